"""Pinned-loss tiny run (torchtune's recipe tier): 3 GRPO steps of the embedded model from a fixed seed.

The per-step ``actor/pg_loss``, ``actor/entropy`` and ``critic/score/mean`` are compared with values measured on
this project's CI machine (x86-64, torch CPU, one thread). A change to the loss, the advantages, the sampler or the
update order moves them; float rounding on another x86 CPU (about 1e-6 relative) does not.

The random-init model never gets a sum right, so the arithmetic reward would be 0 everywhere and every advantage 0.
The run instead scores with the built-in ``format`` reward and ``pattern: '7'`` (a completion that contains a 7 scores
1): groups are mixed, advantages are non-zero and the policy-gradient loss is a real number to pin.
"""

import json

import pytest

from keel.cli import main

ARGS = [
    "train", "configs/demo.yaml",
    "actor_rollout_ref.model.path=embedded",
    "trainer.seed=1", "trainer.total_training_steps=3", "trainer.val_before_train=false", "trainer.logger=[jsonl]",
    "data.val_size=4", "data.max_response_length=16", "data.train_batch_size=4",
    "actor_rollout_ref.rollout.n=4",  # 4 prompts x 4 answers = 16 completions a step
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",  # 2 updates a step
    "actor_rollout_ref.actor.optim.lr=1e-3",  # large enough that steps 2 and 3 see what step 1 changed
    "reward.functions=[{name: format, kwargs: {pattern: '7'}}]",
]

# measured on this machine (token-mean aggregation, the demo's default)
PINNED = {
    "actor/pg_loss": [-0.09788254275918007, -0.018152221105992794, -0.06485135562252253],
    "actor/entropy": [3.8518933057785034, 3.835882544517517, 3.8260509967803955],
    "critic/score/mean": [0.3125, 0.4375, 0.4375],
}
RTOL, ATOL = 1e-3, 1e-4


def run(tmp_path, *extra: str) -> dict[str, list[float]]:
    run_dir = tmp_path / "run"
    assert main([*ARGS, f"trainer.run_dir={run_dir}", *extra]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    return {key: [r[key] for r in rows] for key in PINNED}


def mismatches(got: dict[str, list[float]]) -> list[str]:
    return [f"{key} step {i + 1}: {g!r} != {w!r}" for key, want in PINNED.items()
            for i, (g, w) in enumerate(zip(got[key], want)) if not abs(g - w) <= ATOL + RTOL * abs(w)]


def test_three_grpo_steps_match_the_pinned_losses(tmp_path, capsys):
    got = run(tmp_path)
    assert mismatches(got) == []


@pytest.mark.parametrize("change", ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                                    "algorithm.norm_adv_by_std_in_grpo=false"])
def test_a_changed_loss_does_not_match(tmp_path, capsys, change):
    """The tolerance is tight enough to notice a different aggregation or advantage normalisation."""
    bad = mismatches(run(tmp_path, change))
    assert any(m.startswith("actor/pg_loss step 1:") for m in bad), bad
