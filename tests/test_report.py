"""keel report: trend words, tables, plots (line data before saving, PNG pixels after) and the written HTML / Markdown."""

import base64
import io
import json
from html.parser import HTMLParser

import matplotlib.image
import pytest
import yaml

from keel.errors import KeelError
from keel.report import (
    PANELS,
    Run,
    config_diff,
    criteria_rows,
    figure_png,
    comparison_table,
    health_spans,
    in_band_share,
    load_run,
    pick_samples,
    pick_steps,
    plot_panel,
    report_main,
    results_summary,
    spans_decades,
    trend_words,
    value_at,
    write_report,
)

# 12 steps of a run whose entropy falls, score improves, connectives rise then collapse
ENTROPY = [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.2, 0.2]
SCORE = [0.10, 0.12, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.42, 0.45, 0.47, 0.5]
CONNECTIVES = [1, 2, 3, 4, 5, 6, 5, 4, 3, 2, 1, 1]
HEALTH = [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 0, 0]
POS_LENGTH = [30, 31, None, 33, 34, 35, 36, 37, 38, 39, 40, 41]


def make_run(root, name="run-a", entropy_coeff=0.001, scale=1.0, with_health_metric=True):
    run = root / name
    run.mkdir(parents=True)
    config = {"actor_rollout_ref": {"actor": {"entropy_coeff": entropy_coeff, "kl_loss_coef": 0.001}},
              "trainer": {"project_name": "keel", "experiment_name": name, "logger": ["console", "jsonl"]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "meta.json").write_text(json.dumps({"seed": 1, "git_commit": "abc123", "versions": {"torch": "2.13.0"}}))
    (run / "eval.json").write_text(json.dumps({"heldout_accuracy_before": 0.25, "heldout_accuracy_after": 0.5, "n_heldout": 64}))
    with open(run / "metrics.jsonl", "w") as f:
        for i in range(12):
            row = {"step": i + 1, "actor/entropy": ENTROPY[i] * scale, "critic/score/mean": SCORE[i],
                   "actor/kl_loss": 0.001, "response_length/mean": 40.0, "response_length/pos/mean": POS_LENGTH[i],
                   "token/logical_connectives": CONNECTIVES[i], "actor/entropy_coeff": 0.0 if i < 6 else 0.01,
                   "actor/kl_coef": 0.001}
            if with_health_metric:
                row["health/overall"] = HEALTH[i]
            f.write(json.dumps(row) + "\n")
    # the monitor's change events: per rule, and "overall" (watch from step 6, bad 8-10, good again at 11)
    events = [{"step": 6, "rule": "actor/entropy", "verdict": "watch", "reason": "actor/entropy 0.5 above 0.15"},
              {"step": 6, "rule": "overall", "verdict": "watch", "reason": "actor/entropy 0.5 above 0.15"},
              {"step": 8, "rule": "overall", "verdict": "bad", "reason": "actor/entropy 0.3 for 3 steps"},
              {"step": 11, "rule": "overall", "verdict": "good", "reason": "every rule is good again"}]
    (run / "health.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    samples = [{"step": s, "prompt": f"What is {s}+{s}?", "response": f"<b>{2 * s}</b> & done", "score": 1.0} for s in (1, 2, 6, 12, 12)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


class TagChecker(HTMLParser):
    """Fails on unbalanced tags; collects <img src> and table cells."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.cells, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "th"):
            self.cells.append(data)


def parse_html(path):
    checker = TagChecker()
    checker.feed(path.read_text())
    checker.close()
    assert checker.errors == [] and checker.stack == []
    return checker


def png_pixels(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(data), format="png")


# --------------------------------------------------------------------------- numbers and words


@pytest.mark.parametrize(
    "values, better, words",
    [
        ([1, 1, 1, 1], None, "flat"),
        ([0.5, 0.52, 0.49, 0.51, 0.5], None, "flat"),  # span 0.03 <= 0.1 * 0.52
        ([0, 1, 0, 1, 0, 1, 0, 1, 0, 1], None, "flat"),  # w = 2 smooths the zig-zag to 0.5 everywhere
        ([0.1, 0.2, 0.3, 0.4, 0.5], None, "rising"),
        ([0.5, 0.4, 0.3, 0.2, 0.1], None, "falling"),
        ([0.5, 0.4, 0.3, 0.2, 0.1], False, "improving"),
        (ENTROPY, None, "falling"),
        (SCORE, True, "improving"),
        ([0.40, 0.41, 0.42, 0.43, 0.44, 0.45], True, "slowly improving"),  # net 0.05 < 0.25 * 0.45
        ([0.40, 0.41, 0.42, 0.43, 0.44, 0.45], None, "slowly rising"),
        ([0.45, 0.44, 0.43, 0.42, 0.41, 0.40], True, "slowly declining"),
        (CONNECTIVES, None, "rose then collapsed"),  # peak 5.5 (smoothed), tail 1 lost 4.5 of the 4 gained
        ([5, 3, 1, 3, 5], None, "fell then recovered"),
        ([1, 2, 1.8, 1.9, 1.2], None, "rose then collapsed"),  # rise 1, lost 0.8 >= 0.5
        ([0.4, 0.5, 0.35, 0.45, 0.4, 0.5, 0.38, 0.42], None, "no clear trend"),  # span 0.15 < 2 * median jump 0.1
        ([1, 2], None, "rising"),
        ([1.0, None, float("nan")], None, "too few points"),
    ],
)
def test_trend_words(values, better, words):
    assert trend_words(values, better) == words


def test_pick_steps_and_value_at():
    assert pick_steps(80) == [6, 25, 50, 80]
    assert pick_steps(30) == [6, 25, 30]
    assert pick_steps(30, [40, 10, 10]) == [10, 30]
    run = Run("r", None, rows=[{"step": 1, "x": 1.0}, {"step": 4, "x": None}, {"step": 7, "x": 7.0}])
    assert [value_at(run, "x", s) for s in (0, 1, 3, 4, 7, 9)] == [None, 1.0, 1.0, None, 7.0, 7.0]
    assert run.series("x") == ([1, 7], [1.0, 7.0])


def test_load_run_resume_and_truncation(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2, "y": 5}\n{"step": 2, "x": 20}\n{"step": 3, "x"')
    run = load_run(run_dir)
    assert run.series("x") == ([1, 2], [1.0, 20.0])  # the re-logged step 2 wins, the cut-off step 3 is skipped
    assert run.series("y") == ([2], [5.0])
    assert (run.config, run.meta, run.health, run.samples, run.eval) == ({}, {}, [], [], {})
    with pytest.raises(KeelError, match="is not a run directory"):
        load_run(tmp_path)


def test_results_summary_and_config_diff(tmp_path):
    run = load_run(make_run(tmp_path))
    table = results_summary(run, [3, 6])
    assert table.header == ["metric", "step 3", "step 6", "last (12)", "trend"]
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["score"] == ["0.15", "0.3", "0.5", "improving"]
    assert rows["entropy"] == ["0.8", "0.5", "0.2", "falling"]
    assert rows["KL"] == ["0.001", "0.001", "0.001", "flat"]
    assert rows["correct-response length"] == ["n/a", "35", "41", "rising"]
    assert rows["connectives"] == ["3", "6", "1", "rose then collapsed"]
    assert rows["entropy_coeff"] == ["0", "0", "0.01", "rising"]

    other = load_run(make_run(tmp_path, "run-b", entropy_coeff=0.01))
    (other.path / "config.yaml").write_text(yaml.safe_dump({**other.config, "control": {"type": "band"}}))
    other = load_run(other.path)
    diff = config_diff([run, other])
    assert diff.header == ["key", "run-a", "run-b"]
    assert diff.rows == [
        ["actor_rollout_ref.actor.entropy_coeff", "0.001", "0.01"],
        ["control.type", "(absent)", "band"],
        ["trainer.experiment_name", "run-a", "run-b"],
    ]
    assert config_diff([run, run]).note == "the configs are identical"


def test_in_band_share_given_band_logged_band_and_floor(tmp_path):
    run = load_run(make_run(tmp_path))  # ENTROPY 0.9 ... 0.2 over steps 1-12, no band logged
    assert in_band_share(run) is None  # a fixed run has no band of its own
    assert in_band_share(run, (0.3, 0.7), after_step=0) == pytest.approx(5 / 12)  # 0.7 0.6 0.5 0.4 0.3
    assert in_band_share(run, (0.3, 0.7), after_step=4) == pytest.approx(4 / 8)  # steps 5-12
    for row in run.rows:  # a band controller's logged band, and a floor's (no high edge)
        row.update({"control/entropy_low": 0.3, "control/entropy_high": 0.7})
    assert in_band_share(run, after_step=0) == pytest.approx(5 / 12)
    for row in run.rows:
        row.update({"control/entropy_low": 0.5, "control/entropy_high": None})
    assert in_band_share(run, after_step=0) == pytest.approx(6 / 12)  # >= 0.5: 0.9 0.85 0.8 0.7 0.6 0.5
    table = comparison_table([run], (0.3, 0.7), after_step=4)
    assert table.header[6] == "in [0.3, 0.7] (steps > 4)" and table.rows[0][6] == "50 %"


def test_criteria_rows_from_a_hand_made_summary():
    summary = {"rules": [
        {"rule": "actor/entropy", "criterion": "good 0.02–0.15", "latest": 0.0123456, "latest_step": 40, "verdict": "bad",
         "reason": "actor/entropy 0.0123 below 0.02 for 5 steps", "first_warning_step": 31, "first_bad_step": 35},
        {"rule": "actor/kl_loss", "criterion": "good ≤ 0.5", "latest": None, "latest_step": None, "verdict": None,
         "reason": None, "first_warning_step": None, "first_bad_step": None}]}
    assert criteria_rows(summary) == [
        ["actor/entropy", "good 0.02–0.15", "0.01235 @40", "bad", "31", "35", "actor/entropy 0.0123 below 0.02 for 5 steps"],
        ["actor/kl_loss", "good ≤ 0.5", "n/a", "n/a", "n/a", "n/a", ""],
    ]


# --------------------------------------------------------------------------- plots


def test_health_spans():
    assert health_spans([1, 2, 3, 4, 5, 6, 7], [0, 1, 1, 2, 0, 2, None]) == [(1.5, 3.5, 1), (3.5, 4.5, 2), (5.5, 6.5, 2)]
    assert health_spans(list(range(1, 13)), HEALTH) == [(5.5, 7.5, 1), (7.5, 10.5, 2)]
    assert health_spans([1, 2], [0, 0]) == []


def test_entropy_plot_single_run(tmp_path):
    run = load_run(make_run(tmp_path))
    fig = plot_panel([run], PANELS[0])
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert line.get_label() == "actor/entropy"
    assert list(line.get_xdata()) == list(range(1, 13)) and list(line.get_ydata()) == ENTROPY
    spans = sorted((p.get_x(), p.get_x() + p.get_width(), p.get_label()) for p in ax.patches)
    assert spans == [(5.5, 7.5, "health: watch"), (7.5, 10.5, "health: bad")]
    pixels = png_pixels(figure_png(fig))
    assert pixels.shape == (320, 640, 4) and pixels[..., :3].std() > 0.05  # a drawn plot, not a blank image


def test_entropy_shading_falls_back_to_health_events(tmp_path):
    run = load_run(make_run(tmp_path, with_health_metric=False))
    ax = plot_panel([run], PANELS[0]).axes[0]
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches)
    assert spans == [(5.5, 7.5), (7.5, 10.5)]  # "overall" changes: watch at 6, bad at 8, good at 11


def test_overlay_and_split_panels(tmp_path):
    runs = [load_run(make_run(tmp_path, "run-a")), load_run(make_run(tmp_path, "run-b", scale=0.5))]
    ax = plot_panel(runs, PANELS[0]).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["run-a", "run-b"]
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([0.5 * v for v in ENTROPY])
    assert len(ax.patches) == 0 and len(ax.collections) == 2  # several runs: bad steps marked per curve, not shaded
    assert list(ax.collections[1].get_offsets()[:, 0]) == [8, 9, 10]
    length = plot_panel(runs, PANELS[3]).axes[0].get_lines()[0]
    assert list(length.get_xdata()) == [1, 2] + list(range(4, 13))  # the null at step 3 is a gap, not a zero
    coefficients = plot_panel(runs, PANELS[5])
    assert [ax.get_title() for ax in coefficients.axes] == ["actor/entropy_coeff", "actor/kl_coef"]
    assert [[line.get_label() for line in ax.get_lines()] for ax in coefficients.axes] == [
        ["run-a", "run-b"], ["run-a", "run-b"]
    ]
    assert plot_panel([Run("empty", tmp_path, rows=[{"step": 1}])], PANELS[0]) is None


def test_pick_samples():
    samples = [{"step": s, "response": str(i)} for i, s in enumerate([1, 1, 1, 5, 9, 9])]
    assert [(phase, step, [s["response"] for s in rows]) for phase, step, rows in pick_samples(samples)] == [
        ("early", 1, ["0", "1"]), ("middle", 5, ["3"]), ("late", 9, ["4", "5"])]
    assert [p[:2] for p in pick_samples([{"step": 2}, {"step": 3}])] == [("early", 2), ("late", 3)]


# --------------------------------------------------------------------------- written report


def test_single_run_report(tmp_path):
    run_dir = make_run(tmp_path)
    html_path = write_report([str(run_dir)], steps=[3, 6])
    assert html_path == (run_dir / "report.html").resolve()
    page = parse_html(html_path)
    assert len(page.images) == 6  # entropy, score, KL, length, connectives, coefficients
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        pixels = png_pixels(base64.b64decode(src.split(",", 1)[1]))
        assert pixels[..., :3].std() > 0.05
    start = page.cells.index("score")
    assert page.cells[start : start + 5] == ["score", "0.15", "0.3", "0.5", "improving"]
    # criteria (embedded rules): entropy 0.2 is above the good band 0.02-0.15 but below bad (> 1.0); the band is a
    # criterion only from step 20 (good_from), so in this 12-step run it is good, never watch
    start = page.cells.index("actor/entropy", page.cells.index("rule"))
    assert page.cells[start + 2 : start + 5] == ["0.2 @12", "good", "n/a"]
    assert ["seed", "1", "git_commit", "abc123", "versions.torch", "2.13.0"] == page.cells[page.cells.index("seed") :][:6]
    text = html_path.read_text()
    assert "&lt;b&gt;24&lt;/b&gt; &amp; done" in text  # completions are escaped, step 12 is the late phase
    md = (run_dir / "report.md").read_text()
    assert "![entropy](plots/entropy.png)" in md and "| score | 0.15 | 0.3 | 0.5 | improving |" in md
    assert png_pixels((run_dir / "plots" / "entropy.png").read_bytes()).shape == (320, 640, 4)


def test_several_runs_and_sweep(tmp_path, monkeypatch):
    a, b = make_run(tmp_path / "x", "run-a"), make_run(tmp_path / "y", "run-a", entropy_coeff=0.01)
    monkeypatch.chdir(tmp_path)
    html_path = write_report([str(a), str(b)])
    assert html_path == tmp_path / "report" / "report.html"
    page = parse_html(html_path)
    assert "x/run-a" in page.cells and "y/run-a" in page.cells  # same dir name: the parent tells them apart
    start = page.cells.index("actor_rollout_ref.actor.entropy_coeff")
    assert page.cells[start : start + 3] == ["actor_rollout_ref.actor.entropy_coeff", "0.001", "0.01"]
    start = page.cells.index("x/run-a")  # comparison: last step, score, entropy, KL, length, in band, held-out, health, trend
    assert page.cells[start : start + 11] == ["x/run-a", "12", "0.5", "0.2", "0.001", "41", "n/a", "0.25", "0.5", "bad",
                                              "improving"]  # fixed coefficients: no band of their own

    sweep = tmp_path / "sweep"
    make_run(sweep / "runs", "trial-0")
    make_run(sweep / "runs", "trial-1", scale=0.5)
    (sweep / "summary.csv").write_text("name,entropy_coeff,final_score\ntrial-0,0.001,0.5\ntrial-1,0.003,0.45\n")
    assert report_main([str(sweep), "--steps", "5,10"]) == 0
    page = parse_html(sweep / "report.html")
    start = page.cells.index("final_score")
    assert page.cells[start : start + 7] == ["final_score", "trial-0", "0.001", "0.5", "trial-1", "0.003", "0.45"]
    assert page.cells.count("step 5") == 2 and page.cells.count("step 10") == 2  # one results summary per trial
    md = (sweep / "report.md").read_text()
    assert "| trial-0 | 0.001 | 0.5 |" in md


def test_report_errors(tmp_path):
    with pytest.raises(KeelError, match="is not a run directory"):
        write_report([str(tmp_path)])
    with pytest.raises(KeelError, match="is not a directory"):
        write_report([str(tmp_path / "missing")])
    with pytest.raises(KeelError, match="--steps must be comma-separated integers"):
        report_main([str(make_run(tmp_path)), "--steps", "6,x"])
    with pytest.raises(KeelError, match=r"--band must be LOW,HIGH in nats like 0.08,0.16, got '0.1'"):
        report_main([str(tmp_path / "run-a"), "--band", "0.1"])
    with pytest.raises(KeelError, match=r"--band must have 0 <= LOW < HIGH, got '0.2,0.1'"):
        report_main([str(tmp_path / "run-a"), "--band", "0.2,0.1"])


def test_seed_sweep_report_leads_with_pictures_and_shows_the_spread(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "runs", "V3-s1")
    make_run(sweep / "runs", "V3-s2", scale=0.01)  # entropy 100x lower: the curves span decades
    (sweep / "summary.csv").write_text(
        "run,outcome,heldout_acc_before,heldout_acc_after,heldout_acc_after_se,heldout_acc_after_s1,heldout_acc_after_s2\n"
        "V3,Stable 2/2,0.43,0.55,0.05,0.5,0.6\n")
    html_path = write_report([str(sweep)])
    text = html_path.read_text()
    assert text.index("<h2>Curves</h2>") < text.index("<h2>Results</h2>")  # pictures first
    md = (sweep / "report.md").read_text()
    assert md.index("![seed_spread_sweep](plots/seed_spread_sweep.png)") < md.index("![entropy](plots/entropy.png)")
    spread = png_pixels((sweep / "plots" / "seed_spread_sweep.png").read_bytes())
    assert spread[..., :3].std() > 0.05
    assert "Stable 2/2" in md


def test_entropy_axis_turns_logarithmic_when_it_spans_decades(tmp_path):
    assert spans_decades([0.03, 0.3]) and not spans_decades([0.05, 0.3]) and not spans_decades([])
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", scale=0.01)
    entropy = next(p for p in PANELS if p.name == "entropy")
    assert plot_panel([load_run(a), load_run(b)], entropy).axes[0].get_yscale() == "log"
    assert plot_panel([load_run(a)], entropy).axes[0].get_yscale() == "linear"
