"""Rewards: verifiable scores for completions, custom functions (TRL and verl style), weighted sums.

    r_total(y) = sum_i w_i * r_i(y)  +  r_overlong(|y|)

Built-in functions (``reward.functions: [{name, weight, kwargs}]``):

* ``arithmetic``  — 1.0 when the last integer of the completion equals the (integer) ground truth (embedded task).
* ``math_verify`` — 1.0 when the final answer is equivalent to the gold answer (math-verify ``parse``/``verify``,
  gold first). The answer is the last ``\\boxed{...}`` or GSM8K ``#### x``; plain numbers are compared
  directly (commas, leading zeros and ``$`` removed) without calling math-verify, which is the common case.
* ``format``      — 1.0 when the completion states a final answer (``\\boxed{}`` / ``####``, or a regex ``pattern``).
* ``auto``        — by ``data_source``, as verl's ``default_compute_score``: ``embedded/*`` -> arithmetic,
  everything else (``openai/gsm8k`` included: ``####`` is accepted) -> math_verify.

Custom functions are ``"module.path:function"``, ``"module.path.function"`` or ``"file.py:function"`` with either
TRL's signature ``f(prompts, completions, **columns) -> list[float | None]`` or verl's
``compute_score(data_source, solution_str, ground_truth, extra_info) -> float | {"score": float, ...}``.
None means "not applicable": scored 0 and counted in ``reward/not_applicable``. A function that raises
on a sample scores it ``reward.error_score`` (counted in ``reward/errors``); one that fails on every sample
of ``reward.max_failed_batches`` batches in a row stops the run with a one-line error; a wrong number of scores is a
KeelError.

The execution machinery -- math-verify worker processes with per-call and per-batch deadlines, the deadline
around custom functions, containment of their ``sys.exit()`` -- is in :mod:`keel.reward_exec`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import re
from collections.abc import Callable
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

from keel.data import PromptRow
from keel.errors import KeelError
from keel.reward_exec import (  # noqa: F401  (re-exported: keel.rewards is where callers import them from)
    DEFAULT_WORKERS,
    RewardExit,
    RewardTimeout,
    VerifyPool,
    VerifyTimeout,
    _contained,
    get_pool,
    run_with_deadline,
)

log = logging.getLogger("keel.rewards")

Score = float | None | BaseException  # one sample's raw result: a score, not applicable, or what went wrong


# --------------------------------------------------------------------------- answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced), or of ``\\boxed 5``; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    j = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", j):  # "\boxed 5": the token after the space
        token = re.match(r" +([^\s$]+)", text[j : j + 200])
        return token.group(1) if token else None
    if not text.startswith("{", j):
        return None
    depth = 0
    for brace in re.finditer(r"[{}]", text[j:]):  # linear, skips everything between braces at C speed
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[j + 1 : j + brace.start()].strip()
    return None  # unbalanced: the completion was cut off inside the box


def extract_answer(text: str) -> str | None:
    """The final answer as graders look for it: whichever comes last of ``\\boxed{...}`` and GSM8K ``#### x``."""
    boxed_at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    hashes_at = text.rfind("####")
    if hashes_at > boxed_at:
        line = text[hashes_at + 4 :].lstrip().split("\n", 1)[0].strip()
        return line or None
    return last_boxed(text)


_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def as_number(text: str) -> Decimal | None:
    """A plain decimal number written any common way ("1,450,000", "007", "$18.", "\\$1{,}000") -> Decimal, else None."""
    s = text.strip()
    if len(s) > 64:
        return None
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\$", "").strip("$ ").rstrip(".")
    if not _NUMBER.fullmatch(s):
        return None
    return Decimal(s.replace(",", ""))


_INTEGER = re.compile(r"(?<!\d)-?\d+(?:,\d{3})*(?!\d)")  # a minus right after a digit is subtraction, not a sign


def last_integer(text: str) -> int | None:
    """The last integer written in the text ("... so the answer is 1,071." -> 1071); None if there is none."""
    last = None
    for last in _INTEGER.finditer(text):
        pass
    return int(last.group().replace(",", "")) if last else None



