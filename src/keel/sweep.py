"""``keel sweep SWEEP.yaml``: explicit lists, grids and Optuna searches of training runs, with a verdict table.

Every run is one ``keel train`` process in SWEEP_DIR/runs/<name>/, ``n_jobs`` at a time. When it
ends, it gets an **outcome** from its exit code and the health rules replayed over its metrics (the
lab log's table, generated): Stable, Collapsed (bad on the low side: entropy, or connectives / rewarded
length), Too random (entropy bad-high), Diverged (KL bad-high, a non-finite loss, exit 4), Regressed (a
task-score rule: the training score well below its own best, or held-out accuracy below its start), Pruned (by
the Optuna pruner), Stopped early (ended early, no health verdict explains it), Failed (crashed or
rejected its config: exit code and last error line kept). The earliest problem (by step) names it.

SWEEP_DIR holds summary.{md,csv} (one row per run, rewritten as runs finish), sweep.yaml, optuna.db
and runs/<name>/ = a Keel run dir + train.log (the process output) + sweep_run.json (the sweep's
record: a run with one is finished and skipped when the command is re-run). Schema: docs/sweep.md.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from keel.config import KeelConfig, config_from_dict, load_config, parse_override, read_yaml, to_dict
from keel.errors import EXIT_HEALTH_STOP, EXIT_NONFINITE_STOP, KeelError
from keel.monitor import Failing, Monitor, Rule, final_eval_step, load_rules, read_metrics


class Outcome(str, Enum):
    STABLE = "Stable"
    COLLAPSED = "Collapsed"
    TOO_RANDOM = "Too random"
    DIVERGED = "Diverged"
    REGRESSED = "Regressed"
    PRUNED = "Pruned"
    STOPPED_EARLY = "Stopped early"
    FAILED = "Failed"


RECORD = "sweep_run.json"  # written into a run dir when its process has ended: the run is finished
PRUNED_FILE = "PRUNED"  # written by the sweep (reason text) before it terminates a pruned trial
PRUNED_PREFIX = "pruned by the median pruner at step "  # + the step the pruner decided at; parsed back by _classify
LOG = "train.log"  # the run process's stdout + stderr
PENDING = "Pending"  # summary outcome of a run that has not finished yet
LOSS_KEYS = ("actor/pg_loss", "actor/kl_loss", "actor/entropy")  # a non-finite value here = Diverged
# summary columns "<label>@N": (label, metric key)
SUMMARY_METRICS = [("entropy", "actor/entropy"), ("score", "critic/score/mean"),
                   ("response_length/pos/mean", "response_length/pos/mean"),
                   ("connectives", "token/logical_connectives"), ("kl", "actor/kl_loss"),
                   ("entropy_coeff", "actor/entropy_coeff")]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]*")  # a directory name; no leading "-" or "."
_MISSING = object()


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- outcomes


def _run_rules(run_dir: Path, rules: list[Rule] | str | None) -> list[Rule]:
    """`rules` as given, or the run's own (config.yaml monitor.rules + extra_rules; "embedded" without one)."""
    if isinstance(rules, list):
        return rules
    meta = run_dir / "meta.json"
    vocab = json.loads(meta.read_text()).get("model", {}).get("vocab_size") if meta.is_file() else None
    extra = None
    if rules is None:
        mon = (read_yaml(run_dir / "config.yaml").get("monitor") or {}) if (run_dir / "config.yaml").is_file() else {}
        rules, extra = mon.get("rules") or "embedded", mon.get("extra_rules") or None
    return load_rules(rules, vocab, extra)


def side_outcome(failing: Failing) -> Outcome:
    """The rule failing at the first bad step -> a task-score rule: Regressed; KL high: Diverged; else low:
    Collapsed, high: Too random."""
    if failing.kind == "score":
        return Outcome.REGRESSED
    if "kl" in failing.metric.lower() and failing.direction != "low":
        return Outcome.DIVERGED
    return Outcome.COLLAPSED if failing.direction == "low" else Outcome.TOO_RANDOM


def classify_outcome(run_dir: str | Path, exit_code: int | None,
                     rules: list[Rule] | str | None = None) -> tuple[str, int | None]:
    """A finished run's (outcome, step it went bad or stopped); ``exit_code`` None = a recorded trace.

    Exit codes: 0 ok, 3 stopped by the monitor, 4 non-finite guard, < 0 killed by that signal
    (SIGTERM / SIGINT = stopped from outside; others, e.g. SIGKILL by the OOM killer, = Failed),
    anything else = Failed. `rules`: Rules, a rule-set spec ("embedded", "lablog", a YAML path),
    or None for the run's own (config.yaml ``monitor.rules``; "embedded" when there is no config).
    """
    outcome, step, _ = _classify(Path(run_dir), exit_code, rules)
    return outcome, step


