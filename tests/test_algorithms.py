"""keel.algorithms: every formula checked against numbers worked out by hand (in the comments)."""

import math

import pytest
import torch

from keel.algorithms import (
    ADV_ESTIMATOR_REGISTRY,
    AdvantageEstimator,
    KLType,
    LossAggMode,
    agg_loss,
    compute_grpo_outcome_advantage,
    compute_policy_loss,
    get_adv_estimator,
    get_kl_type,
    get_loss_agg_mode,
    kl_penalty,
    logprobs_and_entropy,
    masked_mean,
    register_adv_est,
)
from keel.errors import KeelError

torch.set_num_threads(1)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- advantages


def test_grpo_advantage_hand_computed_groups():
    # group 0: [1,0,0,1] mean .5, unbiased std sqrt(1/3)=.57735 -> +-.5/.57735 = +-.866025
    # group 1: [1,0,0,0] mean .25, var (.5625 + 3*.0625)/3 = .25, std .5 -> [1.5, -.5, -.5, -.5]
    # group 2: all equal -> exactly 0
    scores = t(1, 0, 0, 1, 1, 0, 0, 0, 0.7, 0.7, 0.7, 0.7)
    adv = compute_grpo_outcome_advantage(scores, group_size=4)
    a = 0.8660239  # .5 / (.5773503 + 1e-6)
    expected = t(a, -a, -a, a, 1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0)
    assert adv.shape == (12,)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(adv[8:], torch.zeros(4))  # exactly zero, not ~1e-7


def test_seven_equal_rewards_get_exactly_zero_advantage():
    # float32 mean of 7 x 0.7 is 0.69999993; verl's (0.7 - mean) / (std + 1e-6) gives +0.056 per row
    r = torch.full((7,), 0.7)
    naive = (r - r.mean()) / (r.std() + 1e-6)
    assert naive.abs().max().item() > 0.01  # the bug this guards against is real in float32
    for norm in (True, False):
        adv = compute_grpo_outcome_advantage(torch.full((14,), 0.7), group_size=7, norm_adv_by_std_in_grpo=norm)
        assert torch.equal(adv, torch.zeros(14))
    # a non-constant group of the same size is unchanged by the shift: [0.7 x 6, 1.7] mean 0.842857,
    # unbiased std sqrt(1/7)=.377964 -> 1.7: .857143/.377965 = 2.267787, 0.7: -.142857/.377965 = -.377964
    adv = compute_grpo_outcome_advantage(t(0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 1.7), group_size=7)
    torch.testing.assert_close(adv, t(*[-0.3779635] * 6, 2.2677868), atol=1e-5, rtol=0)


def test_dr_grpo_advantage_is_centred_only():
    scores = t(1, 0, 0, 1, 1, 0, 0, 0, 3, 3, 3, 3)
    adv = compute_grpo_outcome_advantage(scores, group_size=4, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(adv, t(0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0))


def test_grpo_advantage_group_of_two_and_no_grad():
    # [3,1]: mean 2, unbiased std sqrt(2) -> +-1/1.41421 = +-.707106
    scores = t(3, 1).requires_grad_()
    adv = compute_grpo_outcome_advantage(scores, group_size=2)
    torch.testing.assert_close(adv, t(0.7071063, -0.7071063), atol=1e-6, rtol=0)
    assert not adv.requires_grad


def test_grpo_advantage_rejects_ragged_groups():
    with pytest.raises(ValueError):
        compute_grpo_outcome_advantage(t(1, 0, 1), group_size=2)
    with pytest.raises(ValueError):
        compute_grpo_outcome_advantage(t(1, 0), group_size=1)


def test_adv_estimator_registry():
    assert get_adv_estimator("grpo") is compute_grpo_outcome_advantage
    assert get_adv_estimator(AdvantageEstimator.GRPO) is compute_grpo_outcome_advantage
    with pytest.raises(KeelError, match=r"unknown algorithm.adv_estimator 'gae' \(valid: grpo\)"):
        get_adv_estimator("gae")


def test_register_custom_adv_estimator():
    @register_adv_est("raw_score")
    def raw(scores, group_size, **_):
        return scores.float()

    try:
        assert get_adv_estimator("raw_score")(t(2, 1), 2).tolist() == [2.0, 1.0]
        with pytest.raises(KeelError, match="grpo, raw_score"):
            get_adv_estimator("nope")
        with pytest.raises(ValueError, match="already registered"):
            register_adv_est("grpo")(raw)
    finally:
        del ADV_ESTIMATOR_REGISTRY["raw_score"]


# --------------------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 7 / 3),  # (1+2+4) / 3 tokens
        ("seq-mean-token-sum", 3.5),  # (3 + 4) / 2
        ("seq-mean-token-mean", 2.75),  # (3/2 + 4/1) / 2
        ("seq-mean-token-sum-norm", 7 / 3),  # (3 + 4) / L=3: a sum over rows, as verl (not / S)
    ],
)
def test_agg_loss_modes(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected, abs=1e-6)
    assert agg_loss(LOSS, MASK, LossAggMode(mode)).item() == pytest.approx(expected, abs=1e-6)
    # a fully masked third row changes nothing (no contribution, does not dilute the mean)
    loss3 = torch.cat([LOSS, torch.tensor([[7.0, 8.0, 9.0]])])
    mask3 = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.long)])
    assert agg_loss(loss3, mask3, mode).item() == pytest.approx(expected, abs=1e-6)


