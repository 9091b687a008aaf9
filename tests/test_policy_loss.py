"""The policy-loss registry (vanilla | clip_cov | kl_cov) and TRL's top_entropy_quantile, on hand-computed tensors.

One response of four tokens is used throughout:
    logp      = [-0.1, -0.5, -1.0, -2.0]        mean -0.9
    log-ratio = [ 0.1,  0.0,  0.2, -0.3]        ratio = e^lr = [1.105171, 1, 1.221403, 0.740818]
    A         = [ 1,    1,   -1,   -1  ]        mean 0
    cov_t = (A - 0)(logp + 0.9) = [0.8, 0.4, 0.1, 1.1]
"""
import math

import pytest
import torch

from keel import algorithms
from keel.algorithms import PolicyLossKnobs, get_policy_loss, high_entropy_mask, token_covariance
from keel.config import load_config
from keel.errors import KeelError

LOGP = [-0.1, -0.5, -1.0, -2.0]
LOG_RATIO = [0.1, 0.0, 0.2, -0.3]
ADV = [1.0, 1.0, -1.0, -1.0]
RATIO = [math.exp(x) for x in LOG_RATIO]


def inputs():
    logp = torch.tensor([LOGP], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([LOGP], dtype=torch.float64) - torch.tensor([LOG_RATIO], dtype=torch.float64)
    return logp, old, torch.tensor([ADV], dtype=torch.float64), torch.ones(1, 4)


def test_registry_names_and_unknown_mode():
    assert list(algorithms.POLICY_LOSS_REGISTRY) == ["vanilla", "clip_cov", "kl_cov"]
    with pytest.raises(KeelError, match=r"unknown actor_rollout_ref.actor.policy_loss.loss_mode 'gspo' "
                                        r"\(valid: vanilla, clip_cov, kl_cov\)"):
        get_policy_loss("gspo")
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register_policy_loss("vanilla")(lambda *a: None)


def test_covariance_is_the_centred_product():
    logp, _, adv, mask = inputs()
    assert token_covariance(logp, adv, mask)[0].tolist() == pytest.approx([0.8, 0.4, 0.1, 1.1])


def test_vanilla_is_the_clipped_surrogate():
    logp, old, adv, mask = inputs()
    loss, m = get_policy_loss("vanilla")(logp, old, adv, mask, "token-mean", None, PolicyLossKnobs())
    # token 2: A < 0 and ratio 1.2214 > 1.2 -> the unclipped 1.221403 is the larger; token 3: ratio 0.7408 < 0.8 -> 0.8
    expected = (-RATIO[0] - 1.0 + RATIO[2] + 0.8) / 4
    assert float(loss) == pytest.approx(expected) and float(m["actor/pg_clipfrac"]) == 0.25  # token 3 only


def test_kl_cov_penalises_the_top_covariance_token():
    logp, old, adv, mask = inputs()
    knobs = PolicyLossKnobs(kl_cov_ratio=0.25, ppo_kl_coef=1.0)  # k = max(1, floor(0.25 * 4)) = 1: token 3 (cov 1.1)
    loss, m = get_policy_loss("kl_cov")(logp, old, adv, mask, "token-mean", None, knobs)
    # pg = -A * ratio, plus |log-ratio| = 0.3 on token 3; no clipping: (-1.105171 - 1 + 1.221403 + 0.740818 + 0.3) / 4
    assert float(loss) == pytest.approx((-RATIO[0] - 1.0 + RATIO[2] + RATIO[3] + 0.3) / 4)
    assert float(loss) == pytest.approx(0.0392625, abs=1e-6)
    assert float(m["actor/ppo_kl"]) == pytest.approx(0.15) and float(m["actor/pg_clipfrac"]) == 0.25
    loss.backward()
    # d/dlogp_3 = (-A_3 ratio_3 + coef * sign(lr_3)) / 4 = (0.740818 - 1) / 4; token 2 without the penalty
    assert logp.grad[0, 3].item() == pytest.approx((RATIO[3] - 1.0) / 4)
    assert logp.grad[0, 2].item() == pytest.approx(RATIO[2] / 4)


def test_clip_cov_detaches_tokens_inside_the_covariance_range():
    logp, old, adv, mask = inputs()
    # lb 0.3 < cov < ub 1.0: tokens 0 (0.8) and 1 (0.4); token 3 (1.1) is outside and PPO-clipped anyway.
    # clip_cov_ratio 0.5 -> max(1, floor(0.5 * 4)) = 2 tokens: both eligible ones are detached
    knobs = PolicyLossKnobs(clip_cov_ratio=0.5, clip_cov_lb=0.3, clip_cov_ub=1.0)
    loss, m = get_policy_loss("clip_cov")(logp, old, adv, mask, "token-mean", None, knobs)
    assert float(loss) == pytest.approx((RATIO[2] + 0.8) / 4)  # = 0.505351
    assert float(m["actor/pg_clipfrac"]) == 0.5 and float(m["actor/cov_selected"]) == 2
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, RATIO[2] / 4, 0.0])  # token 3: clipped, no gradient
    # with a budget of one token, one of the two is drawn at random
    logp, old, adv, mask = inputs()
    torch.manual_seed(0)
    loss, m = get_policy_loss("clip_cov")(logp, old, adv, mask, "token-mean", None,
                                          PolicyLossKnobs(clip_cov_ratio=0.25, clip_cov_lb=0.3, clip_cov_ub=1.0))
    assert float(m["actor/cov_selected"]) == 1
    assert float(loss) in (pytest.approx((-1.0 + RATIO[2] + 0.8) / 4), pytest.approx((-RATIO[0] + RATIO[2] + 0.8) / 4))


def test_high_entropy_mask_keeps_the_top_quantile():
    ent = torch.tensor([[0.1, 0.5, 0.3, 0.9, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # rho 0.5: q_0.5 of [0.1, 0.3, 0.5, 0.9] = 0.3 + 0.5 * (0.5 - 0.3) = 0.4; the padded 5.0 never counts
    assert high_entropy_mask(ent, mask, 0.5).tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    assert high_entropy_mask(ent, mask, 0.2).tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0]]  # q_0.8 = 0.5 + 0.4 * 0.4 = 0.66


def test_entropy_masked_advantages_drop_tokens_but_keep_the_denominator():
    logp, old, adv, mask = inputs()
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss, _ = get_policy_loss("vanilla")(logp, old, adv * keep, mask, "token-mean", None, PolicyLossKnobs())
    assert float(loss) == pytest.approx((-RATIO[0] + RATIO[2]) / 4)  # TRL: per-token loss * mask, / all 4 tokens


def test_policy_loss_config_keys():
    cfg = load_config(None, ["actor_rollout_ref.actor.policy_loss.loss_mode=kl_cov",
                             "actor_rollout_ref.actor.policy_loss.kl_cov_ratio=0.002"])
    assert (cfg.actor_rollout_ref.actor.policy_loss.loss_mode, cfg.actor_rollout_ref.actor.policy_loss.kl_cov_ratio) == (
        "kl_cov", 0.002)
    with pytest.raises(KeelError, match="top_entropy_quantile' must be in \\(0, 1\\], got 0.0"):
        load_config(None, ["actor_rollout_ref.actor.policy_loss.top_entropy_quantile=0.0"])
    with pytest.raises(KeelError, match="clip_cov_lb' must be < clip_cov_ub"):
        load_config(None, ["actor_rollout_ref.actor.policy_loss.clip_cov_lb=6.0"])
