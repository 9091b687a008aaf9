"""Models and tokenizers: the embedded tiny Qwen3, local HF directories, and a lean forward.

* :func:`build_embedded` makes the default model from a config (random init, no hub)
  and a character-level tokenizer built with the ``tokenizers`` library, both
  saveable/loadable as an ordinary Hugging Face directory.
* :func:`load_model_and_tokenizer` loads any local ``AutoModelForCausalLM`` directory and
  explains in one line what is wrong with a bad one.
* :class:`LeanForward` runs Llama-family decoders (Qwen3, Qwen2, Llama, Mistral) on the
  HF module's own parameters with a preallocated KV cache. It is what makes rollouts
  cheap on a CPU: no per-call mask building, no cache objects, and the batch can be
  compacted when rows finish. Its logits equal the HF forward's (tested).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from keel.errors import KeelError

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
LEAN_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")


# --------------------------------------------------------------------------- tokenizer


def build_char_tokenizer(alphabet: list[str]):
    """A character-level fast tokenizer (one token per character) with pad/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False
    )


# --------------------------------------------------------------------------- models


def embedded_config(vocab_size: int, eos_token_id: int, pad_token_id: int, hidden: int = 128, layers: int = 4,
                    heads: int = 4, mlp: int = 384, max_positions: int = 256):
    """The default ~0.86M-parameter Qwen3 (head_dim = hidden/heads; Qwen3Config defaults it to 128)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=hidden // heads, intermediate_size=mlp,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None, use_cache=False,
    )


def build_embedded(alphabet: list[str], seed: int = 0, **size):
    """Random-init tiny Qwen3 + char tokenizer for `alphabet` (deterministic in `seed`)."""
    from transformers import Qwen3ForCausalLM

    tokenizer = build_char_tokenizer(alphabet)
    config = embedded_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, **size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model, tokenizer


def load_model_and_tokenizer(path: str, tokenizer_path: str | None = None, dtype: str = "float32"):
    """Load a local HF causal-LM directory; one clear KeelError line for each bad case."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(path)
    if model_dir.is_file():
        raise KeelError(f"model path '{path}' is a file, not a model directory (set actor_rollout_ref.model.path to "
                        "the directory holding config.json and the weights)")
    if not model_dir.is_dir():
        raise KeelError(f"model directory '{path}' does not exist (set actor_rollout_ref.model.path to a local HF model directory)")
    if (model_dir / "config.json").is_dir():
        raise KeelError(f"model directory '{path}': config.json is a directory, not a file")
    if not (model_dir / "config.json").is_file():
        raise KeelError(f"model directory '{path}' has no config.json (not a Hugging Face model directory)")
    try:
        config_json = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise KeelError(f"model directory '{path}': config.json is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise KeelError(f"model directory '{path}': config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config_json, dict):
        raise KeelError(f"model directory '{path}': config.json must hold a JSON object of settings, "
                        f"got {type(config_json).__name__}")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    if not weights:
        raise KeelError(f"model directory '{path}' has no weights (*.safetensors or *.bin)")
    tok_dir = Path(tokenizer_path) if tokenizer_path else model_dir
    if not tok_dir.is_dir():
        raise KeelError(f"tokenizer directory '{tok_dir}' does not exist "
                        "(config key 'actor_rollout_ref.model.tokenizer_path')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad tokenizer dir
        raise KeelError(f"tokenizer in '{tok_dir}' could not be loaded: {str(e).splitlines()[0][:200]}") from None
    if not tokenizer("1 + 1 = 2", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one
        raise KeelError(f"tokenizer in '{tok_dir}' turns text into no tokens (tokenizer files missing? expected "
                        "tokenizer.json or vocab files next to config.json, or set actor_rollout_ref.model.tokenizer_path)")
    if tokenizer.eos_token_id is None:
        raise KeelError(f"tokenizer in '{tok_dir}' has no eos token (generation could never stop)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice for decoder-only models
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except Exception as e:
        why = str(e).splitlines()[0][:200]
        if "mismatched_sizes" in why:  # transformers' own explanation went to a silenced log report
            why = "the weights' tensor shapes do not match config.json (edited, or from another model?)"
        raise KeelError(f"model in '{path}' could not be loaded: {why}") from None
    if model.config.vocab_size < len(tokenizer):
        raise KeelError(
            f"model in '{path}' has vocab_size {model.config.vocab_size} but its tokenizer has {len(tokenizer)} tokens"
        )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KeelError(f"model in '{path}' has non-finite weights (NaN or inf in '{name}')")
    if not is_causal(model):
        raise KeelError(f"model in '{path}' is not a causal language model: its prediction at a position depends "
                        f"on later tokens (model_type '{model.config.model_type}'; GRPO needs a decoder-only LM)")
    return model, tokenizer


@torch.no_grad()
def is_causal(model) -> bool:
    """True when the logits at position 0 do not change with the token at position 1 (a decoder-only LM).

    BERT-style encoders load as ``AutoModelForCausalLM`` too (a masked-LM head over bidirectional attention).
    """
    was_training = model.training
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[min(1, vocab - 1), min(2, vocab - 1)], [min(1, vocab - 1), min(3, vocab - 1)]])
    ids = ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids).logits.float()  # (2, 2, V)
    model.train(was_training)
    return torch.allclose(logits[0, 0], logits[1, 0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- lean forward


@dataclass
class _FusedLayer:
    """One decoder layer's weights for decoding: transposed, contiguous (x @ W runs ~20% faster than
    F.linear's x @ W^T at decode shapes), q|k|v and gate|up concatenated (fewer, larger matmuls), and the
    input and post-attention norm weights folded in: W (x_hat * w) = (W diag(w)) x_hat."""

    qkv: torch.Tensor  # (C, (nh + 2 nkv) hd)
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # (nh hd, C)
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # (C, 2 F)
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # (F, C)
    down_bias: torch.Tensor | None
    qk_norm_weight: torch.Tensor | None  # (nh + nkv, hd): q_norm's weight per query head, then k_norm's


def _matmul(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ w_t (in, out) [+ bias]."""
    y = x @ w_t
    return y if bias is None else y + bias


def _cat_or_none(tensors):
    return None if any(t is None for t in tensors) else torch.cat(tensors)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm (fp32 statistics, times weight) in one call where the dtypes allow it (same numbers)."""
    if x.dtype == norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


class LeanForward:
    """Functional forward over an HF Llama-family model's own modules (no copies: gradients flow).

    Shapes: B batch rows, T positions, M distinct tokens of a packed batch, nh query heads,
    nkv key/value heads, hd head dim, C hidden size, V vocab.

    Three entry points, one per job:

    * :meth:`hidden` / :meth:`forward` — right-padded rows (B, T), plain causal attention (SFT);
    * :meth:`hidden_packed` — a GRPO batch without padding waste: each distinct token (a
      prompt shared by its group counts once) runs through the projections and the MLP once,
      and only attention sees the (B, T) row layout;
    * :meth:`step` / :meth:`decode_step` — KV-cached prefill and one-token decoding for rollouts.
    """

    def __init__(self, model):
        cfg = model.config
        if cfg.model_type not in LEAN_MODEL_TYPES:
            raise ValueError(f"LeanForward supports {LEAN_MODEL_TYPES}, not {cfg.model_type}")
        self.model = model
        self.base = model.model
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_layers = cfg.num_hidden_layers
        self.qk_norm = hasattr(self.base.layers[0].self_attn, "q_norm")  # Qwen3: RMSNorm over each head
        self._rope_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._frozen: list[_FusedLayer] | None = None  # fused weights while decoding (weights fixed)
        self._frozen_head: tuple | None = None
        # the training forward as an nn.Module (keel.actor.train_module builds it; keel.distributed wraps it)
        self.module: torch.nn.Module | None = None

    @staticmethod
    def supports(model) -> bool:
        sw = getattr(model.config, "sliding_window", None)
        use_sw = getattr(model.config, "use_sliding_window", False)
        return model.config.model_type in LEAN_MODEL_TYPES and not (sw and use_sw)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype,
             signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for integer positions (B, T) -> (B, 1, T, hd), from the model's own rotary module.

        signed=True gives sin with its first half negated, the form :meth:`_rotate` takes.
        """
        n = int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache[0] < n:
            n_alloc = max(n, 256)
            probe = torch.zeros(1, 1, self.hd, dtype=torch.float32, device=positions.device)
            with torch.no_grad():
                cos, sin = self.base.rotary_emb(probe, torch.arange(n_alloc, device=positions.device)[None])
            cos, sin, half = cos[0], sin[0], self.hd // 2  # (n_alloc, hd)
            self._rope_cache = (n_alloc, cos, sin, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1))
        _, cos, sin, sin_signed = self._rope_cache
        sin = sin_signed if signed else sin
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def _rotate(x, cos, sin_signed):
        """HF's x*cos + rotate_half(x)*sin with rotate_half(x) = (-x2, x1): a roll swaps the halves and
        the sign is folded into sin (one copy instead of neg + cat; exact)."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed

    # ---- one layer's pieces; decoding uses a fused snapshot of the weights (fewer, larger matmuls)

    def _fuse(self, layer, dtype: torch.dtype | None) -> _FusedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        qk_w = None
        if self.qk_norm:
            qk_w = torch.cat([attn.q_norm.weight.expand(self.nh, self.hd),
                              attn.k_norm.weight.expand(self.nkv, self.hd)])
        cast = lambda t: None if t is None else t.to(dtype or t.dtype).contiguous()  # noqa: E731
        in_w, post_w = layer.input_layernorm.weight[:, None], layer.post_attention_layernorm.weight[:, None]
        return _FusedLayer(
            cast(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t() * in_w),
            cast(_cat_or_none([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])),
            cast(attn.o_proj.weight.t()), cast(attn.o_proj.bias),
            cast(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t() * post_w),
            cast(_cat_or_none([mlp.gate_proj.bias, mlp.up_proj.bias])),
            cast(mlp.down_proj.weight.t()), cast(mlp.down_proj.bias),
            qk_w,
        )

    @contextmanager
    def decoding(self):
        """Within this block the weights are fixed: fuse q|k|v and gate|up once for all decode steps.

        Under autocast the fused weights are stored in its dtype (autocast would re-cast them at every step).
        """
        device = next(self.model.parameters()).device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.no_grad():
            self._frozen = [self._fuse(layer, dtype) for layer in self.base.layers]
            head = self.model.lm_head
            self._frozen_head = ((head.weight.t() * self.base.norm.weight[:, None]).to(dtype or head.weight.dtype)
                                 .contiguous(), head.bias)  # (C, V)
        try:
            yield self
        finally:
            self._frozen = self._frozen_head = None

    def _layers(self) -> list[tuple]:
        """(layer, fused snapshot or None) per decoder layer."""
        return list(zip(self.base.layers, self._frozen or [None] * self.n_layers))

    def _attn_in(self, layer, fused: _FusedLayer | None, x, cos, sin):
        """Residual stream x (..., C) -> q, k, v of the layer's attention (input_layernorm first)."""
        return self._qkv_rope(layer, fused, self._norm(layer.input_layernorm, fused, x), cos, sin)

    def _qkv_rope(self, layer, fused: _FusedLayer | None, h, cos, sin):
        """h (..., C) -> q (..., nh, hd), k (..., nkv, hd), v (..., nkv, hd); q and k normed and rotated.

        Training keeps the projections apart: concatenating the weights would cost a copy
        and a split of their gradients at every step.
        """
        attn, nh, nkv, hd = layer.self_attn, self.nh, self.nkv, self.hd
        if fused is None:
            q = attn.q_proj(h).unflatten(-1, (nh, hd))
            k = attn.k_proj(h).unflatten(-1, (nkv, hd))
            v = attn.v_proj(h).unflatten(-1, (nkv, hd))
            if self.qk_norm:
                q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
            return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v
        qkv = _matmul(h, fused.qkv, fused.qkv_bias).unflatten(-1, (nh + 2 * nkv, hd))
        qk, v = qkv[..., : nh + nkv, :], qkv[..., nh + nkv :, :]
        if fused.qk_norm_weight is not None:  # q_norm and k_norm share eps: one normalisation, per-head weights
            eps = attn.q_norm.variance_epsilon
            if qk.dtype == torch.float32:
                qk = F.rms_norm(qk, (hd,), eps=eps) * fused.qk_norm_weight
            else:  # autocast: HF's norm statistics in fp32
                normed = qk.float() * torch.rsqrt(qk.float().pow(2).mean(-1, keepdim=True) + eps)
                qk = fused.qk_norm_weight * normed.to(qk.dtype)
        qk = self._rotate(qk, cos, sin)
        return qk[..., :nh, :], qk[..., nh:, :], v

    def _norm(self, norm, fused: _FusedLayer | None, x):
        """RMSNorm; with a fused snapshot its weight is already folded into the next matmul."""
        return _rms_norm(norm, x) if fused is None else F.rms_norm(x, (x.shape[-1],), eps=norm.variance_epsilon)

    def _attn_out(self, layer, fused: _FusedLayer | None, x, y):
        """x + o_proj(attention output y (..., nh*hd))."""
        return x + (layer.self_attn.o_proj(y) if fused is None else _matmul(y, fused.o, fused.o_bias))

    def _mlp(self, layer, fused: _FusedLayer | None, x):
        """x + MLP(post_attention_layernorm(x))."""
        h = self._norm(layer.post_attention_layernorm, fused, x)
        if fused is None:
            return x + layer.mlp(h)
        gate, up = _matmul(h, fused.gate_up, fused.gate_up_bias).chunk(2, dim=-1)
        return x + _matmul(layer.mlp.act_fn(gate) * up, fused.down, fused.down_bias)

    def _logits(self, x):
        if self._frozen_head is not None:
            return _matmul(F.rms_norm(x, (x.shape[-1],), eps=self.base.norm.variance_epsilon), *self._frozen_head)
        return self.model.lm_head(_rms_norm(self.base.norm, x))

    def _causal_attention(self, q, k, v):
        """Causal SDPA over rows (B, h, T, hd). Under autocast it runs in fp32: its FLOPs are few, and
        PyTorch's bf16 flash-attention backward on CPU is ~6x slower than the fp32 one."""
        if q.dtype == k.dtype == v.dtype == torch.float32 and not torch.is_autocast_enabled(q.device.type):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nh != self.nkv)
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                  enable_gqa=self.nh != self.nkv)

    # ---- padded rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward of right-padded rows (B, T) -> logits (B, T, V)."""
        return self._logits(self.hidden(input_ids))

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (B, T, C), before the final norm.

        Rows start at position 0 and padding sits at the end, so a causal mask alone is
        exact for every real token (no real token ever attends to a later pad).
        """
        B, T = input_ids.shape
        x = self.base.embed_tokens(input_ids)  # (B, T, C)
        positions = torch.arange(T, device=input_ids.device)[None]
        cos, sin = self.rope(positions, x.dtype, signed=True)  # (1, 1, T, hd)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (1, T, 1, hd): broadcast over heads
        for layer, fused in self._layers():
            q, k, v = self._attn_in(layer, fused, x, cos, sin)  # (B, T, h, hd)
            y = self._causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, nh, T, hd)
            x = self._attn_out(layer, fused, x, y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
            x = self._mlp(layer, fused, x)
        return x

    # ---- packed batch (no padding waste)

    def hidden_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_token: torch.Tensor,
                      token_slot: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (M, C) of a packed batch, before the final norm.

        input_ids, positions: (M,) each distinct token once (a prompt shared by G rows is stored once).
        slot_token: (B, T) the token at each slot of each right-padded row (pad slots: any token;
            causal attention never lets a real slot see a later pad).
        token_slot: (M,) the slot (row * T + t) whose attention output a token takes.
        Projections, norms and the MLP (nearly all FLOPs) run over the M tokens; attention
        gathers q, k, v into rows and scatters its output back.
        """
        x = self.base.embed_tokens(input_ids)  # (M, C)
        cos, sin = self.rope(positions, x.dtype, signed=True)  # (M, 1, hd)
        for layer, fused in self._layers():
            x = self.packed_layer(layer, fused, x, cos, sin, slot_token, token_slot)
        return x

    def packed_layer(self, layer, fused: _FusedLayer | None, x, cos, sin, slot_token, token_slot):
        """One decoder layer over a packed batch: x (M, C) -> (M, C) (see :meth:`hidden_packed`)."""
        B, T = slot_token.shape
        q, k, v = self._attn_in(layer, fused, x, cos, sin)  # (M, h, hd)
        gather = slot_token.reshape(-1)  # (B*T,)
        q, k, v = (t.index_select(0, gather).view(B, T, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        y = self._causal_attention(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B * T, self.nh * self.hd).index_select(0, token_slot)  # (M, nh*hd)
        x = self._attn_out(layer, fused, x, y)
        return self._mlp(layer, fused, x)

    # ---- incremental decoding with a preallocated cache

    def new_cache(self, B: int, T_max: int, dtype: torch.dtype, device, zeroed: bool = True) -> list[torch.Tensor]:
        """Per layer a (2, B, nkv, T_max, hd) key/value buffer.

        zeroed=False leaves it uninitialised, for a caller that writes every slot before attention reads it
        (the rollout: prompt slots copied from the prefill, each decode slot written by its own step).
        """
        alloc = torch.zeros if zeroed else torch.empty
        return [alloc(2, B, self.nkv, T_max, self.hd, dtype=dtype, device=device) for _ in range(self.n_layers)]

    def step(self, input_ids, positions, cache, start: int, key_mask) -> torch.Tensor:
        """Run new tokens (B, T) written at cache slots [start, start+T) -> logits of the last token (B, V).

        positions: (B, T) rotary positions (left-padded prompts start later than slot 0).
        key_mask: (B, start+T) bool, True where a cache slot holds a real token.
        """
        B, T = input_ids.shape
        x = self.base.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype, signed=True)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
        end = start + T
        # a query attends to real keys at or before its own slot; a pad query attends to itself (no empty rows)
        slots = torch.arange(end, device=input_ids.device)
        causal = slots[None, :] <= (start + torch.arange(T, device=input_ids.device))[:, None]  # (T, end)
        own = slots[None, :] == (start + torch.arange(T, device=input_ids.device))[:, None]
        mask = (causal[None] & key_mask[:, None, :]) | own[None]  # (B, T, end)
        mask = mask[:, None]  # (B, 1, T, end)
        for (layer, fused), kv in zip(self._layers(), cache):
            q, k, v = self._attn_in(layer, fused, x, cos, sin)  # (B, T, h, hd)
            kv[0, :, :, start:end] = k.transpose(1, 2)
            kv[1, :, :, start:end] = v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q.transpose(1, 2).to(kv.dtype), kv[0, :, :, :end], kv[1, :, :, :end],
                                               attn_mask=mask, enable_gqa=self.nh != self.nkv)
            x = self._attn_out(layer, fused, x, y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
            x = self._mlp(layer, fused, x)
        return self._logits(x[:, -1])

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache, slot: int,
                    key_bias: torch.Tensor | None) -> torch.Tensor:
        """One new token per row (A,) written at cache slot `slot` -> next-token logits (A, V).

        positions: (A,) rotary positions. key_bias: None when every slot up to `slot` holds a
        real token, else (A, 1, 1, slot+1) additive mask (0 or -inf) over the cache slots.
        """
        A = tokens.shape[0]
        x = self.base.embed_tokens(tokens)  # (A, C)
        cos, sin = self.rope(positions, x.dtype, signed=True)  # (A, 1, hd)
        for (layer, fused), kv in zip(self._layers(), cache):
            q, k, v = self._attn_in(layer, fused, x, cos, sin)  # (A, h, hd)
            kv[0, :, :, slot] = k
            kv[1, :, :, slot] = v
            y = F.scaled_dot_product_attention(q.unsqueeze(2).to(kv.dtype), kv[0, :, :, : slot + 1],
                                               kv[1, :, :, : slot + 1], attn_mask=key_bias,
                                               enable_gqa=self.nh != self.nkv)  # (A, nh, 1, hd)
            x = self._attn_out(layer, fused, x, y.reshape(A, self.nh * self.hd))
            x = self._mlp(layer, fused, x)
        return self._logits(x)


def count_parameters(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
