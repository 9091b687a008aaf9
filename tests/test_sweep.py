"""keel sweep: outcome classification on hand-made traces, the sweep file check, and real tiny sweeps
(kill + resume, a failed run, an Optuna search with a health-pruned trial)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from keel.config import parse_override
from keel.errors import KeelError
from keel.sweep import (agreement, classify_outcome, last_error_line, load_sweep_spec, outcome_counts, override_text,
                        parse_seeds, run_sweep, setting_rows, sweep_main)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "sweeps" / "smoke.yaml"
SEED = REPO / "sweeps" / "seed_v0_v3.yaml"
EC = "actor_rollout_ref.actor.entropy_coeff"
HEALTHY = {"actor/entropy": 0.06, "actor/kl_loss": 0.01, "token/logical_connectives": 1.0,
           "response_length/pos/mean": 37.0, "actor/pg_loss": 0.1}
# the traces' own rule set (the shipped ones get re-tuned): a bad streak starting at step s is bad at s + 4
RULES = """
- {metric: actor/entropy, good: [0.02, 0.15], bad: [[null, 0.005], [1.0, null]], from_step: 5, patience: 5}
- {metric: token/logical_connectives, good: [0.2, null], bad: [null, 0.02], patience: 5}
- {metric: actor/kl_loss, good: [null, 0.5], bad: [2.0, null], patience: 5}
"""


def write_trace(run_dir: Path, n: int, **changes) -> Path:
    """`n` healthy steps; changes = {metric: (from_step, value)} replaces the value from that step on.

    The run's config.yaml points monitor.rules at RULES, as `keel train` would write it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "rules.yaml").write_text(RULES)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"monitor": {"rules": str(run_dir / "rules.yaml")}}))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, n + 1):
            row = {"step": step, **HEALTHY}
            for key, (start, value) in changes.items():
                if step >= start:
                    row[key] = value
            f.write(json.dumps(row) + "\n")  # json writes float("nan") as NaN, as verl's loggers do
    return run_dir


# --------------------------------------------------------------------------- outcomes


def test_stable_trace(tmp_path):
    assert classify_outcome(write_trace(tmp_path / "r", 12), 0) == ("Stable", None)


def test_entropy_collapse_is_bad_after_patience(tmp_path):
    run = write_trace(tmp_path / "r", 15, **{"actor/entropy": (6, 0.003)})
    assert classify_outcome(run, 0) == ("Collapsed", 10)  # bad steps 6, 7, 8, 9, 10


def test_entropy_before_from_step_is_not_judged(tmp_path):
    run = write_trace(tmp_path / "r", 15, **{"actor/entropy": (1, 0.003)})
    assert classify_outcome(run, 0) == ("Collapsed", 9)  # judged from step 5: bad 5..9


def test_too_random_and_kl_divergence(tmp_path):
    assert classify_outcome(write_trace(tmp_path / "a", 15, **{"actor/entropy": (8, 1.5)}), 0) == ("Too random", 12)
    assert classify_outcome(write_trace(tmp_path / "b", 15, **{"actor/kl_loss": (3, 3.0)}), 0) == ("Diverged", 7)


def test_connectives_collapse_counts_as_collapsed(tmp_path):
    run = write_trace(tmp_path / "r", 12, **{"token/logical_connectives": (2, 0.0)})
    assert classify_outcome(run, 0) == ("Collapsed", 6)


def test_earliest_problem_names_the_outcome(tmp_path):
    # KL bad from step 2 (bad at 6) and a non-finite loss at step 9: the KL came first
    run = write_trace(tmp_path / "r", 12, **{"actor/kl_loss": (2, 3.0), "actor/pg_loss": (9, float("nan"))})
    assert classify_outcome(run, 0) == ("Diverged", 6)
    run = write_trace(tmp_path / "s", 12, **{"actor/entropy": (6, 0.003), "actor/pg_loss": (4, float("inf"))})
    assert classify_outcome(run, 0) == ("Diverged", 4)


