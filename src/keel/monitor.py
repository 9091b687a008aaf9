"""Training health: rules as data, a verdict every step, early warnings, and ``keel monitor``.

A rule set is a YAML list of rules (built-ins in ``keel/rules/``: ``embedded``, ``lablog``):

    threshold  {metric, good: [lo, hi], bad: [[lo, hi], ...], from_step, good_from, patience, frac_log_vocab,
               unless_rising, rise, ema}
               bad if inside an (open) bad range at any step from `from_step` (a short settling period);
               from `good_from` on (the lab log's "good at step N") outside the (closed) good band = watch.
    score      {kind: score, metric, reference: best | start, drop, ema, from_step, patience}: the task
               score's EMA  m_t = ema * m_{t-1} + (1 - ema) * x_t  is bad when  ref - m_t >= drop, ref =
               its own best EMA since from_step, or its value at from_step (start). Sweep outcome: Regressed.
    trend      {kind: trend, metric, direction, window, change, with_metric, with_direction, with_change,
               toward, horizon, from_step, patience, level}: a least-squares line over the last `window`
               steps whose relative change (end - start) / |start| passes `change` fires `level`.

Overall verdict = the worst rule; a threshold rule counts as bad only after `patience` bad steps in a
row (watch before). A proxy rule with ``unless_rising: <task score>`` is held at watch while that
score's EMA stands `rise` or more above its first value: a proxy alone does not overrule a rising score. metrics.jsonl codes: ``health/overall``, ``health/<rule id>`` = 0 good, 1 watch,
2 bad, null not judged. Field reference and how to choose bands: docs/health.md.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import json
import sys
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from keel.config import read_yaml
from keel.errors import KeelError

RULES_DIR = Path(__file__).resolve().parent / "rules"
BUILTIN_RULE_SETS = ("embedded", "lablog")
CODES = {"good": 0, "watch": 1, "bad": 2}
MAX_TABLE_CHECKPOINTS = 6  # the table shows the most recent ones; --json has all


# --------------------------------------------------------------------------- rules


@dataclass
class Rule:
    """One health criterion over one logged metric (field docs: module docstring, docs/health.md)."""

    metric: str
    good: tuple | None = None  # threshold: closed band (lo, hi); None = unbounded side
    bad: list = field(default_factory=list)  # threshold: open ranges (lo, hi)
    from_step: int = 0  # earlier steps are not judged (warm-up)
    patience: int = 1  # threshold: bad steps in a row before overall is bad; trend: steps in a row before it fires
    frac_log_vocab: bool = False  # bounds (good, bad, toward) are fractions of ln V
    kind: str = "threshold"  # threshold | trend
    name: str | None = None  # id; default metric (threshold) or metric/direction (trend)
    direction: str = "falling"  # trend: falling | rising
    window: int = 20  # trend: steps the line is fitted over
    change: float = 0.2  # trend: relative change over the window that fires (0.2 = 20 %)
    with_metric: str | None = None  # trend: must move at the same time (collapse feedback loop)
    with_direction: str = "falling"
    with_change: float = 0.0
    toward: float | None = None  # trend: fire only if the fitted line reaches this within `horizon` steps
    horizon: int = 50
    level: str = "watch"  # trend: verdict when it fires
    good_from: int = 0  # threshold: the good band is a criterion from this step on (before: only bad counts)
    reference: str = "best"  # score: best (its own best smoothed value) | start (its value at from_step)
    drop: float = 0.1  # score: bad when the smoothed metric is this far (metric units) below the reference
    ema: float = 0.8  # score, unless_rising: EMA factor of the smoothed score (0 = raw values)
    unless_rising: str | None = None  # threshold/trend: held at watch while this metric (a task score) is rising
    rise: float = 0.05  # unless_rising: "rising" = its EMA is at least this far above its first value
    at_end: bool = False  # score: judged only on the run's final evaluation (reference start = its first value)
    ln_vocab: float | None = None  # set when frac_log_vocab bounds were scaled (not a YAML field)

    @property
    def id(self) -> str:
        if self.name:
            return self.name
        return f"{self.metric}/{self.direction}" if self.kind == "trend" else self.metric


_YAML_FIELDS = [f.name for f in fields(Rule) if f.name != "ln_vocab"]
_TREND_ONLY = {"direction", "window", "change", "with_metric", "with_direction", "with_change", "toward", "horizon", "level"}
_ONLY = {  # kind -> fields of the other kinds that do not apply to it
    "threshold": _TREND_ONLY | {"reference", "drop", "at_end"},
    "trend": {"good", "bad", "good_from", "reference", "drop", "at_end"},
    "score": _TREND_ONLY | {"good", "bad", "good_from", "unless_rising", "rise", "frac_log_vocab"},
}


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _range(x: Any, what: str) -> tuple:
    if not (isinstance(x, (list, tuple)) and len(x) == 2 and all(v is None or _is_num(v) for v in x)):
        raise ValueError(f"'{what}' must be [lo, hi] with numbers or null, got {x!r}")
    lo, hi = (None if v is None else float(v) for v in x)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"'{what}' has lo > hi: {x!r}")
    return lo, hi


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_name(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


_CHECKS = {  # field -> (test, what the value must be); None is allowed for optional fields
    "metric": (_is_name, "a metric name"),
    "name": (_is_name, "a non-empty string"),
    "with_metric": (_is_name, "a metric name"),
    "kind": (lambda x: x in ("threshold", "trend", "score"), "threshold, trend or score"),
    "unless_rising": (_is_name, "a metric name"),
    "reference": (lambda x: x in ("best", "start"), "best or start"),
    "good_from": (lambda x: _is_int(x) and x >= 0, "an integer >= 0"),
    "drop": (lambda x: _is_num(x) and x >= 0, "a number >= 0"),
    "rise": (lambda x: _is_num(x) and x >= 0, "a number >= 0"),
    "ema": (lambda x: _is_num(x) and 0 <= x < 1, "a number in [0, 1)"),
    "direction": (lambda x: x in ("falling", "rising"), "falling or rising"),
    "with_direction": (lambda x: x in ("falling", "rising"), "falling or rising"),
    "level": (lambda x: x in ("watch", "bad"), "watch or bad"),
    "frac_log_vocab": (lambda x: isinstance(x, bool), "true or false"),
    "at_end": (lambda x: isinstance(x, bool), "true or false"),
    "from_step": (lambda x: _is_int(x) and x >= 0, "an integer >= 0"),
    "patience": (lambda x: _is_int(x) and x >= 1, "an integer >= 1"),
    "window": (lambda x: _is_int(x) and x >= 3, "an integer >= 3"),
    "horizon": (lambda x: _is_int(x) and x >= 1, "an integer >= 1"),
    "change": (lambda x: _is_num(x) and x > 0, "a number > 0"),
    "with_change": (lambda x: _is_num(x) and x >= 0, "a number >= 0"),
    "toward": (_is_num, "a number"),
}


def parse_rule(raw: Any, where: str) -> Rule:
    """One YAML entry -> Rule; any problem raises KeelError naming `where` (file and entry)."""
    if not isinstance(raw, dict):
        raise KeelError(f"{where}: a rule must be a mapping with at least 'metric', got {raw!r}")
    for key in raw:
        if key not in _YAML_FIELDS:
            close = difflib.get_close_matches(str(key), _YAML_FIELDS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(_YAML_FIELDS)})"
            raise KeelError(f"{where}: unknown field '{key}'{hint}")
    try:
        if raw.get("metric") is None:
            raise ValueError("'metric' (the logged metric name) is required")
        for key, (ok, need) in _CHECKS.items():
            if raw.get(key) is not None and not ok(raw[key]):
                raise ValueError(f"'{key}' must be {need}, got {raw[key]!r}")
        kind = raw.get("kind", "threshold")
        wrong = _ONLY[kind] & raw.keys()
        if wrong:
            raise ValueError(f"field '{sorted(wrong)[0]}' does not apply to {kind} rules")
        if kind == "threshold" and raw.get("good") is None and not raw.get("bad"):
            raise ValueError("a threshold rule needs 'good' and/or 'bad'")
        kw = {k: v for k, v in raw.items() if v is not None}
        if raw.get("good") is not None:
            kw["good"] = _range(raw["good"], "good")
        bad = raw.get("bad") or []
        if isinstance(bad, (list, tuple)) and len(bad) == 2 and all(v is None or _is_num(v) for v in bad):
            bad = [bad]  # a single range written flat: bad: [null, 1.0]
        if not isinstance(bad, (list, tuple)):
            raise ValueError(f"'bad' must be [lo, hi] or a list of them, got {bad!r}")
        kw["bad"] = [_range(r, "bad") for r in bad]
        return Rule(**kw)
    except ValueError as e:
        raise KeelError(f"{where}: {e}") from None


def scale_rule(rule: Rule, vocab_size: int | None, where: str = "rule") -> Rule:
    """Bounds given as fractions of ln V -> absolute nats (good, bad and toward are multiplied by ln V)."""
    if not rule.frac_log_vocab:
        return rule
    if vocab_size is None or vocab_size < 2:
        raise KeelError(f"{where} ({rule.id}): frac_log_vocab needs the vocabulary size (pass vocab_size / --vocab-size)")
    ln_v = math.log(vocab_size)

    def mul(r: tuple | None) -> tuple | None:
        return None if r is None else tuple(None if x is None else x * ln_v for x in r)

    toward = None if rule.toward is None else rule.toward * ln_v
    return replace(rule, good=mul(rule.good), bad=[mul(r) for r in rule.bad], toward=toward, frac_log_vocab=False, ln_vocab=ln_v)


def load_rules(spec: str, vocab_size: int | None = None, extra: list[dict] | None = None) -> list[Rule]:
    """A rule set by name ("embedded", "lablog") or YAML path, plus `extra` entries (config ``monitor.extra_rules``).

    An extra rule whose id equals a rule of the set replaces it; otherwise it is appended.
    """
    path = RULES_DIR / f"{spec}.yaml" if spec in BUILTIN_RULE_SETS else Path(spec)
    if not path.is_file():
        raise KeelError(f"monitor rules '{spec}' is neither a built-in rule set ({', '.join(BUILTIN_RULE_SETS)}) nor a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise KeelError(f"rules file '{path}': malformed YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(raw, list):
        raise KeelError(f"rules file '{path}' must hold a YAML list of rules, got {type(raw).__name__}")
    if extra is not None and not isinstance(extra, list):
        raise KeelError(f"config key 'monitor.extra_rules' must be a list of rules, got {extra!r}")
    rules: list[Rule] = []
    sources = [(f"rules file '{path}'", raw), ("config key 'monitor.extra_rules'", extra or [])]
    for label, entries in sources:
        for i, entry in enumerate(entries, 1):
            where = f"{label} entry {i}" + (f" ({entry.get('metric')})" if isinstance(entry, dict) else "")
            rule = scale_rule(parse_rule(entry, where), vocab_size, where)
            same = [j for j, r in enumerate(rules) if r.id == rule.id]
            if same and entries is raw:
                raise KeelError(f"{where}: rule id '{rule.id}' is used twice (give one a 'name')")
            if same:
                rules[same[0]] = rule
            else:
                rules.append(rule)
    return rules


# --------------------------------------------------------------------------- verdicts


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    s = f"{x:.3g}"
    return s if any(c in s for c in ".en") else s + ".0"


def _bad_text(r: tuple) -> str:
    lo, hi = r
    return f"< {_fmt(hi)}" if lo is None else f"> {_fmt(lo)}" if hi is None else f"in ({_fmt(lo)}, {_fmt(hi)})"


def _value(x: Any) -> float | None:
    return float(x) if _is_num(x) else None


@dataclass
class RuleVerdict:
    verdict: str | None  # good | watch | bad | None (not judged)
    effective: str  # what it adds to the overall verdict (patience applied; None -> good)
    value: float | None  # the metric's value this step (also when not judged)
    reason: str | None = None
    direction: str | None = None  # low | high: which side of healthy it is on
    streak: int = 0


@dataclass(frozen=True)
class Failing:
    """The rule behind a non-good overall verdict (the rollback controller reads .direction)."""

    rule: str
    metric: str
    direction: str | None  # low: collapse side (more entropy pressure); high: too random (more KL pressure)
    verdict: str
    kind: str = "threshold"  # the rule's kind: a "score" rule failing = the task score regressed


@dataclass
class StepVerdict:
    step: int
    overall: str
    per_rule: dict[str, RuleVerdict]
    events: list[dict]  # lines for health.jsonl
    reason: str | None  # the failing rule's reason, None when good
    failing_rule: Failing | None


# Edges: a trend that moved exactly `change`, or will reach its ceiling in exactly `horizon` steps, has crossed.
# Comparisons carry this relative tolerance so that a value on the edge does not flip with float rounding
# (a fitted slope differs in its last bits from one BLAS / CPU to the next).
EDGE_RTOL = 1e-9


def _ema_key(metric: str, ema: float) -> str:
    return f"{metric}@{ema!r}"


def _split_ema_key(key: str) -> tuple[str, float]:
    metric, _, ema = key.rpartition("@")
    return metric, float(ema)


def _fit(points: list, step: int, window: int) -> tuple[float, float, float] | None:
    """Least-squares line through the (step, value) points of the last `window` steps -> (start, end, slope).

    Closed form on centred x:  slope = Σ(x-x̄)(y-ȳ) / Σ(x-x̄)²,  line(x) = ȳ + slope·(x-x̄).
    Exact for points that lie on a line with small integer steps (no LAPACK call whose rounding varies by machine).
    """
    pts = [p for p in points if p[0] > step - window]
    if len(pts) < max(3, (window + 1) // 2):
        return None
    x, y = np.array(pts, dtype=np.float64).T  # (n,), (n,)
    dx, dy = x - x.mean(), y - y.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    return float(y.mean() + slope * dx[0]), float(y.mean() + slope * dx[-1]), slope


def _moved(fit: tuple, direction: str, change: float) -> float | None:
    """Relative change of the fitted line if it moved at least `change` in `direction`, else None."""
    start, end, _ = fit
    rel = (end - start) / max(abs(start), 1e-12)
    edge = change * (1 - EDGE_RTOL)
    return rel if (rel <= -edge if direction == "falling" else rel >= edge) else None


class Monitor:
    """Judges one step at a time; keeps streaks and trend windows (``state_dict`` for checkpoints)."""

    def __init__(self, rules: list[Rule], vocab_size: int | None = None):
        self.rules = [scale_rule(r, vocab_size) for r in rules]
        ids = [r.id for r in self.rules]
        if len(set(ids)) != len(ids):
            raise KeelError(f"monitor rules have duplicate ids {sorted({i for i in ids if ids.count(i) > 1})} (give one a 'name')")
        self._keep: dict[str, int] = {}  # metric -> steps of history the trend rules need
        for r in self.rules:
            if r.kind == "trend":
                for m in filter(None, (r.metric, r.with_metric)):
                    self._keep[m] = max(self._keep.get(m, 0), r.window)
        self._history: dict[str, list] = {m: [] for m in self._keep}  # metric -> [(step, value)]
        # smoothed task scores (score rules and the unless_rising guards): "metric@ema" -> {m: EMA, first: its 1st value}
        self._ema: dict[str, dict] = {}
        for r in self.rules:
            if r.kind == "score":
                self._ema[_ema_key(r.metric, r.ema)] = {"m": None, "first": None}
            if r.unless_rising:
                self._ema[_ema_key(r.unless_rising, r.ema)] = {"m": None, "first": None}
        self._ref: dict[str, float] = {}  # score rule id -> its reference (best or start smoothed value)
        self._last: dict[str, RuleVerdict] = {}  # score rule id -> its last verdict (held between sparse evals)
        self._streak = dict.fromkeys(ids, 0)
        self._prev = dict.fromkeys(ids, "good")
        self.overall = "good"
        self.first_warning_step: int | None = None
        self.first_bad_step: int | None = None

    def _threshold(self, rule: Rule, step: int, v: float | None) -> RuleVerdict:
        rid = rule.id
        if step < rule.from_step:
            self._streak[rid] = 0
        if step < rule.from_step or v is None:
            return RuleVerdict(None, "good", v, streak=self._streak[rid])
        lo, hi = rule.good if rule.good and step >= rule.good_from else (None, None)
        side = "low" if lo is not None and v < lo else "high" if hi is not None and v > hi else None
        hit = next((r for r in rule.bad if (r[0] is None or v > r[0]) and (r[1] is None or v < r[1])), None)
        if hit is None:
            self._streak[rid] = 0
            if side is None:
                return RuleVerdict("good", "good", v)
            bound = lo if side == "low" else hi
            why = f"{rule.metric} {_fmt(v)} {'<' if side == 'low' else '>'} {_fmt(bound)} (good {_band(rule.good)})"
            return RuleVerdict("watch", "watch", v, why, side)
        n = self._streak[rid] = self._streak[rid] + 1
        side = side or ("high" if hit[1] is None else "low")  # a bad range inside the good band counts as low
        why = f"{rule.metric} {_fmt(v)} {_bad_text(hit)} for {n} step{'s' if n > 1 else ''}"
        if n < rule.patience:
            why += f" (bad after {rule.patience})"
        return RuleVerdict("bad", "bad" if n >= rule.patience else "watch", v, why, side, n)

    def _trend(self, rule: Rule, step: int, v: float | None) -> RuleVerdict:
        rid = rule.id
        fit = _fit(self._history[rule.metric], step, rule.window)
        if step < rule.from_step or fit is None:
            self._streak[rid] = 0
            return RuleVerdict(None, "good", v)
        rel = _moved(fit, rule.direction, rule.change)
        verb = {"falling": "fell", "rising": "rose"}
        why = f"{rule.metric} {verb[rule.direction]} {abs(rel or 0):.0%} over {rule.window} steps ({_fmt(fit[0])} → {_fmt(fit[1])})"
        if rel is not None and rule.with_metric:
            fit2 = _fit(self._history[rule.with_metric], step, rule.window)
            rel2 = None if fit2 is None else _moved(fit2, rule.with_direction, rule.with_change)
            if rel2 is None:
                rel = None
            else:
                why += f" while {rule.with_metric} {verb[rule.with_direction]} {abs(rel2):.0%} ({_fmt(fit2[0])} → {_fmt(fit2[1])})"
        if rel is not None and rule.toward is not None:
            end, slope = fit[1], fit[2]
            gap = rule.toward - end
            steps_left = 0.0 if (gap <= 0 if rule.direction == "rising" else gap >= 0) else gap / slope
            if steps_left > rule.horizon * (1 + EDGE_RTOL):
                rel = None
            else:
                why += f", heading for {_fmt(rule.toward)} in ~{max(steps_left, 0):.0f} steps"
        self._streak[rid] = self._streak[rid] + 1 if rel is not None else 0
        if self._streak[rid] < rule.patience:
            return RuleVerdict("good", "good", v, streak=self._streak[rid])
        side = "low" if rule.direction == "falling" else "high"
        return RuleVerdict(rule.level, rule.level, v, why, side, self._streak[rid])

    def _score(self, rule: Rule, step: int, v: float | None) -> RuleVerdict:
        """Task score vs its own best (or start): bad after `patience` judged steps with ref - EMA > drop."""
        rid = rule.id
        m = self._ema[_ema_key(rule.metric, rule.ema)]["m"]
        if step < rule.from_step or m is None:
            self._streak[rid] = 0
            return RuleVerdict(None, "good", v, streak=0)
        if v is None:  # a sparse metric (val/accuracy every test_freq steps): its last verdict holds
            return self._last.get(rid) or RuleVerdict(None, "good", v)
        ref = self._ref.get(rid)
        if rule.at_end and rule.reference == "start":  # the first evaluation (before training) is the start
            ref = self._ema[_ema_key(rule.metric, rule.ema)]["first"]
        ref = m if ref is None else max(ref, m) if rule.reference == "best" else ref
        self._ref[rid] = ref
        gap = ref - m
        if gap <= rule.drop:
            self._streak[rid] = 0
            rv = RuleVerdict("good", "good", v)
        else:
            n = self._streak[rid] = self._streak[rid] + 1
            what = f"{rule.metric} (EMA {rule.ema:g})" if rule.ema else rule.metric
            why = (f"{what} {_fmt(m)} is {_fmt(gap)} below its {'best' if rule.reference == 'best' else 'start'} "
                   f"{_fmt(ref)} for {n} step{'s' if n > 1 else ''}" + (f" (bad after {rule.patience})" if n < rule.patience else ""))
            rv = RuleVerdict("bad", "bad" if n >= rule.patience else "watch", v, why, "low", n)
        self._last[rid] = rv
        return rv

    def _rising(self, metric: str, ema: float, rise: float) -> tuple[float, float] | None:
        """(first, now) of the smoothed metric when it stands at least `rise` above its first value, else None."""
        tr = self._ema[_ema_key(metric, ema)]
        return (tr["first"], tr["m"]) if tr["m"] is not None and tr["m"] - tr["first"] >= rise else None

    def observe(self, step: int, metrics: dict, at_end: bool = False) -> StepVerdict:
        """Judge one step's metrics (missing / null / NaN values are simply not judged); ``at_end``: this
        record holds the run's final evaluation, the only one ``at_end`` rules judge."""
        step = int(step)
        for m, pts in self._history.items():  # a re-observed step (resume, rollback) replaces what followed it
            v = _value(metrics.get(m))
            pts[:] = [p for p in pts if step - self._keep[m] < p[0] < step] + ([(step, v)] if v is not None else [])
        for key, tr in self._ema.items():  # m_t = ema * m_{t-1} + (1 - ema) * x_t,  m_0 = x_0
            metric, ema = _split_ema_key(key)
            v = _value(metrics.get(metric))
            if v is not None:
                tr["m"] = v if tr["m"] is None else ema * tr["m"] + (1 - ema) * v
                tr["first"] = tr["m"] if tr["first"] is None else tr["first"]
        per_rule: dict[str, RuleVerdict] = {}
        for rule in self.rules:
            judge = {"trend": self._trend, "score": self._score}.get(rule.kind, self._threshold)
            rv = judge(rule, step, None if rule.at_end and not at_end else _value(metrics.get(rule.metric)))
            if rule.unless_rising and rv.effective == "bad" and (up := self._rising(rule.unless_rising, rule.ema, rule.rise)):
                why = f"{rv.reason}; held at watch: {rule.unless_rising} is rising ({_fmt(up[0])} → {_fmt(up[1])})"
                rv = replace(rv, effective="watch", reason=why)
            per_rule[rule.id] = rv
        overall, failing = "good", None
        for rule in self.rules:
            rv = per_rule[rule.id]
            if CODES[rv.effective] > CODES[overall]:
                overall, failing = rv.effective, Failing(rule.id, rule.metric, rv.direction, rv.effective, rule.kind)
        reason = per_rule[failing.rule].reason if failing else None
        events = []
        for rule in self.rules:
            rid, rv = rule.id, per_rule[rule.id]
            if rv.verdict is not None and rv.verdict != self._prev[rid]:
                why = rv.reason or f"{rule.id} is good again ({rule.metric} {_fmt(rv.value)})"
                events.append({"step": step, "rule": rid, "metric": rule.metric, "verdict": rv.verdict,
                               "previous": self._prev[rid], "value": rv.value, "direction": rv.direction, "reason": why})
                self._prev[rid] = rv.verdict
        if overall != self.overall:
            events.append({"step": step, "rule": "overall", "verdict": overall, "previous": self.overall,
                           "reason": reason or "every rule is good again"})
            self.overall = overall
        if overall != "good" and self.first_warning_step is None:
            self.first_warning_step = step
        if overall == "bad" and self.first_bad_step is None:
            self.first_bad_step = step
        return StepVerdict(step, overall, per_rule, events, reason, failing)

    def metrics(self, verdict: StepVerdict) -> dict:
        """``health/overall`` and ``health/<rule id>`` codes (0 good, 1 watch, 2 bad, None not judged)."""
        out: dict[str, int | None] = {"health/overall": CODES[verdict.overall]}
        for rid, rv in verdict.per_rule.items():
            out[f"health/{rid}"] = None if rv.verdict is None else CODES[rv.verdict]
        return out

    def state_dict(self) -> dict:
        return {"version": 1, "streak": dict(self._streak), "prev": dict(self._prev), "overall": self.overall,
                "first_warning_step": self.first_warning_step, "first_bad_step": self.first_bad_step,
                "history": {m: [list(p) for p in pts] for m, pts in self._history.items()},
                "ema": {k: dict(v) for k, v in self._ema.items()}, "ref": dict(self._ref)}

    def load_state_dict(self, d: dict) -> None:
        """Restore what `state_dict` saved; rules added or removed since then start fresh."""
        for key, target in (("streak", self._streak), ("prev", self._prev)):
            target.update({k: v for k, v in d.get(key, {}).items() if k in target})
        for m, pts in d.get("history", {}).items():
            if m in self._history:
                self._history[m] = [(int(s), float(v)) for s, v in pts]
        for k, tr in d.get("ema", {}).items():
            if k in self._ema:
                self._ema[k] = dict(tr)
        self._ref.update({k: v for k, v in d.get("ref", {}).items() if k in self._streak})
        self.overall = d.get("overall", "good")
        self.first_warning_step, self.first_bad_step = d.get("first_warning_step"), d.get("first_bad_step")