def _classify(run_dir: Path, exit_code: int | None, rules) -> tuple[str, int | None, str | None]:
    """classify_outcome plus the reason: the failing rule's, the non-finite key, or the STOPPED / PRUNED text."""
    metrics_file = run_dir / "metrics.jsonl"
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    last = records[-1][0] if records else None
    stopped_outside = exit_code is not None and exit_code < 0 and -exit_code in (signal.SIGTERM, signal.SIGINT)
    if exit_code not in (None, 0, EXIT_HEALTH_STOP, EXIT_NONFINITE_STOP) and not stopped_outside:
        return Outcome.FAILED.value, None, last_error_line(run_dir / LOG, exit_code)

    def text(name: str) -> str | None:
        return (run_dir / name).read_text().strip() if (run_dir / name).is_file() else None

    events: list[tuple[int, Outcome, str | None]] = []  # everything that went wrong, health first
    monitor = Monitor(_run_rules(run_dir, rules))
    for step, m in records:
        bad_keys = [k for k in LOSS_KEYS if isinstance(m.get(k), float) and not math.isfinite(m[k])]
        if bad_keys:
            events.append((step, Outcome.DIVERGED, f"{bad_keys[0]} is {m[bad_keys[0]]} at step {step}"))
            break
    health_bad, entropy_bad = None, None
    end = final_eval_step(run_dir)
    for step, m in records:
        verdict = monitor.observe(step, m, at_end=step == end)
        if verdict.overall == "bad" and health_bad is None:
            health_bad = (step, side_outcome(verdict.failing_rule), verdict.reason)
        if entropy_bad is None:  # entropy is the lab log's axis: its verdict names the run when it goes bad
            entropy_bad = next(((step, Outcome.COLLAPSED if rv.direction == "low" else Outcome.TOO_RANDOM, rv.reason)
                                for rule in monitor.rules if rule.metric == "actor/entropy" and rule.kind != "trend"
                                for rv in [verdict.per_rule[rule.id]] if rv.effective == "bad"), None)
    if health_bad is not None:
        # a run that went bad on KL first and later lost its entropy band too is named by its entropy
        events.append(entropy_bad if entropy_bad is not None and health_bad[1] is Outcome.DIVERGED else health_bad)
    if exit_code == EXIT_NONFINITE_STOP:
        events.append((last or 0, Outcome.DIVERGED, text("STOPPED")))
    if (run_dir / PRUNED_FILE).is_file():  # a bad health verdict at the pruning step names it instead
        # the step the pruner decided at, not the last logged one: the run may log another step before SIGTERM lands
        why = text(PRUNED_FILE)
        at = re.match(re.escape(PRUNED_PREFIX) + r"(\d+)", why or "")
        events.append((int(at.group(1)) if at else (last or 0), Outcome.PRUNED, why))
    if events:
        step, outcome, reason = min(events, key=lambda e: e[0])  # min keeps the first of equal steps
        return outcome.value, step, reason
    if exit_code == EXIT_HEALTH_STOP or stopped_outside:
        why = text("STOPPED") or (f"ended by {signal.Signals(-exit_code).name}" if stopped_outside else None)
        return Outcome.STOPPED_EARLY.value, last, why
    return Outcome.STABLE.value, None, None


def last_error_line(log_file: Path, exit_code: int | None) -> str:
    """Why a Failed run failed: the signal, the ``keel: error:`` line, or the last line of the output."""
    if exit_code is not None and exit_code < 0:
        return f"killed by signal {signal.Signals(-exit_code).name}"
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines()] if log_file.is_file() else []
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("keel: error:")]
    return (errors or lines or [f"exit code {exit_code}, no output"])[-1][:500]


# --------------------------------------------------------------------------- the sweep file


@dataclass
class RunSpec:
    name: str
    values: dict[str, Any]  # dotted config key -> the value this run sets (its swept values)
    source: str  # list | grid | optuna
    trial: Any = None  # the optuna.Trial of an Optuna run
    setting: str | None = None  # with `seeds`: the listed / grid run this is one seed of (its name without -s<seed>)
    seed: int | None = None  # with `seeds`: its trainer.seed

    def overrides(self) -> list[str]:
        return [f"{k}={override_text(v)}" for k, v in self.values.items()]


@dataclass
class OptunaSpec:
    distributions: dict[str, Any]  # dotted config key -> optuna distribution
    n_trials: int  # the budget: finished + running trials of the study, over all machines sharing it
    objective: str = "critic/score/mean"  # a metrics.jsonl key (mean of its last `window` values) or an eval.json key
    direction: str = "maximize"
    window: int = 5
    intermediate: str = "critic/score/mean"  # the metric reported to the pruner every step
    pruner: str = "median"  # median | none
    n_startup_trials: int = 3  # median pruner: trials finished before any pruning
    n_warmup_steps: int = 10  # median pruner: no pruning before this step
    timeout_min: float | None = None  # stop starting new trials after this many minutes (per invocation)
    storage: str | None = None  # default sqlite:///SWEEP_DIR/optuna.db
    study_name: str | None = None  # default the sweep name
    seed: int | None = None  # TPE sampler seed
    stop_on_bad: bool = True  # launch trials with monitor.action=stop (bad health ends and prunes the trial)
    enqueue: list = field(default_factory=list)  # points ({key: value}) tried first, e.g. known-good settings


@dataclass
class SweepSpec:
    path: Path
    name: str
    base: Path
    out: Path
    overrides: dict[str, Any]  # every run: the file's `overrides`, then the command line's
    base_config: dict  # the resolved base config (base file + overrides), as a nested dict
    summary_step: int
    n_jobs: int = 1
    stop_on_bad: bool = False
    warm_start: bool = False
    poll_s: float = 1.0
    runs: list[RunSpec] = field(default_factory=list)
    optuna: OptunaSpec | None = None
    seeds: list[int] = field(default_factory=list)  # every listed / grid run once per seed (trainer.seed)

    def run_overrides(self, run: RunSpec) -> list[str]:
        """Everything a run's `keel train` gets after the base config (except trainer.run_dir)."""
        stop = self.optuna.stop_on_bad if run.source == "optuna" and self.optuna else self.stop_on_bad
        loggers = [x for x in self.base_config["trainer"]["logger"] if x != "console"]  # no progress bar in a log file
        return ([f"{k}={override_text(v)}" for k, v in self.overrides.items()] + run.overrides()
                + (["monitor.action=stop"] if stop else []) + [f"trainer.logger={json.dumps(loggers)}"])


