"""keel.monitor: rule parsing, verdicts on hand-made steps, and replays of recorded metric traces.

The traces in tests/traces/ are written by tests/traces/make_traces.py (see its docstring for the
curves). The replay tests pin the step at which each warning / bad verdict fires and check it
against the trace itself: the warning must come before the threshold it warns about is crossed.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from keel.errors import KeelError
from keel.monitor import (
    Monitor,
    Rule,
    checkpoint_steps,
    describe,
    load_rules,
    monitor_main,
    read_metrics,
    render_table,
    summarize,
)

TRACES = Path(__file__).resolve().parent / "traces"


def replay(name: str, rule_set: str):
    """Feed a trace to a fresh monitor -> (records, verdicts, events)."""
    records = read_metrics(TRACES / f"{name}.jsonl")
    monitor = Monitor(load_rules(rule_set))
    verdicts = [monitor.observe(step, m) for step, m in records]
    return records, verdicts, [e for v in verdicts for e in v.events]


def first_step(records, metric, pred):
    return next(step for step, m in records if m.get(metric) is not None and pred(m[metric]))


def first_fire(events, rule_id):
    return next(e["step"] for e in events if e["rule"] == rule_id and e["verdict"] != "good")


# --------------------------------------------------------------------------- rule sets


def test_lablog_rules_are_the_lab_log_table():
    rules = {r.id: r for r in load_rules("lablog")}
    ent = rules["actor/entropy"]
    # the lab log's table as written: bad (< 1 or > 7) at any step after a 10-step settling period, good 3-6 at step 100
    assert (ent.good, ent.bad, ent.from_step, ent.good_from) == ((3.0, 6.0), [(None, 1.0), (7.0, None)], 10, 100)
    assert (rules["token/logical_connectives"].good, rules["token/logical_connectives"].bad) == ((0.05, None), [(None, 0.02)])
    assert (rules["response_length/pos/mean"].good, rules["response_length/pos/mean"].bad) == ((50.0, None), [(None, 20.0)])
    assert (rules["actor/kl_loss"].good, rules["actor/kl_loss"].bad) == ((None, 3.0), [(5.0, None)])
    assert {r.kind for r in rules.values()} == {"threshold", "trend", "score"}
    assert describe(ent) == "good 3.0–6.0, bad < 1.0 or > 7.0, patience 5, good band from step 100, from step 10"
    assert rules["token/logical_connectives"].unless_rising == "critic/score/mean"
    assert describe(rules["score_regressed"]) == "bad EMA 0.9 > 0.1 below its best, patience 20, from step 10"


def test_embedded_rules_load_with_entropy_far_below_qwen_scale():
    rules = {r.id: r for r in load_rules("embedded")}
    lo, hi = rules["actor/entropy"].good
    assert hi < math.log(49) / 10  # the healthy band is a small fraction of ln V for the character model
    assert lo <= 0.02 and hi >= 0.1  # and it contains the healthy 0.02-0.1 nats


def test_frac_log_vocab_bounds_are_multiplied_by_ln_v(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("- metric: actor/entropy\n  good: [0.25, 0.5]\n  bad: [[null, 0.1], [0.9, null]]\n  frac_log_vocab: true\n"
                 "- {kind: trend, metric: actor/entropy, direction: rising, toward: 0.6, frac_log_vocab: true}\n")
    ln_v = math.log(151936)  # 11.93
    ent, trend = load_rules(str(f), vocab_size=151936)
    assert ent.good == pytest.approx((0.25 * ln_v, 0.5 * ln_v))
    assert ent.bad[0][1] == pytest.approx(0.1 * ln_v) and ent.bad[1][0] == pytest.approx(0.9 * ln_v)
    assert trend.toward == pytest.approx(0.6 * ln_v) and not ent.frac_log_vocab
    assert "× ln V = 11.93" in describe(ent)
    with pytest.raises(KeelError, match=r"entry 1 \(actor/entropy\).*frac_log_vocab needs the vocabulary size"):
        load_rules(str(f))
    # a Rule built in code is scaled by the monitor itself
    m = Monitor([Rule("x", good=(0.5, 1.0), frac_log_vocab=True)], vocab_size=math.e**2)
    assert m.rules[0].good == pytest.approx((1.0, 2.0))


@pytest.mark.parametrize(
    "text, match",
    [
        ("- metric: a\n  god: [1, 2]\n", r"entry 1 \(a\): unknown field 'god' \(did you mean 'good'\?\)"),
        ("- metric: a\n  good: [1, 2]\n- metric: b\n  good: [3, 1]\n", r"entry 2 \(b\): 'good' has lo > hi"),
        ("- metric: a\n  good: [1, 2]\n  window: 5\n", r"entry 1 \(a\): field 'window' does not apply to threshold"),
        ("- good: [1, 2]\n", r"entry 1 \(None\): 'metric' .* is required"),
        ("- metric: a\n", r"entry 1 \(a\): a threshold rule needs 'good' and/or 'bad'"),
        ("- metric: a\n  good: [1, 2]\n  patience: 0\n", r"'patience' must be an integer >= 1, got 0"),
        ("- metric: a\n  kind: trend\n  direction: up\n", r"'direction' must be falling or rising"),
        ("- metric: a\n  bad: [1, 2, 3]\n", r"'bad' must be \[lo, hi\]"),
        ("- metric: a\n  good: [1, 2]\n- metric: a\n  bad: [null, 0]\n", r"entry 2 \(a\): rule id 'a' is used twice"),
        ("metric: a\n", r"must hold a YAML list of rules, got dict"),
        ("- metric: a\n  good: [1, 2\n", r"malformed YAML"),
        ("- just a string\n", r"entry 1: a rule must be a mapping"),
    ],
)
def test_bad_rule_files_name_file_and_entry(tmp_path, text, match):
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(KeelError, match=match) as e:
        load_rules(str(f))
    assert str(f) in str(e.value)


def test_unknown_rule_set():
    with pytest.raises(KeelError, match="neither a built-in rule set .*embedded, lablog"):
        load_rules("qwen")


def test_extra_rules_replace_by_id_or_append():
    extra = [{"metric": "actor/entropy", "good": [2.0, 5.0], "bad": [None, 0.5]},  # replaces the table's row
             {"metric": "batch/valid", "good": [0.2, None], "bad": [None, 0.05], "patience": 10}]
    rules = load_rules("lablog", extra=extra)
    by_id = {r.id: r for r in rules}
    assert len(rules) == len(load_rules("lablog")) + 1
    assert by_id["actor/entropy"].good == (2.0, 5.0) and by_id["actor/entropy"].from_step == 0
    assert by_id["batch/valid"].patience == 10
    with pytest.raises(KeelError, match=r"config key 'monitor.extra_rules' entry 1 \(x\): unknown field 'bda'"):
        load_rules("lablog", extra=[{"metric": "x", "bda": [1, 2]}])


# --------------------------------------------------------------------------- verdicts


def entropy_rule(patience=3, **kw):
    return Rule("actor/entropy", good=(3.0, 6.0), bad=[(None, 1.0), (7.0, None)], patience=patience, **kw)


def test_threshold_verdicts_and_patience():
    m = Monitor([entropy_rule()])
    seq = [(4.0, "good", "good"), (2.0, "watch", "watch"), (0.5, "bad", "watch"), (0.7, "bad", "watch"), (0.62, "bad", "bad")]
    for step, (value, rule_verdict, overall) in enumerate(seq, 1):
        v = m.observe(step, {"actor/entropy": value})
        assert (v.per_rule["actor/entropy"].verdict, v.overall) == (rule_verdict, overall), step
    assert v.reason == "actor/entropy 0.62 < 1.0 for 3 steps"
    assert (v.failing_rule.metric, v.failing_rule.direction, v.failing_rule.verdict) == ("actor/entropy", "low", "bad")
    assert m.metrics(v) == {"health/overall": 2, "health/actor/entropy": 2}
    assert (m.first_warning_step, m.first_bad_step) == (2, 5)
    v = m.observe(6, {"actor/entropy": 8.0})  # the too-random side: still a consecutive bad step
    assert (v.overall, v.failing_rule.direction, v.reason) == ("bad", "high", "actor/entropy 8.0 > 7.0 for 4 steps")
    v = m.observe(7, {"actor/entropy": 4.5})
    assert (v.overall, v.reason, v.failing_rule) == ("good", None, None)


def test_bounds_good_is_closed_bad_is_open():
    m = Monitor([entropy_rule(patience=1)])
    assert m.observe(1, {"actor/entropy": 3.0}).overall == "good"  # on the good band's edge
    assert m.observe(2, {"actor/entropy": 1.0}).overall == "watch"  # on the bad bound: not bad
    assert m.observe(3, {"actor/entropy": 0.999}).overall == "bad"


def test_missing_values_and_from_step_are_not_judged():
    m = Monitor([entropy_rule(from_step=10)])
    v = m.observe(5, {"actor/entropy": 0.1})  # before from_step
    assert (v.per_rule["actor/entropy"].verdict, v.overall) == (None, "good")
    assert m.metrics(v) == {"health/overall": 0, "health/actor/entropy": None}
    m.observe(10, {"actor/entropy": 0.1})
    m.observe(11, {"actor/entropy": 0.1})
    for step, value in [(12, None), (13, float("nan")), (14, "n/a")]:  # missing: the bad streak is kept, not reset
        assert m.observe(step, {"actor/entropy": value}).per_rule["actor/entropy"].verdict is None
    assert m.observe(15, {}).overall == "good"  # a rule that cannot judge adds nothing to the overall verdict
    v = m.observe(16, {"actor/entropy": 0.1})
    assert (v.overall, v.reason) == ("bad", "actor/entropy 0.1 < 1.0 for 3 steps")


def test_events_on_changes_only():
    m = Monitor([entropy_rule(patience=2)])
    assert m.observe(1, {"actor/entropy": 4.0}).events == []
    ev = m.observe(2, {"actor/entropy": 0.5}).events
    assert [(e["rule"], e["previous"], e["verdict"]) for e in ev] == [("actor/entropy", "good", "bad"), ("overall", "good", "watch")]
    assert ev[0]["reason"] == "actor/entropy 0.5 < 1.0 for 1 step (bad after 2)" and ev[0]["direction"] == "low"
    ev = m.observe(3, {"actor/entropy": 0.5}).events
    assert [(e["rule"], e["verdict"], e["reason"]) for e in ev] == [("overall", "bad", "actor/entropy 0.5 < 1.0 for 2 steps")]
    ev = m.observe(4, {"actor/entropy": 4.0}).events
    assert [(e["rule"], e["verdict"]) for e in ev] == [("actor/entropy", "good"), ("overall", "good")]
    json.dumps(ev, allow_nan=False)


def collapse_loop(**kw):
    return Rule("actor/entropy", kind="trend", name="loop", direction="falling", window=5, change=0.3,
                with_metric="response_length/pos/mean", with_direction="falling", with_change=0.1, **kw)


def test_trend_fires_only_when_both_metrics_fall():
    m = Monitor([collapse_loop()])
    # entropy 10 9 8 7 6: the fitted line goes 10 -> 6, -40 % over the 5-step window
    for step, h in enumerate([10, 9, 8, 7, 6], 1):
        v = m.observe(step, {"actor/entropy": h, "response_length/pos/mean": 100})  # length flat
    assert v.overall == "good"
    m = Monitor([collapse_loop()])
    for step, (h, n) in enumerate([(10, 100), (9, 95), (8, 90), (7, 85), (6, 80)], 1):
        v = m.observe(step, {"actor/entropy": h, "response_length/pos/mean": n})
        # 3 points (half the window) are needed; at step 3 the line falls 20 %, at step 4 30 %: fires
        assert v.per_rule["loop"].verdict == (None if step < 3 else "good" if step < 4 else "watch"), step
    assert v.reason == ("actor/entropy fell 40% over 5 steps (10.0 → 6.0) "
                        "while response_length/pos/mean fell 20% (100 → 80.0)")
    assert (v.failing_rule.rule, v.failing_rule.direction) == ("loop", "low")


def test_trend_toward_a_ceiling_uses_the_horizon():
    def run(horizon):
        rule = Rule("h", kind="trend", direction="rising", window=5, change=0.1, toward=10.0, horizon=horizon)
        m = Monitor([rule])
        for step in range(1, 6):
            v = m.observe(step, {"h": float(step)})  # slope 1 per step, at 5: 5 steps from 10
        return v
    assert run(4).overall == "good"
    v = run(5)
    assert v.overall == "watch" and v.reason.endswith("heading for 10.0 in ~5 steps")
    assert v.failing_rule.direction == "high"


@pytest.mark.parametrize("last, fires", [(7.02, False), (6.98, True)])
def test_trend_change_just_inside_and_outside_the_edge(last, fires):
    # entropy 10 9 8 then `last`: the fitted line falls ~29.4 % (7.02) or ~30.6 % (6.98); the edge is 30 %
    m = Monitor([collapse_loop()])
    for step, (h, n) in enumerate([(10, 100), (9, 95), (8, 90), (last, 85)], 1):
        v = m.observe(step, {"actor/entropy": h, "response_length/pos/mean": n})
    assert v.per_rule["loop"].verdict == ("watch" if fires else "good")


@pytest.mark.parametrize("noise", [-1e-13, 0.0, 1e-13])
def test_trend_on_the_edge_does_not_flip_with_rounding_noise(noise):
    # exactly 30 % (10 -> 7) is crossed; a last-bit perturbation of the data must not change that
    m = Monitor([collapse_loop()])
    for step, (h, n) in enumerate([(10, 100), (9, 95), (8 + noise, 90), (7 - noise, 85)], 1):
        v = m.observe(step, {"actor/entropy": h, "response_length/pos/mean": n})
    assert v.per_rule["loop"].verdict == "watch"


@pytest.mark.parametrize("horizon, fires", [(4.9, False), (5.1, True)])
def test_trend_horizon_just_inside_and_outside_the_edge(horizon, fires):
    rule = Rule("h", kind="trend", direction="rising", window=5, change=0.1, toward=10.0, horizon=horizon)
    m = Monitor([rule])
    for step in range(1, 6):
        v = m.observe(step, {"h": float(step)})  # at step 5, 5 steps from 10
    assert (v.overall == "watch") == fires


def test_trend_patience_and_level_bad():
    rule = Rule("h", kind="trend", direction="falling", window=3, change=0.1, patience=2, level="bad")
    m = Monitor([rule])
    verdicts = [m.observe(s, {"h": x}).overall for s, x in enumerate([10, 9, 8, 7], 1)]
    assert verdicts == ["good", "good", "good", "bad"]  # fires at step 3, but needs 2 steps in a row


def test_reobserved_steps_replace_the_trend_window():
    m = Monitor([collapse_loop()])
    for step, (h, n) in enumerate([(10, 100), (9, 95), (8, 90), (7, 85)], 1):
        m.observe(step, {"actor/entropy": h, "response_length/pos/mean": n})
    # roll back to step 2 and continue flat: the falling points of steps 3-4 must be gone
    for step in (3, 4, 5):
        v = m.observe(step, {"actor/entropy": 9, "response_length/pos/mean": 95})
    assert v.overall == "good"


def test_state_dict_round_trip_resumes_identically():
    records = read_metrics(TRACES / "rise_collapse.jsonl")
    rules = load_rules("lablog")
    full = Monitor(rules)
    expected = [(v.overall, v.reason) for v in (full.observe(s, m) for s, m in records)]
    first = Monitor(rules)
    for s, m in records[:60]:
        first.observe(s, m)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))  # through JSON, as in a checkpoint
    resumed = Monitor(rules)
    resumed.load_state_dict(state)
    got = [(v.overall, v.reason) for v in (resumed.observe(s, m) for s, m in records[60:])]
    assert got == expected[60:]
    assert (resumed.first_warning_step, resumed.first_bad_step) == (full.first_warning_step, full.first_bad_step)


def test_duplicate_rule_ids_are_refused():
    with pytest.raises(KeelError, match="duplicate ids"):
        Monitor([Rule("x", good=(0, 1)), Rule("x", bad=[(None, 0)])])


# --------------------------------------------------------------------------- recorded traces (lablog scale)


def test_stable_run_stays_good():
    records, verdicts, events = replay("stable", "lablog")
    assert len(records) == 160 and records[36][1]["response_length/pos/mean"] is None  # step 37: no positives
    assert {v.overall for v in verdicts} == {"good"} and events == []
    assert verdicts[-1].per_rule["actor/entropy"].verdict == "good"  # judged from step 100 on


def test_over_random_run_warns_before_the_ceiling():
    records, verdicts, events = replay("over_random", "lablog")
    crosses_ceiling = first_step(records, "actor/entropy", lambda h: h > 7.0)
    warned = first_fire(events, "entropy_toward_ceiling")
    assert (warned, crosses_ceiling) == (110, 142)
    assert warned < crosses_ceiling
    first_warning = next(v.step for v in verdicts if v.overall != "good")
    first_bad = next(v.step for v in verdicts if v.overall == "bad")
    # the trace's score falls 0.5 -> 0.1 with the text: the task-score rule sees the regression first (EMA 0.1 below
    # its best from step 69, bad after 20 steps in a row), long before entropy passes the ceiling
    assert (first_warning, first_bad) == (69, 88)
    assert verdicts[first_bad - 1].failing_rule.kind == "score"
    ent_bad = next(v.step for v in verdicts if v.per_rule["actor/entropy"].effective == "bad")
    assert ent_bad == 146  # the ceiling itself: 142 + patience 5
    last = verdicts[-1]
    assert last.overall == "bad" and last.per_rule["actor/entropy"].reason.startswith("actor/entropy 8.71 > 7.0 for ")


def test_rise_then_collapse_is_flagged_before_the_collapse():
    records, verdicts, events = replay("rise_collapse", "lablog")  # verl's {"step", "data"} lines
    assert len(records) == 78 and records[0][1]["actor/entropy"] == pytest.approx(3.922)
    peak = 46  # of the curve in make_traces.py (the noisy trace's highest value is at step 42)
    below_floor = first_step(records, "actor/entropy", lambda h: h < 1.0)  # the lab log's bad floor
    first_warning = next(v for v in verdicts if v.overall != "good")
    assert (first_warning.step, below_floor) == (55, 68)
    assert peak < first_warning.step < below_floor < 78
    assert first_warning.failing_rule.rule == "entropy_collapse_loop" and first_warning.failing_rule.direction == "low"
    assert first_warning.reason.startswith("actor/entropy fell 30% over 20 steps")
    # actor/entropy is judged at any step after settling: below 1.0 from step 68, bad after patience 5
    first_bad = next(v for v in verdicts if v.overall == "bad")
    assert first_bad.step == below_floor + 4 == 72 and first_bad.reason == "actor/entropy 0.596 < 1.0 for 5 steps"


def test_monotone_collapse_warns_long_before_bad():
    records, verdicts, events = replay("monotone_collapse", "lablog")
    first_warning = next(v for v in verdicts if v.overall != "good")
    below_floor = first_step(records, "actor/entropy", lambda h: h < 1.0)
    first_bad = next(v for v in verdicts if v.overall == "bad")
    assert (first_warning.step, below_floor, first_bad.step) == (19, 113, 117)
    assert first_warning.failing_rule.rule == "entropy_collapse_loop"
    assert first_bad.reason == "actor/entropy 0.86 < 1.0 for 5 steps"  # patience 5: 113..117


# --------------------------------------------------------------------------- recorded traces (embedded scale)


def test_embedded_stable_run_stays_good():
    _, verdicts, events = replay("embedded_stable", "embedded")
    assert {v.overall for v in verdicts} == {"good"} and events == []


def test_embedded_style_collapse():
    records, verdicts, _ = replay("embedded_collapse", "embedded")
    first_warning = next(v for v in verdicts if v.overall != "good")
    first_bad = next(v for v in verdicts if v.overall == "bad")
    leaves_band = first_step(records, "actor/entropy", lambda h: h < 0.02)
    assert (first_warning.step, leaves_band, first_bad.step) == (32, 43, 65)
    assert first_warning.failing_rule.rule == "entropy_collapse_loop"
    assert first_bad.failing_rule.metric == "response_length/pos/mean"


# --------------------------------------------------------------------------- summarize / keel monitor


def make_run_dir(tmp_path, rules="lablog"):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000040").mkdir(parents=True)
    (run / "checkpoints" / "step_60").mkdir()
    (run / "checkpoints" / "latest.txt").write_text("60")  # not a checkpoint directory
    (run / "config.yaml").write_text(f"monitor:\n  rules: {rules}\n  action: log\n")
    with open(run / "metrics.jsonl", "w") as f:  # flat lines, written from the verl-format trace
        for step, m in read_metrics(TRACES / "rise_collapse.jsonl"):
            f.write(json.dumps({"step": step, **m}) + "\n")
    return run


def test_summarize_run_dir(tmp_path):
    run = make_run_dir(tmp_path)
    s = summarize(run)
    assert (s["rule_set"], s["steps"], s["last_step"], s["checkpoints"]) == ("lablog", 78, 78, [40, 60])
    assert (s["overall"], s["first_warning_step"], s["first_bad_step"]) == ("bad", 55, 72)
    assert s["failing_rule"]["metric"] == "actor/entropy"
    rows = {r["rule"]: r for r in s["rules"]}
    records = dict(read_metrics(TRACES / "rise_collapse.jsonl"))
    pos = rows["response_length/pos/mean"]
    assert pos["latest"] == records[78]["response_length/pos/mean"] and pos["verdict"] == "bad"
    assert pos["at_checkpoints"]["40"] == {"value": records[40]["response_length/pos/mean"], "verdict": "good"}
    assert (pos["first_warning_step"], pos["first_bad_step"]) == (70, 73)
    ent = rows["actor/entropy"]
    assert ent["latest"] == records[78]["actor/entropy"] and ent["verdict"] == "bad" and ent["first_bad_step"] == 68
    assert rows["entropy_collapse_loop"]["first_warning_step"] == 55
    # the verl-format file gives the same answer (no run directory: no checkpoints, lablog by default)
    bare = summarize(TRACES / "rise_collapse.jsonl")
    assert bare["rule_set"] == "lablog" and bare["checkpoints"] == []
    assert [r["latest"] for r in bare["rules"]] == [r["latest"] for r in s["rules"]]


def test_run_dir_rules_come_from_its_config(tmp_path):
    run = make_run_dir(tmp_path, rules="my_rules.yaml")
    (run / "my_rules.yaml").write_text("- metric: actor/kl_loss\n  good: [null, 1.0]\n  bad: [2.0, null]\n")
    s = summarize(run)
    assert [r["rule"] for r in s["rules"]] == ["actor/kl_loss"] and s["rule_set"].endswith("my_rules.yaml")
    assert summarize(run, "embedded")["rule_set"] == "embedded"  # an explicit choice wins


def test_checkpoint_step_names(tmp_path):
    for name in ("step_000100", "step_7", "global_step_30", "step_x", "tmp"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert checkpoint_steps(tmp_path) == [7, 30, 100]
    assert checkpoint_steps(None) == []


def test_read_metrics_formats_and_errors(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 2, "actor/entropy": 1.5}\n\n{"step": 1, "data": {"actor/entropy": NaN}}\n'
                 '{"step": 2.0, "data": {"val/score": 0.5}}\n{"step": 3, "actor/ent')  # last line still being written
    (s1, m1), (s2, m2) = read_metrics(f)  # sorted by step; lines of one step merged
    assert (s1, s2, m2) == (1, 2, {"actor/entropy": 1.5, "val/score": 0.5})
    assert math.isnan(m1["actor/entropy"])  # NaN is read as NaN, and never judged
    f.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(KeelError, match=r"m.jsonl' line 2: not valid JSON"):
        read_metrics(f)
    f.write_text('{"actor/entropy": 1.0}\n')
    with pytest.raises(KeelError, match=r"line 1: no integer 'step'"):
        read_metrics(f)
    with pytest.raises(KeelError, match="does not exist"):
        summarize(tmp_path / "nope")
    with pytest.raises(KeelError, match="has no metrics.jsonl"):
        summarize(tmp_path)


def test_render_table(tmp_path):
    console = Console(record=True, width=250)
    console.print(render_table(summarize(make_run_dir(tmp_path))))
    text = console.export_text()
    assert "overall BAD" in text and "step 40" in text and "step 60" in text
    assert "actor/entropy 0.19 < 1.0 for 11 steps" in text  # the caption: the failing rule's reason
    row = next(line for line in text.splitlines() if "response_length/pos/mean" in line and "good ≥ 50" in line)
    assert "6.11 @78" in row and "bad" in row


def test_monitor_main_json(tmp_path, capsys):
    assert monitor_main([str(make_run_dir(tmp_path)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["overall"], out["first_warning_step"], out["first_bad_step"]) == ("bad", 55, 72)
    assert {r["rule"]: r["verdict"] for r in out["rules"]}["actor/kl_loss"] == "watch"


def test_monitor_main_follow(tmp_path, capsys):
    run = tmp_path / "starting"
    run.mkdir()  # the run has not written metrics.jsonl yet: --follow waits for it
    assert monitor_main([str(run), "--follow", "--json", "--count", "2", "--interval", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["overall"] is None and json.loads(lines[0])["steps"] == 0
    shutil.copy(TRACES / "stable.jsonl", run / "metrics.jsonl")
    assert monitor_main([str(run), "--follow", "--count", "2", "--interval", "0.01", "--rules", "lablog"]) == 0
    assert "overall GOOD" in capsys.readouterr().out
    with pytest.raises(KeelError, match="interval"):
        monitor_main([str(run), "--interval", "0"])


# --------------------------------------------------------------------------- the lab log's criteria as written

# V0-V3 of the lab log as noiseless entropy curves over a 100-step run, t = 1..100. Where each must turn bad is
# worked out from the curve: the first step past the bad bound, plus patience 5 - 1.
LABLOG_SHAPES = {
    # V0 monotone collapse: 4.5 exp(-t/30) < 1 for t > 30 ln 4.5 = 45.1 -> 46; bad at 50
    "V0": (lambda t: 4.5 * math.exp(-t / 30), 50, "low"),
    # V1 monotone rise past the ceiling: 4 + 0.045 t > 7 for t > 66.7 -> 67; bad at 71 (from_step 100 never judged it)
    "V1": (lambda t: 4.0 + 0.045 * t, 71, "high"),
    # V2 rise to 6.0 at t = 40, then 6 exp(-(t-40)/12) < 1 for t > 40 + 12 ln 6 = 61.5 -> 62; bad at 66
    "V2": (lambda t: 4.0 + 0.05 * t if t <= 40 else 6.0 * math.exp(-(t - 40) / 12), 66, "low"),
    # V3 stable: 4.5 +- 0.3, inside 3-6 at step 100
    "V3": (lambda t: 4.5 + 0.3 * math.sin(t / 5), None, None),
}
EMBEDDED_SHAPES = {  # the same shapes on the embedded scale (bad < 0.005 or > 1.0 after step 5, patience 5)
    # 0.15 exp(-t/15) < 0.005 for t > 15 ln 30 = 51.0 -> 52; bad at 56
    "V0": (lambda t: 0.15 * math.exp(-t / 15), 56, "low"),
    # 0.15 exp(t/40) > 1 for t > 40 ln(20/3) = 75.9 -> 76; bad at 80
    "V1": (lambda t: 0.15 * math.exp(t / 40), 80, "high"),
    # 0.15 e at t = 40, then x exp(-(t-40)/8) < 0.005 for t > 40 + 8 ln(0.15 e / 0.005) = 75.2 -> 76; bad at 80
    "V2": (lambda t: 0.15 * math.exp(t / 40) if t <= 40 else 0.15 * math.e * math.exp(-(t - 40) / 8), 80, "low"),
    "V3": (lambda t: 0.06 + 0.01 * math.sin(t / 5), None, None),
}


@pytest.mark.parametrize("rule_set, shapes", [("lablog", LABLOG_SHAPES), ("embedded", EMBEDDED_SHAPES)])
@pytest.mark.parametrize("name", ["V0", "V1", "V2", "V3"])
def test_lab_log_shaped_runs_turn_bad_where_the_criteria_say(rule_set, shapes, name):
    curve, bad_at, side = shapes[name]
    monitor = Monitor(load_rules(rule_set))
    verdicts = [monitor.observe(t, {"actor/entropy": curve(t)}) for t in range(1, 101)]
    assert monitor.first_bad_step == bad_at
    if bad_at is None:
        assert verdicts[-1].per_rule["actor/entropy"].verdict == "good"  # good at step 100
    else:
        v = verdicts[bad_at - 1]
        assert (v.failing_rule.rule, v.failing_rule.direction) == ("actor/entropy", side)


def test_good_band_is_judged_from_good_from_and_bad_ranges_after_settling():
    rules = {r.id: r for r in load_rules("lablog")}
    m = Monitor([rules["actor/entropy"]])
    # 2.0 is outside the good band 3-6 but in no bad range: fine until step 100, watch from then on
    got = [m.observe(t, {"actor/entropy": 2.0}).overall for t in (1, 50, 99, 100, 101)]
    assert got == ["good", "good", "good", "watch", "watch"]
    m = Monitor([rules["actor/entropy"]])
    for t in range(1, 15):  # 0.5 < 1 from step 1: the first 9 steps settle, 10..14 are the 5 bad steps
        v = m.observe(t, {"actor/entropy": 0.5})
    assert (m.first_bad_step, v.reason) == (14, "actor/entropy 0.5 < 1.0 for 5 steps")


# --------------------------------------------------------------------------- task-score rules and proxies


def test_score_rule_against_its_own_best_hand_computed():
    m = Monitor([Rule("s", kind="score", reference="best", drop=0.1, ema=0.5, patience=2)])
    # EMA: 0.6, 0.6, 0.45, 0.375, 0.3375; best 0.6; gap 0, 0, 0.15 (> 0.1: 1st), 0.225 (2nd: bad)
    got = [(v.per_rule["s"].verdict, v.overall) for v in (m.observe(t, {"s": x}) for t, x in enumerate([0.6, 0.6, 0.3, 0.3], 1))]
    assert got == [("good", "good"), ("good", "good"), ("bad", "watch"), ("bad", "bad")]
    v = m.observe(5, {"s": 0.3})
    assert v.reason == "s (EMA 0.5) 0.338 is 0.262 below its best 0.6 for 3 steps"  # 0.2625 in floats
    assert (v.failing_rule.kind, v.failing_rule.direction) == ("score", "low")
    v = m.observe(6, {"s": 0.9})  # EMA 0.619: a new best, good again
    assert v.overall == "good" and m.state_dict()["ref"]["s"] == pytest.approx(0.61875)


def test_heldout_rule_against_its_start_holds_between_evaluations():
    m = Monitor([Rule("val/accuracy", kind="score", reference="start", drop=0.02, ema=0.0)])
    assert m.observe(5, {"val/accuracy": 0.43}).overall == "good"  # the start
    assert m.observe(9, {}).per_rule["val/accuracy"].verdict == "good"  # no evaluation this step: the last verdict
    assert m.observe(10, {"val/accuracy": 0.45}).overall == "good"
    assert m.observe(15, {"val/accuracy": 0.415}).overall == "good"  # 1.5 points below: within the 2-point margin
    v = m.observe(20, {"val/accuracy": 0.40})
    assert (v.overall, v.reason) == ("bad", "val/accuracy 0.4 is 0.03 below its start 0.43 for 1 step")
    assert m.observe(21, {}).overall == "bad"


def test_a_proxy_alone_does_not_overrule_a_rising_task_score():
    proxy = Rule("token/logical_connectives", good=(0.2, None), bad=[(None, 0.02)], unless_rising="critic/score/mean",
                 rise=0.05, ema=0.0)
    m = Monitor([proxy])
    assert m.observe(1, {"token/logical_connectives": 0.5, "critic/score/mean": 0.40}).overall == "good"
    v = m.observe(2, {"token/logical_connectives": 0.01, "critic/score/mean": 0.50})  # 0.10 above the first value
    assert (v.per_rule[proxy.id].verdict, v.overall) == ("bad", "watch")
    assert v.reason == ("token/logical_connectives 0.01 < 0.02 for 1 step; "
                        "held at watch: critic/score/mean is rising (0.4 → 0.5)")
    v = m.observe(3, {"token/logical_connectives": 0.01, "critic/score/mean": 0.42})  # only 0.02 above: not rising
    assert (v.overall, v.reason) == ("bad", "token/logical_connectives 0.01 < 0.02 for 2 steps")


def test_monitor_state_keeps_the_smoothed_scores():
    rules = load_rules("embedded")
    scores = [0.5 + 0.02 * t for t in range(10)] + [0.2] * 30
    full = Monitor(rules)
    expected = [full.observe(t, {"critic/score/mean": x}).overall for t, x in enumerate(scores, 1)]
    first = Monitor(rules)
    for t, x in enumerate(scores[:12], 1):
        first.observe(t, {"critic/score/mean": x})
    resumed = Monitor(rules)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got = [resumed.observe(t, {"critic/score/mean": x}).overall for t, x in enumerate(scores[12:], 13)]
    assert got == expected[12:] and expected[-1] == "bad"
    assert full.first_bad_step == 31  # EMA 0.95: gap > 0.1 from step 17 (0.4371 under its best 0.5395); 15 in a row


@pytest.mark.parametrize("text, match", [
    ("- metric: a\n  kind: score\n  good: [1, 2]\n", r"field 'good' does not apply to score rules"),
    ("- metric: a\n  kind: score\n  reference: peak\n", r"'reference' must be best or start, got 'peak'"),
    ("- metric: a\n  kind: trend\n  good_from: 3\n", r"field 'good_from' does not apply to trend rules"),
    ("- metric: a\n  bad: [null, 1]\n  ema: 1.0\n", r"'ema' must be a number in \[0, 1\), got 1.0"),
])
def test_bad_score_fields(tmp_path, text, match):
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(KeelError, match=match):
        load_rules(str(f))
