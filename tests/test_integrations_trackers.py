"""keel.integrations.trackers: `keel monitor` / `keel report` on runs written by TensorBoard, W&B (offline) and
MLflow themselves: a real TRL run logging to all three (TRL's names), and Keel's Tracker (verl's names)."""
import json
import subprocess
import sys

import pytest

from keel.integrations import trackers
from keel.integrations.names import keel_name, to_keel_names
from keel.monitor import summarize
from keel.report import write_report

CONFIG = {"trainer": {"seed": 7}}


def test_trl_names_map_to_verl_names():
    m = to_keel_names({"train/entropy": 2.5, "kl": 0.1, "completions/mean_length": 12.0, "reward": 0.4,
                       "rewards/digit_share/mean": 0.4, "frac_reward_zero_std": 0.25, "grad_norm": 1.5,
                       "actor/entropy_coeff": 0.01, "loss": -0.2})
    assert m == {"actor/entropy": 2.5, "actor/kl_loss": 0.1, "response_length/mean": 12.0, "critic/score/mean": 0.4,
                 "reward/digit_share/mean": 0.4, "batch/valid": 0.75, "actor/grad_norm": 1.5,
                 "actor/entropy_coeff": 0.01, "loss": -0.2}
    assert keel_name("actor/pg_clipfrac") == "actor/pg_clipfrac"  # verl's names pass through


def keel_monitor_json(path, rules):
    out = subprocess.run([sys.executable, "-m", "keel", "monitor", str(path), "--json", "--rules", str(rules)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture()
def fresh_wandb():
    """W&B reads its environment once per process: reset it so each test's WANDB_DIR applies."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield wandb
    wandb.teardown()


def test_keel_tracker_runs_with_verl_names(tmp_path, monkeypatch, fresh_wandb):
    from keel.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # a file store (sqlite is slow to set up)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    run_dir = tmp_path / "runs" / "r1"
    entropy = [0.14, 0.12, 0.02, 0.01, 0.01]
    rules = tmp_path / "rules.yaml"  # watch below 0.1, bad below 0.05 for 2 steps: watch at 3, bad at 4
    rules.write_text("- metric: actor/entropy\n  good: [0.1, null]\n  bad: [null, 0.05]\n  patience: 2\n")
    with Tracker(["tensorboard", "wandb", "mlflow"], run_dir, "proj", "exp", CONFIG) as tr:
        for step, h in enumerate(entropy, 1):
            tr.log({"actor/entropy": h, "critic/score/mean": step / 10}, step)
    sources = [run_dir / "tensorboard", next((run_dir / "wandb").glob("offline-run-*")),
               tmp_path / "mlruns"]
    assert [trackers.detect(s) for s in sources] == ["tensorboard", "wandb", "mlflow"]
    for source in sources:
        steps = trackers.read_tracker_run(source)
        assert [s for s, _ in steps] == [1, 2, 3, 4, 5], source
        assert [m["actor/entropy"] for _, m in steps] == pytest.approx(entropy), source
        local = summarize(source, rules=str(rules))
        assert (local["steps"], local["first_warning_step"], local["first_bad_step"]) == (5, 3, 4), source
    one = keel_monitor_json(sources[0], rules)  # the command line, as a user would run it
    assert (one["overall"], one["first_bad_step"], one["last_step"]) == ("bad", 4, 5)
    run_dir_of_run = next(p.parent for p in (tmp_path / "mlruns").rglob("meta.yaml") if (p.parent / "metrics").is_dir())
    assert trackers.read_tracker_run(run_dir_of_run) == trackers.read_tracker_run(tmp_path / "mlruns")
    assert trackers.read_tracker_run(f"{(tmp_path / 'mlruns').as_uri()}#exp")[-1][1]["actor/entropy"] == 0.01


def test_trl_run_logged_to_tensorboard_wandb_mlflow(tmp_path, monkeypatch, fresh_wandb):
    pytest.importorskip("trl")
    from test_integrations_trl import make_trainer, model_dir as _  # noqa: F401

    from keel.integrations.trl import HealthCallback
    from keel.modeling import build_embedded
    from keel.tasks import TASK_ALPHABET

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_PROJECT", "keel-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())  # an MLflow file store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    model, tok = build_embedded(TASK_ALPHABET, 0, hidden=32, layers=1, heads=2, mlp=64)
    model.config.use_cache = model.generation_config.use_cache = True
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(tmp_path / "tiny", tmp_path, steps=3, report_to=["tensorboard", "wandb", "mlflow"])
    HealthCallback(trainer, rules="lablog", run_dir=tmp_path / "keel")  # its metrics.jsonl is the reference
    trainer.train()
    fresh_wandb.finish()
    reference = [json.loads(line) for line in open(tmp_path / "keel" / "metrics.jsonl")]
    sources = {"tensorboard": tmp_path / "tb", "wandb": next((tmp_path / "wandb").glob("offline-run-*")),
               "mlflow": tmp_path / "mlruns"}
    for kind, source in sources.items():
        assert trackers.detect(source) == kind
        steps = dict(trackers.read_tracker_run(source))
        # (W&B also holds TRL's profiling timings, logged at global step 0 during the first step)
        assert sorted(s for s, m in steps.items() if "actor/entropy" in m) == [1, 2, 3], kind
        for ref in reference:  # TRL's names arrive as Keel's, with the values the callback saw
            got = steps[ref["step"]]
            for key in ("actor/entropy", "critic/score/mean", "response_length/mean", "reward/digit_share/mean"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5), (kind, key)
    report = write_report([str(sources["mlflow"])], tmp_path / "report")
    assert "actor/entropy" in report.with_suffix(".md").read_text()