def override_text(value: Any) -> str:
    """A value as ``key=value`` text that `keel train` parses back to the same value.

    YAML 1.1 reads ``1e-05`` as a string, so a float's exponent gets a mantissa dot: ``1.0e-05``.
    """
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return json.dumps(value)


def check_config_key(key: Any, where: str) -> str:
    """A dotted key must name a leaf of KeelConfig (``actor_rollout_ref.actor.entropy_coeff``)."""
    if not isinstance(key, str) or not key:
        raise KeelError(f"{where}: config keys must be dotted strings, got {key!r}")
    node: Any = KeelConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise KeelError(f"{where}: '{key}' is not a config key ('{'.'.join(parts[:i])}' is a value, not a section)")
        hints = typing.get_type_hints(node)
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1, cutoff=0.5)
            hint = f" (did you mean '{'.'.join(parts[:i] + close)}'?)" if close else f" (valid: {', '.join(hints)})"
            raise KeelError(f"{where}: '{key}' is not a config key{hint}")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise KeelError(f"{where}: '{key}' is a config section; name a key inside it")
    return key


def _num(x: Any) -> float | None:
    """A number, also from YAML 1.1's string reading of ``1e-3``."""
    if _is_num(x):
        return float(x)
    try:
        return float(x) if isinstance(x, str) else None
    except ValueError:
        return None


class _Section:
    """One mapping of the sweep file; every error names the file and the dotted key."""

    def __init__(self, file: Path, raw: Any, prefix: str, allowed: list[str]):
        self.file, self.prefix = file, prefix
        if not isinstance(raw, dict):
            raise self.error(prefix.rstrip(".") or "<top level>", f"must be a mapping, got {raw!r}")
        for key in raw:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(allowed)})"
                raise self.error(f"{prefix}{key}", f"is unknown{hint}")
        self.raw = raw

    def error(self, key: str, message: str) -> KeelError:
        return KeelError(f"sweep file '{self.file}' key '{key}' {message}")

    def get(self, key: str, default: Any, ok=None, need: str = "") -> Any:
        value = self.raw.get(key, default)
        if value is not default and ok is not None and not ok(value):
            raise self.error(f"{self.prefix}{key}", f"must be {need}, got {value!r}")
        return value

    def mapping(self, key: str) -> dict:
        """A mapping of dotted config keys (checked against KeelConfig) to values."""
        raw = self.get(key, {}, lambda v: isinstance(v, dict), "a mapping of dotted config keys to values")
        where = f"sweep file '{self.file}' key '{self.prefix}{key}'"
        return {check_config_key(k, where): v for k, v in raw.items()}


