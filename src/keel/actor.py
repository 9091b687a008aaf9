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

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from keel import algorithms, modeling
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


# --------------------------------------------------------------------------- the training forward as a module


class LeanLayer(nn.Module):
    """One HF decoder layer run by :meth:`LeanForward.packed_layer`: the unit that FSDP2 shards and
    activation checkpointing recomputes (its parameters are the HF layer's own)."""

    def __init__(self, lean: LeanForward, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self._lean = lean  # a plain object, not a submodule

    def forward(self, x, cos, sin, slot_token, token_slot):  # (M, C) -> (M, C)
        return self._lean.packed_layer(self.layer, None, x, cos, sin, slot_token, token_slot)


class PackedLM(nn.Module):
    """The GRPO training forward of a packed batch as one module call: tokens -> response log-probs.

    Shapes: M distinct tokens, K real response tokens, C hidden, V vocabulary.

        x = embed(ids);  x = layer_l(x) for l = 1..L;  h = norm(x[predictor])   (K, C)
        logp_k = z_k[y_k] - logsumexp(z_k),  z = lm_head(h) / T                (K,)

    The module tree holds each parameter once (embed, L layers, norm, head), so DDP and FSDP2 can
    wrap it, and ``checkpointing`` recomputes each layer in backward (activation memory: one layer's
    worth plus an (M, C) residual per layer). The head runs ``chunk`` rows at a time and, with grad,
    each chunk is recomputed in backward: no more than a (chunk, V) block of logits ever exists.
    """

    def __init__(self, lean: LeanForward, checkpointing: bool = False):
        super().__init__()
        self.embed_tokens = lean.base.embed_tokens
        self.layers = nn.ModuleList(LeanLayer(lean, layer) for layer in lean.base.layers)
        self.norm = lean.base.norm
        self.lm_head = lean.model.lm_head
        self._lean = lean
        self.checkpointing = checkpointing

    def forward(self, input_ids, positions, slot_token, token_slot, predictor, labels, temperature: float,
                chunk: int, entropy: str = "none"):
        """-> (logp (K,), entropy (K,) or None). entropy: none | grad (in the graph) | nograd (logged only)."""
        x = self.embed_tokens(input_ids)  # (M, C)
        cos, sin = self._lean.rope(positions, x.dtype, signed=True)  # (M, 1, hd)
        recompute = self.checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, slot_token, token_slot, use_reentrant=False)
            else:
                x = layer(x, cos, sin, slot_token, token_slot)
        h = x.index_select(0, predictor)  # (K, C)
        return self.head_logprobs(h, labels, temperature, chunk, entropy)

    def head_logprobs(self, h, labels, temperature: float, chunk: int, entropy: str = "none"):
        """(K, C) hidden states -> (K,) log-probs of labels (and entropies), `chunk` rows of logits at a time."""
        def rows(h_c, y_c):
            logits = self.lm_head(modeling._rms_norm(self.norm, h_c))  # (k, V)
            logp, ent = algorithms.logprobs_and_entropy(logits, y_c, temperature, chunk, entropy == "grad")
            if entropy == "nograd":
                with torch.no_grad():
                    ent = algorithms.logprobs_and_entropy(logits.detach(), y_c, temperature, chunk, True)[1]
            return (logp,) if ent is None else (logp, ent)

        K = h.shape[0]
        recompute = torch.is_grad_enabled() and h.requires_grad and K > chunk
        parts = [checkpoint(rows, h[s : s + chunk], labels[s : s + chunk], use_reentrant=False) if recompute
                 else rows(h[s : s + chunk], labels[s : s + chunk]) for s in range(0, K, max(1, chunk))]
        if not parts:  # no response token at all
            empty = h.new_zeros(0, dtype=torch.float32)
            return empty, (empty if entropy != "none" else None)
        logp = torch.cat([p[0] for p in parts])
        return logp, (torch.cat([p[1] for p in parts]) if entropy != "none" else None)


def train_module(lean: LeanForward) -> nn.Module:
    """The training forward of `lean`'s model as a module (built once; keel.distributed may wrap it)."""
    if lean.module is None:
        lean.module = PackedLM(lean)
    return lean.module


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


def _padded_logits(model, packed: Packed) -> torch.Tensor:
    hidden = model.model(input_ids=packed.input_ids).last_hidden_state  # HF applies the final norm
    idx = packed.hidden_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (N, R, C)
    picked = torch.gather(hidden, 1, idx)
    return model.get_output_embeddings()(picked)


