"""Non-finite guard: a NaN loss or gradient skips the update (counted in actor/nonfinite_skips);
trainer.max_nonfinite_in_row of them in a row stop the run with exit code 4 and a checkpoint of the
last finite weights. No checkpoint ever holds NaN/inf.

The NaN comes from KEEL_FAULT_INJECT (keel.checkpoint.fault_point, a testing aid): ``nan@grad:S``
fills a real gradient with NaN after backward, ``nan@loss:S`` makes a real mini-batch loss NaN.
Rewards cannot be used for this: they are sanitised before they reach the loss.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from keel import cli
from keel.checkpoint import verify_checkpoint
from keel.errors import EXIT_NONFINITE_STOP

DIGIT_SHARE = '''
def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
'''


def train(tmp_path: Path, monkeypatch, fault: str, *overrides: str) -> tuple[int, Path]:
    reward_file = tmp_path / "digit_reward.py"  # a reward the random-init model improves on: weights move
    reward_file.write_text(DIGIT_SHARE)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("KEEL_FAULT_INJECT", fault)
    code = cli.main(["train", "configs/demo.yaml", "actor_rollout_ref.model.path=embedded",
                     f"trainer.run_dir={run_dir}", "trainer.logger=[jsonl]", "trainer.save_freq=1",
                     "trainer.max_ckpt_to_keep=10", "data.val_size=4", "trainer.val_before_train=false",
                     "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # 2 updates/step
                     "actor_rollout_ref.rollout.n=4", "data.max_response_length=16",
                     f"reward.functions=[{{name: '{reward_file}:digit_share'}}]", *overrides])
    return code, run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensors(run_dir: Path, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / name)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(run_dir: Path) -> bool:
    for d in (run_dir / "checkpoints").glob("step_*"):
        for f in d.glob("*.safetensors"):
            for t in load_file(f).values():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return False
    return True


def test_nan_gradient_skips_the_update_and_the_run_goes_on(tmp_path, monkeypatch):
    code, run_dir = train(tmp_path, monkeypatch, "nan@grad:3", "trainer.total_training_steps=4")
    assert code == 0
    m = metrics(run_dir)
    # 2 mini-batch updates per step; both of step 3 are skipped, the count is cumulative
    assert [row["actor/nonfinite_skips"] for row in m] == [0, 0, 2, 2]
    assert m[2].get("actor/grad_norm") is None  # no finite update in step 3, so no grad norm to report
    assert all(row["actor/grad_norm"] > 0 for i, row in enumerate(m) if i != 2)
    # step 3 left weights and optimizer state exactly as step 2 had them; the other steps changed both
    assert not same(tensors(run_dir, 1), tensors(run_dir, 2))
    assert same(tensors(run_dir, 2), tensors(run_dir, 3))
    assert same(tensors(run_dir, 2, "optimizer.safetensors"), tensors(run_dir, 3, "optimizer.safetensors"))
    assert not same(tensors(run_dir, 3), tensors(run_dir, 4))
    assert not (run_dir / "STOPPED").exists()
    assert all_finite(run_dir)


def test_nan_losses_in_a_row_stop_with_exit_4_and_a_finite_checkpoint(tmp_path, monkeypatch, capsys):
    code, run_dir = train(tmp_path, monkeypatch, "nan@loss:2-", "trainer.total_training_steps=6",
                          "trainer.max_nonfinite_in_row=3")
    assert code == EXIT_NONFINITE_STOP == 4
    # step 2: 2 skipped updates in a row, step 3: 4 >= 3 -> stop after step 3
    m = metrics(run_dir)
    assert [row["step"] for row in m] == [1, 2, 3]
    assert [row["actor/nonfinite_skips"] for row in m] == [0, 2, 4]
    reason = "4 non-finite updates in a row at step 3"
    assert (run_dir / "STOPPED").read_text() == reason + "\n"
    last_event = json.loads((run_dir / "health.jsonl").read_text().splitlines()[-1])
    assert last_event == {"step": 3, "rule": "run", "verdict": "stop", "reason": reason}
    assert f"run stopped at step 3: {reason}" in capsys.readouterr().out
    # the stop checkpoint is complete, `latest` names it, and it holds the last finite state (= step 1's)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000003\n"
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000003") == []
    assert same(tensors(run_dir, 1), tensors(run_dir, 3))
    assert same(tensors(run_dir, 1, "optimizer.safetensors"), tensors(run_dir, 3, "optimizer.safetensors"))
    assert all_finite(run_dir)
    assert same(load_file(run_dir / "model" / "model.safetensors"), tensors(run_dir, 1))
    state = json.loads((run_dir / "checkpoints" / "step_000003" / "state.json").read_text())["trainer"]
    assert (state["step"], state["nonfinite_skips"], state["nonfinite_in_row"]) == (3, 4, 4)


def initial_weights() -> dict[str, torch.Tensor]:
    """The embedded model the run starts from (trainer.seed 1), keyed like a checkpoint's model.safetensors."""
    from keel.modeling import build_embedded
    from keel.tasks import TASK_ALPHABET

    model, _ = build_embedded(TASK_ALPHABET, seed=1)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once


