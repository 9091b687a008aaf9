"""Experiment tracking: one ``Tracker`` fans each step's metrics out to the loggers in ``trainer.logger``.

Logger names follow verl's convention (``["console", "jsonl", "tensorboard", "wandb", "mlflow"]``) and
every backend gets the same metric names (``actor/entropy``, ``critic/score/mean`` ...).
``RUN_DIR/metrics.jsonl`` is always written: it is what ``keel report`` and the monitor read.

Where each backend writes (all work without network):

- jsonl:        ``RUN_DIR/metrics.jsonl``, one ``{"step": int, "<metric>": float|null}`` per line, flushed per step
- tensorboard:  ``$TENSORBOARD_DIR`` or ``RUN_DIR/tensorboard``  (``tensorboard --logdir RUN_DIR``)
- wandb:        ``RUN_DIR/wandb/`` ; ``WANDB_MODE=offline`` logs with no network, ``wandb sync`` uploads later
- mlflow:       ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<RUN_DIR's parent>/mlflow.db``, shared by sibling runs
                so ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` compares them
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from keel.errors import KeelError

PIP_HINT = "pip install keel[trackers]"


class Logger(str, enum.Enum):
    CONSOLE = "console"
    JSONL = "jsonl"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    MLFLOW = "mlflow"


# --------------------------------------------------------------------------- values


def clean_value(value: Any) -> Any:
    """One metric value -> something JSON can hold: finite float / int / bool / str, or None.

    NaN and +-inf become None (``metrics.jsonl`` never holds NaN); numpy / torch scalars become floats.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item"):  # numpy / torch scalar
        value = value.item()
        if isinstance(value, (bool, int)):
            return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def numeric_items(metrics: dict) -> dict[str, float]:
    """The metrics a scalar tracker can plot: finite numbers only (None, strings and bools left out)."""
    out = {}
    for key, value in metrics.items():
        value = clean_value(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (config dicts, for MLflow params and config diffs)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file. A last line cut off by a crash mid-write is skipped; a bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        raise KeelError(f"'{path}' does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # truncated tail: the writer died mid-line
                break
            raise KeelError(f"'{path}' line {i + 1} is not valid JSON") from None
        if not isinstance(row, dict):
            raise KeelError(f"'{path}' line {i + 1} must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- backends
# Each backend: log(metrics, step) and close(). metrics already passed through clean_value.


class JsonlBackend:
    def __init__(self, run_dir: Path, **_):
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}, allow_nan=False) + "\n")
        self.file.flush()  # the report / monitor may read while the run is going

    def close(self) -> None:
        self.file.close()


# name shown on the console line -> metric key, in display order
CONSOLE_KEYS = {
    "score": "critic/score/mean",
    "entropy": "actor/entropy",
    "kl": "actor/kl_loss",
    "len": "response_length/mean",
    "ent_coef": "actor/entropy_coeff",
    "kl_coef": "actor/kl_coef",
}
HEALTH_WORDS = {0: "good", 1: "watch", 2: "bad"}
HEALTH_STYLE = {0: "green", 1: "yellow", 2: "bold red"}


class ConsoleBackend:
    def __init__(self, **_):
        from rich.console import Console

        self.console = Console(highlight=False)

    def log(self, metrics: dict, step: int) -> None:
        self.console.print(console_line(metrics, step))

    def close(self) -> None:
        pass


def console_line(metrics: dict, step: int) -> str:
    """Compact rich-markup line: ``step 3  score 0.4  entropy 0.41  kl 0.002  health [green]good[/]``."""
    parts = [f"step {step}"]
    shown = [(short, metrics[key]) for short, key in CONSOLE_KEYS.items() if key in metrics]
    if not shown:  # a run logging other names: show its first few
        shown = [(k, v) for k, v in metrics.items() if k != "health/overall"][:6]
    for short, value in shown:
        parts.append(f"{short} {value:.4g}" if isinstance(value, (int, float)) else f"{short} {value}")
    code = metrics.get("health/overall")
    if code in HEALTH_WORDS:
        parts.append(f"health [{HEALTH_STYLE[code]}]{HEALTH_WORDS[code]}[/]")
    return "  ".join(parts)


