"""Tracker: jsonl always, console line, and the real TensorBoard / W&B (offline) / MLflow (sqlite) backends."""

import json
import struct
import sys

import numpy as np
import pytest

from keel.errors import KeelError
from keel.tracking import Tracker, clean_value, console_line, flatten, read_jsonl

CONFIG = {"actor_rollout_ref": {"actor": {"entropy_coeff": 0.001, "kl_loss_coef": 0.01}}, "trainer": {"seed": 7}}
STEPS = [
    (1, {"actor/entropy": 0.5, "critic/score/mean": 0.25, "health/overall": 0}),
    (2, {"actor/entropy": float("nan"), "critic/score/mean": 0.5, "health/overall": 1}),
    (3, {"actor/entropy": 0.25, "critic/score/mean": np.float32(0.75), "health/overall": 2}),
]


def log_steps(tracker):
    for step, metrics in STEPS:
        tracker.log(metrics, step)
    tracker.close()


def test_clean_value_and_flatten():
    assert clean_value(float("nan")) is None
    assert clean_value(float("-inf")) is None
    assert clean_value(np.float32(0.5)) == 0.5 and type(clean_value(np.float32(0.5))) is float
    assert clean_value(np.int64(3)) == 3 and type(clean_value(np.int64(3))) is int
    assert clean_value(2) == 2 and clean_value(True) is True and clean_value(None) is None
    assert clean_value(object()) is None
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_read_jsonl_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1.0}\n\n{"step": 2, "x": 2.0}\n{"step": 3, "x": 3.')
    assert read_jsonl(path) == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}]
    path.write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(KeelError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(KeelError, match="line 2 must be a JSON object"):
        read_jsonl(path)
    with pytest.raises(KeelError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_jsonl_always_written_flushed_and_nan_free(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tracker = Tracker(["console"], run_dir, "proj", "exp", CONFIG, console=False)
    tracker.log(*reversed(STEPS[0]))
    # flushed per step: readable while the run goes on
    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 1, "actor/entropy": 0.5, "critic/score/mean": 0.25, "health/overall": 0}]
    tracker.log(*reversed(STEPS[1]))
    tracker.close()
    text = (run_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text
    assert json.loads(text.splitlines()[1]) == {"step": 2, "actor/entropy": None, "critic/score/mean": 0.5, "health/overall": 1}
    assert capsys.readouterr().out == ""  # console=False silences the console logger


def test_console_line(tmp_path, capsys):
    assert console_line({"critic/score/mean": 0.4, "actor/entropy": 0.41234, "health/overall": 2}, 3) == (
        "step 3  score 0.4  entropy 0.4123  health [bold red]bad[/]"
    )
    assert console_line({"foo": 1.5, "bar": None}, 1) == "step 1  foo 1.5  bar None"
    with Tracker(["console", "jsonl"], tmp_path / "run", "proj", "exp", CONFIG) as tracker:
        tracker.log({"critic/score/mean": 0.5, "actor/kl_loss": 0.002, "health/overall": 0}, 4)
    assert capsys.readouterr().out.strip() == "step 4  score 0.5  kl 0.002  health good"


def test_unknown_logger_and_missing_library(tmp_path, monkeypatch):
    with pytest.raises(KeelError, match=r"unknown logger\(s\) \['neptune'\]"):
        Tracker(["jsonl", "neptune"], tmp_path / "run", "proj", "exp", CONFIG)
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(KeelError, match=r"'wandb' but the wandb package is not installed \(pip install keel\[trackers\]\)"):
        Tracker(["wandb"], tmp_path / "run2", "proj", "exp", CONFIG)


def test_tensorboard_event_file(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    log_steps(Tracker(["tensorboard"], tmp_path / "run", "proj", "exp", CONFIG))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    entropy = acc.Scalars("actor/entropy")
    assert [e.step for e in entropy] == [1, 3]  # the NaN at step 2 is left out
    assert [e.value for e in entropy] == [0.5, 0.25]
    assert [(e.step, e.value) for e in acc.Scalars("critic/score/mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in acc.Scalars("health/overall")] == [0, 1, 2]


def test_tensorboard_resume_replaces_the_replayed_steps(tmp_path, monkeypatch):
    """A run killed after logging step 5 resumes from its step-3 checkpoint and logs 4, 5 again:
    TensorBoard keeps one point per step, the replayed ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    first = Tracker(["tensorboard"], tmp_path / "run", "proj", "exp", CONFIG)
    for step in range(1, 6):
        first.log({"critic/score/mean": step / 10}, step)
    first.close()
    resumed = Tracker(["tensorboard"], tmp_path / "run", "proj", "exp", CONFIG, resume_step=3)
    for step in (4, 5):
        resumed.log({"critic/score/mean": step}, step)
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    points = acc.Scalars("critic/score/mean")
    assert [e.step for e in points] == [1, 2, 3, 4, 5]
    assert [e.value for e in points] == pytest.approx([0.1, 0.2, 0.3, 4.0, 5.0])


def wandb_records(path):
    """Records of a W&B ``.wandb`` file: a 7-byte header, then 32 KiB blocks of leveldb-log chunks
    (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: zero padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_offline_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    log_steps(Tracker(["wandb"], tmp_path / "run", "proj", "exp-a", CONFIG))
    run_files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = wandb_records(run_files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("proj", "exp-a")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["actor_rollout_ref"] == {"actor": {"entropy_coeff": 0.001, "kl_loss_coef": 0.01}}
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h.get("actor/entropy") for h in history] == [0.5, None, 0.25]
    assert [h["critic/score/mean"] for h in history] == [0.25, 0.5, 0.75]


def test_mlflow_sqlite_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(["mlflow"], tmp_path / "runs" / "r1", "proj", "exp-b", CONFIG)
    tracker.log({"val@k": 0.5, "note": "text is not a metric"}, 4)
    log_steps(tracker)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")  # shared by sibling runs
    experiment = client.get_experiment_by_name("proj")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "exp-b" and run.info.status == "FINISHED"
    assert run.data.params["actor_rollout_ref.actor.entropy_coeff"] == "0.001"
    assert run.data.params["trainer.seed"] == "7"
    history = client.get_metric_history(run.info.run_id, "actor/entropy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (3, 0.25)]
    score = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "critic/score/mean"))
    assert score == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_k")] == [0.5]  # '@' is not allowed
    assert "note" not in run.data.metrics
    assert run.data.metrics["health/overall"] == 2  # latest value
    assert not (tmp_path / "mlruns").exists()


def test_mlflow_tracking_uri_from_env(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with Tracker(["mlflow"], tmp_path / "runs" / "r2", "proj2", "exp-c", {}) as tracker:
        tracker.log({"actor/entropy": 0.125}, 5)
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj2").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "actor/entropy")] == [(5, 0.125)]