def test_agg_loss_norm_len_and_bool_mask():
    # verl's loss_scale_factor F: (3 + 4) / 4
    assert agg_loss(LOSS, MASK.bool(), "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(7 / 4)
    # Keel's former per-sequence mean (3 + 4) / (S=2 * L=3) is F = S * L
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_len=2 * 3).item() == pytest.approx(7 / 6)


@pytest.mark.parametrize("mode", [m.value for m in LossAggMode])
def test_agg_loss_all_masked_is_zero_with_finite_grad(mode):
    loss_mat = LOSS.clone().requires_grad_()
    out = agg_loss(loss_mat, torch.zeros(2, 3), mode)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(loss_mat.grad, torch.zeros(2, 3))


def test_agg_loss_unknown_mode_lists_valid_names():
    msg = "seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm"
    with pytest.raises(KeelError, match=f"unknown actor_rollout_ref.actor.loss_agg_mode 'seq-mean'.*token-mean, {msg}"):
        agg_loss(LOSS, MASK, "seq-mean")
    assert get_loss_agg_mode("token-mean") is LossAggMode.TOKEN_MEAN


def test_masked_mean():
    assert masked_mean(t(1, 2, 3), t(1, 0, 1)).item() == 2.0
    assert masked_mean(t(1, 2, 3), t(0, 0, 0)).item() == 0.0


# --------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize(
    "adv, ratio, loss, grad, clipfrac, lower",
    [
        # unclipped: -A*r = -1.1, d/dlogp = -A*r = -1.1
        (1.0, 1.1, -1.1, -1.1, 0.0, 0.0),
        # clipped high: max(-1.5, -1.2) = -1.2, gradient stopped
        (1.0, 1.5, -1.2, 0.0, 1.0, 0.0),
        # clipped low (A<0): max(0.5, 0.8) = 0.8 ; dual bound 3 not reached
        (-1.0, 0.5, 0.8, 0.0, 1.0, 0.0),
        # dual clip: max(4, 1.2) = 4 > 3*|A| -> 3, gradient stopped
        (-1.0, 4.0, 3.0, 0.0, 0.0, 1.0),
        # A<0 inside the trust region: -A*r = 0.9, d/dlogp = 0.9
        (-1.0, 0.9, 0.9, 0.9, 0.0, 0.0),
    ],
)
def test_policy_loss_regimes(adv, ratio, loss, grad, clipfrac, lower):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out, m = compute_policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1))
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-6)
    assert m["actor/pg_clipfrac"].item() == clipfrac
    assert m["actor/pg_clipfrac_lower"].item() == lower
    assert m["actor/ppo_kl"].item() == pytest.approx(-math.log(ratio), abs=1e-6)


