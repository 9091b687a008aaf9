"""keel.evaluate: mean@k / pass@k on a tiny model and a handful of embedded problems."""

import json

import pytest
import torch

from keel.config import load_config
from keel.data import PromptRow
from keel.evaluate import evaluate
from keel.modeling import LeanForward, build_embedded
from keel.rewards import build_reward
from keel.tasks import TASK_ALPHABET, split_problems

N_PROBLEMS = 6


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_embedded(TASK_ALPHABET, seed=0)
    cfg = load_config("configs/demo.yaml", ["actor_rollout_ref.model.path=embedded", "data.max_response_length=12"])
    _, held = split_problems(cfg.task)
    problems = held[:N_PROBLEMS]
    rows = [PromptRow(p.prompt, str(p.answer), p.data_source, {}, {}) for p in problems]
    ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    return model, LeanForward(model), tokenizer, ids, rows, cfg


def run(tiny, reward, tmp_path, name, **kw):
    model, lean, tokenizer, ids, rows, cfg = tiny
    out = tmp_path / f"{name}.jsonl"
    result = evaluate(model, lean, tokenizer, ids, rows, reward, max_new_tokens=cfg.data.max_response_length,
                      out_file=out, **kw)
    return result, [json.loads(line) for line in out.read_text().splitlines()]


def test_greedy_is_deterministic_whatever_the_seed(tiny, tmp_path):
    reward = build_reward(tiny[5])
    a, rows_a = run(tiny, reward, tmp_path, "a", k=3, temperature=0.0, seed=0)
    b, rows_b = run(tiny, reward, tmp_path, "b", k=3, temperature=0.0, seed=12345)
    assert rows_a == rows_b and a == b
    assert len(rows_a) == N_PROBLEMS and a["n"] == N_PROBLEMS and a["k"] == 3 and a["temperature"] == 0.0
    for row in rows_a:  # greedy: the k answers to a problem are one answer
        assert len(row["completions"]) == 3 and len(set(row["completions"])) == 1
        assert row["scores"][0] == row["scores"][1] == row["scores"][2]
    # greedy mean@k equals pass@k: a problem is all right or all wrong
    assert a["mean@3"] == a["pass@3"]
    # sampling does depend on the seed (and the same seed repeats)
    s1, rows_s1 = run(tiny, reward, tmp_path, "s1", k=3, temperature=1.0, seed=0)
    s2, rows_s2 = run(tiny, reward, tmp_path, "s2", k=3, temperature=1.0, seed=0)
    s3, rows_s3 = run(tiny, reward, tmp_path, "s3", k=3, temperature=1.0, seed=1)
    assert rows_s1 == rows_s2
    assert [r["completions"] for r in rows_s1] != [r["completions"] for r in rows_s3]


def test_evaluate_restores_training_mode(tiny, tmp_path):
    model = tiny[0]
    model.train()
    run(tiny, build_reward(tiny[5]), tmp_path, "mode", k=1, temperature=0.0)
    assert model.training
    model.eval()
    run(tiny, build_reward(tiny[5]), tmp_path, "mode", k=1, temperature=0.0)
    assert not model.training


class HandScores:
    """A reward whose score for answer j of problem `gold` is SCORES[gold][j] (whatever the text)."""

    SCORES = {
        "p0": [1.0, 0.0, 0.0],  # one of three right
        "p1": [0.0, 0.0, 0.0],  # none
        "p2": [1.0, 1.0, 1.0],  # all
        "p3": [0.0, 0.5, -1.0],  # partly-right counts as right (> 0), a penalty as wrong
    }

    def __init__(self):
        self.seen: dict[str, int] = {}

    def __call__(self, prompts, completions, rows, response_lengths):
        scores = []
        for row in rows:
            j = self.seen.get(row.ground_truth, 0)
            self.seen[row.ground_truth] = j + 1
            scores.append(self.SCORES[row.ground_truth][j])
        return scores, {}


def test_mean_and_pass_at_k_by_hand(tiny, tmp_path):
    model, lean, tokenizer, ids, _, _ = tiny
    rows = [PromptRow("q", f"p{i}", "embedded/addition", {}, {}) for i in range(4)]
    reward = HandScores()
    result = evaluate(model, lean, tokenizer, ids[:4], rows, reward, k=3, max_new_tokens=4, temperature=1.0,
                      out_file=tmp_path / "hand.jsonl")
    # correct (> 0): p0 1/3, p1 0/3, p2 3/3, p3 1/3 -> mean@3 = 5/12; problems with one right: 3 of 4
    assert result["mean@3"] == pytest.approx(5 / 12, abs=1e-12)
    assert result["pass@3"] == pytest.approx(3 / 4, abs=1e-12)
    # the mean raw score: (1 + 0 + 3 + (0 + 0.5 - 1)) / 12 = 3.5 / 12
    assert result["mean_score"] == pytest.approx(3.5 / 12, abs=1e-12)
    assert (result["n"], result["k"]) == (4, 3)
    assert reward.seen == {"p0": 3, "p1": 3, "p2": 3, "p3": 3}  # k answers per problem, each scored once
    saved = [json.loads(line) for line in (tmp_path / "hand.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in saved] == [HandScores.SCORES[f"p{i}"] for i in range(4)]
    assert [r["ground_truth"] for r in saved] == ["p0", "p1", "p2", "p3"]


def test_k1_mean_equals_pass(tiny):
    model, lean, tokenizer, ids, _, _ = tiny
    rows = [PromptRow("q", f"p{i}", "embedded/addition", {}, {}) for i in range(4)]
    reward = HandScores()
    result = evaluate(model, lean, tokenizer, ids[:4], rows, reward, k=1, max_new_tokens=4, temperature=1.0)
    # first answers: 1.0, 0.0, 1.0, 0.0 -> 2 of 4
    assert result == {"mean@1": 0.5, "pass@1": 0.5, "mean_score": 0.5, "n": 4, "k": 1, "temperature": 1.0}