def _response_logprobs(model, lean, packed: Packed, temperature: float, chunk: int, with_entropy: bool,
                       entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, R) log-probs and entropies (None unless with_entropy), 0 where masked.

    entropy_grad=False computes the entropy outside the graph (logged, not trained).
    """
    N, R = packed.mask.shape
    if lean is None:
        part = trim(packed)
        logits, labels = _padded_logits(model, part), part.labels  # (N, r, V), (N, r)
        lp, ent = algorithms.logprobs_and_entropy(logits, labels, temperature, chunk, with_entropy and entropy_grad)
        if with_entropy and not entropy_grad:
            with torch.no_grad():
                _, ent = algorithms.logprobs_and_entropy(logits.detach(), labels, temperature, chunk, True)
        place = lambda x: F.pad(x * part.mask, (0, R - x.shape[1]))  # noqa: E731
    else:
        flat = flat_layout(packed)
        mode = "none" if not with_entropy else ("grad" if entropy_grad else "nograd")
        lp, ent = train_module(lean)(flat.input_ids, flat.positions, flat.slot_token, flat.token_slot,
                                     flat.predictor, flat.labels, temperature, chunk, mode)  # (K,) each
        place = lambda x: x.new_zeros(N, R).masked_scatter(flat.response_mask, x)  # noqa: E731
    return place(lp), (place(ent) if with_entropy else None)


# --------------------------------------------------------------------------- micro-batches


def row_tokens(packed: Packed) -> torch.Tensor:
    """(N,) tokens of each row: prompt + response (the work a row brings to a forward)."""
    return packed.hidden_index[:, 0] + 1 + packed.mask.sum(1).long()


def micro_batches(packed: Packed, size: int = 0, max_tokens: int = 0) -> list[torch.Tensor]:
    """Row indices of a batch's micro-batches, in row order (verl's ``*_micro_batch_size_per_gpu`` and
    ``use_dynamic_bsz``).

        max_tokens > 0:  consecutive rows while their prompt + response tokens sum to <= max_tokens
                         (a longer row goes alone): peak memory follows the token budget
        size > 0:        `size` rows each
        otherwise:       the whole batch at once
    """
    N = packed.input_ids.shape[0]
    if max_tokens > 0:
        out, current, used = [], [], 0
        for i, n in enumerate(row_tokens(packed).tolist()):
            if current and used + n > max_tokens:
                out.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        return [torch.tensor(rows, dtype=torch.long) for rows in out + ([current] if current else [])]
    step = size if size > 0 else max(N, 1)
    return [torch.arange(s, min(N, s + step)) for s in range(0, N, step)]


def compute_logprobs(model, lean, packed: Packed, temperature: float, chunk: int,
                     with_entropy: bool = False, micro_batch: int = 0,
                     max_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs (and entropies) of the packed responses: (N, R) each, `micro_batch` rows or
    `max_tokens` tokens per forward (0 = the whole batch)."""
    R = packed.mask.shape[1]
    logps, ents = [], []
    parts = micro_batches(packed, micro_batch, max_tokens)
    with torch.no_grad():
        for rows in parts:
            part = packed if len(parts) == 1 else packed.select(rows)
            lp, ent = _response_logprobs(model, lean, part, temperature, chunk, with_entropy)
            logps.append(F.pad(lp, (0, R - lp.shape[1])))
            if with_entropy:
                ents.append(F.pad(ent, (0, R - ent.shape[1])))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