def test_policy_loss_batch_metrics_and_mask():
    # the first four regimes above as one row, plus a masked token that must not count anywhere
    ratios = [1.1, 1.5, 0.5, 4.0, 100.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])  # per-token advantages (N, L)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, m = compute_policy_loss(logp, torch.zeros(1, 5), adv, mask)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 0.8 + 3.0) / 4, abs=1e-6)  # 0.375
    assert m["actor/pg_loss"].item() == pytest.approx(0.375, abs=1e-6)
    assert m["actor/pg_clipfrac"].item() == 0.5  # tokens 2 and 3 of 4
    assert m["actor/pg_clipfrac_lower"].item() == 0.25  # token 4 of 4 response tokens
    assert m["actor/ppo_kl"].item() == pytest.approx(-math.log(1.1 * 1.5 * 0.5 * 4.0) / 4, abs=1e-6)  # -.298481
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1 / 4, 0.0, 0.0, 0.0, 0.0]]))


def test_policy_loss_clip_higher_and_seq_mode():
    # clip-higher 0.28: ratio 1.5 clipped at 1.28 -> -1.28 ; ratio 1.25 now unclipped -> -1.25
    logp = torch.tensor([[math.log(1.5), math.log(1.25)], [math.log(1.25), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = compute_policy_loss(
        logp, torch.zeros(2, 2), torch.ones(2), mask, clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-mean"
    )
    assert loss.item() == pytest.approx(((-1.28 - 1.25) / 2 + -1.25) / 2, abs=1e-6)  # -1.2575
    assert m["actor/pg_clipfrac"].item() == pytest.approx(1 / 3)


def test_policy_loss_extreme_log_ratio_stays_finite():
    # log-ratio 50 is clamped to 20 before exp; A>0 -> clipped at 1.2 anyway
    loss, m = compute_policy_loss(torch.tensor([[50.0]]), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.2)
    assert torch.isfinite(m["actor/ppo_kl"])
    # ppo_kl averages the clamped log-ratio, as verl: -(20 + 0.5) / 2 = -10.25, not -(50 + 0.5) / 2
    _, m = compute_policy_loss(t(50.0, 0.5)[None], torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    assert m["actor/ppo_kl"].item() == pytest.approx(-10.25)
    _, m = compute_policy_loss(t(-30.0)[None], torch.zeros(1, 1), -torch.ones(1), torch.ones(1, 1))
    assert m["actor/ppo_kl"].item() == pytest.approx(20.0)


# --------------------------------------------------------------------------- KL


@pytest.mark.parametrize(
    "name, expected",
    [
        # d = logp - ref = [0.5, -1]
        ("k1", [0.5, -1.0]),
        ("kl", [0.5, -1.0]),
        ("abs", [0.5, 1.0]),
        ("k2", [0.125, 0.5]),
        ("mse", [0.125, 0.5]),
        # e^{-d} - 1 + d: e^-.5 - .5 = .1065307 ; e^1 - 2 = .7182818
        ("k3", [0.1065307, 0.7182818]),
        ("low_var_kl", [0.1065307, 0.7182818]),
    ],
)
def test_kl_penalty_types_and_aliases(name, expected):
    logp = t(0.0, -1.5)
    ref = t(-0.5, -0.5)
    torch.testing.assert_close(kl_penalty(logp, ref, name), t(*expected), atol=1e-6, rtol=0)


def test_kl_k3_is_clamped_and_gradients_flow():
    # d = -15: e^15 - 16 -> 10 ; d = 12: e^-12 + 11 = 11.000006 -> 10 ; d = 0 -> 0
    logp = t(-15.0, 12.0, 0.3).requires_grad_()
    kl = kl_penalty(logp, torch.zeros(3), "low_var_kl")
    torch.testing.assert_close(kl[:2], t(10.0, 10.0))
    kl[2].backward()
    assert logp.grad[2].item() == pytest.approx(1 - math.exp(-0.3), abs=1e-6)  # d/dd (e^-d + d) = 1 - e^-d


def test_kl_type_lookup():
    assert get_kl_type("low_var_kl") is KLType.K3
    assert get_kl_type("mse") is KLType.K2
    assert get_kl_type(KLType.ABS) is KLType.ABS
    with pytest.raises(KeelError, match=r"'full' \(valid: k1, kl, k2, mse, k3, low_var_kl, abs\)"):
        kl_penalty(t(0.0), t(0.0), "full")


# --------------------------------------------------------------------------- log-probs / entropy


def test_uniform_distribution_entropy_is_log_v():
    logits = torch.zeros(2, 3, 8, dtype=torch.bfloat16)  # any dtype in, fp32 out
    labels = torch.randint(0, 8, (2, 3))
    logp, ent = logprobs_and_entropy(logits, labels)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (2, 3)
    torch.testing.assert_close(ent, torch.full((2, 3), 2.0794415))  # ln 8
    torch.testing.assert_close(logp, torch.full((2, 3), -2.0794415))


def test_one_hot_distribution_entropy_is_zero():
    logits = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    logp, ent = logprobs_and_entropy(logits, torch.tensor([0]))
    assert abs(ent.item()) < 1e-6
    assert abs(logp.item()) < 1e-6
    logp1, _ = logprobs_and_entropy(logits, torch.tensor([1]))
    assert logp1.item() == pytest.approx(-100.0, abs=1e-4)


def test_temperature_divides_logits():
    # [2, 0] / T=2 -> [1, 0]: p = [e/(1+e), 1/(1+e)] = [.731059, .268941]
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    logp, ent = logprobs_and_entropy(logits, torch.tensor([0, 1]), temperature=2.0)
    torch.testing.assert_close(logp, t(-0.3132617, -1.3132617))
    torch.testing.assert_close(ent, t(0.5822031, 0.5822031))  # -(p ln p + q ln q)
    # [1,2,3] at T=1 vs T=2 ([.5,1,1.5]): flatter distribution, higher entropy
    _, e1 = logprobs_and_entropy(t(1, 2, 3)[None], torch.tensor([2]), temperature=1.0)
    lp2, e2 = logprobs_and_entropy(t(1, 2, 3)[None], torch.tensor([2]), temperature=2.0)
    assert e1.item() == pytest.approx(0.8323956, abs=1e-6)
    assert e2.item() == pytest.approx(1.0201913, abs=1e-6)
    assert lp2.item() == pytest.approx(-0.6802697, abs=1e-6)


def test_gradient_of_log_prob_is_onehot_minus_softmax():
    # d logp(y=0)/d logits for [2, 0]: [1 - p0, -p1] with p0 = e^2/(1+e^2) = .880797 -> [.119203, -.119203]
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
    logp, _ = logprobs_and_entropy(logits, torch.tensor([0]), with_entropy=False)
    logp.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.1192029, -0.1192029]]))