# --------------------------------------------------------------------------- reading runs


def _band(r: tuple | None) -> str:
    lo, hi = r or (None, None)
    return f"≤ {_fmt(hi)}" if lo is None else f"≥ {_fmt(lo)}" if hi is None else f"{_fmt(lo)}–{_fmt(hi)}"


def describe(rule: Rule) -> str:
    """The criterion in words, for the table."""
    if rule.kind == "trend":
        verb = {"falling": "falls", "rising": "rises"}
        text = f"{verb[rule.direction]} >{rule.change:.0%} in {rule.window} steps"
        if rule.with_metric:
            text += f" while {rule.with_metric} {verb[rule.with_direction]} >{rule.with_change:.0%}"
        if rule.toward is not None:
            text += f", reaching {_fmt(rule.toward)} within {rule.horizon} steps"
        text += " (bad)" if rule.level == "bad" else ""
    else:
        parts = [f"good {_band(rule.good)}"] if rule.good else []
        parts += [f"bad {' or '.join(_bad_text(r) for r in rule.bad)}"] if rule.bad else []
        text = ", ".join(parts)
        if rule.patience > 1:
            text += f", patience {rule.patience}"
        if rule.good and rule.good_from:
            text += f", good band from step {rule.good_from}"
    if rule.kind == "score":
        ref = "its best" if rule.reference == "best" else "its start"
        text = f"bad {'EMA ' + format(rule.ema, 'g') + ' ' if rule.ema else ''}> {_fmt(rule.drop)} below {ref}"
        text += f", patience {rule.patience}" if rule.patience > 1 else ""
        text += ", on the final evaluation" if rule.at_end else ""
    if rule.unless_rising:
        text += f", held at watch while {rule.unless_rising} rises ≥ {_fmt(rule.rise)}"
    if rule.from_step:
        text += f", from step {rule.from_step}"
    if rule.ln_vocab:
        text += f" [× ln V = {rule.ln_vocab:.2f}]"
    return text


