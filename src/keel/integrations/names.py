"""Metric names of other trainers -> Keel's (verl's) names, so one rule set judges them all.

Keel logs verl's names (``actor/entropy``, ``critic/score/mean`` ...); a verl run's names pass
through unchanged. TRL's ``GRPOTrainer`` logs its own; :func:`to_keel_names` renames them:

    entropy                   -> actor/entropy             token mean (as Keel's token-mean)
    kl                        -> actor/kl_loss             k3 token mean (verl's low_var_kl)
    completions/mean_length   -> response_length/mean      (min_length, max_length likewise)
    completions/clipped_ratio -> response_length/clip_ratio
    reward                    -> critic/score/mean         (reward_std -> critic/score/std)
    rewards/<f>/mean          -> reward/<f>/mean           (std likewise)
    frac_reward_zero_std      -> batch/valid = 1 - value   share of groups with a learning signal
    clip_ratio/region_mean    -> actor/pg_clipfrac         tokens whose ratio left [1-eps, 1+eps]
    grad_norm, learning_rate  -> actor/grad_norm, actor/lr
    entropy_coef              -> actor/entropy_coeff

A ``train/`` prefix (what transformers' TensorBoard / W&B / MLflow callbacks add) is dropped first.
Every other name is kept as it is, so nothing logged is lost.
"""

from __future__ import annotations

import re

TRL_TO_VERL = {
    "entropy": "actor/entropy",
    "kl": "actor/kl_loss",
    "completions/mean_length": "response_length/mean",
    "completions/min_length": "response_length/min",
    "completions/max_length": "response_length/max",
    "completions/clipped_ratio": "response_length/clip_ratio",
    "reward": "critic/score/mean",
    "reward_std": "critic/score/std",
    "clip_ratio/region_mean": "actor/pg_clipfrac",
    "grad_norm": "actor/grad_norm",
    "learning_rate": "actor/lr",
    "entropy_coef": "actor/entropy_coeff",
}
_PER_FUNCTION = re.compile(r"rewards/(.+)/(mean|std)")


def keel_name(name: str) -> str:
    """One logged name -> Keel's name (verl's and unknown names unchanged)."""
    if name.startswith("train/"):
        name = name[len("train/"):]
    if name in TRL_TO_VERL:
        return TRL_TO_VERL[name]
    m = _PER_FUNCTION.fullmatch(name)
    return f"reward/{m.group(1)}/{m.group(2)}" if m else name


def to_keel_names(metrics: dict) -> dict:
    """A step's metrics with TRL's names mapped to Keel's (verl's); a mapped name wins over a same-named original."""
    out: dict = {}
    for name, value in metrics.items():
        base = name[len("train/"):] if name.startswith("train/") else name
        if base == "frac_reward_zero_std":
            out["batch/valid"] = None if value is None else 1.0 - float(value)
            continue
        key = keel_name(name)
        if key != name or key not in out:
            out[key] = value
    return out
