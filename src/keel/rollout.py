"""Rollouts: G sampled completions for each prompt, as fast as the CPU allows.

The ``hf`` backend is Keel's own sampler over :class:`keel.modeling.LeanForward`:

1. prefill each *distinct* prompt once (left-padded to a common length), then copy
   its KV cache G times — the group shares its prompt;
2. decode one token per step for all live rows with a preallocated cache;
3. when enough rows have emitted EOS, drop them from the batch (compaction), so the
   tail of a rollout decodes only the long answers instead of padding.

Sampling: p = softmax(z / temperature), optional nucleus (top-p) truncation, one
``torch.multinomial`` draw per row from the caller's generator, so a rollout is a
pure function of (weights, prompts, generator state). Temperature 0 means greedy
(argmax) decoding, what verl's validation does by default (``val_kwargs.do_sample=False``);
training rollouts need T > 0 (log-probs divide by it).

Models outside the Llama family fall back to ``model.generate`` (same sampling
parameters, no compaction). The ``vllm`` backend lives in :mod:`keel.rollout_vllm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.modeling import LeanForward

COMPACT_FRACTION = 0.25  # compact the batch once this share of live rows has finished


@dataclass
class Rollout:
    """B*G completions, group-major (rows g*G .. g*G+G-1 answer prompt g)."""

    prompt_ids: list[list[int]]  # (B*G,) prompt token ids (no padding)
    response_ids: list[list[int]]  # (B*G,) sampled ids, EOS included when the row stopped
    finished: list[bool]  # stopped with EOS (False = clipped at max_new_tokens)
    n_generated: int  # tokens sampled in total (throughput)

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


class NonFiniteLogits(RuntimeError):
    """The policy's logits hold NaN/inf: its weights are broken (a diverged update); nothing can be sampled."""


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits (A, V) -> token ids (A,); temperature 0 = greedy. NonFiniteLogits if any logit is NaN/inf."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("non-finite logits in sampling (NaN or inf)")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_p.cumsum(-1)
        sorted_p[(cumulative - sorted_p) >= top_p] = 0.0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
             top_p: float, eos_id: int, pad_id: int, generator: torch.Generator,
             lean: LeanForward | None = None) -> Rollout:
    """Sample `group_size` completions for each prompt (token-id lists)."""
    if lean is None:
        return _generate_hf(model, prompts, group_size, max_new_tokens, temperature, top_p, eos_id, pad_id, generator)
    with lean.decoding():  # weights are fixed for the whole rollout: fuse the projections once
        return _generate_lean(lean, prompts, group_size, max_new_tokens, temperature, top_p, eos_id, pad_id, generator)


def _generate_lean(lean: LeanForward, prompts, G, max_new_tokens, temperature, top_p, eos_id, pad_id,
                   generator) -> Rollout:
    param = next(lean.model.parameters())
    device = param.device
    # the KV cache holds what attention reads: autocast's dtype when it is on (half the memory traffic)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else param.dtype
    B = len(prompts)
    P = max(len(p) for p in prompts)
    # ---- prefill the B distinct prompts, left-padded to P
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    key_mask = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        key_mask[i, P - len(p):] = True
    positions = (key_mask.cumsum(1) - 1).clamp(min=0)  # (B, P): real tokens at 0..len-1
    prefill = lean.new_cache(B, P, dtype, device)
    logits = lean.step(ids, positions, prefill, 0, key_mask)  # (B, V)
    # ---- copy each prompt's state to its G group members (only the P prompt slots hold anything yet)
    logits = logits.repeat_interleave(G, 0)  # (N, V)
    cache = lean.new_cache(B * G, P + max_new_tokens, dtype, device, zeroed=False)  # every slot is written first
    for kv, kv_prompt in zip(cache, prefill):
        kv.unflatten(1, (B, G))[:, :, :, :, :P] = kv_prompt.unsqueeze(2)
    next_pos = positions[:, -1].repeat_interleave(G, 0) + 1  # (N,)
    # additive mask over cache slots, only needed when prompts differ in length (left padding)
    key_bias = None
    if not bool(key_mask.all()):
        key_bias = torch.zeros(B, 1, 1, P + max_new_tokens, dtype=dtype, device=device)
        key_bias[:, 0, 0, :P].masked_fill_(~key_mask, float("-inf"))
        key_bias = key_bias.repeat_interleave(G, 0)  # (N, 1, 1, P + max_new_tokens)
    N = B * G
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    rows = torch.arange(N, device=device)  # batch slot -> output row
    live = torch.ones(N, dtype=torch.bool, device=device)  # slots still decoding
    n_live, n_generated = N, 0
    # ---- decode: one token per live row per step
    for t in range(max_new_tokens):
        tok = _sample(logits, temperature, top_p, generator)  # (A,)
        if n_live == len(rows):  # nobody in the batch has finished: plain writes
            out[rows, t] = tok
            lengths[rows] += 1
            stopped = tok == eos_id
        else:
            out[rows[live], t] = tok[live]
            lengths[rows[live]] += 1
            stopped = live & (tok == eos_id)
        n_generated += n_live
        finished[rows[stopped]] = True
        live = live & ~stopped
        n_live = int(live.sum())
        if n_live == 0 or t == max_new_tokens - 1:
            break
        if len(rows) - n_live >= max(1, int(COMPACT_FRACTION * len(rows))):  # drop finished rows
            keep = live.nonzero().squeeze(-1)
            cache = [kv.index_select(1, keep) for kv in cache]
            next_pos, tok, rows = next_pos[keep], tok[keep], rows[keep]
            key_bias = None if key_bias is None else key_bias[keep]
            live = torch.ones(len(rows), dtype=torch.bool, device=device)
        slot = P + t
        logits = lean.decode_step(tok, next_pos, cache, slot,
                                  None if key_bias is None else key_bias[..., : slot + 1])
        next_pos = next_pos + 1
    out_list = out.tolist()
    response_ids = [row[:n] for row, n in zip(out_list, lengths.tolist())]
    prompt_rows = [list(p) for p in prompts for _ in range(G)]
    return Rollout(prompt_rows, response_ids, finished.tolist(), n_generated)


def _generate_hf(model, prompts, G, max_new_tokens, temperature, top_p, eos_id, pad_id, generator) -> Rollout:
    """Fallback for architectures LeanForward does not cover: transformers' generate()."""
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=G)
    else:  # greedy: transformers returns one sequence per input row, so the rows are repeated instead
        sampling = dict(do_sample=False)
        ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            seqs = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                eos_token_id=eos_id, pad_token_id=pad_id, **sampling,
            )
        except RuntimeError as e:  # torch.multinomial: "probability tensor contains either `inf`, `nan` ..."
            if "inf" in str(e) and "nan" in str(e):
                raise NonFiniteLogits(f"non-finite logits in sampling ({str(e).splitlines()[0][:120]})") from None
            raise
    new = seqs[:, P:].tolist()
    response_ids, finished = [], []
    for row in new:
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        while cut > 0 and row[cut - 1] == pad_id and pad_id != eos_id:
            cut -= 1
        response_ids.append(row[:cut])
        finished.append(eos_id in row[:cut])
    prompt_rows = [list(p) for p in prompts for _ in range(G)]
    return Rollout(prompt_rows, response_ids, finished, sum(len(r) for r in response_ids))