def math_verify_batch(completions: list[str], golds: list[str], timeout_s: float = 5.0,
                      batch_timeout_s: float | None = None) -> list[float | BaseException]:
    """Score each completion against its gold answer; plain numbers locally, the rest in the pool.

    Each pool call has `timeout_s`; all of them together `batch_timeout_s` (None: no batch deadline).

    Identical (gold, answer) pairs in a batch (common within a GRPO group) are verified once.
    """
    out: list[float | BaseException | None] = [None] * len(completions)
    jobs: dict[tuple[str, str], list[int]] = {}
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        answer = extract_answer(completion)
        if answer is not None:
            got, want = as_number(answer), as_number(gold)
            if got is not None and want is not None:  # fast path: both are plain numbers
                out[i] = 1.0 if got == want else 0.0
                continue
        prediction = completion if answer is None else "\\boxed{" + answer + "}"
        jobs.setdefault((gold, prediction), []).append(i)
    if jobs:
        keys = list(jobs)
        for key, result in zip(keys, get_pool().run(keys, timeout_s, batch_timeout_s)):
            for i in jobs[key]:
                out[i] = result
    return out  # type: ignore[return-value]


def math_verify_score(completion: str, gold: str, timeout_s: float = 5.0) -> float:
    """1.0 if the completion's final answer is equivalent to ``gold``, else 0.0 (also on timeout). Any thread."""
    result = math_verify_batch([completion], [gold], timeout_s)[0]
    if isinstance(result, VerifyTimeout):
        return 0.0
    if isinstance(result, BaseException):
        raise result
    return result


def arithmetic_score(completion: str, gold: str) -> float:
    """1.0 if the last integer of the completion equals the integer ``gold``, else 0.0."""
    return 1.0 if last_integer(completion) == int(gold.strip().replace(",", "")) else 0.0


def format_score(completion: str, pattern: str | None = None) -> float:
    """1.0 if the completion states a final answer (``\\boxed{}`` or ``####``; or matches ``pattern``), else 0.0."""
    if pattern is not None:
        return 1.0 if re.search(pattern, completion, re.DOTALL) else 0.0
    return 1.0 if extract_answer(completion) is not None else 0.0