def test_a_diverging_lr_is_caught_in_sampling_restored_and_stops_with_exit_4(tmp_path, monkeypatch, capsys):
    """lr=1e30: each update leaves finite weights of ~1e30 whose logits are NaN. The next step's sampling
    sees them, the weights go back to before that update, and the update counts as non-finite (both
    mini-batches of it). Before: `RuntimeError: probability tensor contains either inf, nan`, exit 1."""
    code, run_dir = train(tmp_path, monkeypatch, "", "trainer.total_training_steps=8", "trainer.max_nonfinite_in_row=3",
                          "actor_rollout_ref.actor.optim.lr=1e30")
    out = capsys.readouterr().out
    assert code == EXIT_NONFINITE_STOP == 4
    m = metrics(run_dir)
    assert [row["step"] for row in m] == [1, 2]
    # step 1: its 2nd mini-batch loss is already NaN (skipped: 1); step 2 re-counts step 1's 2 updates: 2 + its own 1
    assert [row["actor/nonfinite_skips"] for row in m] == [1, 3]
    reason = "4 non-finite updates in a row at step 2 (non-finite logits in sampling)"
    assert (run_dir / "STOPPED").read_text() == reason + "\n"
    assert "step 2: non-finite logits in sampling; restored the weights before step 1's update" in out
    assert f"run stopped at step 2: {reason}" in out
    # the stop checkpoint and the model directory hold the last finite state: the weights the run started from
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002\n"
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000002") == []
    assert same(tensors(run_dir, 2), initial_weights())
    assert same(load_file(run_dir / "model" / "model.safetensors"), initial_weights())
    state = json.loads((run_dir / "checkpoints" / "step_000002" / "state.json").read_text())["trainer"]
    assert (state["step"], state["nonfinite_skips"], state["nonfinite_in_row"]) == (2, 4, 4)
    # the stopped run directory does not block a re-run: resume=auto picks up the checkpoint and stops the same way
    code = cli.main(["train", "configs/demo.yaml", f"trainer.run_dir={run_dir}", "trainer.resume=auto",
                     *(f"{k}={v}" for k, v in _flat_overrides(run_dir).items())])
    assert code == 4
    assert "resumed from" in capsys.readouterr().out
    assert all_finite(run_dir)


def _flat_overrides(run_dir: Path) -> dict:
    """The first run's settings that differ from configs/demo.yaml, as overrides (from its config.yaml)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    a = cfg["actor_rollout_ref"]
    return {"actor_rollout_ref.model.path": "embedded", "trainer.logger": "[jsonl]", "trainer.save_freq": 1,
            "trainer.max_ckpt_to_keep": 10, "data.val_size": 4, "trainer.val_before_train": "false",
            "data.train_batch_size": 8, "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
            "actor_rollout_ref.rollout.n": 4, "data.max_response_length": 16,
            "reward.functions": f"[{{name: '{cfg['reward']['functions'][0]['name']}'}}]",
            "trainer.total_training_steps": 8, "trainer.max_nonfinite_in_row": 3,
            "actor_rollout_ref.actor.optim.lr": a["actor"]["optim"]["lr"]}


def test_weights_made_non_finite_by_a_finite_gradient_are_restored_at_once(tmp_path, monkeypatch):
    """lr * weight_decay = 1e40: the decay factor (1 - lr*wd) overflows to -inf and the weights with it, although
    loss and gradient were finite. The check after the step restores them before anything samples from them."""
    code, run_dir = train(tmp_path, monkeypatch, "", "trainer.total_training_steps=6", "trainer.max_nonfinite_in_row=3",
                          "actor_rollout_ref.actor.optim.lr=1e30", "actor_rollout_ref.actor.optim.weight_decay=1e10")
    assert code == EXIT_NONFINITE_STOP
    m = metrics(run_dir)
    assert [row["step"] for row in m] == [1, 2]  # 2 updates per step, both undone: 2, then 4 >= 3 in a row
    assert [row["actor/nonfinite_skips"] for row in m] == [2, 4]
    assert all(row.get("actor/grad_norm") is None for row in m)
    assert (run_dir / "STOPPED").read_text() == "4 non-finite updates in a row at step 2\n"
    for step in (1, 2):  # every checkpoint holds the starting weights: no update ever stuck
        assert same(tensors(run_dir, step), initial_weights())
    assert all_finite(run_dir)