class TensorBoardBackend:
    def __init__(self, run_dir: Path, resume_step: int | None = None, **_):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KeelError(f"trainer.logger names 'tensorboard' but the tensorboard package is not installed ({PIP_HINT})") from None
        self.log_dir = Path(os.environ.get("TENSORBOARD_DIR") or run_dir / "tensorboard")
        # a resumed run replays the steps after its checkpoint: purge_step hides the first attempt's events
        # from that step on, so each step has one point
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in numeric_items(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # steps take seconds; a crash should not lose the curve

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, run_dir: Path, project_name: str, experiment_name: str, config: dict, **_):
        try:
            import wandb
        except ImportError:
            raise KeelError(f"trainer.logger names 'wandb' but the wandb package is not installed ({PIP_HINT})") from None
        try:
            # console="off": Keel writes its own logs, and stdout capture fights rich progress bars
            self.run = wandb.init(
                project=project_name,
                name=experiment_name,
                config=config,
                dir=str(run_dir),
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # login / network problems: say how to log without them
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise KeelError(f"wandb.init failed ({first}); set WANDB_MODE=offline to log without network") from e

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(numeric_items(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


MLFLOW_BAD_CHARS = re.compile(r"[^\w\-. /]")  # MLflow accepts letters, digits, _ - . space /


class MlflowBackend:
    def __init__(self, run_dir: Path, project_name: str, experiment_name: str, config: dict, **_):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise KeelError(f"trainer.logger names 'mlflow' but the mlflow package is not installed ({PIP_HINT})") from None
        store = run_dir.resolve().parent
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store / 'mlflow.db'}"
        try:
            # the client API (not mlflow.start_run) keeps no global active run, so two Trackers can coexist
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(project_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # artifacts next to the store, not in ./mlruns of whatever the cwd is
                experiment_id = self.client.create_experiment(project_name, artifact_location=(store / "mlartifacts").as_uri())
            self.run_id = self.client.create_run(experiment_id, run_name=experiment_name).info.run_id
        except Exception as e:  # e.g. MLflow 3 refuses file: stores unless MLFLOW_ALLOW_FILE_STORE=true
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise KeelError(f"mlflow tracking store '{self.uri}' failed: {first}") from e
        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(MLFLOW_BAD_CHARS.sub("_", k), v, now, step) for k, v in numeric_items(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS = {
    Logger.CONSOLE: ConsoleBackend,
    Logger.JSONL: JsonlBackend,
    Logger.TENSORBOARD: TensorBoardBackend,
    Logger.WANDB: WandbBackend,
    Logger.MLFLOW: MlflowBackend,
}


# --------------------------------------------------------------------------- tracker


class Tracker:
    """Send each step's metrics to every logger named in ``trainer.logger``; jsonl is always on.

    ``console=False`` silences the console line even when ``"console"`` is listed (a progress bar owns the terminal).
    ``resume_step``: the checkpoint step a resumed run restarts after; TensorBoard then drops the earlier
    attempt's points past it (``metrics.jsonl`` is cut back by the trainer; W&B and MLflow start a new run).
    Unknown logger names and missing tracker libraries raise :class:`KeelError` naming them.
    """

    def __init__(
        self,
        loggers: list[str],
        run_dir: str | Path,
        project_name: str,
        experiment_name: str,
        config: dict,
        console: bool = True,
        resume_step: int | None = None,
    ):
        valid = [x.value for x in Logger]
        unknown = [name for name in loggers if name not in valid]
        if unknown:
            raise KeelError(f"config key 'trainer.logger' has unknown logger(s) {unknown}; valid: {', '.join(valid)}")
        names = [Logger(name) for name in dict.fromkeys(["jsonl", *loggers])]  # jsonl first, no duplicates
        if not console:
            names = [n for n in names if n is not Logger.CONSOLE]
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backends: dict[Logger, Any] = {}
        try:
            for name in names:
                self.backends[name] = BACKENDS[name](
                    run_dir=self.run_dir, project_name=project_name, experiment_name=experiment_name, config=config,
                    resume_step=resume_step,
                )
        except BaseException:
            self.close()  # do not leave a half-open wandb run or event file behind
            raise

    def log(self, metrics: dict, step: int) -> None:
        clean = {key: clean_value(value) for key, value in metrics.items() if key != "step"}
        for backend in self.backends.values():
            backend.log(clean, int(step))

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends = {}

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
