"""The embedded verifiable task: multi-digit addition with a worked column trace.

A problem is ``a+b=`` and a reference solution is written in one of three styles,
so the warm-started model has several ways to answer and GRPO has something to
prefer:

* ``full``    — `` 3+8=11 carry 1, then 2+4+1=7, so the answer is 71.`` (connective words)
* ``compact`` — `` 3+8=11, 2+4+1=7, answer 71.``
* ``bare``    — `` 71.``

With probability ``slip_prob`` per column the written column sum is off by one,
and everything after it follows from the wrong sum (a self-consistent slip), so
supervised warm-starting leaves the model clearly imperfect. The final answer is
always the last integer of the response, which is what the ``arithmetic`` reward
checks.

Problems come from a seeded permutation of all operand pairs; the held-out split is
the first ``n_heldout`` pairs and training never sees them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from keel.config import TaskConfig
from keel.errors import KeelError

CONNECTIVE_FINALS = ("so", "therefore", "thus")  # the full style varies its last connective
STYLES = ("full", "compact", "bare")
STYLE_WEIGHTS = (0.5, 0.3, 0.2)
DATA_SOURCE = "embedded/addition"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b


def split_problems(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """All operand pairs with `digits` digits, shuffled by the task seed -> (train, held_out)."""
    if cfg.name != "addition":
        raise KeelError(f"config key 'task.name' must be 'addition', got {cfg.name!r}")
    if not 1 <= cfg.digits <= 6:
        raise KeelError(f"config key 'task.digits' must be between 1 and 6, got {cfg.digits}")
    lo, hi = (0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)), 10**cfg.digits
    n_values = hi - lo
    n_pairs = n_values * n_values
    if cfg.n_heldout >= n_pairs // 2:
        raise KeelError(f"config key 'task.n_heldout' ({cfg.n_heldout}) must be < half of the {n_pairs} problems")
    rng = random.Random(cfg.seed)
    if n_pairs <= 2_000_000:
        order = list(range(n_pairs))
        rng.shuffle(order)
        pairs = [(lo + i // n_values, lo + i % n_values) for i in order]
        held = [Problem(a, b) for a, b in pairs[: cfg.n_heldout]]
        train = [Problem(a, b) for a, b in pairs[cfg.n_heldout :]]
        return train, held
    # large spaces: sample held-out pairs, train = rejection sampling outside them (a bounded pool)
    held_set: set[tuple[int, int]] = set()
    while len(held_set) < cfg.n_heldout:
        held_set.add((rng.randrange(lo, hi), rng.randrange(lo, hi)))
    train_set: set[tuple[int, int]] = set()
    while len(train_set) < 200_000:
        pair = (rng.randrange(lo, hi), rng.randrange(lo, hi))
        if pair not in held_set:
            train_set.add(pair)
    return [Problem(*p) for p in sorted(train_set)], [Problem(*p) for p in sorted(held_set)]


def solution(problem: Problem, style: str, rng: random.Random, slip_prob: float = 0.0) -> str:
    """A worked solution (the text after the prompt), possibly with self-consistent slips."""
    da = [int(c) for c in reversed(str(problem.a))]
    db = [int(c) for c in reversed(str(problem.b))]
    n = max(len(da), len(db))
    da += [0] * (n - len(da))
    db += [0] * (n - len(db))
    carry, digits, steps = 0, [], []
    for i in range(n):
        true_sum = da[i] + db[i] + carry
        s = true_sum
        if rng.random() < slip_prob:
            s = max(0, s + rng.choice((-1, 1)))
        terms = f"{da[i]}+{db[i]}" + (f"+{carry}" if carry else "")
        steps.append((terms, s))
        digits.append(s % 10)
        carry = s // 10
    if carry:
        digits.append(carry)
    answer = int("".join(str(d) for d in reversed(digits)))
    if style == "bare":
        return f" {answer}."
    if style == "compact":
        return " " + ", ".join(f"{t}={s}" for t, s in steps) + f", answer {answer}."
    if style == "full":
        parts = []
        for i, (t, s) in enumerate(steps):
            part = ("" if i == 0 else "then ") + f"{t}={s}"
            if s >= 10:
                part += " carry 1"
            parts.append(part)
        final = rng.choice(CONNECTIVE_FINALS)
        return " " + ", ".join(parts) + f", {final} the answer is {answer}."
    raise ValueError(f"unknown style {style!r}")


def sft_example(problem: Problem, rng: random.Random, slip_prob: float) -> tuple[str, str]:
    style = rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]
    return problem.prompt, solution(problem, style, rng, slip_prob)


# every character the task can produce; the embedded tokenizer is built from it
TASK_ALPHABET = sorted(set("0123456789+=,. abcdefghijklmnopqrstuvwxyz\n?:-*"))
