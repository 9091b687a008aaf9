"""Write the recorded metric traces that tests/test_monitor.py replays.

    python tests/traces/make_traces.py      # rewrites tests/traces/*.jsonl (deterministic: seeded noise)

Each trace is a synthetic run with the shape of a failure mode from the lab log, in verl's metric
names: t = 1..T is the step, curves are written as functions of t, and every value gets seeded
multiplicative Gaussian noise. The first four are on the Qwen3 scale (judged with the `lablog` rules),
the last two on the embedded task's scale (judged with the `embedded` rules).

    stable              160 steps, entropy ~4.3, nothing drifts; step 37 has no rewarded response
    over_random         200 steps, entropy 4.0 -> 9.0 (convex rise), KL creeping up, text degenerating
    rise_collapse        78 steps, entropy 3.9 -> 5.3 -> 0.18, response length 1128 -> 1250 -> 6
                        (the lab log's run; written in verl's {"step", "data"} line format)
    monotone_collapse   200 steps, entropy 4.5 -> 0.3 and rewarded length 900 -> 15, exponential decay
    embedded_stable      80 steps, entropy ~0.06 nats, ~1 connective and ~37 characters per response
    embedded_collapse    80 steps, style collapse to the bare answer: entropy 0.07 -> 0.003,
                        connectives 1 -> 0, rewarded length 37 -> 5 (falls from step 20 to 70)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _noisy(rng: np.random.Generator, x: np.ndarray, rel: float) -> np.ndarray:
    return x * (1.0 + rel * rng.standard_normal(x.shape))


def _write(name: str, t: np.ndarray, cols: dict[str, np.ndarray], verl_format: bool = False) -> None:
    with open(HERE / f"{name}.jsonl", "w") as f:
        for i, step in enumerate(t):
            row = {k: (None if np.isnan(v[i]) else float(f"{v[i]:.4g}")) for k, v in cols.items()}
            line = {"step": int(step), "data": row} if verl_format else {"step": int(step), **row}
            f.write(json.dumps(line) + "\n")


def _qwen_cols(rng, t, entropy, kl, pos_len, connectives, score) -> dict[str, np.ndarray]:
    """The columns every Qwen-scale trace has, from the curves that define it."""
    return {
        "actor/entropy": _noisy(rng, entropy, 0.03),
        "actor/kl_loss": _noisy(rng, kl, 0.05),
        "actor/entropy_coeff": np.zeros_like(t, dtype=float),
        "actor/kl_coef": np.full(t.shape, 0.001),
        "critic/score/mean": np.clip(_noisy(rng, score, 0.03), 0, 1),
        "token/logical_connectives": _noisy(rng, connectives, 0.05),
        "response_length/mean": _noisy(rng, pos_len * 0.93, 0.04),
        "response_length/pos/mean": _noisy(rng, pos_len, 0.04),
        "batch/valid": np.clip(_noisy(rng, np.full(t.shape, 0.7), 0.05), 0, 1),
    }


def stable(rng):
    t = np.arange(1, 161)
    cols = _qwen_cols(rng, t, entropy=4.3 + 0.2 * np.sin(t / 15), kl=0.05 + 0.9 * t / 160,
                      pos_len=620 + 60 * np.sin(t / 25), connectives=np.full(t.shape, 22.0), score=0.35 + 0.25 * t / 160)
    cols["response_length/pos/mean"][36] = np.nan  # step 37: no rewarded response -> the metric is null
    cols["critic/score/mean"][36] = 0.0
    return t, cols


def over_random(rng):
    t = np.arange(1, 201)
    x = t / 200
    return t, _qwen_cols(rng, t, entropy=4.0 + 5.0 * x**1.5, kl=0.3 + 4.2 * x**2, pos_len=700 + 1100 * x**2,
                         connectives=22 - 20 * x, score=0.5 - 0.4 * x)


def rise_collapse(rng):
    t = np.arange(1, 79)
    u = np.clip((t - 46) / 32, 0, 1)  # 0 until the peak at step 46, 1 at step 78
    rise = np.clip((t - 1) / 45, 0, 1)  # 0 at step 1, 1 at the peak
    entropy = np.where(t <= 46, 3.9 + 1.4 * rise, 0.18 + 5.12 * (1 - u) ** 1.5)
    length = np.where(t <= 46, 1128 + 122 * rise, 6 + 1244 * (1 - u) ** 2.5)
    kl = np.where(t <= 46, 0.05 + 0.75 * rise, 0.8 + 3.2 * u)
    connectives = np.where(t <= 46, 28 + 2 * rise, 30 * (1 - u) ** 2)
    score = np.where(t <= 46, 0.45 + 0.1 * rise, 0.55 - 0.5 * u)
    return t, _qwen_cols(rng, t, entropy, kl, length, connectives, score)


def monotone_collapse(rng):
    t = np.arange(1, 201)
    return t, _qwen_cols(rng, t, entropy=4.5 * np.exp(-np.log(15) / 200 * t), kl=0.1 + 1.9 * t / 200,
                         pos_len=900 * np.exp(-np.log(60) / 200 * t), connectives=24 * np.exp(-np.log(48) / 200 * t),
                         score=np.full(t.shape, 0.4))


def _embedded_cols(rng, t, entropy, connectives, pos_len, kl) -> dict[str, np.ndarray]:
    return {
        "actor/entropy": _noisy(rng, entropy, 0.10),
        "actor/kl_loss": _noisy(rng, kl, 0.10),
        "token/logical_connectives": np.clip(_noisy(rng, connectives, 0.08), 0, None),
        "response_length/pos/mean": _noisy(rng, pos_len, 0.05),
        "critic/score/mean": np.full(t.shape, 0.6),
    }


def embedded_stable(rng):
    t = np.arange(1, 81)
    return t, _embedded_cols(rng, t, entropy=np.full(t.shape, 0.06), connectives=np.full(t.shape, 1.0),
                             pos_len=np.full(t.shape, 37.0), kl=0.01 + 0.06 * t / 80)  # measured demo: 0.001 -> 0.06


def embedded_collapse(rng):
    t = np.arange(1, 81)
    u = np.clip((t - 20) / 50, 0, 1)
    return t, _embedded_cols(rng, t, entropy=0.003 + 0.067 * (1 - u) ** 2, connectives=(1 - u) ** 2,
                             pos_len=5 + 32 * (1 - u) ** 1.5, kl=0.02 + 0.15 * u)  # stays under the KL bad line


if __name__ == "__main__":
    for seed, fn in enumerate([stable, over_random, rise_collapse, monotone_collapse, embedded_stable, embedded_collapse]):
        t, cols = fn(np.random.default_rng(seed))
        _write(fn.__name__, t, cols, verl_format=fn is rise_collapse)
        print(f"wrote {fn.__name__}.jsonl ({len(t)} steps)")
