"""keel.rewards: answer extraction, math-verify with deadlines, custom TRL/verl functions, weighted sums."""

import json
import math
import os
import re
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from keel.config import config_from_dict
from keel.data import PromptRow
from keel.errors import KeelError
from keel.rewards import (
    arithmetic_score,
    as_number,
    build_reward,
    extract_answer,
    format_score,
    last_integer,
    math_verify_batch,
    math_verify_score,
    overlong_penalty,
    VerifyTimeout,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row(gold: str, source: str = "openai/gsm8k", **columns) -> PromptRow:
    return PromptRow("q", gold, source, {"index": 0}, dict(columns))


def cfg_with(**sections):
    return config_from_dict(sections)


# --------------------------------------------------------------------------- extraction and small scorers


def test_extract_answer():
    assert extract_answer("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{\\{1, 2\\}} and that's it") == "\\{1, 2\\}"
    assert extract_answer("She pays 5+3=8.\n#### 1,234\n") == "1,234"
    assert extract_answer("\\boxed{5} first, then\n#### 6") == "6"  # whichever comes last
    assert extract_answer("#### 6 then \\boxed{7}") == "7"
    assert extract_answer("\\boxed 42$") == "42"
    assert extract_answer("\\fbox{3}") == "3"
    assert extract_answer("cut off \\boxed{\\frac{1}{2") is None
    assert extract_answer("the answer is 5") is None


def test_as_number():
    assert as_number("1,450,000") == Decimal(1450000)
    assert as_number("007") == Decimal(7)
    assert as_number("\\$1{,}000.") == Decimal(1000)
    assert as_number("$-2.50$") == Decimal("-2.5")
    assert as_number("1,5") is None  # not a thousands separator
    assert as_number("\\frac{1}{2}") is None


def test_last_integer_and_arithmetic():
    assert last_integer(" 3+8=11 carry 1, then 2+4+1=7, so the answer is 71.") == 71
    assert last_integer("x = -5") == -5
    assert last_integer("7-1") == 1  # a minus after a digit is subtraction
    assert last_integer("total 1,071 apples") == 1071
    assert last_integer("no digits") is None
    assert arithmetic_score(" 3+8=11, 2+4+1=7, answer 71.", "71") == 1.0
    assert arithmetic_score("71", "71") == 1.0
    assert arithmetic_score("answer 71, no wait 72", "71") == 0.0
    assert arithmetic_score("", "71") == 0.0


def test_format_score():
    assert format_score("so \\boxed{3}") == 1.0
    assert format_score("#### 3") == 1.0
    assert format_score("the answer is 3") == 0.0
    assert format_score("<answer>3</answer>", pattern=r"<answer>.*</answer>") == 1.0


def test_overlong_penalty_matches_dapo_rule():
    # L_max = 64, B = 16: free up to 48 tokens, then linear down to -factor at 64
    assert overlong_penalty(40, 64, 16, 1.0) == 0.0
    assert overlong_penalty(48, 64, 16, 1.0) == 0.0
    assert overlong_penalty(56, 64, 16, 1.0) == -0.5
    assert overlong_penalty(64, 64, 16, 1.0) == -1.0
    assert overlong_penalty(60, 64, 16, 2.0) == -1.5


def test_math_verify_symbolic_and_numeric():
    assert math_verify_score("Hence $\\boxed{\\frac{2}{4}}$.", "0.5") == 1.0
    assert math_verify_score("The answer is $x^2+2x+1$.", "(x+1)^2") == 1.0
    assert math_verify_score("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)") == 1.0
    assert math_verify_score("\\boxed{3}", "\\frac{14}{3}") == 0.0
    assert math_verify_score("#### 1,234", "1234") == 1.0
    assert math_verify_score("\\boxed{0012}", "12") == 1.0


# --------------------------------------------------------------------------- every gold answer in ../shared/data


def test_every_gsm8k_gold_scores_one_and_perturbed_zero():
    records = read_jsonl(DATA / "gsm8k" / "test.jsonl") + read_jsonl(DATA / "gsm8k" / "train.jsonl")
    assert len(records) == 1319 + 7473
    raw = [r["answer"].rsplit("####", 1)[1].strip() for r in records]  # as written, e.g. "1,450,000"
    golds = [g.replace(",", "") for g in raw]
    n = len(golds)
    completions, expected = [], []
    for r, g, written in zip(records, golds, raw):
        v = int(g)
        completions += [
            r["answer"],  # the worked solution itself, ending "#### <gold>"
            f"The total is {written}.\n#### {written}",
            f"So the answer is $\\boxed{{{v:,}}}$.",  # thousands separators
            f"So the answer is $\\boxed{{{g}}}$.",
            f"\\boxed{{0{g}}}" if v >= 0 else f"\\boxed{{{g}}}",  # leading zero
            f"#### {v + 1}",
            f"So the answer is $\\boxed{{{v - 1:,}}}$.",
        ]
        expected += [1.0] * 5 + [0.0] * 2
    scores = math_verify_batch(completions, [g for g in golds for _ in range(7)], timeout_s=5.0)
    wrong = [(completions[i], golds[i // 7]) for i in range(len(scores)) if scores[i] != expected[i]]
    assert wrong == [] and len(scores) == 7 * n
    # 1,319 test golds once more in prose without a box: these go through math-verify itself
    test_golds = golds[:1319]
    prose = [f"Adding it all up, the answer is {int(g):,}." for g in test_golds]
    assert math_verify_batch(prose, test_golds, timeout_s=5.0) == [1.0] * 1319


def test_every_math500_gold_scores_one_and_perturbed_zero():
    records = read_jsonl(DATA / "math500" / "test.jsonl")
    assert len(records) == 500
    golds = [r["answer"] for r in records]
    boxed = [f"Therefore the final answer is $\\boxed{{{g}}}$." for g in golds]
    solutions = [r["solution"] for r in records]  # reference solutions: the last \boxed{} is the answer
    perturbed = [f"Therefore the final answer is $\\boxed{{{g} + 1}}$." for g in golds]
    scores = math_verify_batch(boxed + solutions + perturbed, golds * 3, timeout_s=5.0)
    assert [g for g, s in zip(golds, scores[:500]) if s != 1.0] == []
    assert [g for g, s in zip(golds, scores[500:1000]) if s != 1.0] == []
    assert [g for g, s in zip(golds, scores[1000:]) if s != 0.0] == []


# --------------------------------------------------------------------------- adversarial answers and threads


ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9}}}}",  # big-integer power: sympy hangs in C, only a kill stops it
    "The answer is 9^9^9^9",
    "$" + "(" * 5000 + "1" + ")" * 5000 + "$",  # deeply nested
    "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
    "\\boxed{" + "1+" * 500_000 + "1}",  # a megabyte inside the box
    "x" * 1_000_000,
    "$1$ " * 250_000,
]