def _is_int(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _run_name(text: Any, sec: _Section, key: str) -> str:
    if not (isinstance(text, str) and _NAME.fullmatch(text)):
        raise sec.error(key, f"must be a run name of letters, digits and ._+=- (it names a directory), got {text!r}")
    return text


def _grid_runs(sec: _Section) -> list[RunSpec]:
    g = _Section(sec.file, sec.raw["grid"], "grid.", ["params", "name"])
    params = g.mapping("params")
    if not params or not all(isinstance(v, list) and v for v in params.values()):
        raise g.error("grid.params", "must map each config key to a non-empty list of values")
    template = g.get("name", None, lambda v: isinstance(v, str), "a name template such as 'ec{entropy_coeff}'")
    runs = []
    for combo in itertools.product(*params.values()):
        values = dict(zip(params, combo))
        if template:
            def fill(m: re.Match) -> str:
                hits = [k for k in values if m.group(1) in (k, k.split(".")[-1])]
                if not hits:
                    raise g.error("grid.name", f"has '{{{m.group(1)}}}', which is none of the grid's keys")
                return str(values[hits[0]])
            name = re.sub(r"\{([^}]+)\}", fill, template)
        else:
            name = "-".join(f"{k.split('.')[-1]}_{v}" for k, v in values.items())
        runs.append(RunSpec(_run_name(re.sub(r"[^A-Za-z0-9._+=-]", "_", name), g, "grid.name"), values, "grid"))
    return runs


def _optuna_spec(sec: _Section, name: str) -> OptunaSpec:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    o = _Section(sec.file, sec.raw["optuna"], "optuna.", [f.name for f in dataclasses.fields(OptunaSpec)
                                                          if f.name != "distributions"] + ["params"])
    enqueue = o.get("enqueue", [], lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
                    "a list of {config key: value} points")
    dists = {}
    for key, raw in o.mapping("params").items():
        where = f"optuna.params.{key}"
        if isinstance(raw, list) and len(raw) == 2:
            raw = {"low": raw[0], "high": raw[1]}
        p = _Section(sec.file, raw, f"{where}.", ["low", "high", "log", "step", "type", "choices"])
        try:
            if "choices" in raw:
                if not isinstance(raw["choices"], list) or not raw["choices"] or len(raw) > 1:
                    raise ValueError("'choices' must be a non-empty list, alone")
                dists[key] = CategoricalDistribution(raw["choices"])
                continue
            lo, hi, step = _num(raw.get("low")), _num(raw.get("high")), _num(raw.get("step"))
            if lo is None or hi is None:
                raise ValueError("needs numbers 'low' and 'high' (or 'choices')")
            log = p.get("log", False, _is_bool, "true or false")
            kind = p.get("type", "float", lambda v: v in ("float", "int"), "float or int")
            dists[key] = (IntDistribution(int(lo), int(hi), log=log, step=int(step or 1)) if kind == "int"
                          else FloatDistribution(lo, hi, log=log, step=step))
        except ValueError as e:
            raise p.error(where, f"is not a valid range: {e}") from None
    if not dists:
        raise o.error("optuna.params", "must name at least one config key to search")
    kw: dict[str, Any] = {"distributions": dists, "study_name": name}
    checks = {"n_trials": (_is_int(1), "an integer >= 1"), "window": (_is_int(1), "an integer >= 1"),
              "n_startup_trials": (_is_int(0), "an integer >= 0"), "n_warmup_steps": (_is_int(0), "an integer >= 0"),
              "objective": (lambda v: isinstance(v, str) and v, "a metric or eval.json key"),
              "intermediate": (lambda v: isinstance(v, str) and "/" in v, "a metrics.jsonl key"),
              "direction": (lambda v: v in ("maximize", "minimize"), "maximize or minimize"),
              "pruner": (lambda v: v in ("median", "none"), "median or none"),
              "timeout_min": (lambda v: _num(v) is not None and _num(v) > 0, "a number of minutes > 0"),
              "storage": (lambda v: isinstance(v, str) and "://" in v, "a database URL (sqlite:///path.db)"),
              "study_name": (lambda v: isinstance(v, str) and v, "a string"),
              "seed": (_is_int(0), "an integer >= 0"), "stop_on_bad": (_is_bool, "true or false")}
    for key, (ok, need) in checks.items():
        if key in o.raw:
            kw[key] = o.get(key, None, ok, need)
    for point in enqueue:
        if set(point) - set(dists):
            raise o.error("optuna.enqueue", f"names {sorted(set(point) - set(dists))}, which are not in optuna.params")
    kw["enqueue"] = enqueue
    if "n_trials" not in kw:
        raise o.error("optuna.n_trials", "is required (the budget: how many trials in all)")
    if "intermediate" not in kw and "/" in kw.get("objective", "/"):
        kw["intermediate"] = kw.get("objective", OptunaSpec.objective)
    return OptunaSpec(**kw)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 1,2,3`` -> [1, 2, 3] (integers >= 0, no repeats)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KeelError(f"--seeds must be comma-separated integers such as 1,2,3, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise KeelError(f"--seeds must list distinct integers >= 0, got {text!r}")
    return seeds


def _seeded(runs: list[RunSpec], seeds: list[int], sec: _Section) -> list[RunSpec]:
    """Each run once per seed: name <run>-s<seed>, trainer.seed=<seed>; seed-major, so every setting has its
    first seed before any has a second (a sweep cut short still compares all settings)."""
    for run in runs:
        if "trainer.seed" in run.values:
            raise sec.error("seeds", f"cannot be combined with run '{run.name}', which sets trainer.seed itself")
    return [RunSpec(f"{run.name}-s{seed}", {**run.values, "trainer.seed": seed}, run.source, setting=run.name, seed=seed)
            for seed in seeds for run in runs]


def load_sweep_spec(path: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None,
                    n_jobs: int | None = None, seeds: list[int] | None = None) -> SweepSpec:
    """Read and check a sweep file; `overrides` (``key=value``) apply to every run, after the file's.

    `seeds` (``--seeds``) replaces the file's ``seeds`` list."""
    path = Path(path)
    top = ["name", "base", "out", "n_jobs", "overrides", "summary_step", "stop_on_bad", "warm_start", "poll_s",
           "runs", "grid", "optuna", "seeds"]
    sec = _Section(path, read_yaml(path), "", top)
    name = _run_name(sec.get("name", path.stem), sec, "name")
    base_text = sec.get("base", None, lambda v: isinstance(v, str) and v, "a config file path")
    if base_text is None:
        raise sec.error("base", "is required (the config every run starts from, e.g. ../configs/demo.yaml)")
    base = Path(os.path.normpath(path.parent / base_text))
    if not base.is_file():
        raise sec.error("base", f"names '{base}', which does not exist (paths are relative to the sweep file)")
    common = sec.mapping("overrides")
    where = f"sweep file '{path}' command-line override"
    for text in overrides or []:
        keys, value = parse_override(text)
        common[check_config_key(".".join(keys), f"{where} '{text}'")] = value
    try:
        cfg = load_config(base, [f"{k}={override_text(v)}" for k, v in common.items()])
    except KeelError as e:
        raise sec.error("overrides", f"do not give a valid config with base '{base}': {e}") from None
    spec = SweepSpec(
        path=path, name=name, base=base, overrides=common, base_config=to_dict(cfg),
        out=Path(out_dir or sec.get("out", f"runs/sweep-{name}", lambda v: isinstance(v, str) and v, "a directory")),
        summary_step=sec.get("summary_step", cfg.trainer.total_training_steps, _is_int(0), "an integer >= 0"),
        n_jobs=n_jobs or sec.get("n_jobs", 1, _is_int(1), "an integer >= 1"),
        stop_on_bad=sec.get("stop_on_bad", False, _is_bool, "true or false"),
        warm_start=sec.get("warm_start", False, _is_bool, "true or false"),
        poll_s=float(sec.get("poll_s", 1.0, lambda v: _num(v) is not None and _num(v) > 0, "seconds > 0")))
    if n_jobs is not None and n_jobs < 1:
        raise KeelError(f"--n-jobs must be >= 1, got {n_jobs}")
    for i, raw in enumerate(sec.get("runs", [], lambda v: isinstance(v, list), "a list of {name, set} runs"), 1):
        r = _Section(path, raw, f"runs[{i}].", ["name", "set"])
        spec.runs.append(RunSpec(_run_name(r.get("name", None), r, f"runs[{i}].name"), r.mapping("set"), "list"))
    if "grid" in sec.raw:
        spec.runs += _grid_runs(sec)
    file_seeds = sec.get("seeds", None, lambda v: isinstance(v, list) and v and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v) and len(set(v)) == len(v),
        "a non-empty list of distinct integers >= 0 (trainer.seed values)")
    spec.seeds = list(seeds if seeds is not None else file_seeds or [])
    if spec.seeds:
        if "trainer.seed" in common:
            raise sec.error("seeds", "cannot be combined with a trainer.seed override for every run")
        spec.runs = _seeded(spec.runs, spec.seeds, sec)
    if "optuna" in sec.raw:
        spec.optuna = _optuna_spec(sec, name)
    if not spec.runs and spec.optuna is None:
        raise sec.error("runs", "(or 'grid' or 'optuna') is required: the sweep has nothing to run")
    names = [r.name for r in spec.runs]
    dup = sorted({n for n in names if names.count(n) > 1} | {n for n in names if n.startswith("trial_")})
    if dup:
        raise sec.error("runs", f"has duplicate or reserved (trial_*) run names: {', '.join(dup)}")
    return spec


# --------------------------------------------------------------------------- running


@dataclass
class Job:
    run: RunSpec
    run_dir: Path
    proc: subprocess.Popen
    log: Any
    started: float
    reported: int = 0  # last step reported to the Optuna trial


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the sweep dies, so a killed sweep leaves no orphan runs."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _read_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _finished(spec: SweepSpec, run: RunSpec) -> dict | None:
    """The run's record if it finished with the same overrides (else it runs, again)."""
    record = _read_record(spec.out / "runs" / run.name)
    return record if record is not None and record.get("overrides") == spec.run_overrides(run) else None


def _launch(spec: SweepSpec, run: RunSpec, overrides: list[str]) -> Job:
    run_dir = spec.out / "runs" / run.name
    if run_dir.exists():  # an unfinished (interrupted) or outdated run restarts from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = open(run_dir / LOG, "w")
    cmd = [sys.executable, "-m", "keel", "train", str(spec.base), *overrides, f"trainer.run_dir={run_dir}"]
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # own session: Ctrl-C reaches only the sweep, which then stops its runs itself
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)
    return Job(run, run_dir, proc, log, time.time())