def overlong_penalty(length: int, max_length: int, buffer_len: int, factor: float) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13; verl's overlong_buffer):

        r = min(0, -(L - (L_max - B)) / B * factor)

    0 up to L_max - B tokens, then linear down to -factor at L = L_max.
    """
    return min(0.0, -(length - (max_length - buffer_len)) / buffer_len * factor)


# --------------------------------------------------------------------------- built-in registry


class RewardName(str, Enum):
    AUTO = "auto"
    ARITHMETIC = "arithmetic"
    MATH_VERIFY = "math_verify"
    FORMAT = "format"


BuiltinFn = Callable[..., list[Score]]  # (completions, rows, *, timeout_s, **kwargs) -> one Score per completion
BUILTIN_REWARDS: dict[RewardName, BuiltinFn] = {}


def register_reward(name: RewardName) -> Callable[[BuiltinFn], BuiltinFn]:
    def decorator(fn: BuiltinFn) -> BuiltinFn:
        BUILTIN_REWARDS[name] = fn
        return fn

    return decorator


def _per_sample(fn: Callable[..., float], *args: Any) -> Score:
    try:
        return fn(*args)
    except Exception as e:  # scored reward.error_score by the caller
        return e


@register_reward(RewardName.ARITHMETIC)
def arithmetic_reward(completions: list[str], rows: list[PromptRow], *, timeout_s: float) -> list[Score]:
    return [_per_sample(arithmetic_score, c, r.ground_truth) for c, r in zip(completions, rows)]


@register_reward(RewardName.MATH_VERIFY)
def math_verify_reward(completions: list[str], rows: list[PromptRow], *, timeout_s: float,
                       batch_timeout_s: float | None = None) -> list[Score]:
    golds = [r.ground_truth for r in rows]
    usable = [i for i, g in enumerate(golds) if g.strip()]  # no gold answer: not applicable
    scores: list[Score] = [None] * len(completions)
    for i, s in zip(usable, math_verify_batch([completions[i] for i in usable], [golds[i] for i in usable], timeout_s,
                                              batch_timeout_s)):
        scores[i] = s
    return scores


@register_reward(RewardName.FORMAT)
def format_reward(completions: list[str], rows: list[PromptRow], *, timeout_s: float,
                  pattern: str | None = None) -> list[Score]:
    return [_per_sample(format_score, c, pattern) for c in completions]


def auto_reward_name(data_source: str) -> RewardName:
    """verl's default_compute_score dispatch, for Keel's built-ins."""
    if data_source.startswith("embedded/"):
        return RewardName.ARITHMETIC
    return RewardName.MATH_VERIFY  # openai/gsm8k ("####" answers), MATH, deepscaler, anything else


@register_reward(RewardName.AUTO)
def auto_reward(completions: list[str], rows: list[PromptRow], *, timeout_s: float,
                batch_timeout_s: float | None = None) -> list[Score]:
    scores: list[Score] = [None] * len(completions)
    groups: dict[RewardName, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(auto_reward_name(row.data_source), []).append(i)
    for name, idx in groups.items():
        extra = {"batch_timeout_s": batch_timeout_s} if name is RewardName.MATH_VERIFY else {}
        got = BUILTIN_REWARDS[name]([completions[i] for i in idx], [rows[i] for i in idx], timeout_s=timeout_s,
                                    **extra)
        for i, s in zip(idx, got):
            scores[i] = s
    return scores


# --------------------------------------------------------------------------- custom functions


class Style(str, Enum):
    BUILTIN = "builtin"
    TRL = "trl"  # f(prompts, completions, **columns) -> list[float | None]
    VERL = "verl"  # compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict


def load_function(spec: str, default_name: str | None = None) -> Callable:
    """``"pkg.mod:fn"``, ``"pkg.mod.fn"``, ``"path/file.py:fn"`` or ``"path/file.py"`` (+ default_name) -> the function."""
    if ":" in spec:
        target, name = spec.rsplit(":", 1)
    elif spec.endswith(".py"):
        target, name = spec, default_name
    elif "." in spec:
        target, name = spec.rsplit(".", 1)
    else:
        target, name = spec, default_name
    if not name:
        raise KeelError(f"reward function '{spec}' names no function (use 'module:function' or 'file.py:function')")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise KeelError(f"reward function '{spec}': file '{path}' does not exist")
        module_spec = importlib.util.spec_from_file_location(f"keel_custom_reward_{abs(hash(str(path.resolve())))}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise KeelError(f"reward function '{spec}': importing '{path}' failed ({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise KeelError(f"reward function '{spec}': cannot import module '{target}' ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise KeelError(f"reward function '{spec}': '{target}' has no function '{name}'")
    if not callable(fn):
        raise KeelError(f"reward function '{spec}': '{name}' is not callable")
    return fn


def detect_style(fn: Callable, label: str) -> Style:
    """verl if the function takes ``solution_str``; TRL if it takes ``completions`` or ``prompts``."""
    params = inspect.signature(fn).parameters
    if "solution_str" in params:
        return Style.VERL
    if "completions" in params or "prompts" in params:
        return Style.TRL
    raise KeelError(
        f"reward function '{label}' has signature {inspect.signature(fn)}; expected TRL's "
        "f(prompts, completions, **kwargs) or verl's compute_score(data_source, solution_str, ground_truth, extra_info)"
    )


def _trl_columns(rows: list[PromptRow]) -> dict[str, list]:
    """Every dataset column as a list over the batch (TRL passes them as keyword arguments)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row.columns))
    columns = {k: [row.columns.get(k) for row in rows] for k in keys if k not in ("prompt", "prompts", "completions")}
    columns.setdefault("ground_truth", [row.ground_truth for row in rows])
    columns.setdefault("data_source", [row.data_source for row in rows])
    return columns


