"""keel.actor: micro-batches and chunked log-probs give exactly one pass's update; the logged actor/entropy is
aggregated with loss_agg_mode (as verl logs it)."""
import pytest
import torch

from keel import actor, algorithms
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET
from keel.trainer import ppo_update

torch.set_num_threads(1)

G, B = 4, 4  # group size, prompts
MODES = [m.value for m in algorithms.LossAggMode]


def fixed_batch(seed: int = 0):
    """Prompts shared by each group, responses of uneven lengths (1..12), advantages of both signs."""
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(B):
        p = torch.randint(3, 40, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
        prompts += [p] * G
    responses = [torch.randint(3, 40, (int(torch.randint(1, 13, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(B * G)]
    return prompts, responses, torch.randn(B * G, generator=gen)


def one_step(mode: str, micro: int = 0, max_tokens: int = 0, checkpointing: bool = False):
    """Weights and metrics after one SGD update (lr 1, no clipping: the weights move by exactly the gradient)."""
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    ref, _ = build_embedded(TASK_ALPHABET, seed=1)
    lean, ref_lean = LeanForward(model), LeanForward(ref)
    actor.train_module(lean).checkpointing = checkpointing
    prompts, responses, adv = fixed_batch()
    packed = actor.pack(prompts, responses, 0)
    with torch.no_grad():  # an "old" policy a little off the current one: ratios != 1, some clipped
        old = actor.compute_logprobs(model, lean, packed, 1.0, 4096)[0] + 0.3 * torch.randn(
            packed.mask.shape, generator=torch.Generator().manual_seed(5)) * packed.mask
    ref_logp = actor.compute_logprobs(ref, ref_lean, packed, 1.0, 4096)[0]
    lc = actor.LossConfig(0.2, 0.28, 3.0, mode, 0.01, 0.1, "low_var_kl", True, 1.0, 4096, norm_len=12)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics, flags = ppo_update(model, lean, opt, packed, adv, old, ref_logp, lc, group_ids=list(range(B)), n_groups=B,
                                group_size=G, mini_batch_groups=B, ppo_epochs=1, seed=(3, 1), lr=1.0, grad_clip=0.0,
                                micro_batch_size=micro, max_token_len=max_tokens)
    assert flags == [True]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_give_one_pass_update(mode):
    whole, m_whole = one_step(mode)
    init, _ = build_embedded(TASK_ALPHABET, seed=0)
    assert max((whole[k] - init.state_dict()[k]).abs().max().item() for k in whole) > 1e-2  # the step moved
    for micro, max_tokens in ((1, 0), (2, 0), (0, 40)):  # 16, 8 and ~6-10 micro-batches
        w, m = one_step(mode, micro, max_tokens)
        for k in whole:
            torch.testing.assert_close(w[k], whole[k], rtol=0, atol=1e-5, msg=f"{k} micro={micro} tokens={max_tokens}")
        for k in m_whole:  # metrics are the mini-batch's, not a micro-batch's
            assert m[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-6), k


def test_token_budget_plan():
    prompts, responses, _ = fixed_batch()
    packed = actor.pack(prompts, responses, 0)
    tokens = actor.row_tokens(packed)
    assert tokens.tolist() == [len(p) + len(r) for p, r in zip(prompts, responses)]
    plan = actor.micro_batches(packed, max_tokens=40)
    assert torch.cat(plan).tolist() == list(range(B * G))  # every row once, in order
    assert all(int(tokens[rows].sum()) <= 40 for rows in plan)
    assert len(plan) >= int(tokens.sum()) // 40 + 1
    assert [len(x) for x in actor.micro_batches(packed, size=5)] == [5, 5, 5, 1]
    assert [len(x) for x in actor.micro_batches(packed)] == [16]


def test_mean_of_micro_batch_losses_is_not_the_update():
    """The shares matter: averaging 16 per-row token-means (what naive accumulation does) moves the weights
    differently from the one-pass token-mean (responses of 1..12 tokens weigh differently)."""
    whole, _ = one_step("token-mean")
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    ref, _ = build_embedded(TASK_ALPHABET, seed=1)
    lean = LeanForward(model)
    prompts, responses, adv = fixed_batch()
    packed = actor.pack(prompts, responses, 0)
    with torch.no_grad():
        old = actor.compute_logprobs(model, lean, packed, 1.0, 4096)[0] + 0.3 * torch.randn(
            packed.mask.shape, generator=torch.Generator().manual_seed(5)) * packed.mask
    ref_logp = actor.compute_logprobs(ref, LeanForward(ref), packed, 1.0, 4096)[0]
    lc = actor.LossConfig(0.2, 0.28, 3.0, "token-mean", 0.01, 0.1, "low_var_kl", True, 1.0, 4096, norm_len=12)
    for i in range(B * G):
        rows = torch.tensor([i])
        loss, _, _ = actor.grpo_loss(model, lean, packed.select(rows), adv[rows], old[rows], ref_logp[rows], lc)
        (loss / (B * G)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
    gap = max((model.state_dict()[k] - whole[k]).abs().max().item() for k in whole)
    assert gap > 1e-3


def test_gradient_checkpointing_same_update():
    whole, m = one_step("token-mean")
    ckpt, m_ckpt = one_step("token-mean", micro=4, checkpointing=True)
    for k in whole:
        torch.testing.assert_close(ckpt[k], whole[k], rtol=0, atol=1e-5)
    assert m_ckpt["actor/pg_loss"] == pytest.approx(m["actor/pg_loss"], rel=1e-5)


def saved_bytes_and_largest(fn):
    """Run fn() recording what autograd saves for backward: (total bytes, largest numel)."""
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(s for s, _ in sizes), max(n for _, n in sizes)


def test_checkpointing_saves_less_for_backward():
    prompts, responses, _ = fixed_batch()
    packed = actor.pack(prompts, responses, 0)
    flat = actor.flat_layout(packed)
    model, _ = build_embedded(TASK_ALPHABET, seed=0)
    module = actor.train_module(LeanForward(model))
    run = lambda: module(flat.input_ids, flat.positions, flat.slot_token, flat.token_slot, flat.predictor,  # noqa: E731
                         flat.labels, 1.0, 4096)[0].sum()
    plain, plain_bytes, _ = saved_bytes_and_largest(run)
    module.checkpointing = True
    ckpt, ckpt_bytes, _ = saved_bytes_and_largest(run)
    assert float(ckpt.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    assert ckpt_bytes < 0.25 * plain_bytes  # 4 layers: each keeps only its input


def test_chunked_head_equals_unchunked_and_holds_one_chunk():
    """The log-prob gather and its backward run chunk rows of (K, V) logits at a time."""
    from transformers import Qwen3ForCausalLM

    from keel.modeling import embedded_config

    V, K, C = 1000, 23, 16
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(embedded_config(V, 1, 0, hidden=C, layers=1, heads=2, mlp=32))
    module = actor.train_module(LeanForward(model))
    h0 = torch.randn(K, C)
    labels = torch.randint(0, V, (K,))
    results = {}
    for chunk in (5, 10**6):
        h = h0.clone().requires_grad_(True)
        model.zero_grad()
        (logp, ent), saved, largest = saved_bytes_and_largest(
            lambda: module.head_logprobs(h, labels, 0.7, chunk, "grad"))  # noqa: B023
        (logp.sum() + 0.5 * ent.sum()).backward()
        results[chunk] = (logp.detach(), ent.detach(), h.grad.clone(), model.lm_head.weight.grad.clone(), largest)
    small, whole = results[5], results[10**6]
    for a, b in zip(small[:4], whole[:4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole[4] >= K * V  # one pass saves the whole (K, V) logits
    assert small[4] <= max(5 * V, V * C)  # chunked: one (chunk, V) block at most (or the head weight)
    # the reference: log-softmax of the full logits
    ref = torch.log_softmax(model.lm_head(model.model.norm(h0)) / 0.7, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(small[0], ref.detach(), rtol=1e-5, atol=1e-5)

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
        logits = model(input_ids=packed.input_ids).logits  # (3, T, V), the Hugging Face forward
        logits = logits.gather(1, packed.hidden_index[..., None].expand(-1, -1, logits.shape[-1]))  # (3, 4, V)
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