def _terminate(job: Job, wait: bool) -> None:
    if job.proc.poll() is None:
        try:
            os.killpg(job.proc.pid, signal.SIGTERM)  # the run leads its own process group
        except ProcessLookupError:
            pass
    if wait:
        try:
            job.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
        job.log.close()


def objective_value(run_dir: Path, opt: OptunaSpec) -> float | None:
    """eval.json key (no "/"), or the mean of the metric's last `window` logged values."""
    if "/" not in opt.objective:
        ev = run_dir / "eval.json"
        value = json.loads(ev.read_text()).get(opt.objective) if ev.is_file() else None
        return float(value) if _is_num(value) else None
    values = [float(m[opt.objective]) for _, m in _metrics(run_dir) if _is_num(m.get(opt.objective))]
    values = values[-opt.window:]
    return sum(values) / len(values) if values else None


def _metrics(run_dir: Path) -> list[tuple[int, dict]]:
    try:
        return read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    except KeelError:
        return []


def _report_intermediate(job: Job, opt: OptunaSpec) -> None:
    """Feed new steps of the trial's metric to Optuna; terminate the run (SIGTERM) when it should be pruned."""
    trial = job.run.trial
    new = [(s, float(m[opt.intermediate])) for s, m in _metrics(job.run_dir)
           if s > job.reported and _is_num(m.get(opt.intermediate))]
    for step, value in new:
        trial.report(value, step)
        job.reported = step
    if new and trial.should_prune() and not (job.run_dir / PRUNED_FILE).exists():
        step, value = new[-1]
        (job.run_dir / PRUNED_FILE).write_text(f"{PRUNED_PREFIX}{step}: "
                                               f"{opt.intermediate} {value:.4g} trails the other trials\n")
        _terminate(job, wait=False)


