import random

import pytest
import torch

from keel import rollout
from keel.config import TaskConfig
from keel.modeling import LeanForward, build_embedded, count_parameters
from keel.tasks import TASK_ALPHABET, Problem, solution, split_problems


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_embedded(TASK_ALPHABET, seed=0)
    return model.eval(), tok


def test_embedded_model_size_and_tokenizer(tiny):
    model, tok = tiny
    assert 850_000 < count_parameters(model) < 870_000  # hidden 128, 4 layers, MLP 384, tied head
    ids = tok("23+48= 71.", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10  # one token per character
    assert tok.decode(ids) == "23+48= 71."
    assert model.config.head_dim == 32


def test_lean_forward_matches_hf(tiny):
    model, tok = tiny
    lean = LeanForward(model)
    ids = torch.randint(3, len(tok), (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, lean.forward(ids), atol=1e-5)


def test_incremental_decoding_with_left_padding_matches_hf(tiny):
    model, _ = tiny
    lean = LeanForward(model)
    with torch.no_grad():
        cache = lean.new_cache(2, 10, torch.float32, "cpu")
        prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
        real = prompts != 0
        pos = (real.cumsum(1) - 1).clamp(min=0)
        first = lean.step(prompts, pos, cache, 0, real)
        assert torch.allclose(first[0], model(torch.tensor([[5, 6, 7]])).logits[0, -1], atol=1e-5)
        assert torch.allclose(first[1], model(prompts[1:]).logits[0, -1], atol=1e-5)
        real = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], 1)
        second = lean.step(torch.tensor([[13], [14]]), pos[:, -1:] + 1, cache, 5, real)
        assert torch.allclose(second[0], model(torch.tensor([[5, 6, 7, 13]])).logits[0, -1], atol=1e-5)
        assert torch.allclose(second[1], model(torch.tensor([[8, 9, 10, 11, 12, 14]])).logits[0, -1], atol=1e-5)


def test_rollout_is_seeded_grouped_and_stops_at_eos(tiny):
    model, tok = tiny
    lean = LeanForward(model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("12+34=", "5+6=")]
    run = lambda seed: rollout.generate(model, prompts, 4, 12, 1.0, 1.0, tok.eos_token_id, tok.pad_token_id,
                                        torch.Generator().manual_seed(seed), lean=lean)
    a, b, c = run(0), run(0), run(1)
    assert a.response_ids == b.response_ids and a.response_ids != c.response_ids
    assert len(a.response_ids) == 8 and a.prompt_ids[:4] == [prompts[0]] * 4 and a.prompt_ids[4] == prompts[1]
    for resp, fin in zip(a.response_ids, a.finished):
        assert len(resp) <= 12
        assert (tok.eos_token_id in resp) == fin
        if fin:
            assert resp[-1] == tok.eos_token_id and resp.count(tok.eos_token_id) == 1


def test_rollout_tokens_follow_the_model(tiny):
    """Near-greedy sampling equals argmax decoding with the HF model (cache + compaction are exact)."""
    model, tok = tiny
    lean = LeanForward(model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("12+34=", "5+6=", "99+1=")]
    out = rollout.generate(model, prompts, 2, 8, 1e-4, 1.0, tok.eos_token_id, tok.pad_token_id,
                           torch.Generator().manual_seed(0), lean=lean)
    assert_argmax_tokens(model, out)


def assert_argmax_tokens(model, out):
    """Every sampled token is the HF model's argmax given the prompt and the tokens before it."""
    for prompt, resp in zip(out.prompt_ids, out.response_ids):
        seq = list(prompt)
        with torch.no_grad():
            for token in resp:
                assert token == int(model(torch.tensor([seq])).logits[0, -1].argmax())
                seq.append(token)


def test_task_splits_are_disjoint_and_solutions_check_out():
    train, held = split_problems(TaskConfig(digits=2, n_heldout=256, seed=3))
    assert len(held) == 256 and not set(train) & set(held) and len(train) + len(held) == 90 * 90
    rng = random.Random(0)
    p = Problem(23, 48)
    assert solution(p, "full", rng).endswith("the answer is 71.")
    assert " then 2+4+1=7" in solution(p, "full", rng)
    assert solution(p, "compact", rng) == " 3+8=11, 2+4+1=7, answer 71."
    assert solution(p, "bare", rng) == " 71."
    # a slip is self-consistent: the final answer follows from the wrong column sum
    slipped = [solution(p, "compact", random.Random(s), slip_prob=1.0) for s in range(20)]
    assert all(not s.endswith(" 71.") for s in slipped)
    assert " 3+8=10, 2+4+1=8, answer 80." in slipped  # 11 -> 10 keeps the carry; 7 -> 8 in the tens
    for s in slipped:  # the answer is the written digits of the (wrong) column sums
        units, tens = s.split(", ")[:2]
        u, t = int(units.split("=")[1]), int(tens.split("=")[1])
        assert s.endswith(f"answer {t * 10 + u % 10}.")


def test_temperature_zero_is_greedy_on_both_samplers(tiny):
    """T = 0 (verl's val_kwargs.do_sample=false): every token is the model's argmax, whatever the generator,
    with Keel's sampler and with the transformers fallback; the two agree."""
    model, tok = tiny
    lean = LeanForward(model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("12+34=", "5+6=", "99+1=")]
    go = lambda seed, lean: rollout.generate(model, prompts, 2, 8, 0.0, 1.0, tok.eos_token_id,  # noqa: E731
                                             tok.pad_token_id, torch.Generator().manual_seed(seed), lean=lean)
    a, b, hf = go(0, lean), go(1, lean), go(0, None)
    assert a.response_ids == b.response_ids == hf.response_ids
    assert a.response_ids[0] == a.response_ids[1]  # both members of a group get the same answer
    assert_argmax_tokens(model, a)