# Wall-clock bounds: generous upper bounds only (the machine may be a loaded 2-core box), each far below what the
# call takes when its deadline is not enforced (forever for 9^9^9^9, 40 s for the sleeping functions below).
# A killed math-verify worker's replacement imports sympy before it takes the next job: ~1.5 s here under load 7.
RESTART_S = 20.0


def finishes_within(seconds: float, work):
    """work()'s result, run in a thread; fails (instead of hanging the suite) if it is not done after `seconds`."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a deadline was not enforced"
    assert "value" in box, "work() raised (see the thread's traceback above)"
    return box["value"]


def test_adversarial_answers_return_within_timeout():
    timeout_s = 0.5
    for text in ADVERSARIAL:
        # the deadline plus, at worst, the restart of the worker killed by the previous answer
        assert finishes_within(timeout_s + RESTART_S, lambda: math_verify_score(text, "5", timeout_s=timeout_s)) == 0.0
    # a hanging answer in a batch costs its own deadline; the good answers around it still score
    batch = ["\\boxed{\\frac{10}{2}}", ADVERSARIAL[0], "The answer is $\\sqrt{25}$.", ADVERSARIAL[2]]
    results = finishes_within(2 * timeout_s + 2 * RESTART_S,
                              lambda: math_verify_batch(batch, ["5"] * 4, timeout_s=timeout_s))
    assert results[0] == 1.0 and results[2] == 1.0
    assert isinstance(results[1], VerifyTimeout) and isinstance(results[3], VerifyTimeout)


def test_math_verify_outside_the_main_thread():
    got = {}

    def work():
        got["symbolic"] = math_verify_score("so it is $\\sqrt{12}$", "2\\sqrt{3}")
        t0 = time.monotonic()
        got["hang"] = math_verify_score("\\boxed{9^{9^{9^{9}}}}", "5", timeout_s=1.0)
        got["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=1.0 + 2 * RESTART_S)
    assert not thread.is_alive(), "the 1 s deadline was not enforced outside the main thread"
    # measured ~1.0 s: the deadline (the pool was warm); a never-returning call is what this bound catches
    assert got["symbolic"] == 1.0 and got["hang"] == 0.0 and got["seconds"] < 1.0 + RESTART_S


# --------------------------------------------------------------------------- build_reward: built-ins


def test_auto_reward_on_embedded_and_math_rows():
    reward = build_reward(cfg_with())
    rows = [PromptRow("23+48=", "71", "embedded/addition", {}, {})] * 2 + [row("18"), row("\\frac{1}{2}", "deepscaler")]
    completions = [" 3+8=11 carry 1, then 2+4+1=7, so the answer is 71.", " 72.", "#### 18", "$\\boxed{0.5}$"]
    totals, metrics = reward(["p"] * 4, completions, rows, [10, 3, 4, 6])
    assert totals == [1.0, 0.0, 1.0, 1.0]
    assert metrics["reward/auto/mean"] == 0.75
    assert metrics["reward/errors"] == 0 and metrics["reward/timeouts"] == 0


def test_weighted_builtins_overlong_and_timeouts():
    cfg = cfg_with(
        reward={"functions": [{"name": "math_verify", "weight": 1.0}, {"name": "format", "weight": 0.5}],
                "overlong_buffer_len": 16, "overlong_penalty_factor": 1.0, "timeout_s": 1.0},
        data={"max_response_length": 64},
    )
    reward = build_reward(cfg)
    completions = ["\\boxed{18}", "#### 17", "the answer is 18", "\\boxed{9^{9^{9^{9}}}}"]
    totals, metrics = reward(["p"] * 4, completions, [row("18")] * 4, [10, 56, 64, 20])
    # math: 1, 0, 1 (math-verify reads the prose), 0 (timed out); format: 1, 1, 0, 1; overlong: 0, -0.5, -1, 0
    assert totals == [1.5, 0.0, 0.0, 0.5]
    assert metrics["reward/math_verify/mean"] == 0.5
    assert metrics["reward/format/mean"] == 0.75
    assert metrics["reward/overlong/mean"] == -0.375
    assert metrics["reward/timeouts"] == 1


def test_arithmetic_with_non_integer_gold_is_an_error_sample():
    cfg = cfg_with(reward={"functions": ["arithmetic"], "error_score": -1.0})
    totals, metrics = build_reward(cfg)(["p", "p"], ["5", "5"], [row("5"), row("five")], [1, 1])
    assert totals == [1.0, -1.0]
    assert metrics["reward/errors"] == 1


def test_bad_reward_entries():
    with pytest.raises(KeelError, match=r"reward function 'math_verfy' is unknown \(built-ins: arithmetic, auto, format, math_verify"):
        build_reward(cfg_with(reward={"functions": ["math_verfy"]}))
    with pytest.raises(KeelError, match=r"entry 'format': bad kwargs \['patern'\]"):
        build_reward(cfg_with(reward={"functions": [{"name": "format", "kwargs": {"patern": "x"}}]}))
    with pytest.raises(KeelError, match=r"unknown key\(s\) \['wieght'\]"):
        build_reward(cfg_with(reward={"functions": [{"name": "format", "wieght": 2}]}))
    with pytest.raises(KeelError, match=r"overlong_buffer_len' must be in \[0, data.max_response_length=64\]"):
        build_reward(cfg_with(reward={"overlong_buffer_len": 100}, data={"max_response_length": 64}))


# --------------------------------------------------------------------------- custom functions: TRL and verl style


CUSTOM = '''
import math

def trl_contains(prompts, completions, solution, **kwargs):
    """TRL style: 1 if the solution string appears; None when the row has no solution."""
    return [None if s is None else float(s in c) for c, s in zip(completions, solution)]

def trl_conversational(prompts, completions, **kwargs):
    return [float(len(c[0]["content"])) for c in completions]

def trl_raises_on_boom(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        if len(completions) == 1:
            raise ValueError("boom")
        raise ValueError("some sample went boom")
    return [1.0] * len(completions)

def trl_short(prompts, completions, **kwargs):
    return [1.0]

def trl_nan(prompts, completions, **kwargs):
    return [math.nan, 2.0][: len(completions)]

def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
    """verl style: dict with "score" and an extra metric."""
    if solution_str == "raise":
        raise RuntimeError("bad sample")
    ok = solution_str.strip().endswith(ground_truth)
    return {"score": float(ok) + bonus, "acc": float(ok)}

def not_a_reward(x, y):
    return 0.0
'''


@pytest.fixture()
def custom_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(CUSTOM)
    return path


def test_trl_function_with_columns_and_none(custom_file):
    cfg = cfg_with(reward={"functions": [{"name": f"{custom_file}:trl_contains", "weight": 2.0}]})
    rows = [row("7", solution="7"), row("8", solution="8"), row("9")]  # the third row has no solution column
    totals, metrics = build_reward(cfg)(["p"] * 3, ["it is 7", "it is 9", "it is 9"], rows, [1, 1, 1])
    assert totals == [2.0, 0.0, 0.0]
    assert metrics["reward/trl_contains/mean"] == pytest.approx(1 / 3)
    assert metrics["reward/not_applicable"] == 1


def test_trl_conversational_completions(custom_file):
    cfg = cfg_with(reward={"functions": [f"{custom_file}:trl_conversational"]})
    chat_row = PromptRow([{"role": "user", "content": "hi"}], "", "trl", {}, {})
    totals, _ = build_reward(cfg)(["p"], ["abcd"], [chat_row], [4])
    assert totals == [4.0]


def test_raising_sample_scores_error_score_and_is_counted(custom_file):
    cfg = cfg_with(reward={"functions": [f"{custom_file}:trl_raises_on_boom"], "error_score": -0.5})
    totals, metrics = build_reward(cfg)(["p"] * 3, ["fine", "boom", "fine"], [row("1")] * 3, [1, 1, 1])
    assert totals == [1.0, -0.5, 1.0]
    assert metrics["reward/errors"] == 1
    cfg = cfg_with(reward={"functions": [f"{custom_file}:trl_nan"]})
    totals, metrics = build_reward(cfg)(["p"] * 2, ["a", "b"], [row("1")] * 2, [1, 1])
    assert totals == [0.0, 2.0] and metrics["reward/errors"] == 1


def test_a_function_failing_on_every_sample_stops_after_max_failed_batches(custom_file):
    """Two all-failed batches, a batch with one good sample (the count resets), then three all-failed: error."""
    cfg = cfg_with(reward={"functions": [f"{custom_file}:trl_raises_on_boom"], "max_failed_batches": 3})
    reward = build_reward(cfg)
    score = lambda texts: reward(["p"] * len(texts), texts, [row("1")] * len(texts), [1] * len(texts))  # noqa: E731
    for texts in (["boom", "boom"], ["boom", "boom"], ["boom", "fine"], ["boom", "boom"], ["boom", "boom"]):
        score(texts)
    with pytest.raises(KeelError, match=r"^reward function 'trl_raises_on_boom' failed on every sample of 3 batches "
                                        r"in a row \(last error ValueError: boom\)"):
        score(["boom", "boom"])
    never = build_reward(cfg_with(reward={"functions": [f"{custom_file}:trl_raises_on_boom"], "max_failed_batches": 0}))
    for _ in range(5):
        never(["p"], ["boom"], [row("1")], [1])  # 0 = never stop


def test_wrong_length_names_function_and_lengths(custom_file):
    cfg = cfg_with(reward={"functions": [f"{custom_file}:trl_short"]})
    with pytest.raises(KeelError, match=r"^reward function 'trl_short' returned 1 scores for 2 completions$"):
        build_reward(cfg)(["p"] * 2, ["a", "b"], [row("1")] * 2, [1, 1])


def test_verl_compute_score_dict_extra_metrics_and_errors(custom_file):
    cfg = cfg_with(reward={"functions": [{"name": f"{custom_file}:compute_score", "kwargs": {"bonus": 0.25}}],
                           "error_score": -1.0})
    rows = [row("18"), row("18"), row("18"), row("5")]
    totals, metrics = build_reward(cfg)(["p"] * 4, ["so 18", "so 17", "raise", "so 5"], rows, [1] * 4)
    assert totals == [1.25, 0.25, -1.0, 1.25]
    assert metrics["reward/compute_score/mean"] == pytest.approx(0.4375)
    assert metrics["reward/compute_score/acc/mean"] == 0.5
    assert metrics["reward/errors"] == 1


def test_custom_reward_function_section_replaces_auto(custom_file):
    cfg = cfg_with(custom_reward_function={"path": str(custom_file), "name": "compute_score"},
                   reward={"functions": [{"name": "auto", "weight": 2.0}, {"name": "format", "weight": 1.0}]})
    reward = build_reward(cfg)
    assert [(f.name, f.weight) for f in reward.functions] == [("compute_score", 2.0), ("format", 1.0)]
    totals, _ = reward(["p"], ["\\boxed{7}"], [row("7}")], [3])
    assert totals == [3.0]  # compute_score 1 (ends with "7}") * 2 + format 1


def test_dotted_and_module_paths(custom_file, monkeypatch):
    monkeypatch.syspath_prepend(str(custom_file.parent))
    for spec in ("my_rewards.compute_score", "my_rewards:compute_score"):
        totals, _ = build_reward(cfg_with(reward={"functions": [spec]}))(["p"], ["so 3"], [row("3")], [1])
        assert totals == [1.0]
    with pytest.raises(KeelError, match=r"expected TRL's f\(prompts, completions, \*\*kwargs\) or verl's"):
        build_reward(cfg_with(reward={"functions": ["my_rewards:not_a_reward"]}))
    with pytest.raises(KeelError, match=r"style must be trl or verl, got 'xml'"):
        build_reward(cfg_with(reward={"functions": [{"name": "my_rewards:trl_short", "style": "xml"}]}))
    with pytest.raises(KeelError, match=r"'my_rewards' has no function 'missing'"):
        build_reward(cfg_with(reward={"functions": ["my_rewards:missing"]}))
    with pytest.raises(KeelError, match=r"file '.*nowhere\.py' does not exist"):
        build_reward(cfg_with(reward={"functions": ["nowhere.py:f"]}))
    with pytest.raises(KeelError, match=r"cannot import module 'no_such_module'"):
        build_reward(cfg_with(reward={"functions": ["no_such_module:f"]}))


def test_metrics_are_finite_numbers():
    totals, metrics = build_reward(cfg_with())(["p"], ["\\boxed{2}"], [row("2")], [1])
    assert totals == [1.0]
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------- deadlines and escapes (issue 14)


HOSTILE = '''
import sys, time

def sleeps(prompts, completions, **kwargs):
    time.sleep(40)
    return [1.0] * len(completions)

def swallows_everything(prompts, completions, **kwargs):
    """a 40 s busy loop whose `except Exception` would swallow a deadline that is an Exception"""
    end = time.monotonic() + 40
    while time.monotonic() < end:
        try:
            time.sleep(0.01)
        except Exception:
            pass
    return [1.0] * len(completions)

def exits(prompts, completions, **kwargs):
    sys.exit(0)

def interrupts(prompts, completions, **kwargs):
    raise KeyboardInterrupt

class Odd(BaseException):
    pass

def raises_base(prompts, completions, **kwargs):
    raise Odd("not an Exception")

def verl_slow(data_source, solution_str, ground_truth, extra_info=None):
    """instant for the first two samples (ground truths "0", "1"), 40 s for the others"""
    if int(ground_truth) >= 2:
        time.sleep(40)
    return 1.0
'''


@pytest.fixture()
def hostile_file(tmp_path):
    path = tmp_path / "hostile_rewards.py"
    path.write_text(HOSTILE)
    return path


def _scorer(path, name, **reward):
    reward = build_reward(cfg_with(reward={"functions": [f"{path}:{name}"], **reward}))
    return lambda n: reward(["p"] * n, ["c"] * n, [row(str(i)) for i in range(n)], [1] * n)


@pytest.mark.parametrize("name", ["sleeps", "swallows_everything"])
def test_a_custom_function_past_the_batch_deadline_scores_0_and_stops_after_max_failed_batches(hostile_file, name):
    score = _scorer(hostile_file, name, batch_timeout_s=0.5, max_failed_batches=3)
    for _ in range(2):
        t0 = time.monotonic()
        totals, metrics = score(4)
        assert time.monotonic() - t0 < 0.5 + 10.0  # the 0.5 s deadline (measured ~0.5 s), not the function's 40 s
        assert totals == [0.0] * 4 and metrics["reward/timeouts"] == 4 and metrics["reward/errors"] == 0
    with pytest.raises(KeelError, match=rf"^reward function '{name}' timed out on every sample of 3 batches in a row "
                                        r"\(reward.batch_timeout_s=0.5\); make it faster, raise the limit or remove it "
                                        r"from reward.functions \(reward.max_failed_batches=3\)$"):
        score(4)


def test_a_slow_verl_function_keeps_the_samples_scored_before_the_deadline(hostile_file):
    """Two instant samples, then one that takes 40 s; 2 s for the batch: two scored, the other three time out."""
    t0 = time.monotonic()
    totals, metrics = _scorer(hostile_file, "verl_slow", batch_timeout_s=2.0)(5)
    assert time.monotonic() - t0 < 2.0 + 10.0  # not 40 s
    assert totals == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert metrics["reward/timeouts"] == 3


def test_the_deadline_holds_outside_the_main_thread(hostile_file):
    score, got = _scorer(hostile_file, "sleeps", batch_timeout_s=0.5), {}

    def work():
        t0 = time.monotonic()
        got["result"] = score(2)
        got["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert got["result"] == ([0.0, 0.0], {"reward/errors": 0.0, "reward/not_applicable": 0.0, "reward/timeouts": 2.0,
                                          "reward/sleeps/mean": 0.0})
    assert got["seconds"] < 0.5 + 10.0  # the 0.5 s deadline (measured ~0.5 s), not the function's 40 s


@pytest.mark.parametrize("name, raised", [("exits", "SystemExit(0)"), ("interrupts", "KeyboardInterrupt()"),
                                          ("raises_base", "Odd('not an Exception')")])
def test_sys_exit_or_keyboard_interrupt_in_a_function_is_its_failure(hostile_file, caplog, name, raised):
    """Before: sys.exit(0) ended the whole run with exit 0; a raised KeyboardInterrupt read as the user's Ctrl-C."""
    score = _scorer(hostile_file, name, error_score=-1.0, max_failed_batches=2)
    totals, metrics = score(3)
    assert totals == [-1.0] * 3 and metrics["reward/errors"] == 3
    assert [r.getMessage() for r in caplog.records if r.name == "keel.rewards"] == [
        f"reward function '{name}' failed on a sample (RewardExit: raised {raised}); scored -1.0"]
    with pytest.raises(KeelError, match=rf"^reward function '{name}' failed on every sample of 2 batches in a row "
                                        rf"\(last error RewardExit: raised {re.escape(raised)}\)"):
        score(3)


def test_a_real_ctrl_c_during_a_reward_function_is_still_the_users_interrupt(hostile_file):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    score = _scorer(hostile_file, "sleeps", batch_timeout_s=30)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        score(2)
    assert time.monotonic() - t0 < 20  # Ctrl-C came at 0.3 s; the batch deadline is 30 s, the function sleeps 40 s
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was


def test_math_verify_batch_has_a_deadline_for_the_whole_batch():
    """40 distinct hanging answers at 1 s each take 10 s and more (at most 4 workers, a restart after each) without
    the batch deadline; the batch gets 2 s."""
    hanging = [f"\\boxed{{9^{{9^{{9^{{{n}}}}}}}}}" for n in range(3, 43)]
    t0 = time.monotonic()
    results = math_verify_batch(["\\boxed{5}"] + hanging, ["5"] * 41, timeout_s=1.0, batch_timeout_s=2.0)
    seconds = time.monotonic() - t0
    assert results[0] == 1.0  # the fast path: plain numbers never reach the pool
    assert all(isinstance(r, VerifyTimeout) for r in results[1:])
    # measured ~2.0 s (the deadline, then a kill and a restart); >= 10 s without the batch deadline
    assert seconds < 2.0 + 6.0, seconds
