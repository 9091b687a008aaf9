"""Self-healing end to end: a run that goes bad with monitor.action=rollback recovers and finishes healthy."""
import json

import pytest

from conftest import run_keel

pytestmark = pytest.mark.slow

STEPS = 20
# The warm-started tiny model at 6x the demo's learning rate with small groups (4 prompts x 4) and a weak KL
# anchor (0.01): the policy drifts off its reference and the embedded KL rule (bad > 0.25 for 3 steps) fails on
# the "high" side. Measured on the AMD EPYC CI machine: actor/kl_loss 0.35, 0.39, 0.56 at steps 6-8, rollback at
# step 8 to the checkpoint of step 2 with kl_coef 0.01 -> max(0.02, 0.01 + 4) = 4.01; after it the KL stayed at
# or under 0.21 for the rest of the run. (At lr 2e-4 the same blow-up came at step 5-7 on an Intel Xeon but only
# at step 20 here: float rounding differs between the machines' matmul kernels and sampling amplifies it, so
# the push and the anchor are set with margin rather than at the edge.)
ARGS = ["trainer.logger=[jsonl]", f"trainer.total_training_steps={STEPS}", "trainer.save_freq=2",
        "trainer.val_before_train=false", "data.val_size=16", "data.train_batch_size=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.optim.lr=3e-4", "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.kl_loss_coef=0.01", "monitor.rules=embedded", "monitor.action=rollback",
        "monitor.max_rollbacks=2", "control.type=fixed", "control.rollback_kl_step=4.0", "control.max_kl_coef=5"]
# the embedded rule set's KL rule alone: the embedded entropy band's upper edge (0.15) sits at the warm start's
# own entropy, so with it the overall verdict flickers between good and watch whatever the KL does
KL_RULE = """
- metric: actor/kl_loss
  good: [null, 0.15]
  bad: [0.25, null]
  patience: 3
"""


def test_kl_blowup_rolls_back_and_recovers(sft_model, tmp_path):
    rules = tmp_path / "kl.yaml"
    rules.write_text(KL_RULE)
    run_dir = tmp_path / "run"
    code, out, err = run_keel(["train", "configs/demo.yaml", f"trainer.run_dir={run_dir}", *ARGS,
                               f"monitor.rules={rules}"], timeout=300)
    assert code == 0, (out[-2000:], err[-2000:])
    assert not (run_dir / "STOPPED").exists()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the step budget is spent, not replayed
    events = [json.loads(line) for line in open(run_dir / "health.jsonl")]
    rollbacks = [e for e in events if e["verdict"] == "rollback"]
    assert len(rollbacks) == 1, events
    rb = rollbacks[0]
    assert rb["rule"] == "actor/kl_loss" and "rolled back to step" in rb["reason"] and "kl_coef 4.01" in rb["reason"]
    target = int(rb["reason"].split("rolled back to step ")[1].split(",")[0])
    assert target % 2 == 0 and target < rb["step"]
    # a checkpoint is only written while the verdict is good, so the target step was judged good
    assert next(r for r in rows if r["step"] == target)["health/overall"] == 0
    before = [r for r in rows if r["step"] <= rb["step"]]
    after = [r for r in rows if r["step"] > rb["step"]]
    # the coefficients in force: configured up to the rollback, raised KL anchor after it
    assert all(r["actor/kl_coef"] == pytest.approx(0.01) for r in before)
    assert all(r["actor/kl_coef"] == pytest.approx(4.01) for r in after)
    assert all(r["actor/entropy_coeff"] == 0.0 for r in rows)
    assert before[-1]["actor/kl_loss"] > 0.25 and before[-1]["health/overall"] == 2
    assert len(after) >= 5 and after[-1]["control/rollbacks"] == 1
    # recovered: never bad again (the KL rule needs 3 steps in a row over 0.25), and the KL of the last five steps
    # is on average well under the bad edge and under the blow-up's peak. (Single steps after the rollback were
    # measured up to 0.21 on the AMD EPYC CI machine and 0.25 on an Intel Xeon: a step can touch the edge.)
    kl_after = [round(r["actor/kl_loss"], 4) for r in after]
    assert all(r["health/overall"] < 2 for r in after), kl_after
    assert sum(kl_after[-5:]) / 5 < 0.2 and max(kl_after[-5:]) < before[-1]["actor/kl_loss"], kl_after
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["steps"] == STEPS and ev["n_heldout"] == 16
    assert "rolled back to step" in out


