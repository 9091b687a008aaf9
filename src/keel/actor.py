"""The actor: per-token log-probs of sampled responses and the GRPO update of one mini-batch.

Shapes: N rows (completions) in a mini-batch, T packed sequence length, R longest
response, K real response tokens, M distinct tokens, C hidden size, V vocabulary.

Sequences are packed right-padded, ``[prompt | response | pad]`` starting at position 0,
so a plain causal forward is exact for every real token. With the lean forward the
padding never reaches a matmul: :func:`flat_layout` lists each distinct token once (the
prompt a group of G rows shares counts once, not G times), the projections and the MLP
run over those M tokens, and only attention sees the (N, T) rows. Only the K hidden
states that predict response tokens go through the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from keel import algorithms
from keel.modeling import LeanForward


@dataclass
class Packed:
    input_ids: torch.Tensor  # (N, T) right-padded prompt+response
    hidden_index: torch.Tensor  # (N, R) position whose output predicts response token j
    labels: torch.Tensor  # (N, R) response token ids (pad where masked)
    mask: torch.Tensor  # (N, R) float, 1 on real response tokens
    _flat: "FlatLayout | None" = field(default=None, repr=False, compare=False)  # built on first use

    def select(self, rows: torch.Tensor) -> "Packed":
        return Packed(self.input_ids[rows], self.hidden_index[rows], self.labels[rows], self.mask[rows])


@dataclass
class FlatLayout:
    """A batch as its distinct tokens (see :meth:`keel.modeling.LeanForward.hidden_packed`)."""

    input_ids: torch.Tensor  # (M,) shared prompts once, then every response token
    positions: torch.Tensor  # (M,) rotary position of each token
    slot_token: torch.Tensor  # (N, T) token at each row slot (pad slots: token 0, never seen by a real slot)
    token_slot: torch.Tensor  # (M,) the row slot whose attention output each token takes
    predictor: torch.Tensor  # (K,) token whose output predicts each real response token (row-major)
    labels: torch.Tensor  # (K,) the response tokens
    response_mask: torch.Tensor  # (N, R) bool, where the K tokens go back into (N, R)


def flat_layout(packed: Packed) -> FlatLayout:
    """Distinct-token layout of a packed batch; identical prompts (a GRPO group) are stored once.

    A response's last token is an input to nothing (no later token is predicted from it, no later
    query attends to it), so it is left out of the forward: only its label is kept.
    """
    if packed._flat is not None:
        return packed._flat
    device = packed.input_ids.device
    plen = packed.hidden_index[:, 0] + 1  # (N,) prompt lengths
    rlen = (packed.mask.sum(1).long() - 1).clamp(min=0)  # (N,) response tokens that are inputs
    ids = packed.input_ids[:, : int((plen + rlen).max())]  # no slot of the last column is an input
    N, T = ids.shape
    # the first row carrying each distinct prompt owns its tokens
    first: dict[tuple, int] = {}
    owner = [first.setdefault(tuple(row[:p]), i) for i, (row, p) in enumerate(zip(ids.tolist(), plen.tolist()))]
    owner = torch.tensor(owner, device=device)  # (N,)
    is_owner = owner == torch.arange(N, device=device)
    t = torch.arange(T, device=device)[None]  # (1, T)
    prompt_slots = (t < plen[:, None]) & is_owner[:, None]  # (N, T)
    response_slots = (t >= plen[:, None]) & (t < (plen + rlen)[:, None])  # (N, T)
    n_prompt = int(prompt_slots.sum())
    prompt_start = (plen * is_owner).cumsum(0) - plen * is_owner  # (N,) offset of an owner's prompt
    response_start = n_prompt + rlen.cumsum(0) - rlen  # (N,) offset of a row's response
    slot_token = torch.where(t < plen[:, None], prompt_start[owner][:, None] + t,
                             (response_start - plen)[:, None] + t)
    slot_token = torch.where(t < (plen + rlen)[:, None], slot_token, 0)  # (N, T)
    slot_id = torch.arange(N * T, device=device).view(N, T)
    tokens_at = torch.cat([prompt_slots.reshape(-1).nonzero(), response_slots.reshape(-1).nonzero()]).squeeze(-1)
    R = packed.mask.shape[1]
    j = torch.arange(R, device=device)[None]  # (1, R)
    response_mask = packed.mask.bool()
    predictor = torch.where(j == 0, (prompt_start[owner] + plen - 1)[:, None], response_start[:, None] + j - 1)
    packed._flat = FlatLayout(ids.reshape(-1)[tokens_at], t.expand(N, T).reshape(-1)[tokens_at], slot_token,
                              slot_id.reshape(-1)[tokens_at], predictor[response_mask],
                              packed.labels[response_mask], response_mask)
    return packed._flat


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
    """(N, R, V) logits at the positions that predict response tokens (zeros where masked)."""
    if lean is not None:
        logits, flat = _flat_logits(lean, packed)
        full = logits.new_zeros(*flat.response_mask.shape, logits.shape[-1])
        return full.masked_scatter(flat.response_mask[..., None], logits)
    return _padded_logits(model, packed)


def _padded_logits(model, packed: Packed) -> torch.Tensor:
    hidden = model.model(input_ids=packed.input_ids).last_hidden_state  # HF applies the final norm
    idx = packed.hidden_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (N, R, C)
    picked = torch.gather(hidden, 1, idx)
    return model.get_output_embeddings()(picked)


def _flat_logits(lean: LeanForward, packed: Packed) -> tuple[torch.Tensor, FlatLayout]:
    """(K, V) logits of the real response tokens only, and the layout that places them."""
    flat = flat_layout(packed)
    hidden = lean.hidden_packed(flat.input_ids, flat.positions, flat.slot_token, flat.token_slot)  # (M, C)
    return lean._logits(hidden.index_select(0, flat.predictor)), flat


def _response_logprobs(model, lean, packed: Packed, temperature: float, chunk: int, with_entropy: bool,
                       entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, R) log-probs and entropies (None unless with_entropy), 0 where masked.

    entropy_grad=False computes the entropy outside the graph (logged, not trained).
    """
    N, R = packed.mask.shape
    if lean is None:
        part = trim(packed)
        logits, labels = _padded_logits(model, part), part.labels  # (N, r, V), (N, r)
        place = lambda x: F.pad(x * part.mask, (0, R - x.shape[1]))  # noqa: E731
    else:
        logits, flat = _flat_logits(lean, packed)  # (K, V)
        labels = flat.labels
        place = lambda x: x.new_zeros(N, R).masked_scatter(flat.response_mask, x)  # noqa: E731
    lp, ent = algorithms.logprobs_and_entropy(logits, labels, temperature, chunk, with_entropy and entropy_grad)
    if with_entropy and not entropy_grad:
        with torch.no_grad():
            _, ent = algorithms.logprobs_and_entropy(logits.detach(), labels, temperature, chunk, True)
    return place(lp), (place(ent) if with_entropy else None)


