"""GRPO math as pure tensor functions: advantages, loss aggregation, clipped policy loss, KL, entropy.

Nothing here knows about models, configs or the loop: every hyperparameter is an argument.
Shapes used throughout:

    B = prompts in the batch, G = completions per prompt (the group), N = B*G rows,
    L = response length (padded), V = vocabulary size.

Variants are picked by name from small registries keyed by ``str`` Enums (verl's names, so a
verl config carries over); a failed lookup raises :class:`keel.errors.KeelError` listing the
valid names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from keel.errors import KeelError


def _unknown(kind: str, name: object, valid: list[str]) -> KeelError:
    return KeelError(f"unknown {kind} {str(getattr(name, 'value', name))!r} (valid: {', '.join(valid)})")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * m) / max(sum(m), 1): an empty mask gives 0, never NaN."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- advantage estimators


class AdvantageEstimator(str, Enum):
    """Names of the built-in estimators (config key ``algorithm.adv_estimator``)."""

    GRPO = "grpo"


AdvEstimatorFn = Callable[..., Tensor]  # (scores (N,), group_size, **kwargs) -> advantages (N,)
ADV_ESTIMATOR_REGISTRY: dict[str, AdvEstimatorFn] = {}


def register_adv_est(name: str | AdvantageEstimator) -> Callable[[AdvEstimatorFn], AdvEstimatorFn]:
    """Decorator: ``@register_adv_est(AdvantageEstimator.GRPO)`` or ``@register_adv_est("my_est")``."""
    key = str(getattr(name, "value", name))

    def decorator(fn: AdvEstimatorFn) -> AdvEstimatorFn:
        if key in ADV_ESTIMATOR_REGISTRY and ADV_ESTIMATOR_REGISTRY[key] is not fn:
            raise ValueError(f"advantage estimator {key!r} is already registered")
        ADV_ESTIMATOR_REGISTRY[key] = fn
        return fn

    return decorator


def get_adv_estimator(name: str | AdvantageEstimator) -> AdvEstimatorFn:
    key = str(getattr(name, "value", name))
    if key not in ADV_ESTIMATOR_REGISTRY:
        raise _unknown("algorithm.adv_estimator", name, sorted(ADV_ESTIMATOR_REGISTRY))
    return ADV_ESTIMATOR_REGISTRY[key]


@register_adv_est(AdvantageEstimator.GRPO)
def compute_grpo_outcome_advantage(
    scores: Tensor, group_size: int, norm_adv_by_std_in_grpo: bool = True, epsilon: float = 1e-6
) -> Tensor:
    """Group-relative outcome advantage (GRPO, DeepSeekMath arXiv:2402.03300).

    Each prompt's G completions are scored; every completion is judged against its own group:

        GRPO:     A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      std unbiased (torch.std default, as verl)
        Dr.GRPO:  A_i =  r_i - mean_g(r)                          (norm_adv_by_std_in_grpo=False,
                                                                   arXiv:2503.20783: the std division
                                                                   over-weights too-easy/too-hard prompts)

    A group whose rewards are all equal carries no signal and gets exactly zero advantage: the
    rewards are shifted by the group's first one before the mean (r_i - r_0 is exactly 0 for equal
    values, so mean and std are exactly 0 too) and the statistics are taken in float64. verl takes
    the float32 mean of the raw rewards, so 7 rewards of 0.7 give it (0.7 - mean) / (std + eps) =
    +0.056 on every row, a push from a group with no signal; the shift changes nothing else
    (mean and std are shift-invariant).
    The advantage is an outcome (sequence-level) value; the policy loss broadcasts it over tokens.

    Args:
        scores: (N,) one scalar reward per completion, group-major: rows g*G .. g*G+G-1 are prompt g.
        group_size: G (>= 2).
    Returns:
        (N,) float32 advantages, no grad.
    """
    if group_size < 2 or scores.numel() % group_size != 0:
        raise ValueError(f"GRPO needs groups of >= 2: got {scores.numel()} scores for group_size={group_size}")
    with torch.no_grad():
        r = scores.detach().double().reshape(-1, group_size)  # (B, G)
        r = r - r[:, :1]  # (B, G) shift by the first reward: equal rewards become exact zeros
        centred = r - r.mean(dim=-1, keepdim=True)  # (B, G)
        if norm_adv_by_std_in_grpo:
            centred = centred / (r.std(dim=-1, keepdim=True) + epsilon)  # all-equal group: 0 / eps = 0
    return centred.float().reshape(-1)  # (N,)


# --------------------------------------------------------------------------- loss aggregation


class LossAggMode(str, Enum):
    """How an (N, L) per-token loss becomes a scalar (config key ``actor_rollout_ref.actor.loss_agg_mode``)."""

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


def get_loss_agg_mode(name: str | LossAggMode) -> LossAggMode:
    try:
        return LossAggMode(name)
    except ValueError:
        raise _unknown("actor_rollout_ref.actor.loss_agg_mode", name, [m.value for m in LossAggMode]) from None


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, norm_len: int | None = None) -> Tensor:
    """Aggregate a per-token loss into a scalar (verl's ``agg_loss``, same numbers).

        token-mean:              sum_{i,t} l*m / sum_{i,t} m          every token weighs the same (DAPO)
        seq-mean-token-sum:      1/S sum_i sum_t l*m                  long answers weigh more
        seq-mean-token-mean:     1/S sum_i (sum_t l*m / sum_t m)      original GRPO: every answer weighs the same
        seq-mean-token-sum-norm: sum_{i,t} l*m / F                    Dr.GRPO: a constant normaliser F
                                                                      (verl's ``loss_scale_factor``,
                                                                      default L = the padded length)

    S counts the rows with at least one unmasked token (= N when none is empty): a fully masked row
    contributes nothing and does not dilute the mean (as verl). No unmasked token at all gives 0.
    seq-mean-token-sum-norm is a sum, not a mean, over sequences (as verl: the name notwithstanding),
    so its scale grows with the rows per mini-batch; Keel formerly divided by S as well, which is
    ``norm_len = S * L`` here (``actor_rollout_ref.actor.loss_scale_factor``, docs/integrations.md).

    Args:
        loss_mat, loss_mask: (N, L).
        norm_len: F for seq-mean-token-sum-norm (None: L = loss_mat.shape[-1]); ignored by the others.
    """
    mode = get_loss_agg_mode(loss_agg_mode)
    mask = loss_mask.to(loss_mat.dtype)  # (N, L)
    if mode is LossAggMode.TOKEN_MEAN:
        return masked_mean(loss_mat, mask)
    seq_sum = (loss_mat * mask).sum(dim=-1)  # (N,)
    if mode is LossAggMode.SEQ_MEAN_TOKEN_SUM_NORM:
        return seq_sum.sum() / (loss_mat.shape[-1] if norm_len is None else norm_len)
    tokens_per_seq = mask.sum(dim=-1)  # (N,)
    n_seqs = (tokens_per_seq > 0).sum().clamp(min=1)  # S
    if mode is LossAggMode.SEQ_MEAN_TOKEN_SUM:
        return seq_sum.sum() / n_seqs
    return (seq_sum / tokens_per_seq.clamp(min=1.0)).sum() / n_seqs  # SEQ_MEAN_TOKEN_MEAN


# --------------------------------------------------------------------------- policy loss


def compute_policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    norm_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with clip-higher (DAPO arXiv:2503.14476) and dual-clip (arXiv:1912.09729).

        ratio = exp(logp - logp_old)                                   (log-ratio clamped to [-20, 20])
        pg1   = -A * ratio
        pg2   = -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        clip  = max(pg1, pg2)                                          the usual pessimistic PPO bound
        pg    = min(clip, -A * clip_ratio_c)  if A < 0  else clip      dual-clip: a very unlikely-now token
                                                                       with A < 0 cannot push the loss up
                                                                       without bound
        loss  = agg(pg, mask)

    Args:
        log_prob: (N, L) current policy log-probs (with grad).
        old_log_prob: (N, L) log-probs of the policy that sampled the batch.
        advantages: (N, L), or (N,) which is broadcast over tokens.
        response_mask: (N, L) 1 on response tokens.
    Returns:
        loss (scalar) and detached scalar metrics (verl names):
        ``actor/pg_loss``; ``actor/pg_clipfrac``: fraction of response tokens where pg2 > pg1;
        ``actor/pg_clipfrac_lower``: fraction of response tokens with A < 0 where the dual clip binds
        (denominator: all response tokens, as verl); ``actor/ppo_kl``: masked mean of logp_old - logp
        with the log-ratio clamped to [-20, 20] as in the ratio (as verl).
    """
    if advantages.dim() == log_prob.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # (N, 1) broadcasts over L
    advantages = advantages.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)  # (N, L); clamp keeps exp finite
    ratio = torch.exp(log_ratio)  # (N, L)

    pg1 = -advantages * ratio  # (N, L)
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)  # (N, L)
    clipped = torch.maximum(pg1, pg2)  # (N, L)
    pg3 = -advantages * clip_ratio_c  # (N, L)
    dual = torch.minimum(clipped, pg3)  # (N, L)
    pg = torch.where(advantages < 0, dual, clipped)  # (N, L)
    loss = agg_loss(pg, response_mask, loss_agg_mode, norm_len)

    with torch.no_grad():
        metrics = {
            "actor/pg_loss": loss.detach(),
            "actor/pg_clipfrac": masked_mean((pg2 > pg1).float(), response_mask),
            "actor/pg_clipfrac_lower": masked_mean(((clipped > pg3) & (advantages < 0)).float(), response_mask),
            "actor/ppo_kl": masked_mean(-log_ratio.float(), response_mask),
        }
    return loss, metrics


