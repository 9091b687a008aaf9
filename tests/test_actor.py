"""keel.actor: the logged actor/entropy is the entropy aggregated with loss_agg_mode (as verl logs it)."""
import pytest
import torch

from keel import actor, algorithms
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET

torch.set_num_threads(1)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_logged_entropy_uses_loss_agg_mode(mode):
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    lean = LeanForward(model)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[14, 15, 16, 17], [18], [19, 20]]  # lengths 4, 1, 2
    packed = actor.pack(prompts, responses, 0)
    lc = actor.LossConfig(0.2, 0.2, 3.0, mode, 0.0, 0.0, "low_var_kl", False, 1.0, 4096, norm_len=10)
    _, metrics, _ = actor.grpo_loss(model, lean, packed, torch.zeros(3), None, None, lc)
    with torch.no_grad():
        logits = actor.response_logits(model, lean, packed)  # (3, 4, V)
    _, ent = algorithms.logprobs_and_entropy(logits, packed.labels)  # (3, 4)
    mask = packed.mask
    per_row_sum = (ent * mask).sum(1)  # (3,)
    expected = {
        "token-mean": per_row_sum.sum() / 7,  # 7 response tokens
        "seq-mean-token-mean": (per_row_sum / torch.tensor([4.0, 1.0, 2.0])).mean(),
        "seq-mean-token-sum-norm": per_row_sum.sum() / 10,  # verl: sum / loss_scale_factor
    }[mode]
    assert metrics["actor/entropy"] == pytest.approx(float(expected), rel=1e-5)
    if mode == "seq-mean-token-sum-norm":  # 7 tokens / F=10: 0.7 x the token mean
        assert metrics["actor/entropy"] == pytest.approx(0.7 * float(per_row_sum.sum() / 7), rel=1e-5)