def test_no_good_checkpoint_means_stop(sft_model, tmp_path):
    """lr 1e-3 wrecks the policy before the first checkpoint: nothing healthy to return to, so the run stops."""
    run_dir = tmp_path / "run"
    args = [a for a in ARGS if "optim.lr" not in a and "total_training_steps" not in a]
    code, out, err = run_keel(["train", "configs/demo.yaml", f"trainer.run_dir={run_dir}", *args,
                               "actor_rollout_ref.actor.optim.lr=1e-3", "trainer.total_training_steps=8"], timeout=300)
    assert code == 3, (out[-2000:], err[-2000:])
    reason = (run_dir / "STOPPED").read_text().strip()
    assert reason.startswith("actor/kl_loss") and reason.endswith("no healthy checkpoint to roll back to"), reason
    events = [json.loads(line) for line in open(run_dir / "health.jsonl")]
    assert not [e for e in events if e["verdict"] == "rollback"]


# An entropy floor just under the warm start (0.14-0.16 nats in the first steps): at lr 1e-4 with no bonus the
# policy sharpens to 0.129, 0.136 at steps 4-5 (measured on the AMD EPYC CI machine; 0.128, 0.125 on an Intel
# Xeon), the floor fails on the "low" side for 2 steps, and the rollback restores step 2's checkpoint with
# entropy_coeff 0 -> max(2 * 0, 0 + 0.2) = 0.2; entropy then rose to 0.15-0.16 and stayed good.
COLLAPSE_RULES = """
- metric: actor/entropy
  good: [0.145, null]
  bad: [null, 0.14]
  patience: 2
"""


def test_entropy_collapse_rolls_back_with_more_bonus_and_recovers(sft_model, tmp_path):
    rules = tmp_path / "floor.yaml"
    rules.write_text(COLLAPSE_RULES)
    run_dir = tmp_path / "run"
    steps = 14
    code, out, err = run_keel(["train", "configs/demo_band.yaml", "control.type=fixed", f"trainer.run_dir={run_dir}",
                               "trainer.logger=[jsonl]", f"trainer.total_training_steps={steps}", "trainer.save_freq=2",
                               "trainer.val_before_train=false", "data.val_size=16", f"monitor.rules={rules}",
                               "monitor.action=rollback", "control.rollback_entropy_step=0.2"], timeout=300)
    assert code == 0, (out[-2000:], err[-2000:])
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    events = [json.loads(line) for line in open(run_dir / "health.jsonl")]
    rollbacks = [e for e in events if e["verdict"] == "rollback"]
    assert len(rollbacks) == 1, events
    rb = rollbacks[0]
    assert rb["rule"] == "actor/entropy" and "entropy_coeff 0.2" in rb["reason"], rb
    before = [r for r in rows if r["step"] <= rb["step"]]
    after = [r for r in rows if r["step"] > rb["step"]]
    assert before[-1]["actor/entropy"] < 0.14 and before[-1]["health/overall"] == 2  # collapsed
    assert all(r["actor/entropy_coeff"] == 0.0 for r in before)
    assert all(r["actor/entropy_coeff"] == pytest.approx(0.2) for r in after)  # more entropy pressure
    # recovered: entropy back above the floor and judged good for the rest of the run
    assert all(r["health/overall"] == 0 for r in after[-5:]) and min(r["actor/entropy"] for r in after[-5:]) > 0.145
    assert rows[-1]["step"] == steps and not (run_dir / "STOPPED").exists()
