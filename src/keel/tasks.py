"""The embedded verifiable tasks: multi-digit addition and 2-digit x 1-digit multiplication, with worked traces.

``task.name`` picks the task from a registry (:class:`TaskName`). A problem is ``a+b=`` or ``a*b=``, and a
reference solution is written in one of three styles, so the warm-started model has several ways to
answer and GRPO has something to prefer:

* addition, column by column (right to left) with the carry:

  * ``full``    — `` 3+8=11 carry 1, then 2+4+1=7, so the answer is 71.`` (connective words)
  * ``compact`` — `` 3+8=11, 2+4+1=7, answer 71.``
  * ``bare``    — `` 71.``

* multiplication (``a`` has ``task.digits`` digits, ``b`` is one digit 2-9), digit by digit with the carry:

  * ``full``    — `` 7*6=42 carry 4, then 4*6+4=28 carry 2, so the answer is 282.``
  * ``compact`` — `` 7*6=42, 4*6+4=28, answer 282.``
  * ``bare``    — `` 282.``

With probability ``slip_prob`` per column the written column result is off by one,
and everything after it follows from the wrong value (a self-consistent slip), so
supervised warm-starting leaves the model clearly imperfect. The final answer is
always the last integer of the response, which is what the ``arithmetic`` reward
checks.

Problems come from a seeded permutation of all operand pairs; the held-out split is
the first ``n_heldout`` pairs and training never sees them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from keel.config import TaskConfig
from keel.errors import KeelError

CONNECTIVE_FINALS = ("so", "therefore", "thus")  # the full style varies its last connective
STYLES = ("full", "compact", "bare")
STYLE_WEIGHTS = (0.5, 0.3, 0.2)
DATA_SOURCE = "embedded/addition"  # the addition task's data_source (each Problem carries its own)


class TaskName(str, Enum):
    """The embedded tasks (config key ``task.name``)."""

    ADDITION = "addition"
    MULTIPLICATION = "multiplication"


OPS = {TaskName.ADDITION: "+", TaskName.MULTIPLICATION: "*"}


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str = "+"  # + (addition) | * (multiplication)

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return self.a * self.b if self.op == "*" else self.a + self.b

    @property
    def data_source(self) -> str:
        return "embedded/multiplication" if self.op == "*" else DATA_SOURCE


def task_name(cfg: TaskConfig) -> TaskName:
    try:
        return TaskName(cfg.name)
    except ValueError:
        valid = ", ".join(t.value for t in TaskName)
        raise KeelError(f"config key 'task.name' must be one of {valid}, got {cfg.name!r}") from None


def _operand_ranges(name: TaskName, digits: int) -> tuple[range, range]:
    """(values of a, values of b): `digits`-digit numbers; multiplication's b is one digit 2-9."""
    span = range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)
    return (span, span) if name is TaskName.ADDITION else (span, range(2, 10))


def split_problems(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """All operand pairs of the task, shuffled by the task seed -> (train, held_out)."""
    name = task_name(cfg)
    if not 1 <= cfg.digits <= 6:
        raise KeelError(f"config key 'task.digits' must be between 1 and 6, got {cfg.digits}")
    ra, rb = _operand_ranges(name, cfg.digits)
    op = OPS[name]
    n_pairs = len(ra) * len(rb)
    if cfg.n_heldout >= n_pairs // 2:
        raise KeelError(f"config key 'task.n_heldout' ({cfg.n_heldout}) must be < half of the {n_pairs} problems")
    rng = random.Random(cfg.seed)
    if n_pairs <= 2_000_000:
        order = list(range(n_pairs))
        rng.shuffle(order)
        pairs = [(ra[i // len(rb)], rb[i % len(rb)]) for i in order]
        held = [Problem(a, b, op) for a, b in pairs[: cfg.n_heldout]]
        train = [Problem(a, b, op) for a, b in pairs[cfg.n_heldout :]]
        return train, held
    # large spaces: sample held-out pairs, train = rejection sampling outside them (a bounded pool)
    held_set: set[tuple[int, int]] = set()
    while len(held_set) < cfg.n_heldout:
        held_set.add((rng.choice(ra), rng.choice(rb)))
    train_set: set[tuple[int, int]] = set()
    while len(train_set) < 200_000:
        pair = (rng.choice(ra), rng.choice(rb))
        if pair not in held_set:
            train_set.add(pair)
    return [Problem(*p, op) for p in sorted(train_set)], [Problem(*p, op) for p in sorted(held_set)]


def _column_steps(problem: Problem, rng: random.Random, slip_prob: float) -> tuple[list[tuple[str, int]], int]:
    """The worked columns, right to left: [(terms, written result)] and the answer they add up to.

    addition:        terms "3+8" (+ "+carry"),  result = a_i + b_i + carry
    multiplication:  terms "7*6" (+ "+carry"),  result = a_i * b + carry
    The digit written is result % 10 and the carry result // 10, from the written (possibly slipped) result.
    """
    da = [int(c) for c in reversed(str(problem.a))]
    if problem.op == "*":
        columns = [(d, problem.b) for d in da]
    else:
        db = [int(c) for c in reversed(str(problem.b))]
        n = max(len(da), len(db))
        columns = list(zip(da + [0] * (n - len(da)), db + [0] * (n - len(db))))
    carry, digits, steps = 0, [], []
    for x, y in columns:
        s = (x * y if problem.op == "*" else x + y) + carry
        if rng.random() < slip_prob:
            s = max(0, s + rng.choice((-1, 1)))
        steps.append((f"{x}{problem.op}{y}" + (f"+{carry}" if carry else ""), s))
        digits.append(s % 10)
        carry = s // 10
    digits += [int(c) for c in reversed(str(carry))] if carry else []
    return steps, int("".join(str(d) for d in reversed(digits)))


def solution(problem: Problem, style: str, rng: random.Random, slip_prob: float = 0.0) -> str:
    """A worked solution (the text after the prompt), possibly with self-consistent slips."""
    steps, answer = _column_steps(problem, rng, slip_prob)
    if style == "bare":
        return f" {answer}."
    if style == "compact":
        return " " + ", ".join(f"{t}={s}" for t, s in steps) + f", answer {answer}."
    if style == "full":
        parts = []
        for i, (t, s) in enumerate(steps):
            part = ("" if i == 0 else "then ") + f"{t}={s}"
            if s >= 10:
                # addition keeps its original text, "carry 1" even after a slip to 20 (the warm-start data, and so
                # make demo's numbers, stay exactly as before); multiplication writes the carry it uses
                part += " carry 1" if problem.op == "+" else f" carry {s // 10}"
            parts.append(part)
        final = rng.choice(CONNECTIVE_FINALS)
        return " " + ", ".join(parts) + f", {final} the answer is {answer}."
    raise ValueError(f"unknown style {style!r}")


def sft_example(problem: Problem, rng: random.Random, slip_prob: float) -> tuple[str, str]:
    style = rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]
    return problem.prompt, solution(problem, style, rng, slip_prob)


# every character the task can produce; the embedded tokenizer is built from it
TASK_ALPHABET = sorted(set("0123456789+=,. abcdefghijklmnopqrstuvwxyz\n?:-*"))
