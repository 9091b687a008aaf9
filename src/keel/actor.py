"""The actor: per-token log-probs of sampled responses and the GRPO update of one mini-batch.

Shapes: N rows (completions) in a mini-batch, T packed sequence length, R longest
response, C hidden size, V vocabulary.

Sequences are packed right-padded, ``[prompt | response | pad]`` starting at position 0,
so a plain causal forward is exact for every real token. Only the hidden states that
predict response tokens go through the LM head, so prompt positions cost no
(T x V) logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel import algorithms
from keel.modeling import LeanForward


@dataclass
class Packed:
    input_ids: torch.Tensor  # (N, T) right-padded prompt+response
    hidden_index: torch.Tensor  # (N, R) position whose output predicts response token j
    labels: torch.Tensor  # (N, R) response token ids (pad where masked)
    mask: torch.Tensor  # (N, R) float, 1 on real response tokens

    def select(self, rows: torch.Tensor) -> "Packed":
        return Packed(self.input_ids[rows], self.hidden_index[rows], self.labels[rows], self.mask[rows])


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device="cpu") -> Packed:
    N = len(prompt_ids)
    T = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    R = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    hidden_index = torch.zeros(N, R, dtype=torch.long)
    labels = torch.full((N, R), pad_id, dtype=torch.long)
    mask = torch.zeros(N, R)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        if r:
            labels[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1.0
        # token p+j is predicted by the output at position p+j-1
        hidden_index[i] = (len(p) - 1 + torch.arange(R)).clamp(max=T - 1)
    return Packed(input_ids.to(device), hidden_index.to(device), labels.to(device), mask.to(device))


def trim(packed: Packed) -> Packed:
    """Drop columns that are padding in every row of this mini-batch (less work per update)."""
    R = int(packed.mask.sum(1).max().item()) or 1
    T = min(packed.input_ids.shape[1], int(packed.hidden_index[:, :R].max().item()) + 2)
    return Packed(packed.input_ids[:, :T], packed.hidden_index[:, :R], packed.labels[:, :R], packed.mask[:, :R])


def response_logits(model, lean: LeanForward | None, packed: Packed) -> torch.Tensor:
    """(N, R, V) logits at the positions that predict response tokens."""
    if lean is not None:
        hidden = lean.base.norm(lean.hidden(packed.input_ids))
    else:
        hidden = model.model(input_ids=packed.input_ids).last_hidden_state  # HF applies the final norm
    idx = packed.hidden_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (N, R, C)
    picked = torch.gather(hidden, 1, idx)
    return model.get_output_embeddings()(picked)


def compute_logprobs(model, lean, packed: Packed, temperature: float, chunk: int,
                     with_entropy: bool = False, micro_batch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs (and entropies) of the packed responses: (N, R) each."""
    N = packed.input_ids.shape[0]
    step = micro_batch or N
    logps, ents = [], []
    with torch.no_grad():
        for s in range(0, N, step):
            part = trim(packed.select(torch.arange(s, min(N, s + step))))
            logits = response_logits(model, lean, part)
            lp, ent = algorithms.logprobs_and_entropy(logits, part.labels, temperature, chunk, with_entropy)
            R = packed.mask.shape[1]
            logps.append(torch.nn.functional.pad(lp * part.mask, (0, R - lp.shape[1])))
            if with_entropy:
                ents.append(torch.nn.functional.pad(ent * part.mask, (0, R - ent.shape[1])))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


@dataclass
class LossConfig:
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    loss_agg_mode: str
    entropy_coeff: float
    kl_loss_coef: float
    kl_loss_type: str
    use_kl: bool
    temperature: float
    entropy_chunk_size: int
    norm_len: int | None = None


def grpo_loss(model, lean, packed: Packed, advantages: torch.Tensor, old_logp: torch.Tensor | None,
              ref_logp: torch.Tensor | None, lc: LossConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """loss = pg_loss - entropy_coeff * agg(H) + kl_loss_coef * agg(KL)   (one mini-batch).

    advantages: (N,) per completion, broadcast over its tokens. old_logp None means the
    data was sampled by exactly these weights (one epoch, one mini-batch): old = current.
    Returns (loss, metrics, detached log-probs).
    """
    R = packed.mask.shape[1]
    part = trim(packed)
    r = part.mask.shape[1]
    logits = response_logits(model, lean, part)  # (N, r, V)
    want_entropy_grad = lc.entropy_coeff > 0
    logp, ent = algorithms.logprobs_and_entropy(logits, part.labels, lc.temperature, lc.entropy_chunk_size,
                                                with_entropy=want_entropy_grad)
    if not want_entropy_grad:  # entropy is still logged every step, without a graph
        _, ent = algorithms.logprobs_and_entropy(logits.detach(), part.labels, lc.temperature, lc.entropy_chunk_size, True)
    mask = part.mask
    old = logp.detach() if old_logp is None else old_logp[:, :r]
    adv = advantages[:, None].expand(-1, r)  # (N, r)
    pg_loss, pg_metrics = algorithms.compute_policy_loss(
        logp, old, adv, mask, lc.clip_ratio_low, lc.clip_ratio_high, lc.clip_ratio_c, lc.loss_agg_mode, lc.norm_len
    )
    entropy = algorithms.agg_loss(ent, mask, lc.loss_agg_mode, lc.norm_len)
    loss = pg_loss - lc.entropy_coeff * entropy
    metrics = {k: float(v) for k, v in pg_metrics.items()}
    metrics["actor/pg_loss"] = float(pg_loss.detach())
    metrics["actor/entropy"] = float(algorithms.masked_mean(ent.detach(), mask))
    if ref_logp is not None and lc.use_kl:
        kl = algorithms.kl_penalty(logp, ref_logp[:, :r], lc.kl_loss_type)  # (N, r)
        kl_loss = algorithms.agg_loss(kl, mask, lc.loss_agg_mode, lc.norm_len)
        loss = loss + lc.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
    return loss, metrics, torch.nn.functional.pad(logp.detach() * mask, (0, R - r))
