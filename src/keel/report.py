"""``keel report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (plus Markdown) per run, runs or sweep.

What it holds, in order (pictures first):

0. plots (item 4 below) lead the page; a sweep over seeds adds a held-out accuracy spread plot
   (every seed, mean ± standard error per setting); the entropy axis turns logarithmic when the
   curves span a factor of 10 or more
1. results summary: key metrics at chosen steps (default 6 / 25 / 50 / last) and a trend in words
   (one table per run; for several runs also one comparison table, one row per run)
2. config diff (two or more runs): only the keys that differ, one column per run
3. sweep summary (a sweep folder: ``summary.csv`` + ``runs/<name>/``)
4. plots over steps: entropy (health verdicts shaded), score, KL, ``response_length/pos/mean``,
   logical connectives, entropy / KL coefficients; several runs are overlaid on the same axes
5. health criteria (``keel.monitor.summarize``): per rule the criterion, latest value, verdict, first watch / bad step
6. run facts (``meta.json``, ``eval.json``) and sample completions from early / middle / late steps

``report.html`` embeds the PNGs as base64 (one file to mail or attach to a lab log);
``report.md`` links the same PNGs under ``plots/``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

from keel.config import read_yaml
from keel.errors import KeelError
from keel.monitor import read_metrics, summarize
from keel.tracking import flatten, read_jsonl

DEFAULT_STEPS = [6, 25, 50]  # the columns a lab log usually has, plus "last"
HEALTH_WORDS = {0: "good", 1: "watch", 2: "bad"}
HEALTH_CODES = {v: k for k, v in HEALTH_WORDS.items()}
HEALTH_COLORS = {1: "#f2c94c", 2: "#eb5757"}


@dataclass
class Panel:
    name: str  # file name of the PNG
    title: str
    keys: list[str]  # metric keys drawn on this panel
    split: bool = False  # one sub-axis per key (their scales differ by orders of magnitude)


PANELS = [
    Panel("entropy", "Policy entropy (nats)", ["actor/entropy"]),
    Panel("score", "Mean score (reward)", ["critic/score/mean"]),
    Panel("kl", "KL to the reference policy", ["actor/kl_loss"]),
    Panel("length", "Length of correct responses (tokens)", ["response_length/pos/mean"]),
    Panel("connectives", "Logical connectives per response", ["token/logical_connectives"]),
    Panel("coefficients", "Regularisation coefficients", ["actor/entropy_coeff", "actor/kl_coef"], split=True),
]

# rows of the results summary: (label, metric key, higher_is_better for the trend words)
SUMMARY_METRICS = [
    ("score", "critic/score/mean", True),
    ("entropy", "actor/entropy", None),
    ("KL", "actor/kl_loss", None),
    ("response length", "response_length/mean", None),
    ("correct-response length", "response_length/pos/mean", None),
    ("connectives", "token/logical_connectives", None),
    ("entropy_coeff", "actor/entropy_coeff", None),
    ("kl_coef", "actor/kl_coef", None),
]


# --------------------------------------------------------------------------- loading


@dataclass
class Run:
    name: str
    path: Path
    rows: list[dict]  # metrics.jsonl, one row per step, sorted by step
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    health: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        return self.rows[-1]["step"] if self.rows else 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) where ``key`` was logged with a number."""
        pairs = [(r["step"], r[key]) for r in self.rows if is_number(r.get(key))]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


