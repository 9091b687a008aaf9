"""Per-step health metrics of a rollout batch, under verl / Archer names.

Pure Python + NumPy: the loop hands over decoded responses, their scores and token
lengths, and gets back a flat ``{name: float | None}`` dict. Shapes used throughout:

    B = prompts in the batch, G = completions per prompt (the group), N = B*G responses,
    stored group-major: responses [g*G, (g+1)*G) belong to prompt g.

A metric that is undefined in a step (no positive responses, no response long enough
for an n-gram) is ``None``, never NaN; :func:`clean_for_json` turns any stray NaN/inf
into ``None`` before a line reaches ``metrics.jsonl``. Exact definitions: docs/health.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# Words whose disappearance marks a reasoning collapse (the lab log's list).
CONNECTIVES: frozenset[str] = frozenset(
    "alternatively although and because but either even hence however if just maybe nevertheless neither "
    "nor only or perhaps possibly probably since so still then therefore though thus while yet".split()
)

_NON_WORD = re.compile(r"\W+")  # anything that is not a letter, digit or underscore

RESPONSE_KEYS = (
    "critic/score/mean", "critic/score/max", "critic/score/min", "score/mean",
    "token/logical_connectives", "pos_token/logical_connectives", "neg_token/logical_connectives",
    "token/repetition_ratio",
    "response_length/mean", "response_length/max", "response_length/min", "response_length/clip_ratio",
    "response_length/pos/mean", "response_length/neg/mean",
    "batch/valid", "batch/solve_all", "batch/solve_none",
)  # fmt: skip


def words(text: str) -> list[str]:
    """Lowercase, every run of non-word characters -> one space, split on whitespace.

    ``"However, 3+4=7!"`` -> ``["however", "3", "4", "7"]``.
    """
    return _NON_WORD.sub(" ", text.lower()).split()


def count_connectives(text: str) -> int:
    """Number of words of ``text`` (see :func:`words`) that are in :data:`CONNECTIVES`."""
    return sum(w in CONNECTIVES for w in words(text))


def repetition_ratio(text: str, n: int = 3) -> float | None:
    """Share of word n-grams that repeat an earlier n-gram of the same response.

        rep_n = 1 - |unique n-grams| / |n-grams|        (seq-rep-n, Welleck et al. 2019, arXiv:1908.04319)

    Units are always the words of :func:`words` (never characters: mixing units between
    responses would make the batch mean meaningless). ``None`` when the text has fewer
    than ``n`` words, i.e. no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    w = words(text)
    total = len(w) - n + 1  # number of n-grams
    if total <= 0:
        return None
    unique = len({tuple(w[i : i + n]) for i in range(total)})
    return 1.0 - unique / total


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def response_metrics(
    responses: list[str],
    scores: list[float],
    lengths: list[int],
    max_response_length: int,
    group_size: int,
    ngram: int = 3,
) -> dict[str, float | None]:
    """Score, text, length and group metrics of one rollout batch.

    Args:
        responses: (N,) decoded completions, group-major.
        scores: (N,) final rewards; "positive" means score > 0, "negative" score <= 0.
        lengths: (N,) response lengths in tokens (EOS included when generated).
        max_response_length: the generation cap; a response of at least this length is clipped.
        group_size: G, completions per prompt; N must be a multiple of it.
        ngram: n of ``token/repetition_ratio``.

    Returns the keys of :data:`RESPONSE_KEYS`; the ``pos``/``neg`` means are ``None`` when the
    batch has no positive / no negative response. ``batch/*`` are fractions of the B prompts:
    valid = group scores not all equal (the group has a learning signal), solve_all = every
    completion positive, solve_none = no completion positive.
    """
    N = len(responses)
    if len(scores) != N or len(lengths) != N:
        raise ValueError(f"responses ({N}), scores ({len(scores)}) and lengths ({len(lengths)}) differ in length")
    if group_size < 1 or N % group_size:
        raise ValueError(f"{N} responses do not split into groups of {group_size}")
    if N == 0:
        return dict.fromkeys(RESPONSE_KEYS)
    s = np.asarray(scores, dtype=np.float64)  # (N,)
    n_tok = np.asarray(lengths, dtype=np.float64)  # (N,)
    conn = np.array([count_connectives(r) for r in responses], dtype=np.float64)  # (N,)
    rep = np.array([x for r in responses if (x := repetition_ratio(r, ngram)) is not None])  # (<=N,)
    pos = s > 0  # (N,)
    group = s.reshape(-1, group_size)  # (B, G)
    solved = group > 0  # (B, G)
    score_mean = float(s.mean())
    return {
        "critic/score/mean": score_mean,
        "critic/score/max": float(s.max()),
        "critic/score/min": float(s.min()),
        "score/mean": score_mean,
        "token/logical_connectives": float(conn.mean()),
        "pos_token/logical_connectives": _mean(conn[pos]),
        "neg_token/logical_connectives": _mean(conn[~pos]),
        "token/repetition_ratio": _mean(rep),
        "response_length/mean": float(n_tok.mean()),
        "response_length/max": float(n_tok.max()),
        "response_length/min": float(n_tok.min()),
        "response_length/clip_ratio": float((n_tok >= max_response_length).mean()),
        "response_length/pos/mean": _mean(n_tok[pos]),
        "response_length/neg/mean": _mean(n_tok[~pos]),
        "batch/valid": float((group.max(axis=1) != group.min(axis=1)).mean()),
        "batch/solve_all": float(solved.all(axis=1).mean()),
        "batch/solve_none": float((~solved.any(axis=1)).mean()),
    }


def regularizer_balance(entropy: float | None, kl_loss: float | None, entropy_coeff: float, kl_coef: float) -> dict:
    """The two regularizers' weights in the loss this step, side by side.

        actor/entropy_bonus = entropy_coeff * H        (subtracted from the loss; None when H is None)
        actor/kl_penalty    = kl_coef * KL             (added to the loss; None when no KL loss is computed)

    Comparing them shows which pressure dominates: a bonus far above the penalty pushes
    toward randomness, a penalty far above the bonus pins the policy to the reference.
    """
    return {
        "actor/entropy_coeff": float(entropy_coeff),
        "actor/kl_coef": float(kl_coef),
        "actor/entropy_bonus": None if entropy is None else float(entropy_coeff) * float(entropy),
        "actor/kl_penalty": None if kl_loss is None else float(kl_coef) * float(kl_loss),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.generic) or (hasattr(value, "item") and tuple(getattr(value, "shape", (1,))) == ()):
        value = value.item()  # NumPy scalars and 0-d arrays / tensors -> Python numbers
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_for_json(metrics: dict) -> dict:
    """A copy safe for ``json.dumps(allow_nan=False)``: NaN/inf -> None, NumPy/0-d scalars -> Python numbers."""
    return _clean(metrics)