# --------------------------------------------------------------------------- KL penalty


class KLType(str, Enum):
    """KL estimators (Schulman, "Approximating KL Divergence", 2020); verl's names are accepted as aliases."""

    K1 = "k1"  # alias "kl"
    K2 = "k2"  # alias "mse"
    K3 = "k3"  # alias "low_var_kl"
    ABS = "abs"

    @classmethod
    def _missing_(cls, value: object) -> KLType | None:
        return {"kl": cls.K1, "mse": cls.K2, "low_var_kl": cls.K3}.get(value)  # type: ignore[call-overload]


KL_TYPE_NAMES = ["k1", "kl", "k2", "mse", "k3", "low_var_kl", "abs"]


def get_kl_type(name: str | KLType) -> KLType:
    try:
        return KLType(name)
    except ValueError:
        raise _unknown("actor_rollout_ref.actor.kl_loss_type", name, KL_TYPE_NAMES) from None


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kl_type: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with d = logp - logp_ref:

        k1 (kl):          d                      unbiased, high variance, can be negative
        abs:              |d|
        k2 (mse):         d^2 / 2                biased, low variance
        k3 (low_var_kl):  e^{-d} - 1 + d         unbiased and >= 0; -d clamped to [-20, 20] and the
                                                 result to [-10, 10] (as verl) so one outlier token
                                                 cannot blow up the loss

    Args:
        log_prob, ref_log_prob: (N, L).
    Returns:
        (N, L) per-token KL; aggregate it with :func:`agg_loss`.
    """
    kind = get_kl_type(kl_type)
    d = log_prob - ref_log_prob  # (N, L)
    if kind is KLType.K1:
        return d
    if kind is KLType.ABS:
        return d.abs()
    if kind is KLType.K2:
        return 0.5 * d.square()
    neg_d = torch.clamp(-d, -20.0, 20.0)  # log(pi_ref / pi)
    kl = torch.exp(neg_d) - neg_d - 1.0  # (N, L)
    return torch.clamp(kl, -10.0, 10.0)


# --------------------------------------------------------------------------- log-probs and entropy


def _logprob_entropy_rows(logits: Tensor, labels: Tensor, temperature: float, with_entropy: bool):
    z = logits.float() / temperature  # (M, V) fp32: bf16 logsumexp loses ~2 digits
    lse = torch.logsumexp(z, dim=-1)  # (M,)
    logp = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse  # (M,)
    if not with_entropy:
        return logp, None
    entropy = lse - (F.softmax(z, dim=-1) * z).sum(dim=-1)  # (M,)  H = lse(z) - sum_v p_v z_v
    return logp, entropy


def logprobs_and_entropy(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int = 4096, with_entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Token log-probs of ``labels`` and the full-distribution entropy of softmax(logits / T).

        z = logits / T,  log p(y) = z_y - logsumexp(z),  H = logsumexp(z) - sum_v softmax(z)_v z_v

    Rows (all leading dims flattened) are processed ``chunk_size`` at a time in fp32, so the fp32
    copies of an (M, V) logits tensor never exist at once. When grad is needed, each chunk is
    checkpointed (recomputed in backward) so the saved activations stay one chunk's worth too.

    Args:
        logits: (..., V) any float dtype.
        labels: (...) long token ids.
    Returns:
        log-probs (...) and entropy (...) or None, both float32 and differentiable w.r.t. logits.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    lead, V = labels.shape, logits.shape[-1]
    flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)  # (M, V), (M,)
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad and flat_logits.shape[0] > chunk_size
    logps, entropies = [], []
    for start in range(0, flat_logits.shape[0], chunk_size):
        rows = (flat_logits[start : start + chunk_size], flat_labels[start : start + chunk_size])
        if use_ckpt:
            logp, entropy = checkpoint(
                _logprob_entropy_rows, *rows, temperature, with_entropy, use_reentrant=False
            )
        else:
            logp, entropy = _logprob_entropy_rows(*rows, temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).reshape(lead) if logps else flat_logits.new_zeros(lead, dtype=torch.float32)
    if not with_entropy:
        return logp, None
    entropy = torch.cat(entropies).reshape(lead) if entropies else torch.zeros_like(logp)
    return logp, entropy


# --------------------------------------------------------------------------- policy-loss registry


class PolicyLossMode(str, Enum):
    """Names of the built-in policy losses (config key ``actor_rollout_ref.actor.policy_loss.loss_mode``, verl's)."""

    VANILLA = "vanilla"  # compute_policy_loss: PPO clip + clip-higher + dual-clip
    CLIP_COV = "clip_cov"  # Cui et al. 2025 (arXiv 2505.22617): detach a few high-covariance tokens
    KL_COV = "kl_cov"  # Cui et al. 2025: a |log-ratio| penalty on the highest-covariance tokens


@dataclass(frozen=True)
class PolicyLossKnobs:
    """Every hyperparameter a registered policy loss may read (each loss documents the ones it uses)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    clip_cov_ratio: float = 0.0002  # clip_cov: share of response tokens detached
    clip_cov_lb: float = 1.0  # clip_cov: covariance range a detached token is drawn from
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002  # kl_cov: share of response tokens penalised
    ppo_kl_coef: float = 1.0  # kl_cov: weight of the |log-ratio| penalty


# (log_prob (N, L), old_log_prob (N, L), advantages (N, L), response_mask (N, L), loss_agg_mode, norm_len, knobs)
#   -> (loss scalar, detached scalar metrics)
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSS_REGISTRY: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str | PolicyLossMode) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: ``@register_policy_loss(PolicyLossMode.CLIP_COV)`` or ``@register_policy_loss("my_loss")``."""
    key = str(getattr(name, "value", name))

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if key in POLICY_LOSS_REGISTRY and POLICY_LOSS_REGISTRY[key] is not fn:
            raise ValueError(f"policy loss {key!r} is already registered")
        POLICY_LOSS_REGISTRY[key] = fn
        return fn

    return decorator


def get_policy_loss(name: str | PolicyLossMode) -> PolicyLossFn:
    key = str(getattr(name, "value", name))
    if key not in POLICY_LOSS_REGISTRY:
        raise _unknown("actor_rollout_ref.actor.policy_loss.loss_mode", name, list(POLICY_LOSS_REGISTRY))
    return POLICY_LOSS_REGISTRY[key]


@register_policy_loss(PolicyLossMode.VANILLA)
def compute_policy_loss_vanilla(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                loss_agg_mode: str, norm_len: int | None, knobs: PolicyLossKnobs):
    """The PPO clipped surrogate of :func:`compute_policy_loss` (clip_ratio_low/high, clip_ratio_c)."""
    return compute_policy_loss(log_prob, old_log_prob, advantages, response_mask, knobs.clip_ratio_low,
                               knobs.clip_ratio_high, knobs.clip_ratio_c, loss_agg_mode, norm_len)


def token_covariance(log_prob: Tensor, advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token centred product  cov_t = (A_t - mean A) * (logp_t - mean logp)  over response tokens (detached).

    Cui et al. 2025: entropy falls by about the covariance of log-prob and advantage, so the tokens with
    the largest cov_t are the ones driving the collapse. Means are masked means over the whole batch. (N, L)
    """
    lp, adv = log_prob.detach().float(), advantages.detach().float()
    return (adv - masked_mean(adv, response_mask)) * (lp - masked_mean(lp, response_mask))  # (N, L)


@register_policy_loss(PolicyLossMode.CLIP_COV)
def compute_policy_loss_clip_cov(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                                 loss_agg_mode: str, norm_len: int | None, knobs: PolicyLossKnobs):
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617; verl ``loss_mode: clip_cov``).

        ratio = exp(logp - logp_old);   pg = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
        S     = response tokens the PPO clip leaves alone with clip_cov_lb < cov_t < clip_cov_ub
        D     = max(1, floor(clip_cov_ratio * #response tokens)) tokens drawn from S at random (all of S if fewer)
        loss  = agg(pg * (1 - 1[t in D]), mask)        the drawn tokens get no gradient (no dual clip)

    Uses clip_ratio_low/high, clip_cov_ratio, clip_cov_lb, clip_cov_ub. Metrics: ``actor/pg_clipfrac`` = share of
    response tokens detached (verl's), ``actor/ppo_kl``; ``actor/cov_selected`` = |D|.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == log_prob.dim() - 1 else advantages
    adv = adv.expand_as(log_prob).to(log_prob.dtype)  # (N, L)
    log_ratio = log_prob - old_log_prob  # (N, L)
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    pg1 = -adv * ratio  # (N, L)
    pg2 = -adv * torch.clamp(ratio, 1.0 - knobs.clip_ratio_low, 1.0 + knobs.clip_ratio_high)
    valid = response_mask > 0
    cov = token_covariance(log_prob, adv, response_mask)  # (N, L)
    eligible = valid & ~(pg2 > pg1) & (cov > knobs.clip_cov_lb) & (cov < knobs.clip_cov_ub)
    idx = torch.nonzero(eligible)  # (K, 2)
    n_detach = max(1, int(knobs.clip_cov_ratio * int(valid.sum())))
    if len(idx) > n_detach:
        idx = idx[torch.randperm(len(idx), device=idx.device)[:n_detach]]
    keep = torch.ones_like(pg1)
    keep[idx[:, 0], idx[:, 1]] = 0.0
    loss = agg_loss(torch.maximum(pg1, pg2) * keep, response_mask, loss_agg_mode, norm_len)
    with torch.no_grad():
        metrics = {"actor/pg_loss": loss.detach(), "actor/pg_clipfrac": masked_mean(1.0 - keep, response_mask),
                   "actor/ppo_kl": masked_mean(-log_ratio.float(), response_mask),
                   "actor/cov_selected": torch.tensor(float(len(idx)))}
    return loss, metrics


@register_policy_loss(PolicyLossMode.KL_COV)
def compute_policy_loss_kl_cov(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                               loss_agg_mode: str, norm_len: int | None, knobs: PolicyLossKnobs):
    """KL-Cov (Cui et al. 2025, arXiv 2505.22617; verl ``loss_mode: kl_cov``).

        ratio = exp(logp - logp_old)
        T     = the k = max(1, floor(kl_cov_ratio * #response tokens)) response tokens with the largest cov_t
        pg_t  = -A_t * ratio_t + ppo_kl_coef * |logp_t - logp_old_t| * 1[t in T]      (no ratio clipping)
        loss  = agg(pg, mask)

    Uses kl_cov_ratio, ppo_kl_coef. Metrics: ``actor/ppo_kl`` = masked mean |log-ratio| (verl's),
    ``actor/pg_clipfrac`` = share of response tokens penalised.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == log_prob.dim() - 1 else advantages
    adv = adv.expand_as(log_prob).to(log_prob.dtype)  # (N, L)
    log_ratio = log_prob - old_log_prob  # (N, L)
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    valid = response_mask > 0
    cov = token_covariance(log_prob, adv, response_mask).masked_fill(~valid, -torch.inf)  # (N, L)
    n_valid = int(valid.sum())
    penalised = torch.zeros_like(ratio)
    if n_valid:
        k = max(1, int(knobs.kl_cov_ratio * n_valid))
        top = torch.topk(cov.flatten(), k).indices  # (k,)
        penalised.view(-1)[top] = 1.0
    pg = -adv * ratio + knobs.ppo_kl_coef * log_ratio.abs() * penalised  # (N, L)
    loss = agg_loss(pg, response_mask, loss_agg_mode, norm_len)
    with torch.no_grad():
        metrics = {"actor/pg_loss": loss.detach(), "actor/ppo_kl": masked_mean(log_ratio.abs().float(), response_mask),
                   "actor/pg_clipfrac": masked_mean(penalised, response_mask)}
    return loss, metrics


def high_entropy_mask(entropy: Tensor, response_mask: Tensor, top_quantile: float) -> Tensor:
    """TRL's ``top_entropy_quantile`` ρ (Wang et al. 2025, arXiv 2506.01939, "the 80/20 rule"):

        keep_t = 1[H_t >= q_{1-ρ}(H over response tokens)] * mask_t          ρ = 1: every response token

    q is torch.quantile's linear interpolation. Multiplying the advantages by keep drops the other tokens
    from the policy loss and leaves the aggregation's denominators as they were (TRL multiplies the
    per-token loss). (N, L) float.
    """
    valid = response_mask > 0
    if top_quantile >= 1.0 or not bool(valid.any()):
        return valid.to(entropy.dtype)
    threshold = torch.quantile(entropy.detach()[valid].float(), 1.0 - top_quantile)
    return ((entropy.detach() >= threshold) & valid).to(entropy.dtype)