def read_metrics(path: str | Path) -> list[tuple[int, dict]]:
    """Steps of a metrics JSONL, sorted; flat ``{"step", ...}`` or verl's ``{"step", "data": {...}}`` lines.

    Lines of the same step are merged (later keys win). A half-written last line is skipped.
    """
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    merged: dict[int, dict] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # no trailing newline yet: a line still being written
                continue
            raise KeelError(f"metrics file '{path}' line {i}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise KeelError(f"metrics file '{path}' line {i}: expected a JSON object, got {type(obj).__name__}")
        data = obj["data"] if isinstance(obj.get("data"), dict) else obj
        step = obj.get("step", data.get("training/global_step"))
        if not (_is_num(step) and float(step).is_integer()):
            raise KeelError(f"metrics file '{path}' line {i}: no integer 'step' (got {step!r})")
        merged.setdefault(int(step), {}).update((k, v) for k, v in data.items() if k != "step")
    return sorted(merged.items())


def _locate(path: str | Path, allow_missing: bool = False) -> tuple[Path | None, Path]:
    """-> (run directory or None, metrics file)."""
    p = Path(path)
    if p.is_dir():
        f = p / "metrics.jsonl"
        if not f.is_file() and not allow_missing:
            raise KeelError(f"run directory '{p}' has no metrics.jsonl (yet)")
        return p, f
    if p.is_file():  # a run's own metrics.jsonl still gets its checkpoints and config
        run = p.parent if p.name == "metrics.jsonl" and any((p.parent / n).exists() for n in ("config.yaml", "checkpoints")) else None
        return run, p
    raise KeelError(f"'{p}' does not exist (expected a Keel run directory or a JSONL metrics file)")


def final_eval_step(run_dir: Path | None) -> int | None:
    """The step of a finished run's final evaluation (eval.json ``steps``), which ``at_end`` rules judge; None
    while the run is going or for a bare metrics file."""
    path = run_dir / "eval.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        steps = json.loads(path.read_text()).get("steps")
    except (ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def checkpoint_steps(run_dir: Path | None) -> list[int]:
    """Steps of ``checkpoints/step_<N>`` (or verl's ``global_step_<N>``) directories, zero-padded or not."""
    if not run_dir or not (root := run_dir / "checkpoints").is_dir():
        return []
    found = (re.fullmatch(r"(?:global_)?step_(\d+)", d.name) for d in root.iterdir() if d.is_dir())
    return sorted({int(m.group(1)) for m in found if m})


def _rules_for(run_dir: Path | None, spec: str | None, vocab_size: int | None) -> tuple[str, list[Rule]]:
    """The run's own rule set (config.yaml monitor.rules + extra_rules), or `spec`, or lablog for bare files."""
    extra = None
    cfg_file = run_dir / "config.yaml" if run_dir else None
    if cfg_file is not None and cfg_file.is_file():
        mon = read_yaml(cfg_file).get("monitor") or {}
        extra = mon.get("extra_rules") or None
        spec = spec or mon.get("rules") or "embedded"
    spec = spec or ("embedded" if run_dir else "lablog")
    if spec not in BUILTIN_RULE_SETS and not Path(spec).is_file() and run_dir and (run_dir / spec).is_file():
        spec = str(run_dir / spec)
    return spec, load_rules(spec, vocab_size, extra)


def summarize(metrics_path_or_run_dir: str | Path, rules: list[Rule] | str | None = None,
              vocab_size: int | None = None, allow_missing: bool = False) -> dict:
    """Replay a run's metrics through the monitor -> the ``keel monitor --json`` object.

    `rules`: a list of Rules, a rule-set spec ("embedded", "lablog", YAML path), or None for the
    run's own (``monitor.rules`` of its config.yaml; lablog for a bare JSONL file).
    """
    from keel.integrations.trackers import detect, read_tracker_run

    if detect(metrics_path_or_run_dir) is not None:  # a TensorBoard / W&B / MLflow run, names mapped to Keel's
        run_dir, metrics_file = None, metrics_path_or_run_dir
        records = read_tracker_run(metrics_path_or_run_dir)
    else:
        run_dir, metrics_file = _locate(metrics_path_or_run_dir, allow_missing)
        records = read_metrics(metrics_file) if metrics_file.is_file() else []
    if isinstance(rules, list):
        rule_set = "custom"
    else:
        rule_set, rules = _rules_for(run_dir, rules, vocab_size)
    ckpts = checkpoint_steps(run_dir)
    monitor = Monitor(rules, vocab_size)
    rows = {r.id: {"rule": r.id, "metric": r.metric, "kind": r.kind, "criterion": describe(r), "latest": None,
                   "latest_step": None, "verdict": None, "reason": None, "at_checkpoints": {},
                   "first_warning_step": None, "first_bad_step": None} for r in monitor.rules}
    last = None
    nonfinite: dict[str, tuple[int, Any]] = {}  # rule id -> (step, value) while its metric's latest value is NaN/inf
    usable = 0  # finite numbers seen for any watched metric
    end = final_eval_step(run_dir)
    for step, m in records:
        last = monitor.observe(step, m, at_end=step == end)
        for rule in monitor.rules:
            if rule.metric in m:
                raw = m[rule.metric]
                usable += _value(raw) is not None
                if _value(raw) is not None:
                    nonfinite.pop(rule.id, None)
                elif _nonfinite(raw):
                    nonfinite[rule.id] = (nonfinite.get(rule.id, (step,))[0], raw)  # since the streak's first step
        for rid, rv in last.per_rule.items():
            row = rows[rid]
            if rv.value is not None:
                row.update(latest=rv.value, latest_step=step, verdict=rv.verdict, reason=rv.reason)
            if rv.verdict in ("watch", "bad") and row["first_warning_step"] is None:
                row["first_warning_step"] = step
            if rv.verdict == "bad" and row["first_bad_step"] is None:
                row["first_bad_step"] = step
            if step in ckpts:
                row["at_checkpoints"][str(step)] = {"value": rv.value, "verdict": rv.verdict}
    overall, reason = (last.overall, last.reason) if last else (None, None)
    failing = asdict(last.failing_rule) if last and last.failing_rule else None
    first_warning, first_bad = monitor.first_warning_step, monitor.first_bad_step
    for rid, (step, raw) in nonfinite.items():  # a NaN / inf metric is not healthy, whatever the rules say
        row = rows[rid]
        why = f"{row['metric']} is {_nonfinite_text(raw)} (non-finite) since step {step}"
        row.update(verdict="bad", reason=why)
        row["first_warning_step"] = row["first_warning_step"] or step
        row["first_bad_step"] = row["first_bad_step"] or step
        if overall != "bad":
            overall, reason = "bad", why
            failing = {"rule": rid, "metric": row["metric"], "direction": None, "verdict": "bad"}
        first_warning = min(first_warning or step, step)
        first_bad = min(first_bad or step, step)
    if records and not usable and not nonfinite:
        watched = sorted({r.metric for r in monitor.rules})
        overall, reason = None, (f"no usable values: the watched metrics ({', '.join(watched)}) are missing or "
                                 "not numbers in every step")
    return {
        "path": str(metrics_path_or_run_dir), "metrics_file": str(metrics_file), "rule_set": rule_set,
        "steps": len(records), "last_step": records[-1][0] if records else None, "checkpoints": ckpts,
        "overall": overall, "reason": reason, "failing_rule": failing,
        "first_warning_step": first_warning, "first_bad_step": first_bad,
        "rules": list(rows.values()),
    }


def _nonfinite(x: Any) -> bool:
    """NaN / ±inf, as a JSON number (NaN, Infinity) or as a string ("nan", "inf")."""
    if isinstance(x, bool):
        return False
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            return False
    return isinstance(x, (int, float)) and not math.isfinite(x)


def _nonfinite_text(x: Any) -> str:
    return repr(x) if isinstance(x, str) else str(x)


# --------------------------------------------------------------------------- keel monitor

_STYLE = {"good": "green", "watch": "yellow", "bad": "bold red", None: "dim"}


def render_table(summary: dict):
    """The criteria table: value at each checkpoint, latest value, verdict, first watch / bad step."""
    from rich.table import Table
    from rich.text import Text

    overall = summary["overall"]
    title = Text.assemble(f"{summary['path']}  ·  rules: {summary['rule_set']}  ·  step {summary['last_step']}  ·  overall ",
                          (str(overall).upper() if overall else "no usable values" if summary["steps"] else
                           "no steps yet", _STYLE[overall]))
    firsts = f"first warning: step {summary['first_warning_step']}  ·  first bad: step {summary['first_bad_step']}"
    caption = f"{summary['reason']}\n{firsts}" if summary["reason"] else firsts
    table = Table(title=title, caption=caption)
    ckpts = summary["checkpoints"][-MAX_TABLE_CHECKPOINTS:]
    for name, just in [("rule", "left"), ("criterion", "left")] + [(f"step {c}", "right") for c in ckpts] + [
            ("latest", "right"), ("verdict", "left"), ("first watch", "right"), ("first bad", "right")]:
        table.add_column(name, justify=just, overflow="fold")
    for row in summary["rules"]:
        cells = []
        for c in ckpts:
            at = row["at_checkpoints"].get(str(c)) or {"value": None, "verdict": None}
            cells.append(Text(_fmt(at["value"]), style=_STYLE[at["verdict"]]))
        latest = f"{_fmt(row['latest'])} @{row['latest_step']}" if row["latest"] is not None else "—"
        table.add_row(row["rule"], row["criterion"], *cells, latest, Text(row["verdict"] or "—", style=_STYLE[row["verdict"]]),
                      str(row["first_warning_step"] or "—"), str(row["first_bad_step"] or "—"))
    return table


ON_BAD_EXIT = {"ran": 3, "failed": 4}  # exit codes of `keel monitor --on-bad` once the run has gone bad


def run_on_bad(cmd: str, summary: dict) -> int:
    """Run the ``--on-bad`` shell command once, for a run whose verdict has turned bad.

    The command sees KEEL_RUN (the path), KEEL_BAD_STEP (the first bad step), KEEL_LAST_STEP, KEEL_VERDICT
    (the latest overall verdict), KEEL_RULE and KEEL_REASON (the failing rule now, empty if it recovered).
    Returns 3 when the command exited 0, 4 when it failed or could not start.
    """
    import os
    import subprocess

    failing = summary.get("failing_rule") or {}
    env = {**os.environ, "KEEL_RUN": str(summary["path"]), "KEEL_BAD_STEP": str(summary["first_bad_step"]),
           "KEEL_LAST_STEP": str(summary["last_step"]), "KEEL_VERDICT": str(summary["overall"]),
           "KEEL_RULE": failing.get("rule") or "", "KEEL_REASON": summary.get("reason") or ""}
    print(f"keel monitor: {summary['path']} turned bad at step {summary['first_bad_step']} "
          f"({summary.get('reason') or 'see the table'}); running: {cmd}", file=sys.stderr, flush=True)
    try:
        rc = subprocess.run(cmd, shell=True, env=env).returncode
    except OSError as e:
        print(f"keel monitor: --on-bad command could not start: {e}", file=sys.stderr)
        return ON_BAD_EXIT["failed"]
    if rc != 0:
        print(f"keel monitor: --on-bad command exited {rc}", file=sys.stderr)
    return ON_BAD_EXIT["ran"] if rc == 0 else ON_BAD_EXIT["failed"]


def monitor_main(argv: list[str]) -> int:
    """``keel monitor PATH [--rules R] [--vocab-size V] [--follow] [--json] [--interval S] [--count N] [--on-bad CMD]``.

    Exit codes: 0 the run is not bad (or no --on-bad); 2 bad input; with --on-bad, once any step has been
    judged bad: 3 the command ran and exited 0, 4 it failed (the monitor stops in both cases).
    """
    p = argparse.ArgumentParser(prog="keel monitor", description="Judge a run's health: a Keel run directory or any "
                                "JSONL metrics file with verl metric names (flat or verl's {step, data} lines).")
    p.add_argument("path", help="run directory (RUN_DIR/metrics.jsonl) or a JSONL metrics file")
    p.add_argument("--rules", help="embedded | lablog | rules.yaml (default: the run's monitor.rules; lablog for a bare file)")
    p.add_argument("--vocab-size", type=int, help="vocabulary size V for rules written with frac_log_vocab")
    p.add_argument("--follow", action="store_true", help="re-read and redraw every --interval seconds (Ctrl-C stops)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (one line per refresh with --follow)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --follow")
    p.add_argument("--count", type=int, default=0, help="with --follow: stop after N refreshes (0 = until Ctrl-C)")
    p.add_argument("--on-bad", metavar="CMD", help="shell command run once when the verdict turns bad (e.g. to stop "
                   "the job; it sees KEEL_RUN, KEEL_BAD_STEP, KEEL_RULE, KEEL_REASON), then exit 3 (4 if CMD failed)")
    args = p.parse_args(argv)
    if args.interval <= 0 or args.count < 0:
        raise KeelError("--interval must be > 0 and --count >= 0")

    from rich.console import Console
    from rich.live import Live

    # a pipe or a CI log has no terminal width; give the table room instead of folding every cell
    console = Console() if sys.stdout.isatty() else Console(width=200)
    live = Live(console=console, auto_refresh=False) if args.follow and not args.json else None
    try:
        with live or contextlib.nullcontext():
            for n in itertools.count(1):
                summary = summarize(args.path, args.rules, args.vocab_size, allow_missing=args.follow)
                if args.json:
                    print(json.dumps(summary, allow_nan=False), flush=True)
                elif live:
                    live.update(render_table(summary), refresh=True)
                else:
                    console.print(render_table(summary))
                if args.on_bad and summary["first_bad_step"] is not None:
                    if live:
                        live.stop()
                    return run_on_bad(args.on_bad, summary)
                if not args.follow or (args.count and n >= args.count):
                    break
                time.sleep(args.interval)
    except KeyboardInterrupt:  # the way to leave --follow
        pass
    return 0