@dataclass
class Sweep:
    path: Path
    header: list[str]
    rows: list[list[str]]


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise KeelError(f"'{path}' is not valid JSON") from None
    return data if isinstance(data, dict) else {}


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory (only ``metrics.jsonl`` is required) or a tracker's run (keel.integrations.trackers)."""
    from keel.integrations.trackers import detect, read_tracker_run

    if detect(path) is not None:  # TensorBoard / W&B / MLflow: the metrics only, names mapped to Keel's
        rows = [{"step": step, **m} for step, m in read_tracker_run(path)]
        return Run(name=name or Path(str(path).split("#")[0]).name or str(path), path=path, rows=rows, config={},
                   meta={}, health=[], samples=[], eval={})
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise KeelError(f"'{path}' is not a run directory (no metrics.jsonl) nor a sweep (no summary.csv)")
    config = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    optional = {f: read_jsonl(path / f) if (path / f).is_file() else [] for f in ("health.jsonl", "samples.jsonl")}
    return Run(
        name=name or path.name,
        path=path,
        # the monitor's reader: a resumed run's re-logged steps merge (later keys win), verl's {"step", "data"} lines work
        rows=[{"step": step, **m} for step, m in read_metrics(metrics)],
        config=config,
        meta=_read_json(path / "meta.json"),
        health=optional["health.jsonl"],
        samples=optional["samples.jsonl"],
        eval=_read_json(path / "eval.json"),
    )


