"""keel.sft: `keel sft` on a few steps of the embedded task lowers the loss and writes a loadable, cached model."""

import json
import math
import random

import torch
import torch.nn.functional as F

from keel.cli import main
from keel.config import load_config
from keel.modeling import build_embedded, load_model_and_tokenizer
from keel.sft import STAMP, make_batch, settings_key
from keel.tasks import TASK_ALPHABET, split_problems

STEPS = 30


def heldout_loss(model, tokenizer, cfg) -> float:
    """Next-token cross-entropy on 64 held-out worked solutions (no slips), prompt tokens masked."""
    _, held = split_problems(cfg.task)
    ids, targets = make_batch(tokenizer, held[:64], random.Random(123), slip_prob=0.0)
    with torch.no_grad():
        logits = model.eval()(ids).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item()


def test_make_batch_masks_the_prompt_and_predicts_the_next_token():
    cfg = load_config("configs/demo.yaml", [])
    _, tokenizer = build_embedded(TASK_ALPHABET, seed=0)
    train, _ = split_problems(cfg.task)
    ids, targets = make_batch(tokenizer, train[:3], random.Random(0), slip_prob=0.0)
    assert ids.shape == targets.shape and ids.shape[0] == 3
    for i in range(3):
        supervised = (targets[i] != -100).nonzero().flatten()
        first, last = supervised[0].item(), supervised[-1].item()
        assert (targets[i, first : last + 1] != -100).all()  # one contiguous span: the solution + EOS
        assert targets[i, last].item() == tokenizer.eos_token_id
        assert torch.equal(targets[i, first:last], ids[i, first + 1 : last + 1])  # position t predicts token t+1
        prompt = tokenizer.decode(ids[i, : first + 1].tolist())
        assert prompt == train[i].prompt


def test_keel_sft_lowers_the_loss_and_writes_a_loadable_cached_model(tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", "configs/demo.yaml", f"sft.output_dir={out}", f"sft.steps={STEPS}", "sft.batch_size=16"]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(out)
    final = next(line for line in printed if line.startswith(f"sft step {STEPS}/{STEPS} loss "))
    train_loss = float(final.split()[4])

    cfg = load_config("configs/demo.yaml", [f"sft.output_dir={out}", f"sft.steps={STEPS}", "sft.batch_size=16"])
    untrained, tokenizer = build_embedded(TASK_ALPHABET, seed=cfg.sft.seed)
    before = heldout_loss(untrained, tokenizer, cfg)
    trained, loaded_tokenizer = load_model_and_tokenizer(str(out))
    after = heldout_loss(trained, loaded_tokenizer, cfg)
    vocab = len(tokenizer)
    # random init predicts about uniformly: ln V (V = 49 -> 3.89); measured 3.886
    assert vocab == trained.config.vocab_size == 49
    assert abs(before - math.log(vocab)) < 0.1, before
    # 30 steps of 16: measured held-out 1.59, last training batch 1.63 on this machine; demand under half of ln V
    assert after < 0.5 * before, (before, after)
    assert train_loss < 0.5 * math.log(vocab), train_loss
    assert loaded_tokenizer("3+4=", add_special_tokens=False)["input_ids"] == \
        tokenizer("3+4=", add_special_tokens=False)["input_ids"]

    stamp = json.loads((out / STAMP).read_text())
    assert stamp["key"] == settings_key(cfg) and stamp["sft"]["steps"] == STEPS
    weights = (out / "model.safetensors").read_bytes()

    assert main(args) == 0  # same settings: reused, not retrained
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"warm-start model cached at {out} (same settings); skipping SFT", str(out)]
    assert (out / "model.safetensors").read_bytes() == weights
    other = load_config("configs/demo.yaml", [f"sft.output_dir={out}", f"sft.steps={STEPS + 1}"])
    assert settings_key(other) != settings_key(cfg)  # different settings would retrain