def _open_study(spec: SweepSpec, log) -> Any:
    """Create or load the study; RUNNING trials left by a dead sweep on this host are failed and re-queued."""
    import optuna

    opt = spec.optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = opt.storage or f"sqlite:///{(spec.out / 'optuna.db').resolve()}"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=opt.n_startup_trials, n_warmup_steps=opt.n_warmup_steps)
              if opt.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=opt.study_name, direction=opt.direction,
                                sampler=optuna.samplers.TPESampler(seed=opt.seed), pruner=pruner, load_if_exists=True)
    if not study.trials:  # a new study: try the given points first
        for point in opt.enqueue:
            study.enqueue_trial(point)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid, host = t.user_attrs.get("sweep_pid"), t.user_attrs.get("sweep_host")
        if host == socket.gethostname() and pid is not None and not _alive(pid):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params)
            shutil.rmtree(spec.out / "runs" / f"trial_{t.number:04d}", ignore_errors=True)
            log(f"trial {t.number} was cut off by an interrupted sweep; its parameters are queued again")
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def _trials_used(study) -> int:
    """Budget spent: finished, pruned and running trials, plus failures of real runs (not re-queued ones)."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(t.state in done or (t.state == TrialState.FAIL and "record" in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


def _ask(study, spec: SweepSpec) -> RunSpec:
    trial = study.ask(spec.optuna.distributions)
    trial.set_user_attr("sweep_host", socket.gethostname())
    trial.set_user_attr("sweep_pid", os.getpid())
    return RunSpec(f"trial_{trial.number:04d}", dict(trial.params), "optuna", trial)


def _finish(spec: SweepSpec, job: Job, study, log) -> dict:
    """Classify the ended run, write its record, tell Optuna."""
    rc = job.proc.returncode
    job.log.close()
    try:
        outcome, bad_step, note = _classify(job.run_dir, rc, None)
    except KeelError as e:  # unreadable metrics or rules: the run cannot be judged
        outcome, bad_step, note = Outcome.FAILED.value, None, str(e)
    record = {"name": job.run.name, "source": job.run.source, "values": job.run.values,
              "overrides": spec.run_overrides(job.run), "exit_code": rc, "outcome": outcome, "bad_step": bad_step,
              "note": note, "wall_s": round(time.time() - job.started, 1)}
    if job.run.trial is not None:
        from optuna.trial import TrialState

        record["trial"] = job.run.trial.number
        value = objective_value(job.run_dir, spec.optuna) if outcome == Outcome.STABLE else None
        record["objective"] = value
        if outcome == Outcome.STABLE and value is None:
            record["note"] = f"objective '{spec.optuna.objective}' was not logged"
        state = (TrialState.COMPLETE if value is not None else TrialState.PRUNED
                 if outcome in (Outcome.PRUNED, Outcome.COLLAPSED, Outcome.TOO_RANDOM, Outcome.DIVERGED, Outcome.REGRESSED)
                 else TrialState.FAIL)
        job.run.trial.set_user_attr("record", record)
        job.run.trial.set_user_attr("row", summary_row(spec, job.run_dir, record))
        study.tell(job.run.trial, value if state == TrialState.COMPLETE else None, state=state)
    tmp = job.run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(job.run_dir / RECORD)
    when = f" at step {bad_step}" if bad_step is not None and outcome != Outcome.STABLE else ""
    log(f"done   {job.run.name}: {outcome}{when} (exit {rc}, {record['wall_s']:.0f} s)"
        + (f" - {record['note']}" if record["note"] else ""))
    return record


def run_sweep(spec_path: str | Path, out_dir: str | Path | None = None, n_jobs: int | None = None,
              overrides: list[str] | None = None, log=print, seeds: list[int] | None = None) -> Path:
    """Run (or resume) a sweep; returns the sweep directory with summary.md / summary.csv."""
    spec = load_sweep_spec(spec_path, overrides, out_dir, n_jobs, seeds)
    (spec.out / "runs").mkdir(parents=True, exist_ok=True)
    if spec.path.resolve() != (spec.out / "sweep.yaml").resolve():
        shutil.copyfile(spec.path, spec.out / "sweep.yaml")
    if spec.warm_start and spec.base_config["actor_rollout_ref"]["model"]["path"] != "embedded":
        from keel.sft import run_sft

        run_sft(config_from_dict(spec.base_config), log=log)  # cached: instant when the model exists
    study = _open_study(spec, log) if spec.optuna else None
    todo = [run for run in spec.runs if _finished(spec, run) is None]
    budget = f", Optuna: {spec.optuna.n_trials} trials ({_trials_used(study)} used)" if study else ""
    log(f"sweep {spec.name}: {len(spec.runs)} runs ({len(spec.runs) - len(todo)} finished, {len(todo)} to run)"
        f"{budget}, n_jobs {spec.n_jobs} -> {spec.out}")
    t_start, jobs = time.time(), []
    try:
        while True:
            while len(jobs) < spec.n_jobs:
                if todo:
                    run = todo.pop(0)
                elif study is not None and _trials_used(study) < spec.optuna.n_trials and (
                        spec.optuna.timeout_min is None or time.time() - t_start < 60 * float(spec.optuna.timeout_min)):
                    run = _ask(study, spec)
                else:
                    break
                jobs.append(_launch(spec, run, spec.run_overrides(run)))
                log(f"start  {run.name}  " + " ".join(run.overrides()))
            if not jobs:
                break
            time.sleep(spec.poll_s)
            for job in list(jobs):
                if job.run.trial is not None and job.proc.poll() is None:
                    _report_intermediate(job, spec.optuna)
                if job.proc.poll() is not None:
                    jobs.remove(job)
                    _finish(spec, job, study, log)
                    write_summary(spec, study)
    finally:
        for job in jobs:  # interrupted: stop the runs; without a record they restart when the sweep is re-run
            _terminate(job, wait=True)
            if job.run.trial is not None:  # give the trial's parameters back to the queue
                from optuna.trial import TrialState

                study.tell(job.run.trial, state=TrialState.FAIL)
                study.enqueue_trial(job.run.values)
                shutil.rmtree(job.run_dir, ignore_errors=True)
        if jobs:
            log(f"interrupted: {len(jobs)} unfinished run(s) restart when the command is re-run")
    md, _ = write_summary(spec, study)
    log(f"summary: {md}")
    return spec.out


# --------------------------------------------------------------------------- summary


def _lookup(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _cell(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, (list, dict)):
        return json.dumps(x)
    return "" if x is None else x


def _swept_keys(spec: SweepSpec) -> tuple[list[str], dict[str, str]]:
    """Swept config keys in order of appearance, and their column labels (``actor_rollout_ref.actor.`` dropped)."""
    keys = list(dict.fromkeys(k for r in spec.runs for k in r.values))
    keys += [k for k in (spec.optuna.distributions if spec.optuna else {}) if k not in keys]
    return keys, {k: re.sub(r"^actor_rollout_ref\.(actor\.)?", "", k) for k in keys}


def summary_row(spec: SweepSpec, run_dir: Path | None, record: dict) -> dict:
    """One summary line: swept values, outcome, key metrics at spec.summary_step (run_dir None: no metrics yet)."""
    keys, labels = _swept_keys(spec)
    cfg = read_yaml(run_dir / "config.yaml") if run_dir and (run_dir / "config.yaml").is_file() else {}
    row: dict[str, Any] = {"run": record["name"], "source": record["source"]}
    for k in keys:  # what the run set, else what it resolved (config.yaml), else the base config's value
        v = record["values"][k] if k in record["values"] else _lookup(cfg, k)
        v = _lookup(spec.base_config, k) if v is _MISSING else v
        row[labels[k]] = None if v is _MISSING else v
    records = _metrics(run_dir) if run_dir else []
    row.update(outcome=record["outcome"], bad_step=record.get("bad_step"),
               steps=records[-1][0] if records else None)
    n = spec.summary_step
    for label, key in SUMMARY_METRICS:  # the value at step N, or at the run's last logged step before it
        values = [m[key] for s, m in records if s <= n and _is_num(m.get(key))]
        row[f"{label}@{n}"] = values[-1] if values else None
    ev = json.loads((run_dir / "eval.json").read_text()) if run_dir and (run_dir / "eval.json").is_file() else {}
    row.update(heldout_acc_before=ev.get("heldout_accuracy_before"), heldout_acc_after=ev.get("heldout_accuracy_after"))
    if spec.optuna is not None:
        row["objective"] = record.get("objective")
    row.update(exit_code=record.get("exit_code"), wall_s=record.get("wall_s"), note=record.get("note"))
    return row


def summary_rows(spec: SweepSpec, study=None) -> list[dict]:
    """Listed / grid runs in file order (unfinished ones as Pending), then Optuna trials by number."""
    rows = []
    for run in spec.runs:
        record = _finished(spec, run)
        rows.append(summary_row(spec, spec.out / "runs" / run.name, record) if record else
                    summary_row(spec, None, {"name": run.name, "source": run.source, "values": run.values,
                                             "outcome": PENDING}))
    if study is not None:
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            record = t.user_attrs.get("record")
            if record is None:
                continue
            run_dir = spec.out / "runs" / record["name"]  # a trial run on another machine: its stored row
            rows.append(summary_row(spec, run_dir, record) if (run_dir / RECORD).is_file() else t.user_attrs["row"])
    return rows


HEALTHY_OUTCOMES = (Outcome.STABLE.value,)  # the verdicts that call a finished run healthy
GAIN = 0.10  # held-out gain (accuracy points / 100) that a healthy verdict must not miss


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error sd / sqrt(n) (sample sd, n - 1); SE None for one value."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, sd / math.sqrt(len(values))


def _pm(mean: float | None, se: float | None) -> str:
    return "" if mean is None else f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def outcome_counts(outcomes: list[str]) -> str:
    """["Stable", "Diverged", "Stable"] -> "Stable 2/3, Diverged 1/3" (most frequent first, ties in Outcome order)."""
    order = [o.value for o in Outcome] + [PENDING]
    counts = collections.Counter(outcomes)
    ranked = sorted(counts, key=lambda o: (-counts[o], order.index(o) if o in order else len(order)))
    return ", ".join(f"{o} {counts[o]}/{len(outcomes)}" for o in ranked)


def setting_rows(spec: SweepSpec, rows: list[dict]) -> list[dict]:
    """Per-seed run rows -> one row per setting: outcome counts, median first-bad step, means (± SE), per-seed values."""
    by_name = {r.name: r for r in spec.runs}
    groups: dict[str, list[tuple[RunSpec, dict]]] = {}
    for row in rows:
        run = by_name.get(row["run"])
        if run is not None and run.setting is not None:
            groups.setdefault(run.setting, []).append((run, row))
    _, labels = _swept_keys(spec)
    out = []
    for setting, members in groups.items():
        first = members[0][1]
        agg: dict[str, Any] = {"run": setting, "source": first["source"]}
        agg.update({lab: first.get(lab) for lab in labels.values() if lab != "trainer.seed"})
        done = [row for _, row in members if row["outcome"] != PENDING]
        bad_steps = [row["bad_step"] for row in done if row["outcome"] not in HEALTHY_OUTCOMES and _is_num(row.get("bad_step"))]
        agg.update(outcome=outcome_counts([row["outcome"] for _, row in members]), seeds=len(members),
                   bad_step_median=statistics.median(bad_steps) if bad_steps else None)
        for key in ("heldout_acc_before", "heldout_acc_after"):
            mean, se = _mean_se([float(row[key]) for row in done if _is_num(row.get(key))])
            agg[key], agg[f"{key}_se"] = mean, se
        agg["heldout_acc_after_mean_se"] = _pm(agg["heldout_acc_after"], agg["heldout_acc_after_se"])
        n = spec.summary_step
        for label, _ in SUMMARY_METRICS:
            agg[f"{label}@{n}"] = _mean_se([float(row[f"{label}@{n}"]) for row in done if _is_num(row.get(f"{label}@{n}"))])[0]
        for run, row in members:
            for key in ("outcome", "bad_step", "heldout_acc_before", "heldout_acc_after"):
                agg[f"{key}_s{run.seed}"] = row.get(key)
        out.append(agg)
    return out


def agreement(rows: list[dict]) -> dict:
    """The verdicts against what happened to held-out accuracy (finished runs with both numbers).

    fell: after < before; gained: after - before >= GAIN; else flat. unhealthy: any outcome but Stable.
    miss = fell but judged healthy; false alarm = gained but judged unhealthy. precision / recall of
    "unhealthy" as a prediction of "fell".
    """
    cells = collections.Counter()
    misses, alarms = [], []
    for row in rows:
        before, after = row.get("heldout_acc_before"), row.get("heldout_acc_after")
        if row["outcome"] in (PENDING, Outcome.FAILED.value) or not (_is_num(before) and _is_num(after)):
            continue
        change = "fell" if after < before else "gained" if after - before >= GAIN - 1e-9 else "flat"
        verdict = "healthy" if row["outcome"] in HEALTHY_OUTCOMES else "unhealthy"
        cells[change, verdict] += 1
        if change == "fell" and verdict == "healthy":
            misses.append(row["run"])
        if change == "gained" and verdict == "unhealthy":
            alarms.append(row["run"])
    flagged = cells["fell", "unhealthy"] + cells["flat", "unhealthy"] + cells["gained", "unhealthy"]
    fell = cells["fell", "unhealthy"] + cells["fell", "healthy"]
    return {"cells": {f"{c}/{v}": cells[c, v] for c in ("fell", "flat", "gained") for v in ("unhealthy", "healthy")},
            "misses": misses, "false_alarms": alarms,
            "precision": cells["fell", "unhealthy"] / flagged if flagged else None,
            "recall": cells["fell", "unhealthy"] / fell if fell else None}


def agreement_lines(rows: list[dict]) -> list[str]:
    """The agreement table as Markdown lines (empty when no run has both held-out numbers)."""
    a = agreement(rows)
    c = a["cells"]
    if not sum(c.values()):
        return []
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    return ["## Verdict vs held-out accuracy", "",
            f"Held-out accuracy after vs before training: fell (after < before), flat, gained (≥ {GAIN * 100:.0f} points). "
            "Unhealthy = any outcome but Stable.", "",
            "| held-out | unhealthy | healthy |", "|---|---|---|",
            f"| fell | {c['fell/unhealthy']} | {c['fell/healthy']} (miss) |",
            f"| flat | {c['flat/unhealthy']} | {c['flat/healthy']} |",
            f"| gained ≥ {GAIN * 100:.0f} | {c['gained/unhealthy']} (false alarm) | {c['gained/healthy']} |", "",
            f"- precision of 'unhealthy' for 'fell': {fmt(a['precision'])}; recall: {fmt(a['recall'])}",
            f"- misses: {', '.join(a['misses']) or 'none'}; false alarms: {', '.join(a['false_alarms']) or 'none'}", ""]


def _write_csv(path: Path, rows: list[dict]) -> None:
    header = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[_cell(row.get(k)) for k in header] for row in rows])


def _md_table(rows: list[dict]) -> list[str]:
    header = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(_cell(row.get(k))).replace("|", "\\|").replace("\n", " ") for k in header]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(spec: SweepSpec, study=None) -> tuple[Path, Path]:
    """SWEEP_DIR/summary.csv and summary.md (same columns; the Markdown adds the outcome counts and the
    verdict-vs-held-out agreement). With `seeds`, summary.csv has one row per setting and runs.csv one per run."""
    rows = summary_rows(spec, study)
    csv_path, md_path = spec.out / "summary.csv", spec.out / "summary.md"
    settings = setting_rows(spec, rows) if spec.seeds else []
    if settings:
        _write_csv(csv_path, settings)
        _write_csv(spec.out / "runs.csv", rows)
    else:
        _write_csv(csv_path, rows)
    counts = collections.Counter(row["outcome"] for row in rows)
    common = ", ".join(f"`{k}={override_text(v)}`" for k, v in spec.overrides.items()) or "none"
    lines = [f"# Sweep `{spec.name}`", "",
             f"- base config: `{spec.base}`; overrides for every run: {common}",
             f"- metrics are taken at step {spec.summary_step} (a run that ended earlier: at its last step, "
             f"see `steps`); `bad_step` = the step it went bad or was stopped",
             "- outcomes: " + ", ".join(f"{n} {o}" for o, n in counts.items()), ""]
    if settings:
        lines += [f"## Per setting, over seeds {', '.join(map(str, spec.seeds))}", "",
                  "Outcome counts; `bad_step_median` = median first-bad step of the seeds that went bad; "
                  "held-out accuracy = mean over seeds, `_se` = standard error (sd / sqrt(n)).", ""]
        brief = [{k: v for k, v in row.items() if not re.search(r"_s\d+$", k)} for row in settings]
        lines += _md_table(brief) + ["", "## Per run", ""]
    lines += _md_table(rows) + [""] + agreement_lines(rows)
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md_path, csv_path


# --------------------------------------------------------------------------- keel sweep


def sweep_main(argv: list[str]) -> int:
    """``keel sweep SWEEP.yaml [key=value ...] [--out DIR] [--n-jobs N] [--dry-run]``."""
    p = argparse.ArgumentParser(prog="keel sweep", description="Run a sweep of `keel train` runs (explicit list, "
                                "grid or Optuna search) and write summary.md / summary.csv with each run's outcome. "
                                "Re-running the command resumes: finished runs are skipped.")
    p.add_argument("spec", help="sweep YAML file (schema: docs/sweep.md)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides for every run")
    p.add_argument("--out", help="sweep directory (default: the file's `out`, else runs/sweep-<name>)")
    p.add_argument("--n-jobs", type=int, help="runs at a time (default: the file's n_jobs)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands, start nothing")
    p.add_argument("--seeds", help="run every listed / grid run once per seed (trainer.seed), e.g. 1,2,3; "
                                   "replaces the file's `seeds`")
    args = p.parse_intermixed_args(argv)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.dry_run:
        spec = load_sweep_spec(args.spec, args.overrides, args.out, args.n_jobs, seeds)
        for run in spec.runs:
            print(f"{'finished' if _finished(spec, run) else 'to run  '}  {run.name}: keel train {spec.base} "
                  + " ".join(spec.run_overrides(run)))
        if spec.optuna:
            print(f"optuna: {spec.optuna.n_trials} trials over {', '.join(spec.optuna.distributions)}")
        return 0

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        out = run_sweep(args.spec, args.out, args.n_jobs, args.overrides, seeds=seeds)
    except KeyboardInterrupt:
        print("keel: sweep interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print((out / "summary.md").read_text())
    return 0