def test_task_score_regression_is_its_own_outcome(tmp_path):
    # every proxy healthy, the training score falls 0.6 -> 0.3 at step 6: the embedded score rule (EMA 0.95,
    # > 0.1 below its best for 15 steps) calls it: k steps after the fall the gap is 0.3 (1 - 0.95^k) > 0.1 from
    # k = 8 (step 13, 0.3 x 0.3366 = 0.101): bad at step 27
    run = write_trace(tmp_path / "r", 35)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 36):
            f.write(json.dumps({"step": step, **HEALTHY, "critic/score/mean": 0.6 if step < 6 else 0.3}) + "\n")
    assert classify_outcome(run, 0, rules="embedded") == ("Regressed", 27)
    # held-out accuracy below its first evaluation (val/accuracy every 10 steps) = Regressed at that evaluation
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            val = {10: 0.43, 20: 0.40, 30: 0.37}.get(step)  # 3 points under the start is noise; 6 is a fall
            f.write(json.dumps({"step": step, **HEALTHY, "critic/score/mean": 0.6,
                                **({"val/accuracy": val} if val else {})}) + "\n")
    assert classify_outcome(run, 0, rules="embedded") == ("Regressed", 30)


def test_exit_codes(tmp_path):
    run = write_trace(tmp_path / "r", 7)
    assert classify_outcome(run, 4) == ("Diverged", 7)  # the non-finite guard
    assert classify_outcome(run, 3) == ("Stopped early", 7)  # monitor stop, nothing bad in the replay
    assert classify_outcome(run, -signal.SIGTERM) == ("Stopped early", 7)
    assert classify_outcome(run, -signal.SIGKILL) == ("Failed", None)
    assert classify_outcome(run, 1) == ("Failed", None)
    assert classify_outcome(tmp_path / "never_started", 2) == ("Failed", None)
    (run / "PRUNED").write_text("pruned by the median pruner at step 7\n")
    assert classify_outcome(run, -signal.SIGTERM) == ("Pruned", 7)
    run = write_trace(tmp_path / "s", 10, **{"actor/entropy": (2, 0.003)})  # bad at 9, then pruned at 10
    (run / "PRUNED").write_text("pruned by the median pruner at step 10\n")
    assert classify_outcome(run, -signal.SIGTERM) == ("Collapsed", 9)


def test_rules_argument_and_run_config_pick_the_rule_set(tmp_path):
    # the lab log's V1 "Too random (8.0)" on the Qwen3 scale; lablog judges its bad ranges after 10 settling steps
    run = write_trace(tmp_path / "r", 110, **{"actor/entropy": (1, 8.0), "response_length/pos/mean": (1, 900.0)})
    assert classify_outcome(run, None, rules="lablog") == ("Too random", 14)  # bad steps 10..14
    assert classify_outcome(run, None) == ("Too random", 9)  # the run's own RULES: bad > 1.0 from step 5
    (run / "config.yaml").write_text(yaml.safe_dump({"monitor": {"rules": "lablog", "extra_rules": [
        {"metric": "actor/entropy", "good": [3.0, 6.0], "bad": [[None, 1.0], [9.0, None]]}]}}))
    assert classify_outcome(run, 0) == ("Stable", None)  # its extra rule replaced lablog's entropy rule


def test_last_error_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("$ keel train x\nrun dir: x\nkeel: error: config key 'a' is unknown\n\n")
    assert last_error_line(log, 2) == "keel: error: config key 'a' is unknown"
    log.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n")
    assert last_error_line(log, 1) == "RuntimeError: boom"
    assert last_error_line(log, -9) == "killed by signal SIGKILL"


# --------------------------------------------------------------------------- the sweep file


def write_spec(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "demo.yaml"), **body}, sort_keys=False))
    return path


def test_override_text_round_trips_through_the_config_parser():
    for value in (1e-05, 0.001, 0.0, 3, True, "band", [1, 2]):
        assert parse_override(f"k={override_text(value)}")[1] == value
    assert override_text(1e-05) == "1.0e-05"