@dataclass
class Placement:
    """Where a micro-batch's rows sit in its whole mini-batch (over every rank).

    Every loss_agg_mode is linear in the per-token loss for a fixed mask, so a micro-batch's share of
    the mini-batch loss is the aggregation over the *whole* mini-batch's mask of its per-token values
    with zeros on every other row:

        agg(l, M) = sum_k agg(l * 1[rows of k], M)

    whatever the denominator is (tokens, sequences, padded length of the mini-batch). Summing the
    gradients of those shares over the micro-batches (and ranks) is exactly one pass's gradient.
    """

    rows: torch.Tensor  # (n,) row of each micro-batch row in the mini-batch's (N, r) layout
    lengths: torch.Tensor  # (N,) response tokens of every row of the mini-batch

    def mask(self) -> torch.Tensor:
        r = max(1, int(self.lengths.max()))
        return (torch.arange(r, device=self.lengths.device)[None] < self.lengths[:, None]).float()  # (N, r)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """(n, r_k) micro-batch values -> (N, r) with zeros on the other rows (differentiable)."""
        N, r = self.lengths.shape[0], max(1, int(self.lengths.max()))
        return x.new_zeros(N, r).index_copy(0, self.rows, F.pad(x[:, :r], (0, r - min(x.shape[1], r))))


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
              ref_logp: torch.Tensor | None, lc: LossConfig,
              place: Placement | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """loss = pg_loss - entropy_coeff * agg(H) + kl_loss_coef * agg(KL)   (one mini-batch).

    advantages: (N,) per completion, broadcast over its tokens. old_logp None means the
    data was sampled by exactly these weights (one epoch, one mini-batch): old = current.
    place: `packed` is one micro-batch of a larger mini-batch: the loss and every metric are its
    share of the mini-batch's (they sum over the micro-batches to one pass's values; see
    :class:`Placement`). On the other rows logp = old = ref = A = 0, so their policy loss
    (-A * ratio), KL (d = 0) and entropy are exactly 0.
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
    ref = None if ref_logp is None else ref_logp[:, :r]
    local_logp = logp.detach() * mask
    if place is not None:  # (n, r) -> the mini-batch's (N', r') with zeros on the other rows
        logp, ent, old, adv = place.spread(logp), place.spread(ent), place.spread(old), place.spread(adv)
        ref = None if ref is None else place.spread(ref)
        mask = place.mask()
    pl = lc.policy_loss
    # (with micro-batches, the token selections below -- top-entropy share, clip_cov / kl_cov -- are made per micro-batch)
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
        kl = algorithms.kl_penalty(logp, ref, lc.kl_loss_type)  # (N, r)
        kl_loss = algorithms.agg_loss(kl, mask, lc.loss_agg_mode, lc.norm_len)
        loss = loss + lc.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
    return loss, metrics, F.pad(local_logp, (0, R - r))


def backward_mini_batch(model, lean, packed: Packed | None, advantages: torch.Tensor, old_logp: torch.Tensor | None,
                        ref_logp: torch.Tensor | None, lc: LossConfig, *, micro: list[torch.Tensor],
                        place_rows: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                        n_micro: int | None = None, loss_scale: float = 1.0, fallback: Packed | None = None,
                        sync=None, autocast=None, poison: bool = False) -> tuple[dict[str, float], bool]:
    """Forward and backward of one mini-batch, `micro` row sets at a time; gradients accumulate in .grad.

    packed (n rows) holds this process's rows of the mini-batch (None: it has none), advantages /
    old_logp / ref_logp the same rows. With place_rows (n,) (their rows in the mini-batch) and lengths
    (N,) (response tokens of all its rows, every rank's), each micro-batch's loss is its share of the
    mini-batch loss (:class:`Placement`), so the summed gradients are one pass's for any loss_agg_mode;
    without them the single micro-batch is the whole mini-batch. loss_scale undoes an engine's mean
    over ranks (W for DDP / FSDP2). n_micro: forwards every rank runs (an engine needs the same number
    on each); missing ones run on `fallback` with weight 0. sync(last) is the engine's context that
    skips the gradient reduction until the last micro-batch. poison: a NaN loss (testing aid).

    Returns (metrics: the mini-batch's, summed over its micro-batches; whether every loss was finite).
    """
    n_micro = len(micro) if n_micro is None else n_micro
    autocast = autocast or nullcontext()
    metrics: dict[str, float] = {}
    finite = True
    for k in range(n_micro):
        with sync(k == n_micro - 1) if sync is not None else nullcontext():
            if packed is None or k >= len(micro):  # nothing of ours left: a zero-weight forward for the engine
                with autocast:
                    lp, _ = _response_logprobs(model, lean, fallback, lc.temperature, lc.entropy_chunk_size, False)
                (lp.sum() * 0.0).backward()
                continue
            rows = micro[k]
            part = packed if len(micro) == 1 and place_rows is None else packed.select(rows)
            place = None if place_rows is None else Placement(place_rows[rows], lengths)
            with autocast:
                loss, lm, _ = grpo_loss(model, lean, part, advantages[rows],
                                        None if old_logp is None else old_logp[rows],
                                        None if ref_logp is None else ref_logp[rows], lc, place)
            if poison:
                loss = loss * float("nan")
            finite = finite and math.isfinite(float(loss.detach()))
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            for key, v in lm.items():
                metrics[key] = metrics.get(key, 0.0) + v
    return metrics, finite