class RewardFunction:
    """One weighted reward: a built-in, a TRL-style or a verl-style function, with per-sample error handling."""

    def __init__(self, name: str, fn: Callable, weight: float = 1.0, style: Style = Style.BUILTIN,
                 kwargs: dict | None = None, error_score: float = 0.0, timeout_s: float = 5.0) -> None:
        self.name, self.fn, self.weight, self.style = name, fn, float(weight), Style(style)
        self.kwargs = dict(kwargs or {})
        self.error_score, self.timeout_s = float(error_score), float(timeout_s)
        self._warned = False
        self.max_failed_batches = 3  # reward.max_failed_batches (0 = never stop)
        self.batch_timeout_s = 60.0  # reward.batch_timeout_s: one batch's scoring by this function
        self._failed_in_row = 0  # batches in a row on which every sample failed
        self._call = _contained(fn)  # sys.exit() / a raised KeyboardInterrupt fail the sample, not the run
        params = inspect.signature(fn).parameters if style is Style.BUILTIN else {}
        self._builtin_batch_deadline = "batch_timeout_s" in params

    def __call__(self, prompts: list[str], completions: list[str], rows: list[PromptRow],
                 response_lengths: list[int]) -> list[float]:
        return self.score(prompts, completions, rows, response_lengths)[0]

    def score(self, prompts: list[str], completions: list[str], rows: list[PromptRow],
              response_lengths: list[int]) -> tuple[list[float], dict[str, float]]:
        """(scores, counts) with counts = {"errors", "not_applicable", "timeouts", and verl dict extras "<key>/sum"}."""
        if self.style is Style.BUILTIN:
            extra = {"batch_timeout_s": self.batch_timeout_s} if self._builtin_batch_deadline else {}
            raw = self.fn(completions, rows, timeout_s=self.timeout_s, **extra, **self.kwargs)
        else:
            raw = self._call_custom(completions, rows)
        self._check_length(raw, len(completions))
        scores: list[float] = []
        counts = {"errors": 0.0, "not_applicable": 0.0, "timeouts": 0.0}
        for value in raw:
            if isinstance(value, dict):  # verl: {"score": ..., other metrics}
                for key, extra in value.items():
                    if key != "score" and isinstance(extra, numbers.Real):
                        counts[f"{key}/sum"] = counts.get(f"{key}/sum", 0.0) + float(extra)
                value = value["score"] if "score" in value else KeyError("verl reward dict has no 'score'")
            if value is None:
                counts["not_applicable"] += 1
                scores.append(0.0)
            elif isinstance(value, (VerifyTimeout, RewardTimeout)):
                counts["timeouts"] += 1
                scores.append(0.0)
            elif isinstance(value, BaseException) or not _is_finite_number(value):
                counts["errors"] += 1
                self._warn(value)
                scores.append(self.error_score)
            else:
                scores.append(float(value))
        self._stop_if_broken(raw, counts["errors"], counts["timeouts"])
        return scores, counts

    def _call_custom(self, completions: list[str], rows: list[PromptRow]) -> list[Score]:
        """A TRL (one call) or verl (one call per sample) function, all of it under reward.batch_timeout_s."""
        raw: list[Score] = []  # verl: filled as samples are scored, so a late batch keeps what was done
        try:
            if self.style is Style.TRL:
                return run_with_deadline(lambda: self._call_trl(completions, rows), self.batch_timeout_s,
                                         f"reward function '{self.name}'")
            run_with_deadline(lambda: raw.extend(_per_sample(self._call_verl, c, r) for c, r in zip(completions, rows)),
                              self.batch_timeout_s, f"reward function '{self.name}'")
            return raw
        except RewardTimeout as late:
            return raw + [late] * (len(completions) - len(raw))

    def _stop_if_broken(self, raw: list, errors: float, timeouts: float = 0.0) -> None:
        """A function that fails (or times out) on every sample, batch after batch, is broken: say so instead of
        training on constant scores (which give every completion the same advantage, zero)."""
        self._failed_in_row = self._failed_in_row + 1 if raw and errors + timeouts == len(raw) else 0
        if self.max_failed_batches and self._failed_in_row >= self.max_failed_batches and timeouts == len(raw):
            limits = f"reward.batch_timeout_s={self.batch_timeout_s:g}"
            if self.style is Style.BUILTIN:
                limits = f"reward.timeout_s={self.timeout_s:g} per call, {limits}"
            raise KeelError(f"reward function '{self.name}' timed out on every sample of {self._failed_in_row} "
                            f"batches in a row ({limits}); make it faster, raise the limit or remove it from "
                            f"reward.functions (reward.max_failed_batches={self.max_failed_batches})")
        if self.max_failed_batches and self._failed_in_row >= self.max_failed_batches:
            last = next((v for v in reversed(raw) if isinstance(v, BaseException)), None)
            why = f"last error {type(last).__name__}: {str(last)[:200]}" if last is not None else "non-numeric scores"
            raise KeelError(f"reward function '{self.name}' failed on every sample of {self._failed_in_row} batches "
                            f"in a row ({why}); fix it or remove it from reward.functions "
                            f"(reward.max_failed_batches={self.max_failed_batches})")

    def _call_trl(self, completions: list[str], rows: list[PromptRow]) -> list[Score]:
        prompts = [row.prompt for row in rows]  # as in the dataset, like TRL (not chat-templated)
        # conversational prompts get conversational completions, as TRL does
        wrapped = [c if isinstance(r.prompt, str) else [{"role": "assistant", "content": c}]
                   for c, r in zip(completions, rows)]
        columns = _trl_columns(rows)
        try:
            out = self._call(prompts=prompts, completions=wrapped, **{**columns, **self.kwargs})
            if not isinstance(out, (list, tuple)):
                raise KeelError(f"reward function '{self.name}' must return a list of floats, got {type(out).__name__}")
            return list(out)
        except KeelError:
            raise
        except Exception:  # find the sample(s) that raise: call again one completion at a time
            raw: list[Score] = []
            for i in range(len(completions)):
                one = {k: v[i : i + 1] for k, v in columns.items()}
                try:
                    got = self._call(prompts=prompts[i : i + 1], completions=wrapped[i : i + 1], **{**one, **self.kwargs})
                except Exception as e:
                    raw.append(e)
                    continue
                self._check_length(got, 1)
                raw.append(got[0])
            return raw

    def _call_verl(self, completion: str, row: PromptRow) -> Any:
        return self._call(data_source=row.data_source, solution_str=completion, ground_truth=row.ground_truth,
                          extra_info=row.extra_info, **self.kwargs)

    def _check_length(self, raw: Any, n: int) -> None:
        if not isinstance(raw, (list, tuple)):
            raise KeelError(f"reward function '{self.name}' must return a list of floats, got {type(raw).__name__}")
        if len(raw) != n:
            raise KeelError(f"reward function '{self.name}' returned {len(raw)} scores for {n} completions")

    def _warn(self, value: Any) -> None:
        if not self._warned:  # once per function: the count is in reward/errors every step
            self._warned = True
            what = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else f"returned {value!r}"
            log.warning("reward function '%s' failed on a sample (%s); scored %s", self.name, what, self.error_score)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


