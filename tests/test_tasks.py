"""The embedded tasks: addition and 2-digit x 1-digit multiplication, their worked traces and splits."""
import random
import re

import pytest

from keel.config import TaskConfig, load_config
from keel.errors import KeelError
from keel.rewards import arithmetic_score
from keel.tasks import STYLES, Problem, solution, split_problems


def test_multiplication_traces_by_hand():
    p = Problem(47, 6, "*")
    assert (p.prompt, p.answer, p.data_source) == ("47*6=", 282, "embedded/multiplication")
    rng = random.Random(0)
    # 7*6 = 42: write 2, carry 4; 4*6 + 4 = 28: write 8, carry 2 -> 282
    assert solution(p, "compact", rng) == " 7*6=42, 4*6+4=28, answer 282."
    assert solution(p, "bare", rng) == " 282."
    full = solution(p, "full", rng)
    assert re.fullmatch(r" 7\*6=42 carry 4, then 4\*6\+4=28 carry 2, (so|therefore|thus) the answer is 282\.", full)
    # no carry out of the ones digit: 21*3 = 63
    assert solution(Problem(21, 3, "*"), "compact", rng) == " 1*3=3, 2*3=6, answer 63."


def test_addition_traces_are_unchanged():
    rng = random.Random(0)
    assert solution(Problem(23, 48), "compact", rng) == " 3+8=11, 2+4+1=7, answer 71."
    assert re.fullmatch(r" 3\+8=11 carry 1, then 2\+4\+1=7, (so|therefore|thus) the answer is 71\.",
                        solution(Problem(23, 48), "full", rng))
    assert solution(Problem(95, 17), "compact", rng) == " 5+7=12, 9+1+1=11, answer 112."


def test_multiplication_split_is_disjoint_and_every_reference_scores_one():
    train, held = split_problems(TaskConfig(name="multiplication", digits=2, n_heldout=256))
    assert (len(train), len(held)) == (90 * 8 - 256, 256)  # a in 10..99, b in 2..9
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in held}
    assert {p.b for p in train + held} == set(range(2, 10)) and {p.op for p in train} == {"*"}
    rng = random.Random(1)
    for p in train[:100] + held:
        for style in STYLES:
            assert arithmetic_score(solution(p, style, rng), str(p.answer)) == 1.0, (p, style)
    # a slip is self-consistent: the answer follows the slipped column, so it is wrong
    slipped = solution(Problem(47, 6, "*"), "compact", random.Random(3), slip_prob=1.0)
    assert arithmetic_score(slipped, "282") == 0.0


def test_task_name_is_checked():
    with pytest.raises(KeelError, match=r"config key 'task.name' must be one of addition, multiplication, got 'division'"):
        split_problems(TaskConfig(name="division"))
    with pytest.raises(KeelError, match=r"'task.n_heldout' \(400\) must be < half of the 720 problems"):
        split_problems(TaskConfig(name="multiplication", n_heldout=400))
    assert load_config(None, ["task.name=multiplication"]).task.name == "multiplication"
