"""The packed training forward (actor.flat_layout + the lean training module) against the Hugging Face forward.

Every training log-prob comes from the packed path: a GRPO group's shared prompt is stored once, each response's
last token is left out of the forward, attention gathers rows out of a flat (M, C) token array. The reference here
runs each (prompt + response) row alone through the unmodified Hugging Face model, with no padding and no sharing.
Log-probs, entropies and the gradient of a weighted log-prob sum must agree to 1e-5 in fp32.
"""

import pytest
import torch

from keel import actor
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET

torch.set_num_threads(1)

TEMPERATURE = 0.7


def embedded():
    return build_embedded(TASK_ALPHABET, seed=3)[0]


def gqa_untied(model_type: str):
    """A random model with grouped-query attention (4 query heads share 2 key/value heads), untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if model_type == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=False,
                        rope_theta=10000.0, pad_token_id=0, bos_token_id=None, eos_token_id=1, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = model_cls(config)
    return model


MODELS = {"embedded": embedded, "qwen3-gqa-untied": lambda: gqa_untied("qwen3"),
          "llama-gqa-untied": lambda: gqa_untied("llama")}


def ragged_groups(seed: int, vocab: int, B: int = 4, G: int = 3):
    """B prompts (3..9 tokens; the second is a prefix of the first, so it must not be merged with it), each shared by
    G rows; responses of 1..11 tokens (a 1-token response feeds nothing forward)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(2, vocab, (n,), generator=gen).tolist()  # noqa: E731
    base = rand(9)
    prompt_list = [base, base[:5]] + [rand(int(torch.randint(3, 10, (1,), generator=gen))) for _ in range(B - 2)]
    prompts = [p for p in prompt_list for _ in range(G)]
    responses = [rand(int(torch.randint(1, 12, (1,), generator=gen))) for _ in prompts]
    responses[0], responses[G] = rand(1), rand(11)  # both extremes present
    return prompts, responses


def hf_reference(model, prompts, responses):
    """Per row, alone: (log-probs (n,), entropies (n,)) of its response tokens at TEMPERATURE."""
    out = []
    for p, r in zip(prompts, responses):
        logits = model(input_ids=torch.tensor([p + r])).logits[0] / TEMPERATURE  # (len(p)+len(r), V)
        logits = logits[len(p) - 1 : len(p) + len(r) - 1]  # position t predicts token t+1
        logp = torch.log_softmax(logits.float(), -1)
        out.append((logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)))
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_logprobs_and_entropies_equal_hf(name, seed):
    model = MODELS[name]().eval()
    lean = LeanForward(model)
    prompts, responses = ragged_groups(seed, model.config.vocab_size)
    packed = actor.pack(prompts, responses, pad_id=0)
    flat = actor.flat_layout(packed)
    distinct_prompt_tokens = sum(len(p) for p in {tuple(p) for p in prompts})
    # the layout stores each distinct prompt once and every response token but the last
    assert flat.input_ids.numel() == distinct_prompt_tokens + sum(len(r) - 1 for r in responses)
    with torch.no_grad():
        ref = hf_reference(model, prompts, responses)
        for chunk in (4096, 5):  # the head in one block, and 5 rows of logits at a time
            lp, ent = actor.compute_logprobs(model, lean, packed, TEMPERATURE, chunk, with_entropy=True)  # (N, R)
            for i, (ref_lp, ref_ent) in enumerate(ref):
                n = len(responses[i])
                torch.testing.assert_close(lp[i, :n], ref_lp, rtol=0, atol=1e-5, msg=f"row {i} log-probs")
                torch.testing.assert_close(ent[i, :n], ref_ent, rtol=0, atol=1e-5, msg=f"row {i} entropies")
                assert (lp[i, n:] == 0).all() and (ent[i, n:] == 0).all()  # masked slots are 0
        # the padded Hugging Face path Keel uses for models without a lean forward agrees as well
        lp_hf, _ = actor.compute_logprobs(model, None, packed, TEMPERATURE, 4096)
        torch.testing.assert_close(lp_hf, lp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["embedded", "qwen3-gqa-untied"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradient_equals_hf(name, checkpointing):
    """d/dθ of sum_k w_k logp_k through the training module equals the same sum through per-row HF forwards."""
    prompts, responses = ragged_groups(2, 40)
    weights = torch.randn(sum(map(len, responses)), generator=torch.Generator().manual_seed(7))  # (K,)

    model = MODELS[name]()
    module = actor.train_module(LeanForward(model))
    module.checkpointing = checkpointing
    flat = actor.flat_layout(actor.pack(prompts, responses, pad_id=0))
    lp, _ = module(flat.input_ids, flat.positions, flat.slot_token, flat.token_slot, flat.predictor, flat.labels,
                   TEMPERATURE, 5)  # (K,) row-major
    (lp * weights).sum().backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    reference = MODELS[name]()
    ref_lp = torch.cat([lp_i for lp_i, _ in hf_reference(reference, prompts, responses)])  # (K,)
    torch.testing.assert_close(lp.detach(), ref_lp.detach(), rtol=0, atol=1e-5)
    (ref_lp * weights).sum().backward()
    for k, p in reference.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)
