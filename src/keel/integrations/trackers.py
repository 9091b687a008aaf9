"""Read a run from the tracker it was logged to: TensorBoard, W&B offline, MLflow (``keel monitor`` / ``keel report``).

    keel monitor runs/trl/runs/Dec02_17-00-00_host        # a TensorBoard event directory
    keel monitor wandb/offline-run-20261202_170000-abc123  # a W&B offline run directory (or its .wandb file)
    keel monitor mlruns                                    # an MLflow file store with one run (or mlruns/<exp>/<run>)
    keel monitor 'sqlite:///runs/mlflow.db#RUN'            # any MLflow tracking URI; #RUN = run id or run name

Each reader returns the run's steps as ``[(step, {name: value})]``, sorted, with TRL's names mapped to
Keel's (verl's) by :func:`keel.integrations.names.to_keel_names` (verl's names pass through), so the
same rule set judges a Keel, verl or TRL run wherever it was logged.

* TensorBoard: ``tensorboard``'s ``EventAccumulator`` (scalar events, and one-element tensor events as
  TF2 writes them); every event file of one directory is one run.
* W&B: wandb 0.31 has no Python reader of ``.wandb`` files (its datastore lives in the Go ``wandb-core``);
  Keel walks the file's leveldb-log framing (a 7-byte ``:W&B`` header, 32 KiB blocks of chunks with a
  7-byte header: crc, length, type full/first/middle/last; checksums not verified) and decodes every
  record with wandb's own protobuf schema (``wandb.proto.wandb_internal_pb2.Record``). The step is
  ``train/global_step`` when logged (transformers' callback), else ``_step``.
* MLflow: ``mlflow``'s ``MlflowClient`` on the store: ``get_metric_history`` per metric (MLflow 3 opens a
  ``file:`` store only with ``MLFLOW_ALLOW_FILE_STORE=true``; the reader sets it when unset).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from keel.errors import KeelError
from keel.integrations.names import to_keel_names

TRACKERS = ("tensorboard", "wandb", "mlflow")
STEP_KEYS = ("train/global_step", "trainer/global_step", "training/global_step", "_step")
_URI_PREFIXES = ("file:", "sqlite:", "http:", "https:", "postgresql:", "mysql:", "databricks")


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _event_dirs(p: Path) -> list[Path]:
    files = [p] if p.is_file() else sorted(p.rglob("events.out.tfevents.*"))
    return sorted({f.parent for f in files})


def _is_mlflow_run_dir(p: Path) -> bool:
    return p.is_dir() and (p / "meta.yaml").is_file() and (p / "metrics").is_dir()


def _is_mlflow_store(p: Path) -> bool:
    return p.is_dir() and any((d / "meta.yaml").is_file() and any(_is_mlflow_run_dir(r) for r in d.iterdir())
                              for d in p.iterdir() if d.is_dir())


def detect(path: str | Path) -> str | None:
    """Which tracker wrote `path` (None: not a tracker's run, e.g. a Keel run directory or a JSONL file)."""
    s = str(path)
    if s.startswith(_URI_PREFIXES) or s.endswith(".db") or "#" in s and not Path(s).exists():
        return "mlflow"
    p = Path(s)
    if not p.exists():
        return None
    if p.is_file():
        if p.name.startswith("events.out.tfevents."):
            return "tensorboard"
        return "wandb" if p.suffix == ".wandb" else None
    if (p / "metrics.jsonl").is_file():
        return None  # a Keel run directory (it may also hold a tensorboard/ or wandb/ folder)
    if _is_mlflow_run_dir(p) or _is_mlflow_store(p):
        return "mlflow"
    if next(p.rglob("*.wandb"), None) is not None:
        return "wandb"
    if next(p.rglob("events.out.tfevents.*"), None) is not None:
        return "tensorboard"
    return None


def _merge(points: dict[int, dict]) -> list[tuple[int, dict]]:
    return [(step, to_keel_names(m)) for step, m in sorted(points.items())]


# --------------------------------------------------------------------------- TensorBoard


def read_tensorboard(path: str | Path) -> list[tuple[int, dict]]:
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.util import tensor_util
    except ImportError:
        raise KeelError(f"'{path}' is a TensorBoard log but the tensorboard package is not installed "
                        "(pip install keel[trackers])") from None
    dirs = _event_dirs(Path(path))
    if len(dirs) != 1:
        raise KeelError(f"'{path}' holds {len(dirs)} TensorBoard runs ({', '.join(str(d) for d in dirs[:4])}); "
                        "point at one run's directory")
    acc = ea.EventAccumulator(str(dirs[0]), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    points: dict[int, dict] = {}
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
        for e in acc.Scalars(tag):
            points.setdefault(int(e.step), {})[tag] = _finite(e.value)
    for tag in tags.get("tensors", []):
        for e in acc.Tensors(tag):
            arr = tensor_util.make_ndarray(e.tensor_proto)
            if arr.size == 1 and arr.dtype.kind in "fiu":
                points.setdefault(int(e.step), {})[tag] = _finite(arr.reshape(-1)[0])
    return _merge(points)


# --------------------------------------------------------------------------- W&B


def wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` file, decoded with wandb's protobuf schema (module docstring)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    if data[:4] != b":W&B":
        raise KeelError(f"'{path}' is not a W&B run file (no ':W&B' header)")
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a chunk header: zero padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill: the end of what was written
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            try:
                record.ParseFromString(buf)
            except Exception:  # a record cut off by a crash: what came before it stands
                break
            records.append(record)
            buf = b""
    return records


def read_wandb(path: str | Path) -> list[tuple[int, dict]]:
    try:
        import wandb.proto.wandb_internal_pb2  # noqa: F401
    except ImportError:
        raise KeelError(f"'{path}' is a W&B run but the wandb package is not installed "
                        "(pip install keel[trackers])") from None
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.rglob("*.wandb"))
    if len(files) != 1:
        raise KeelError(f"'{path}' holds {len(files)} W&B runs ({', '.join(f.parent.name for f in files[:4])}); "
                        "point at one run's directory (wandb/offline-run-...)")
    rows = []
    for record in wandb_records(files[0]):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except json.JSONDecodeError:
                continue
        rows.append(row)
    # one step key for the whole run: a trainer's own step counter when it logged one (rows without it,
    # e.g. transformers' model-size row, are not training steps), else W&B's _step
    step_key = next((k for k in STEP_KEYS if any(k in row for row in rows)), "_step")
    points: dict[int, dict] = {}
    for row in rows:
        step = row.get(step_key)
        if not isinstance(step, (int, float)):
            continue
        values = {k: _finite(v) for k, v in row.items() if k not in STEP_KEYS and not k.startswith("_")
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        points.setdefault(int(step), {}).update(values)
    return _merge(points)


# --------------------------------------------------------------------------- MLflow


def _mlflow_target(spec: str) -> tuple[str, str | None]:
    """-> (tracking URI, run id or name or None)."""
    uri, _, run = spec.partition("#") if "#" in spec and not Path(spec).exists() else (spec, "", "")
    if uri.startswith(_URI_PREFIXES):
        return uri, run or None
    p = Path(uri).resolve()
    if p.suffix == ".db":
        return f"sqlite:///{p}", run or None
    if _is_mlflow_run_dir(p):
        return p.parent.parent.as_uri(), run or p.name
    return p.as_uri(), run or None


def read_mlflow(spec: str | Path) -> list[tuple[int, dict]]:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise KeelError(f"'{spec}' is an MLflow store but the mlflow package is not installed "
                        "(pip install keel[trackers])") from None
    uri, wanted = _mlflow_target(str(spec))
    if uri.startswith("file:"):  # MLflow 3 refuses file stores unless asked; reading an existing one is the point
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    try:
        experiments = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in experiments]) if experiments else []
    except Exception as e:  # noqa: BLE001 - the store's own error, in one line
        raise KeelError(f"MLflow store '{uri}' cannot be read: {str(e).splitlines()[0]}") from None
    if wanted is not None:
        runs = [r for r in runs if wanted in (r.info.run_id, r.info.run_name)]
    if len(runs) != 1:
        names = ", ".join(f"{r.info.run_name} ({r.info.run_id})" for r in runs[:4])
        what = f"no run '{wanted}'" if wanted and not runs else f"{len(runs)} runs" + (f": {names}" if names else "")
        raise KeelError(f"MLflow store '{uri}' has {what}; pick one with '{uri}#RUN_ID' (or a run name)")
    run = runs[0]
    points: dict[int, dict] = {}
    for key in run.data.metrics:
        for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
            points.setdefault(int(m.step), {})[key] = _finite(m.value)
    return _merge(points)


READERS = {"tensorboard": read_tensorboard, "wandb": read_wandb, "mlflow": read_mlflow}


def read_tracker_run(path: str | Path, kind: str | None = None) -> list[tuple[int, dict]]:
    """The steps of a tracker's run (``kind`` detected from `path` when None)."""
    kind = kind or detect(path)
    if kind not in READERS:
        raise KeelError(f"'{path}' is not a TensorBoard, W&B or MLflow run")
    return READERS[kind](path)
