"""Exact resume: a real `keel train` process killed with SIGKILL at several points, resumed with
trainer.resume=auto, must write the same metrics.jsonl / samples.jsonl / health.jsonl / eval.json and the
same final weights, bit for bit, as an uninterrupted run with the same seed (CPU, one thread).

The kill points come from KEEL_FAULT_INJECT (keel.checkpoint.fault_point, a testing aid: the process
sends itself SIGKILL at a named point) plus one SIGKILL from outside at a moment the test does not choose.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from keel.checkpoint import fault_point, verify_checkpoint
from keel.errors import KeelError

# wall-clock metrics differ between any two runs; everything else must be identical
WALL_CLOCK_PREFIXES = ("timing_s/", "perf/")

# A reward that the random-init embedded model can improve on (the share of digits in the completion),
# so the weights really move every step: with the task's own reward every score would be 0, every
# advantage 0 and the weights would never change -- a resume test that could not fail.
DIGIT_SHARE = '''
def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
'''

STEPS, SAVE_FREQ = 6, 2


def train_argv(run_dir: Path, reward_file: Path) -> list[str]:
    return [sys.executable, "-m", "keel", "train", "configs/demo.yaml",
            "actor_rollout_ref.model.path=embedded", f"trainer.run_dir={run_dir}", "trainer.logger=[jsonl]",
            f"trainer.total_training_steps={STEPS}", f"trainer.save_freq={SAVE_FREQ}", "trainer.resume=auto",
            "data.val_size=16", "trainer.val_before_train=false", "trainer.test_freq=3",
            "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # 2 updates per step
            "actor_rollout_ref.rollout.n=4", "data.max_response_length=24",
            "control.type=band",  # a controller whose state (integral, EMA) must survive the restart
            f"reward.functions=[{{name: '{reward_file}:digit_share'}}]"]


def start(run_dir: Path, reward_file: Path, fault: str | None, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a SIGKILL loses buffered output
    env.pop("KEEL_FAULT_INJECT", None)
    if fault:
        env["KEEL_FAULT_INJECT"] = fault
    out = open(run_dir.parent / f"{log_name}.log", "w")
    return subprocess.Popen(train_argv(run_dir, reward_file), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def run(run_dir: Path, reward_file: Path, fault: str | None, log_name: str) -> tuple[int, str]:
    proc = start(run_dir, reward_file, fault, log_name)
    code = proc.wait(timeout=300)
    return code, (run_dir.parent / f"{log_name}.log").read_text()


def metric_lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(WALL_CLOCK_PREFIXES)} for row in rows]


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def ckpt_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> str:
    return (ckpt_dir(run_dir) / "latest").read_text().strip()


def test_kill_anywhere_and_resume_is_bit_identical(tmp_path):
    reward_file = tmp_path / "digit_reward.py"
    reward_file.write_text(DIGIT_SHARE)
    ref, run_dir = tmp_path / "reference", tmp_path / "killed"

    # ---- the uninterrupted reference
    code, log = run(ref, reward_file, None, "reference")
    assert code == 0, log
    ref_metrics = metric_lines(ref)
    # the band's smoothed entropy is logged with the step it smooths: m_1 = H_1, m_2 = 0.5 m_1 + 0.5 H_2 (ema 0.5)
    h1, h2 = ref_metrics[0]["actor/entropy"], ref_metrics[1]["actor/entropy"]
    assert ref_metrics[0]["control/entropy_smoothed"] == pytest.approx(h1)
    assert ref_metrics[1]["control/entropy_smoothed"] == pytest.approx(0.5 * h1 + 0.5 * h2)
    assert [m["step"] for m in ref_metrics] == list(range(1, STEPS + 1))
    scores = [m["critic/score/mean"] for m in ref_metrics]
    assert len(set(scores)) == STEPS  # the policy really changes from step to step
    assert ref_metrics[2]["val/accuracy"] is not None  # the mid-run eval (test_freq=3) is part of the bar

    # ---- A0: killed right after an optimizer step of step 2, before the first checkpoint
    code, log = run(run_dir, reward_file, "kill@update:2", "A0")
    assert code == -signal.SIGKILL, log
    assert [m["step"] for m in metric_lines(run_dir)] == [1] and not ckpt_dir(run_dir).exists()

    # ---- A: no checkpoint to resume from: starts over (step 1 is not logged twice), then is killed
    #      during generation of step 3, with checkpoint 2 complete
    code, log = run(run_dir, reward_file, "kill@gen:3", "A")
    assert code == -signal.SIGKILL, log
    assert "resumed from" not in log
    assert [m["step"] for m in metric_lines(run_dir)] == [1, 2]
    assert latest(run_dir) == "step_000002"

    # ---- B: resumed, killed while writing checkpoint 4 (its files half written in the temp dir)
    code, log = run(run_dir, reward_file, "kill@ckpt_write:4", "B")
    assert code == -signal.SIGKILL, log
    assert "resumed from" in log and "step_000002 (step 2)" in log
    leftovers = [p.name for p in ckpt_dir(run_dir).iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("step_000004.tmp-")
    assert latest(run_dir) == "step_000002" and not (ckpt_dir(run_dir) / "step_000004").exists()
    assert n_lines(run_dir / "metrics.jsonl") == 4  # steps 3, 4 already logged: they are replayed below

    # ---- C: resumed from 2 again, killed right after the first optimizer step of step 5
    code, log = run(run_dir, reward_file, "kill@update:5", "C")
    assert code == -signal.SIGKILL, log
    assert "step_000002 (step 2)" in log
    assert latest(run_dir) == "step_000004"
    assert not [p for p in ckpt_dir(run_dir).iterdir() if ".tmp-" in p.name]  # the crash leftover is gone

    # ---- the newest checkpoint gets corrupted on disk (a truncated weights file)
    weights = ckpt_dir(run_dir) / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    # ---- D: resumed -- must skip step 4 with a clear message and fall back to step 2 -- then
    #      SIGKILLed from outside once step 5 is logged, at whatever moment that happens to be
    proc = start(run_dir, reward_file, None, "D")
    deadline = time.monotonic() + 300
    seen_resume = False
    while time.monotonic() < deadline and proc.poll() is None:
        seen_resume = seen_resume or "resumed from" in (tmp_path / "D.log").read_text()
        if seen_resume and n_lines(run_dir / "metrics.jsonl") >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=60)
    log = (tmp_path / "D.log").read_text()
    assert code == -signal.SIGKILL, log
    assert (f"checkpoint {ckpt_dir(run_dir) / 'step_000004'} is corrupt (model.safetensors: size 1000 bytes"
            in log), log
    assert f"falling back to {ckpt_dir(run_dir) / 'step_000002'}" in log
    assert "step_000002 (step 2)" in log

    # ---- E: resumed, killed when the final checkpoint is renamed into place but `latest` is not updated
    code, log = run(run_dir, reward_file, "kill@ckpt_publish:6", "E")
    assert code == -signal.SIGKILL, log
    assert (ckpt_dir(run_dir) / "step_000006").is_dir()

    # ---- F: resumed to the end
    code, log = run(run_dir, reward_file, None, "F")
    assert code == 0, log

    # ---- the bar: identical logs, eval and weights
    got = metric_lines(run_dir)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, ref_metrics):
        assert mine == theirs, {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs)
                                if mine.get(k) != theirs.get(k)}
    for name in ("samples.jsonl", "health.jsonl", "eval.json"):
        assert (run_dir / name).read_text() == (ref / name).read_text(), name
    final, expected = load_file(run_dir / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    for step in (4, 6):  # the retained checkpoints are intact and equal to the reference's
        mine, theirs = (ckpt_dir(d) / f"step_{step:06d}" for d in (run_dir, ref))
        assert verify_checkpoint(mine) == []
        for f in ("model.safetensors", "optimizer.safetensors"):
            a, b = load_file(mine / f), load_file(theirs / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, f)
    assert latest(run_dir) == "step_000006"
    assert not [p for p in ckpt_dir(run_dir).iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- the fault-injection aid itself


@pytest.mark.parametrize("spec, point, step, expected", [
    (None, "grad", 3, False),
    ("nan@grad:3", "grad", 3, True),
    ("nan@grad:3", "grad", 4, False),
    ("nan@grad:3", "loss", 3, False),
    ("nan@loss:2-4", "loss", 4, True),
    ("nan@loss:2-4", "loss", 5, False),
    ("nan@loss:2-", "loss", 1000, True),
    ("kill@gen:9, nan@grad:1", "grad", 1, True),
])
def test_fault_spec_matching(monkeypatch, spec, point, step, expected):
    if spec is None:
        monkeypatch.delenv("KEEL_FAULT_INJECT", raising=False)
    else:
        monkeypatch.setenv("KEEL_FAULT_INJECT", spec)
    assert fault_point(point, step) is expected


@pytest.mark.parametrize("spec, message", [
    ("nan-grad-3", "must look like ACTION@POINT:STEPS"),
    ("nan@grad:x", "must look like ACTION@POINT:STEPS"),
    ("explode@grad:3", "action must be kill or nan"),
    ("nan@optimizer:3", "point one of gen, loss, grad, update, ckpt_write, ckpt_publish"),
])
def test_bad_fault_spec_is_a_keel_error(monkeypatch, spec, message):
    monkeypatch.setenv("KEEL_FAULT_INJECT", spec)
    with pytest.raises(KeelError, match=message):
        fault_point("grad", 3)


def test_resume_names_config_keys_that_changed(tmp_path):
    import yaml

    from keel.config import load_config, to_dict
    from keel.trainer import config_changes

    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(load_config(None, ["actor_rollout_ref.actor.optim.lr=1e-5"]))))
    same = load_config(None, ["actor_rollout_ref.actor.optim.lr=1e-5"])
    assert config_changes(saved, same) == []
    other = load_config(None, ["actor_rollout_ref.actor.optim.lr=2e-5", "trainer.total_training_steps=7"])
    assert config_changes(saved, other) == ["actor_rollout_ref.actor.optim.lr: 1e-05 -> 2e-05",
                                            "trainer.total_training_steps: 80 -> 7"]
    assert config_changes(tmp_path / "missing.yaml", other) == []