def compute_logprobs(model, lean, packed: Packed, temperature: float, chunk: int,
                     with_entropy: bool = False, micro_batch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs (and entropies) of the packed responses: (N, R) each."""
    N = packed.input_ids.shape[0]
    step = micro_batch or N
    logps, ents = [], []
    with torch.no_grad():
        for s in range(0, N, step):
            part = packed if step >= N else packed.select(torch.arange(s, min(N, s + step)))
            lp, ent = _response_logprobs(model, lean, part, temperature, chunk, with_entropy)
            logps.append(lp)
            if with_entropy:
                ents.append(ent)
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
    policy_loss: Any = None  # config.PolicyLossConfig (None: vanilla)


def grpo_loss(model, lean, packed: Packed, advantages: torch.Tensor, old_logp: torch.Tensor | None,
              ref_logp: torch.Tensor | None, lc: LossConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """loss = pg_loss - entropy_coeff * agg(H) + kl_loss_coef * agg(KL)   (one mini-batch).

    advantages: (N,) per completion, broadcast over its tokens. old_logp None means the
    data was sampled by exactly these weights (one epoch, one mini-batch): old = current.
    Returns (loss, metrics, detached log-probs).
    """
    R = packed.mask.shape[1]
    r = max(1, int(packed.mask.sum(1).max()))  # longest response of this mini-batch
    # the entropy is logged every step; it joins the graph only when it is in the loss
    logp, ent = _response_logprobs(model, lean, packed, lc.temperature, lc.entropy_chunk_size, with_entropy=True,
                                   entropy_grad=lc.entropy_coeff > 0)
    logp, ent = logp[:, :r], ent[:, :r]
    mask = packed.mask[:, :r]
    old = logp.detach() if old_logp is None else old_logp[:, :r]
    adv = advantages[:, None].expand(-1, r)  # (N, r)
    pl = lc.policy_loss
    if pl is not None and pl.top_entropy_quantile < 1.0:  # A_t * keep_t: only high-entropy tokens get a gradient
        adv = adv * algorithms.high_entropy_mask(ent, mask, pl.top_entropy_quantile)
    knobs = algorithms.PolicyLossKnobs(lc.clip_ratio_low, lc.clip_ratio_high, lc.clip_ratio_c, **(
        {} if pl is None else {k: getattr(pl, k) for k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub",
                                                             "kl_cov_ratio", "ppo_kl_coef")}))
    policy_loss = algorithms.get_policy_loss("vanilla" if pl is None else pl.loss_mode)
    pg_loss, pg_metrics = policy_loss(logp, old, adv, mask, lc.loss_agg_mode, lc.norm_len, knobs)
    entropy = algorithms.agg_loss(ent, mask, lc.loss_agg_mode, lc.norm_len)
    loss = pg_loss - lc.entropy_coeff * entropy
    metrics = {k: float(v) for k, v in pg_metrics.items()}
    metrics["actor/pg_loss"] = float(pg_loss.detach())
    # logged as verl logs it: aggregated with loss_agg_mode (the same number the bonus multiplies)
    metrics["actor/entropy"] = float(entropy.detach())
    if ref_logp is not None and lc.use_kl:
        kl = algorithms.kl_penalty(logp, ref_logp[:, :r], lc.kl_loss_type)  # (N, r)
        kl_loss = algorithms.agg_loss(kl, mask, lc.loss_agg_mode, lc.norm_len)
        loss = loss + lc.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
    return loss, metrics, F.pad(logp.detach() * mask, (0, R - r))