def test_grid_and_list_expand_with_names(tmp_path):
    spec = load_sweep_spec(write_spec(tmp_path, {
        "overrides": {"trainer.total_training_steps": 7},
        "runs": [{"name": "V0", "set": {"actor_rollout_ref.actor.entropy_coeff": 0}}],
        "grid": {"name": "ec{entropy_coeff}-kl{actor_rollout_ref.actor.kl_loss_coef}",
                 "params": {"actor_rollout_ref.actor.entropy_coeff": [0.02, 0.3],
                            "actor_rollout_ref.actor.kl_loss_coef": [0.001]}}}), ["trainer.seed=5"])
    assert [r.name for r in spec.runs] == ["V0", "ec0.02-kl0.001", "ec0.3-kl0.001"]
    assert spec.runs[2].values == {EC: 0.3, "actor_rollout_ref.actor.kl_loss_coef": 0.001}
    assert spec.summary_step == 7 and spec.overrides == {"trainer.total_training_steps": 7, "trainer.seed": 5}
    assert spec.run_overrides(spec.runs[1]) == [
        "trainer.total_training_steps=7", "trainer.seed=5", "actor_rollout_ref.actor.entropy_coeff=0.02",
        "actor_rollout_ref.actor.kl_loss_coef=0.001", 'trainer.logger=["jsonl"]']


