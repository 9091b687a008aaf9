"""Self-healing end to end: a collapsing run with monitor.action=rollback recovers and finishes healthy."""
import json

import pytest

from conftest import run_keel

pytestmark = pytest.mark.slow

# A fast-collapsing setup on the warm-started tiny model: a 10x learning rate, no entropy bonus, small groups.
# The entropy rule is tightened (the warm start samples ~0.15 nats/token) so the collapse is judged bad
# within a few steps; the rest of the embedded rule set stays as shipped.
COLLAPSE_RULE = "[{metric: actor/entropy, good: [0.12, null], bad: [null, 0.10], from_step: 2, patience: 2}]"
STEPS = 16


def test_collapse_rolls_back_and_recovers(sft_model, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_keel([
        "train", "configs/demo.yaml", f"trainer.run_dir={run_dir}", "trainer.logger=[jsonl]",
        f"trainer.total_training_steps={STEPS}", "trainer.save_freq=2", "trainer.val_before_train=false",
        "data.val_size=16", "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.entropy_coeff=0", "monitor.action=rollback", "monitor.max_rollbacks=2",
        f"monitor.extra_rules={COLLAPSE_RULE}", "control.rollback_entropy_step=0.1",
    ], timeout=300)
    assert code == 0, (out[-2000:], err[-2000:])
    assert not (run_dir / "STOPPED").exists()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the step budget is spent, not replayed
    events = [json.loads(line) for line in open(run_dir / "health.jsonl")]
    rollbacks = [e for e in events if e["verdict"] == "rollback"]
    assert len(rollbacks) == 1, events
    rb = rollbacks[0]
    assert rb["rule"] == "actor/entropy" and "rolled back to step" in rb["reason"], rb
    target = int(rb["reason"].split("rolled back to step ")[1].split(",")[0])
    assert target % 2 == 0 and target < rb["step"]
    # the coefficient in force: 0 up to the rollback, then max(2*0, 0 + 0.1) = 0.1 for the rest of the run
    assert all(r["actor/entropy_coeff"] == 0.0 for r in rows if r["step"] <= rb["step"])
    assert all(r["actor/entropy_coeff"] == pytest.approx(0.1) for r in rows if r["step"] > rb["step"])
    assert rows[-1]["control/rollbacks"] == 1
    # recovered: the collapsed entropy came back above the rule's bad edge and the run ends judged good
    collapsed = [r["actor/entropy"] for r in rows if r["step"] <= rb["step"]][-1]
    assert collapsed < 0.12
    assert rows[-1]["actor/entropy"] > 0.12 and rows[-1]["health/overall"] == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["steps"] == STEPS and ev["n_heldout"] == 16