def load_sweep(path: Path) -> tuple[Sweep, list[Run]]:
    with open(path / "summary.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    header, rows = (table[0], table[1:]) if table else ([], [])
    run_dirs = sorted(p for p in (path / "runs").glob("*") if (p / "metrics.jsonl").is_file())
    return Sweep(path, header, rows), [load_run(p) for p in run_dirs]


def collect(paths: list[str | Path]) -> tuple[list[Run], list[Sweep]]:
    """Each path is a run directory or a sweep directory; run names are made unique."""
    runs, sweeps = [], []
    from keel.integrations.trackers import detect

    for spec in paths:
        if detect(spec) is not None:  # a tracker's run (an MLflow URI is not a path)
            runs.append(load_run(spec))
            continue
        p = Path(spec)
        if not p.is_dir():
            raise KeelError(f"'{p}' is not a directory")
        if (p / "summary.csv").is_file():
            sweep, sweep_runs = load_sweep(p)
            sweeps.append(sweep)
            runs += sweep_runs
        else:
            runs.append(load_run(p))
    seen: dict[str, int] = {}
    for run in runs:  # two "runs/demo" from different parents: prefix the parent
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{Path(run.path).parent.name}/{Path(run.path).name}"
    return runs, sweeps


# --------------------------------------------------------------------------- numbers and words


def trend_words(values: list[float], higher_is_better: bool | None = None) -> str:
    """Describe a metric's course in words: flat, rising, falling, slowly rising, rose then collapsed ...

    v (None / NaN dropped, n points) is smoothed by a moving average of width w = max(1, n // 5) -> s.
    With head = s[0], tail = s[-1], span = max(s) - min(s), scale = max|v|, noise = median|v[t+1] - v[t]|:

    - span <= 0.1 * scale                                    -> "flat"
    - n >= 3 and span < 2 * noise                            -> "no clear trend"  (step-to-step jitter as big as the course)
    - peak inside s, rise = max(s) - head >= 0.3 span and at least half of it lost (max(s) - tail >= rise / 2)
                                                             -> "rose then collapsed"  (mirror: "fell then recovered")
    - otherwise by the sign of tail - head: rising / falling, "slowly ..." when |tail - head| < 0.2 * max(|head|, |tail|)

    ``higher_is_better`` turns rising / falling into improving / declining (or worsening / improving).
    """
    v = [float(x) for x in values if is_number(x)]
    n = len(v)
    if n < 2:
        return "too few points"
    w = max(1, n // 5)  # one noisy step should not set the trend
    s = [sum(v[i : i + w]) / w for i in range(n - w + 1)]
    head, tail, hi, lo = s[0], s[-1], max(s), min(s)
    span, scale = hi - lo, max(abs(x) for x in v)
    if span <= 0.1 * scale:
        return "flat"
    if n >= 3 and span < 2 * statistics.median(abs(b - a) for a, b in zip(v, v[1:])):
        return "no clear trend"
    inside = range(1, len(s) - 1)
    rise, drop = hi - head, head - lo
    if s.index(hi) in inside and rise >= 0.3 * span and hi - tail >= 0.5 * rise:
        return "rose then collapsed"
    if s.index(lo) in inside and drop >= 0.3 * span and tail - lo >= 0.5 * drop:
        return "fell then recovered"
    net = tail - head
    up = net > 0
    if higher_is_better is None:
        word = "rising" if up else "falling"
    else:
        word = "improving" if up == higher_is_better else ("declining" if higher_is_better else "worsening")
    slow = abs(net) < 0.2 * max(abs(head), abs(tail))
    return f"slowly {word}" if slow else word


def value_at(run: Run, key: str, step: int) -> float | None:
    """The value logged at ``step``, or at the latest logged step before it when ``step`` itself was not logged."""
    before = [r for r in run.rows if r["step"] <= step]
    if not before:
        return None
    value = before[-1].get(key)
    return float(value) if is_number(value) else None


def pick_steps(last_step: int, steps: list[int] | None = None) -> list[int]:
    """Chosen steps below the last one, then the last step: ``pick_steps(30)`` -> [6, 25, 30]."""
    chosen = sorted({s for s in (steps if steps is not None else DEFAULT_STEPS) if 0 <= s < last_step})
    return chosen + [last_step]


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def results_summary(run: Run, steps: list[int] | None = None) -> Table:
    """Rows = key metrics, columns = chosen steps (+ last) and the trend in words."""
    cols = pick_steps(run.last_step, steps)
    header = ["metric"] + [f"step {s}" for s in cols[:-1]] + [f"last ({cols[-1]})", "trend"]
    rows = []
    for label, key, better in SUMMARY_METRICS:
        _, values = run.series(key)
        if values:
            rows.append([label] + [fmt(value_at(run, key, s)) for s in cols] + [trend_words(values, better)])
    return Table(f"Results summary: {run.name}", header, rows)


def worst_health(run: Run) -> str:
    codes = run_health_codes(run)[1]
    return HEALTH_WORDS[max(codes)] if codes else "n/a"


def in_band_share(run: Run, band: tuple[float, float] | None = None, after_step: int = 10) -> float | None:
    """Share of the steps after ``after_step`` whose ``actor/entropy`` lies in the band.

    The band is ``band`` when given (to judge every run, fixed ones too, against one band), else the one the
    run's controller logged at each step (``control/entropy_low`` / ``control/entropy_high``; a floor has no
    high edge). None when there is no band or no step to judge.
    """
    hits = []
    for row in run.rows:
        h = row.get("actor/entropy")
        if row["step"] <= after_step or not is_number(h):
            continue
        low, high = band if band is not None else (row.get("control/entropy_low"), row.get("control/entropy_high"))
        if not is_number(low) and not is_number(high):
            continue
        hits.append((not is_number(low) or h >= low) and (not is_number(high) or h <= high))
    return sum(hits) / len(hits) if hits else None


def comparison_table(runs: list[Run], band: tuple[float, float] | None = None, after_step: int = 10) -> Table:
    """One row per run: last-step values, entropy in band, held-out accuracy before -> after, worst health, score trend."""
    where = f"in [{fmt(band[0])}, {fmt(band[1])}]" if band else "in band"
    header = ["run", "last step", "score", "entropy", "KL", "correct length", f"{where} (steps > {after_step})",
              "held-out before", "held-out after", "worst health", "score trend"]
    rows = []
    for run in runs:
        last = [fmt(value_at(run, k, run.last_step)) for k in ("critic/score/mean", "actor/entropy", "actor/kl_loss", "response_length/pos/mean")]
        share = in_band_share(run, band, after_step)
        rows.append(
            [run.name, str(run.last_step), *last, "n/a" if share is None else f"{100 * share:.0f} %"]
            + [fmt(run.eval.get("heldout_accuracy_before")), fmt(run.eval.get("heldout_accuracy_after"))]
            + [worst_health(run), trend_words(run.series("critic/score/mean")[1], True)]
        )
    return Table("Comparison", header, rows)


def config_diff(runs: list[Run]) -> Table:
    """Only the dotted config keys whose values differ between runs; one column per run."""
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    missing = object()
    rows = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if len({json.dumps(v, sort_keys=True, default=str) if v is not missing else "\0" for v in values}) > 1:
            rows.append([key] + ["(absent)" if v is missing else fmt(v) for v in values])
    return Table("Config diff", ["key"] + [run.name for run in runs], rows, "" if rows else "the configs are identical")


# --------------------------------------------------------------------------- health criteria


def health_summary(run: Run) -> dict:
    """``keel.monitor.summarize`` of the run with its own rules (config ``monitor.rules``).

    A rule set that cannot be loaded (a moved YAML file) leaves the table empty with the error as its note,
    so the rest of the report is still written.
    """
    try:
        return summarize(run.path)
    except KeelError as e:
        return {"rules": [], "overall": None, "reason": None, "error": str(e)}


def criteria_rows(summary: dict) -> list[list[str]]:
    """The monitor's summary -> rows: rule, criterion, latest value @ step, verdict, first watch, first bad, reason."""
    rows = []
    for r in summary.get("rules", []):
        latest = f"{fmt(r['latest'])} @{r['latest_step']}" if r.get("latest") is not None else "n/a"
        rows.append([r["rule"], r.get("criterion") or "", latest, r.get("verdict") or "n/a",
                     fmt(r.get("first_warning_step")), fmt(r.get("first_bad_step")), r.get("reason") or ""])
    return rows


def criteria_table(runs: list[Run]) -> Table:
    """One run: the full criteria table. Several: rows = rules, one "latest verdict" column per run."""
    summaries = [health_summary(run) for run in runs]
    if len(runs) == 1:
        s = summaries[0]
        note = s.get("error") or (f"overall {s['overall']}" + (f": {s['reason']}" if s.get("reason") else "")
                                  if s.get("overall") else "no steps judged")
        header = ["rule", "criterion", "latest", "verdict", "first watch", "first bad", "reason"]
        return Table(f"Health criteria (rules: {s.get('rule_set', 'n/a')})", header, criteria_rows(s), note)
    cells = [{row[0]: f"{row[2]} {row[3]}" for row in criteria_rows(s)} for s in summaries]
    rules = list(dict.fromkeys(rule for c in cells for rule in c))
    rows = [[rule] + [c.get(rule, "n/a") for c in cells] for rule in rules]
    notes = [f"{run.name}: {s['error']}" for run, s in zip(runs, summaries) if s.get("error")]
    return Table("Health criteria (latest value @ step, verdict)", ["rule"] + [run.name for run in runs], rows, "; ".join(notes))


# --------------------------------------------------------------------------- plots


def health_spans(steps: list[int], codes: list[int | None]) -> list[tuple[float, float, int]]:
    """Runs of equal non-good verdicts -> (x_start, x_end, code), each step covering [step - 0.5, step + 0.5]."""
    spans: list[list] = []
    previous = None  # code of the previous logged step
    for step, code in zip(steps, codes):
        if code in (1, 2):
            if code == previous:
                spans[-1][1] = step + 0.5
            else:
                spans.append([step - 0.5, step + 0.5, code])
        previous = code
    return [tuple(span) for span in spans]


def run_health_codes(run: Run) -> tuple[list[int], list[int]]:
    """Overall verdict code per step: ``health/overall`` from metrics.jsonl, else replayed from the
    ``"rule": "overall"`` change events of health.jsonl (a verdict holds until the next change)."""
    steps, codes = run.series("health/overall")
    if steps:
        return steps, [int(c) for c in codes]
    changes = sorted((e["step"], HEALTH_CODES[e["verdict"]]) for e in run.health
                     if e.get("rule") == "overall" and isinstance(e.get("step"), int) and e.get("verdict") in HEALTH_CODES)
    if not changes:
        return [], []
    steps, codes, current, i = [r["step"] for r in run.rows], [], 0, 0
    for step in steps:
        while i < len(changes) and changes[i][0] <= step:
            current, i = changes[i][1], i + 1
        codes.append(current)
    return steps, codes


def plot_panel(runs: list[Run], panel: Panel) -> Figure | None:
    """The panel's curves for every run (None when no run logged any of its keys).

    Line labels: the key for one run, the run name when the axis shows one key, else ``"run: key"``.
    """
    if not any(run.series(key)[0] for run in runs for key in panel.keys):
        return None
    groups = [[key] for key in panel.keys] if panel.split else [panel.keys]
    fig = Figure(figsize=(6.4, 3.2) if len(groups) == 1 else (9.6, 3.2), dpi=100)
    for i, keys in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for run in runs:
            for key in keys:
                steps, values = run.series(key)
                if not steps:
                    continue
                label = key if len(runs) == 1 else run.name if len(keys) == 1 else f"{run.name}: {key}"
                (line,) = ax.plot(steps, values, label=label, linewidth=1.4)
                if panel.name == "entropy" and len(runs) > 1:  # several runs: mark bad steps on each curve
                    at = dict(zip(steps, values))
                    bad = [s for s, c in zip(*run_health_codes(run)) if c == 2 and s in at]
                    ax.scatter(bad, [at[s] for s in bad], marker="x", color=line.get_color(), zorder=3)
        if panel.name == "entropy" and len(runs) == 1:
            shade_health(ax, *run_health_codes(runs[0]))
        if panel.name == "entropy" and spans_decades([v for run in runs for key in keys for v in run.series(key)[1]]):
            ax.set_yscale("log")  # a near-uniform run and a healthy one differ 10-100x: both stay readable
        ax.set_xlabel("step")
        title = keys[0] if len(groups) > 1 else panel.title
        if panel.name == "entropy":
            title += ", overall health shaded" if len(runs) == 1 else ", x = overall health bad"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=max(1, math.ceil(len(ax.get_lines()) / 12)))
    if len(groups) > 1:
        fig.suptitle(panel.title, fontsize=10)
    fig.tight_layout()
    return fig


def spans_decades(values: list[float], ratio: float = 10.0) -> bool:
    """True when the positive values span at least `ratio` (max / min >= 10: a log axis shows them all)."""
    pos = [v for v in values if is_number(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) >= ratio


def seed_spread_figure(sweep: Sweep) -> Figure | None:
    """A sweep over seeds (``heldout_acc_after_s<seed>`` columns): per setting every seed's held-out accuracy
    after training (dots), its mean ± standard error (bar), and the mean before training (open marker)."""
    seed_cols = [i for i, h in enumerate(sweep.header) if h.startswith("heldout_acc_after_s") and h[19:].isdigit()]
    if not seed_cols or "run" not in sweep.header:
        return None
    col = {h: i for i, h in enumerate(sweep.header)}
    fig = Figure(figsize=(max(6.4, 0.8 * len(sweep.rows) + 2), 3.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for x, row in enumerate(sweep.rows):
        values = [float(row[i]) for i in seed_cols if i < len(row) and _is_float(row[i])]
        ax.scatter([x] * len(values), values, color="tab:blue", s=18, zorder=3)
        mean, se = _float(row, col.get("heldout_acc_after")), _float(row, col.get("heldout_acc_after_se"))
        if mean is not None:
            ax.errorbar([x], [mean], yerr=[se or 0.0], fmt="_", color="black", capsize=6, markersize=14, zorder=4)
        before = _float(row, col.get("heldout_acc_before"))
        if before is not None:
            ax.scatter([x], [before], facecolors="none", edgecolors="gray", s=40, zorder=2)
    ax.set_xticks(range(len(sweep.rows)))
    ax.set_xticklabels([row[col["run"]] for row in sweep.rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{sweep.path.name}: held-out accuracy after training per seed (dots), mean ± SE (bar), "
                 "before (circle)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _is_float(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def _float(row: list[str], i: int | None) -> float | None:
    return float(row[i]) if i is not None and i < len(row) and _is_float(row[i]) else None


def shade_health(ax, steps: list[int], codes: list[int]) -> None:
    labelled = set()
    for x0, x1, code in health_spans(steps, codes):
        label = None if code in labelled else f"health: {HEALTH_WORDS[code]}"
        labelled.add(code)
        ax.axvspan(x0, x1, color=HEALTH_COLORS[code], alpha=0.3, linewidth=0, label=label)


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- samples


def pick_samples(samples: list[dict], per_phase: int = 2) -> list[tuple[str, int, list[dict]]]:
    """Completions from the first, middle and last logged step: [(phase, step, rows)]."""
    steps = sorted({s["step"] for s in samples if isinstance(s.get("step"), int)})
    if not steps:
        return []
    phases = {"early": steps[0], "middle": steps[len(steps) // 2], "late": steps[-1]}
    if len(steps) < 3:  # two steps are early and late, one is early
        phases = dict(list(phases.items())[:: 2][: len(steps)])
    return [(phase, step, [s for s in samples if s.get("step") == step][:per_phase]) for phase, step in phases.items()]


def clip_text(text: Any, limit: int = 1500) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f" ... [{len(text) - limit} more characters]"


# --------------------------------------------------------------------------- rendering
# The report is a list of blocks, rendered once as HTML and once as Markdown so the two never drift:
# ("h2", text) | ("p", text) | ("table", Table) | ("img", name, png bytes) | ("samples", run name, picked)


def html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f"<p class='note'>{html.escape(t.note)}</p>" if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(t: Table) -> str:
    lines = [f"### {t.title}", ""]
    if t.rows:
        lines += ["| " + " | ".join(map(md_cell, t.header)) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(map(md_cell, row)) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:.5em 0}.note{color:#666;font-style:italic}
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap;font-size:.85em}"""


def render_html(title: str, blocks: list[tuple]) -> str:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            parts.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            parts.append(html_table(block[1]))
        elif kind == "img":
            data = base64.b64encode(block[2]).decode("ascii")
            parts.append(f"<img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "samples":
            parts.append(f"<h3>{html.escape(block[1])}</h3>")
            for phase, step, rows in block[2]:
                parts.append(f"<h4>{phase} (step {step})</h4>")
                for s in rows:
                    parts.append(f"<p>score {html.escape(fmt(s.get('score')))}</p>"
                                 f"<pre>{html.escape(clip_text(s.get('prompt', '')))}</pre>"
                                 f"<pre>{html.escape(clip_text(s.get('response', '')))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, blocks: list[tuple]) -> str:
    parts = [f"# {title}"]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(md_table(block[1]))
        elif kind == "img":
            parts.append(f"![{block[1]}](plots/{block[1]}.png)")
        elif kind == "samples":
            parts.append(f"### {block[1]}")
            for phase, step, rows in block[2]:
                parts.append(f"#### {phase} (step {step})")
                for s in rows:
                    fence = lambda text: "```text\n" + clip_text(text).replace("```", "'''") + "\n```"  # noqa: E731
                    parts.append(f"score {fmt(s.get('score'))}\n\n{fence(s.get('prompt', ''))}\n\n{fence(s.get('response', ''))}")
    return "\n\n".join(parts) + "\n"


def facts_table(run: Run) -> Table:
    """meta.json and eval.json flattened to key / value rows."""
    rows = [[k, fmt(v)] for k, v in flatten(run.meta).items()]
    rows += [[f"eval.{k}", fmt(v)] for k, v in run.eval.items()]
    return Table(f"Run facts: {run.name}", ["key", "value"], rows, "" if rows else "no meta.json / eval.json")


def build_blocks(runs: list[Run], sweeps: list[Sweep], steps: list[int] | None,
                 band: tuple[float, float] | None = None) -> tuple[list[tuple], dict[str, bytes]]:
    # pictures first: the curves (and a sweep's seed spread) lead, the tables follow
    blocks: list[tuple] = [("h2", "Curves")]
    plots: dict[str, bytes] = {}
    for sweep in sweeps:
        fig = seed_spread_figure(sweep)
        if fig is not None:
            name = f"seed_spread_{sweep.path.name}"
            plots[name] = figure_png(fig)
            blocks.append(("img", name, plots[name]))
    for panel in PANELS:
        fig = plot_panel(runs, panel)
        if fig is None:
            blocks.append(("p", f"{panel.title}: not logged ({', '.join(panel.keys)})"))
            continue
        plots[panel.name] = figure_png(fig)
        blocks.append(("img", panel.name, plots[panel.name]))
    blocks.append(("h2", "Results"))
    if len(runs) > 1 or band is not None:
        blocks.append(("table", comparison_table(runs, band)))
    for run in runs:
        blocks.append(("table", results_summary(run, steps)))
        if run.eval:
            e = run.eval
            blocks.append(("p", f"{run.name}: held-out accuracy {fmt(e.get('heldout_accuracy_before'))} before training, "
                                f"{fmt(e.get('heldout_accuracy_after'))} after (n = {fmt(e.get('n_heldout'))})"))
    if len(runs) > 1:
        blocks.append(("table", config_diff(runs)))
    for sweep in sweeps:
        blocks.append(("table", Table(f"Sweep summary: {sweep.path.name}", sweep.header, sweep.rows)))
    blocks += [("h2", "Health"), ("table", criteria_table(runs))]
    blocks.append(("h2", "Runs"))
    for run in runs:
        blocks.append(("table", facts_table(run)))
        picked = pick_samples(run.samples)
        if picked:
            blocks.append(("samples", f"Sample completions: {run.name}", picked))
    return blocks, plots


def write_report(paths: list[str], out_dir: str | None = None, steps: list[int] | None = None,
                 band: tuple[float, float] | None = None) -> Path:
    """Write report.html (self-contained) and report.md + plots/*.png; return the HTML path.

    Default ``out_dir``: the run (or sweep) directory when one path is given, else ``./report``.
    """
    if not paths:
        raise KeelError("keel report needs at least one run or sweep directory")
    runs, sweeps = collect(paths)
    if not runs:
        raise KeelError(f"no runs with a metrics.jsonl found under {', '.join(map(str, paths))}")
    one_dir = len(paths) == 1 and Path(paths[0]).is_dir()
    out = Path(out_dir) if out_dir is not None else Path(paths[0]) if one_dir else Path("report")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    title = f"Keel report: {runs[0].name}" if len(runs) == 1 else f"Keel report: {len(runs)} runs"
    blocks, plots = build_blocks(runs, sweeps, steps, band)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    (out / "report.md").write_text(render_markdown(title, blocks), encoding="utf-8")
    (out / "report.html").write_text(render_html(title, blocks), encoding="utf-8")
    return (out / "report.html").resolve()


def parse_steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip() and s.strip() != "last"]
    except ValueError:
        raise KeelError(f"--steps must be comma-separated integers like 6,25,50, got {text!r}") from None


def parse_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise KeelError(f"--band must be LOW,HIGH in nats like 0.08,0.16, got {text!r}") from None
    if not 0 <= low < high:
        raise KeelError(f"--band must have 0 <= LOW < HIGH, got {text!r}")
    return low, high


def report_main(argv: list[str]) -> int:
    """``keel report PATH [PATH...] [--out DIR] [--steps 6,25,50] [--band LOW,HIGH]``."""
    parser = argparse.ArgumentParser(prog="keel report", description="Write report.html / report.md for runs or a sweep.")
    parser.add_argument("paths", nargs="+", help="run directories (with metrics.jsonl) or sweep directories (with summary.csv)")
    parser.add_argument("--out", default=None, help="output folder (default: the run dir, or ./report for several)")
    parser.add_argument("--steps", default=None, help="steps shown in the results summary besides the last (default 6,25,50)")
    parser.add_argument("--band", default=None,
                        help="judge every run's entropy against this band, e.g. 0.08,0.16 (default: each run's own "
                             "control/entropy_low/high)")
    args = parser.parse_args(argv)
    path = write_report(args.paths, args.out, parse_steps(args.steps) if args.steps else None,
                        parse_band(args.band) if args.band else None)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