@pytest.mark.parametrize("body, words", [
    ({"runs": [{"name": "a", "set": {"actor_rollout_ref.actor.entropy_coef": 0.1}}]},
     ["key 'runs[1].set'", "did you mean 'actor_rollout_ref.actor.entropy_coeff'"]),
    ({"grid": {"params": {"actor_rollout_ref.actor": [1]}}}, ["key 'grid.params'", "is a config section"]),
    ({"runs": [{"name": "a"}], "n_job": 2}, ["key 'n_job' is unknown", "did you mean 'n_jobs'"]),
    ({"runs": [{"name": "a b"}]}, ["key 'runs[1].name'"]),
    ({"runs": [{"name": "a"}, {"name": "a"}]}, ["duplicate", ": a"]),
    ({}, ["key 'runs'", "nothing to run"]),
    ({"optuna": {"params": {EC: {"low": 0, "high": 0.3, "log": True}}, "n_trials": 2}},
     ["key 'optuna.params.actor_rollout_ref.actor.entropy_coeff'", "not a valid range"]),
    ({"optuna": {"params": {EC: [0.001, 0.3]}}}, ["'optuna.n_trials' is required"]),
    ({"runs": [{"name": "a"}], "overrides": {"actor_rollout_ref.rollout.n": 1}}, ["key 'overrides'", "must be >= 2"]),
])
def test_bad_sweep_files_name_file_and_key(tmp_path, body, words):
    path = write_spec(tmp_path, body)
    with pytest.raises(KeelError) as e:
        load_sweep_spec(path)
    assert f"sweep file '{path}'" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_base_and_shipped_seed_sweep(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: nope.yaml\nruns: [{name: a}]\n")
    with pytest.raises(KeelError, match="key 'base' names .*nope.yaml', which does not exist"):
        load_sweep_spec(path)
    seed = load_sweep_spec(SEED)  # the shipped lab-log sweep: V0-V3, the entropy-preserving losses, keel; 3 seeds
    settings = list(dict.fromkeys(r.setting for r in seed.runs))
    assert settings == ["V0", "V1", "V2", "V3", "clip_cov", "kl_cov", "top_entropy", "keel"] and seed.seeds == [1, 2, 3]
    assert len(seed.runs) == 24 and seed.n_jobs == 2 and seed.summary_step == 100
    assert seed.runs[3].name == "V3-s1" and seed.runs[3].values == {
        EC: 0.01, "actor_rollout_ref.actor.kl_loss_coef": 0.05, "trainer.seed": 1}
    assert seed.runs[-1].name == "keel-s3" and seed.runs[-1].values == {"control.type": "dual", "trainer.seed": 3}


# --------------------------------------------------------------------------- real sweeps


def read_summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if text in (p / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to check for orphan runs")
def test_killed_sweep_resumes_and_failed_run_does_not_break_it(tmp_path):
    out = tmp_path / "sw"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep_log = tmp_path / "sweep.log"
    with open(sweep_log, "w") as log_file:
        sweep = subprocess.Popen([sys.executable, "-m", "keel", "sweep", str(SMOKE), "--out", str(out)], cwd=REPO,
                                 env=env, stdout=log_file, stderr=subprocess.STDOUT)
    first, second = out / "runs" / "ec0" / "sweep_run.json", out / "runs" / "ec0.01" / "train.log"
    deadline = time.time() + 120
    while not (first.is_file() and second.is_file()) and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.1)
    assert first.is_file() and second.is_file(), \
        f"the first run never finished (sweep exit {sweep.poll()}): {sweep_log.read_text()[-2000:]}"
    sweep.kill()  # SIGKILL mid-way: the second run is in flight
    sweep.wait()
    for _ in range(100):  # the in-flight run dies with its sweep (PR_SET_PDEATHSIG), no orphan keeps writing
        if not processes_mentioning(f"trainer.run_dir={out}/runs/ec0.01"):
            break
        time.sleep(0.1)
    assert not processes_mentioning(f"trainer.run_dir={out}/runs/ec0.01")
    partial = read_summary(out)
    assert [partial[n]["outcome"] for n in ("ec0", "ec0.01", "bad_group")] == ["Stable", "Pending", "Pending"], \
        (partial, sweep_log.read_text()[-2000:])
    record = first.read_text()

    lines = []
    run_sweep(SMOKE, out, log=lines.append)
    assert "3 runs (1 finished, 2 to run)" in lines[0], lines
    assert first.read_text() == record  # the finished run was skipped, not re-run
    rows = read_summary(out)
    train_log = (out / "runs" / "ec0.01" / "train.log").read_text()[-2000:]
    assert [rows[n]["outcome"] for n in ("ec0", "ec0.01")] == ["Stable", "Stable"], (rows, lines, train_log)
    assert [rows[n]["outcome"] for n in ("ec0", "ec0.01", "bad_group")] == ["Stable", "Stable", "Failed"]
    assert [rows[n]["entropy_coeff"] for n in ("ec0", "ec0.01")] == ["0.0", "0.01"]
    assert [rows[n]["rollout.n"] for n in ("ec0", "bad_group")] == ["4", "1"]
    assert rows["ec0.01"]["steps"] == "3" and rows["ec0.01"]["exit_code"] == "0" and rows["ec0.01"]["bad_step"] == ""
    assert float(rows["ec0.01"]["entropy_coeff@3"]) == 0.01 and float(rows["ec0.01"]["entropy@3"]) > 0
    assert rows["bad_group"]["exit_code"] == "2" and rows["bad_group"]["steps"] == ""
    assert rows["bad_group"]["note"] == ("keel: error: config key 'actor_rollout_ref.rollout.n' must be >= 2 "
                                         "(GRPO needs a group), got 1")
    md = (out / "summary.md").read_text()
    assert "outcomes: 2 Stable, 1 Failed" in md and "| bad_group | list | 0.0 | 1 | Failed |" in md

    lines.clear()  # a third time: nothing left to do
    assert sweep_main([str(SMOKE), "--out", str(out), "--dry-run"]) == 0
    run_sweep(SMOKE, out, log=lines.append)
    assert "3 runs (3 finished, 0 to run)" in lines[0] and not any(x.startswith("start") for x in lines)


def test_optuna_search_prunes_by_health_and_by_median_then_resumes(tmp_path):
    smoke = yaml.safe_load(SMOKE.read_text())
    # the objective is the logged entropy_coeff itself (minimised), so every pruning decision is exact; a
    # rule calls entropy_coeff > 0.05 bad at once, so the enqueued 0.1 trial stops itself at step 1 (exit 3)
    # (the random-init model's near-uniform entropy and missing connectives are declared fine here)
    rules = [{"metric": "actor/entropy_coeff", "bad": [0.05, None], "from_step": 1},
             {"metric": "actor/entropy", "good": [0, None]}, {"metric": "token/logical_connectives", "good": [0, None]}]
    spec = write_spec(tmp_path, {
        "name": "search", "n_jobs": 1, "poll_s": 0.1,
        "overrides": {**smoke["overrides"], "trainer.total_training_steps": 6, "monitor.extra_rules": rules},
        "optuna": {"n_trials": 3, "seed": 0, "objective": "actor/entropy_coeff", "direction": "minimize",
                   "n_startup_trials": 1, "n_warmup_steps": 2, "params": {EC: {"low": 0.0, "high": 0.2}},
                   "enqueue": [{EC: 0.0}, {EC: 0.1}, {EC: 0.04}]}})
    out = tmp_path / "sw"
    run_sweep(spec, out, log=lambda _: None)
    rows = read_summary(out)
    assert list(rows) == ["trial_0000", "trial_0001", "trial_0002"]
    ok, bad, pruned = rows["trial_0000"], rows["trial_0001"], rows["trial_0002"]
    assert (ok["outcome"], ok["steps"], ok["objective"], ok["entropy_coeff"]) == ("Stable", "6", "0.0", "0.0")
    assert (bad["outcome"], bad["bad_step"], bad["steps"], bad["exit_code"]) == ("Too random", "1", "1", "3")
    assert bad["note"].startswith("actor/entropy_coeff 0.1 > 0.05 for 1 step")
    # 0.04 at step 2 trails the completed trial's 0.0: SIGTERM long before its 6th step
    assert (pruned["outcome"], pruned["exit_code"]) == ("Pruned", str(-signal.SIGTERM))
    # the sweep polls the run's metrics, so under load it may first see step 3 or later (never before warm-up)
    m = re.fullmatch(r"pruned by the median pruner at step (\d+): actor/entropy_coeff 0.04 trails the other trials",
                     pruned["note"])
    assert m and 2 <= int(m.group(1)) == int(pruned["bad_step"]) <= int(pruned["steps"]) < 6, pruned

    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"] and study.trials[0].value == 0.0
    lines = []
    run_sweep(spec, out, log=lines.append)  # the budget is spent: no new trial
    assert "3 trials (3 used)" in lines[0] and not any(x.startswith("start") for x in lines)
    assert len(optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'optuna.db'}").trials) == 3


# --------------------------------------------------------------------------- seeds


def test_seeds_expand_every_run_and_the_command_line_replaces_them(tmp_path):
    spec = load_sweep_spec(write_spec(tmp_path, {"seeds": [1, 2], "runs": [{"name": "a", "set": {EC: 0.0}}],
                                                 "grid": {"name": "ec{entropy_coeff}", "params": {EC: [0.01]}}}))
    assert [(r.name, r.setting, r.seed, r.values["trainer.seed"]) for r in spec.runs] == [
        ("a-s1", "a", 1, 1), ("ec0.01-s1", "ec0.01", 1, 1), ("a-s2", "a", 2, 2), ("ec0.01-s2", "ec0.01", 2, 2)]
    assert "trainer.seed=2" in spec.run_overrides(spec.runs[2])
    assert [r.name for r in load_sweep_spec(write_spec(tmp_path, {"seeds": [1, 2], "runs": [{"name": "a"}]}),
                                            seeds=[7]).runs] == ["a-s7"]
    assert parse_seeds("1, 2,3") == [1, 2, 3]
    for text in ("1,1", "a", "-1", ""):
        with pytest.raises(KeelError, match="--seeds must"):
            parse_seeds(text)
    with pytest.raises(KeelError, match=r"key 'seeds' must be a non-empty list of distinct integers >= 0"):
        load_sweep_spec(write_spec(tmp_path, {"seeds": [1, 1], "runs": [{"name": "a"}]}))
    with pytest.raises(KeelError, match=r"key 'seeds' cannot be combined with run 'a', which sets trainer.seed"):
        load_sweep_spec(write_spec(tmp_path, {"seeds": [1], "runs": [{"name": "a", "set": {"trainer.seed": 3}}]}))


def test_outcome_counts_and_setting_rows(tmp_path):
    assert outcome_counts(["Stable", "Diverged", "Stable", "Stable", "Stable"]) == "Stable 4/5, Diverged 1/5"
    assert outcome_counts(["Diverged", "Collapsed"]) == "Collapsed 1/2, Diverged 1/2"  # ties: the Outcome order
    spec = load_sweep_spec(write_spec(tmp_path, {"seeds": [1, 2, 3], "summary_step": 5,
                                                 "runs": [{"name": "a", "set": {EC: 0.0}}]}))
    rows = [{"run": "a-s1", "source": "list", "entropy_coeff": 0.0, "trainer.seed": 1, "outcome": "Stable",
             "bad_step": None, "heldout_acc_before": 0.43, "heldout_acc_after": 0.50},
            {"run": "a-s2", "source": "list", "entropy_coeff": 0.0, "trainer.seed": 2, "outcome": "Diverged",
             "bad_step": 40, "heldout_acc_before": 0.42, "heldout_acc_after": 0.30},
            {"run": "a-s3", "source": "list", "entropy_coeff": 0.0, "trainer.seed": 3, "outcome": "Regressed",
             "bad_step": 60, "heldout_acc_before": 0.41, "heldout_acc_after": 0.40}]
    (row,) = setting_rows(spec, rows)
    # after: mean 0.4, sd sqrt(((0.1)^2 + (0.1)^2 + 0) / 2) = 0.1, SE 0.1 / sqrt 3 = 0.057735
    assert (row["run"], row["outcome"], row["seeds"], row["bad_step_median"]) == (
        "a", "Stable 1/3, Diverged 1/3, Regressed 1/3", 3, 50)
    assert row["heldout_acc_after"] == pytest.approx(0.4) and row["heldout_acc_after_se"] == pytest.approx(0.057735, abs=1e-6)
    assert row["heldout_acc_before"] == pytest.approx(0.42) and row["heldout_acc_after_mean_se"] == "0.400 ± 0.058"
    assert (row["outcome_s2"], row["bad_step_s3"], row["heldout_acc_after_s1"]) == ("Diverged", 60, 0.50)
    assert "trainer.seed" not in row and row["entropy_coeff"] == 0.0
    # the agreement of verdicts with held-out accuracy: s2 and s3 fell and are unhealthy, s1 gained 7 points (flat)
    a = agreement(rows + [{"run": "b", "outcome": "Stable", "heldout_acc_before": 0.4, "heldout_acc_after": 0.38},
                          {"run": "c", "outcome": "Collapsed", "heldout_acc_before": 0.4, "heldout_acc_after": 0.8}])
    assert a["cells"] == {"fell/unhealthy": 2, "fell/healthy": 1, "flat/unhealthy": 0, "flat/healthy": 1,
                          "gained/unhealthy": 1, "gained/healthy": 0}
    assert (a["misses"], a["false_alarms"]) == (["b"], ["c"])
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)