def test_chunked_equals_unchunked_values_and_grads():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    results = []
    for chunk in (4096, 4, 1):
        x = logits.clone().requires_grad_()
        logp, ent = logprobs_and_entropy(x, labels, temperature=0.7, chunk_size=chunk)
        (logp.sum() + 0.5 * ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), x.grad))
    for logp, ent, grad in results[1:]:
        torch.testing.assert_close(logp, results[0][0])
        torch.testing.assert_close(ent, results[0][1])
        torch.testing.assert_close(grad, results[0][2])
    # and against torch's own log_softmax / Categorical entropy
    ref = torch.distributions.Categorical(logits=logits / 0.7)
    torch.testing.assert_close(results[0][0], ref.log_prob(labels))
    torch.testing.assert_close(results[0][1], ref.entropy())
    assert results[0][2].abs().sum() > 0
    # log-probs only, chunked and checkpointed: same values, entropy skipped
    x = logits.clone().requires_grad_()
    logp_only, none = logprobs_and_entropy(x, labels, 0.7, chunk_size=4, with_entropy=False)
    assert none is None
    torch.testing.assert_close(logp_only.detach(), results[0][0])


def test_entropy_gradient_flows():
    # H of [x, 0] is maximal at x = 0: dH/dx = 0 there, and negative for x > 0
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    _, ent = logprobs_and_entropy(x, torch.tensor([0, 0]))
    ent.sum().backward()
    assert x.grad[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    # dH/dx = -p q x for a 2-way softmax: p=.731059, q=.268941 -> -.196612
    assert x.grad[1, 0].item() == pytest.approx(-0.1966119, abs=1e-6)


def test_labels_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        logprobs_and_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))