# --------------------------------------------------------------------------- building from the config


def make_reward_function(entry: Any, error_score: float = 0.0, timeout_s: float = 5.0) -> RewardFunction:
    """One ``reward.functions`` entry ("name" or {name, weight, kwargs, style}) -> RewardFunction."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise KeelError(f"config key 'reward.functions' entry {entry!r} must be a name or {{name, weight, kwargs}}")
    unknown = set(entry) - {"name", "weight", "kwargs", "style"}
    if unknown:
        raise KeelError(f"config key 'reward.functions' entry '{entry['name']}' has unknown key(s) {sorted(unknown)} "
                        "(valid: name, weight, kwargs, style)")
    spec, weight, kwargs = str(entry["name"]), entry.get("weight", 1.0), entry.get("kwargs") or {}
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise KeelError(f"config key 'reward.functions' entry '{spec}': weight must be a number, got {weight!r}")
    if not isinstance(kwargs, dict):
        raise KeelError(f"config key 'reward.functions' entry '{spec}': kwargs must be a mapping, got {kwargs!r}")
    if spec in {n.value for n in RewardName}:
        fn = BUILTIN_REWARDS[RewardName(spec)]
        try:
            inspect.signature(fn).bind([], [], timeout_s=timeout_s, **kwargs)
        except TypeError as e:
            raise KeelError(f"config key 'reward.functions' entry '{spec}': bad kwargs {sorted(kwargs)} ({e})") from None
        return RewardFunction(spec, fn, weight, Style.BUILTIN, kwargs, error_score, timeout_s)
    if ":" not in spec and "." not in spec:
        valid = ", ".join(sorted(n.value for n in RewardName))
        raise KeelError(f"reward function '{spec}' is unknown (built-ins: {valid}; or 'module:function' / 'file.py:function')")
    fn = load_function(spec)
    if entry.get("style", "trl") not in (Style.TRL.value, Style.VERL.value):
        raise KeelError(f"config key 'reward.functions' entry '{spec}': style must be trl or verl, got {entry['style']!r}")
    style = Style(entry["style"]) if "style" in entry else detect_style(fn, spec)
    return RewardFunction(getattr(fn, "__name__", spec), fn, weight, style, kwargs, error_score, timeout_s)


class CombinedReward:
    """Weighted sum of reward functions (+ overlong penalty) -> (total per completion, metrics)."""

    def __init__(self, functions: list[RewardFunction], max_response_length: int,
                 overlong_buffer_len: int = 0, overlong_penalty_factor: float = 1.0) -> None:
        self.functions = functions
        self.max_response_length = max_response_length
        self.overlong_buffer_len = overlong_buffer_len
        self.overlong_penalty_factor = overlong_penalty_factor

    def __call__(self, prompts: list[str], completions: list[str], rows: list[PromptRow],
                 response_lengths: list[int]) -> tuple[list[float], dict[str, float]]:
        n = len(completions)
        if not (len(prompts) == len(rows) == len(response_lengths) == n):
            raise ValueError(f"reward inputs differ in length: {len(prompts)} prompts, {n} completions, "
                             f"{len(rows)} rows, {len(response_lengths)} lengths")
        total = [0.0] * n
        metrics: dict[str, float] = {"reward/errors": 0.0, "reward/not_applicable": 0.0, "reward/timeouts": 0.0}
        for fn in self.functions:
            scores, counts = fn.score(prompts, completions, rows, response_lengths)
            total = [t + fn.weight * s for t, s in zip(total, scores)]
            for key in ("errors", "not_applicable", "timeouts"):
                metrics[f"reward/{key}"] += counts.pop(key)
            if n:
                metrics[f"reward/{fn.name}/mean"] = sum(scores) / n
                metrics.update({f"reward/{fn.name}/{k[:-4]}/mean": v / n for k, v in counts.items()})
        if self.overlong_buffer_len > 0:
            penalty = [overlong_penalty(L, self.max_response_length, self.overlong_buffer_len,
                                        self.overlong_penalty_factor) for L in response_lengths]
            total = [t + p for t, p in zip(total, penalty)]
            if n:
                metrics["reward/overlong/mean"] = sum(penalty) / n
        return total, metrics


def build_reward(cfg: Any) -> CombinedReward:
    """The run's reward from ``cfg.reward`` and verl's ``cfg.custom_reward_function``.

    A verl custom_reward_function takes the place of the "auto" entry (verl: it replaces the
    default data_source dispatch); with no "auto" entry it is added with weight 1.
    """
    r = cfg.reward
    if r.timeout_s <= 0:
        raise KeelError(f"config key 'reward.timeout_s' must be > 0, got {r.timeout_s}")
    if not 0 <= r.overlong_buffer_len <= cfg.data.max_response_length:
        raise KeelError(f"config key 'reward.overlong_buffer_len' must be in [0, data.max_response_length="
                        f"{cfg.data.max_response_length}], got {r.overlong_buffer_len}")
    if r.overlong_penalty_factor < 0:
        raise KeelError(f"config key 'reward.overlong_penalty_factor' must be >= 0, got {r.overlong_penalty_factor}")
    entries = list(r.functions)
    custom = cfg.custom_reward_function
    if custom.path:
        fn = load_function(custom.path if custom.path.endswith(".py") else f"{custom.path}:{custom.name}", custom.name)
        style = detect_style(fn, f"{custom.path}:{custom.name}")
        weight = next((float(e.get("weight", 1.0)) for e in entries if isinstance(e, dict) and e.get("name") == "auto"), 1.0)
        entries = [e for e in entries if (e.get("name") if isinstance(e, dict) else e) != "auto"]
        functions = [RewardFunction(custom.name, fn, weight, style, {}, r.error_score, r.timeout_s)]
    else:
        functions = []
    if not entries and not functions:
        raise KeelError("config key 'reward.functions' is empty: name at least one reward function")
    functions += [make_reward_function(e, r.error_score, r.timeout_s) for e in entries]
    seen: dict[str, int] = {}
    for fn in functions:  # distinct metric names: reward/<name>/mean
        fn.max_failed_batches = r.max_failed_batches
        fn.batch_timeout_s = r.batch_timeout_s
        seen[fn.name] = seen.get(fn.name, 0) + 1
        if seen[fn.name] > 1:
            fn.name = f"{fn.name}_{seen[fn.name]}"
    return CombinedReward(functions, cfg.data.max_response_length, r.overlong_buffer_len, r.overlong_penalty_factor)