def test_tiny_sweep_over_seeds_summarises_and_resumes_per_seed(tmp_path):
    smoke = yaml.safe_load(SMOKE.read_text())
    spec = write_spec(tmp_path, {"name": "seeds", "n_jobs": 2, "poll_s": 0.1, "seeds": [1, 2],
                                 "overrides": {**smoke["overrides"], "trainer.total_training_steps": 2,
                                               "trainer.val_before_train": True, "data.val_size": 8},
                                 "runs": [{"name": "keel", "set": {"control.type": "dual"}}]})
    out = tmp_path / "sw"
    run_sweep(spec, out, log=lambda _: None)
    rows = read_summary(out)
    assert list(rows) == ["keel"] and rows["keel"]["outcome"] == "Stable 2/2" and rows["keel"]["control.type"] == "dual"
    assert {rows["keel"]["outcome_s1"], rows["keel"]["outcome_s2"]} == {"Stable"}
    for key in ("heldout_acc_before", "heldout_acc_after", "heldout_acc_after_s1", "heldout_acc_after_s2"):
        assert 0.0 <= float(rows["keel"][key]) <= 1.0, key
    with open(out / "runs.csv", newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["keel-s1", "keel-s2"]
    md = (out / "summary.md").read_text()
    assert "## Per setting, over seeds 1, 2" in md and "## Verdict vs held-out accuracy" in md
    record = (out / "runs" / "keel-s1" / "sweep_run.json").read_text()
    lines = []
    run_sweep(spec, out, log=lines.append, seeds=[1, 2, 3])  # a third seed: only it runs
    assert "3 runs (2 finished, 1 to run)" in lines[0], lines
    assert (out / "runs" / "keel-s1" / "sweep_run.json").read_text() == record
    assert read_summary(out)["keel"]["outcome"] == "Stable 3/3"
