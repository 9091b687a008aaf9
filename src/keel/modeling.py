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
    if not model_dir.is_dir():
        raise KeelError(f"model directory '{path}' does not exist (set actor_rollout_ref.model.path to a local HF model directory)")
    if not (model_dir / "config.json").is_file():
        raise KeelError(f"model directory '{path}' has no config.json (not a Hugging Face model directory)")
    try:
        json.loads((model_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise KeelError(f"model directory '{path}': config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
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
    return model, tokenizer


# --------------------------------------------------------------------------- lean forward


class LeanForward:
    """Functional forward over an HF Llama-family model's own modules (no copies: gradients flow).

    Shapes: B batch rows, T positions, nh query heads, nkv key/value heads, hd head dim, V vocab.
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
        self._rope_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def supports(model) -> bool:
        sw = getattr(model.config, "sliding_window", None)
        use_sw = getattr(model.config, "use_sliding_window", False)
        return model.config.model_type in LEAN_MODEL_TYPES and not (sw and use_sw)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for integer positions (B, T) -> (B, 1, T, hd), from the model's own rotary module."""
        n = int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache[0] < n:
            n_alloc = max(n, 256)
            probe = torch.zeros(1, 1, self.hd, dtype=torch.float32, device=positions.device)
            with torch.no_grad():
                cos, sin = self.base.rotary_emb(probe, torch.arange(n_alloc, device=positions.device)[None])
            self._rope_cache = (n_alloc, cos[0], sin[0])  # (n_alloc, hd)
        _, cos, sin = self._rope_cache
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attn_qkv(self, attn, h, B, T, cos, sin):
        q = attn.q_proj(h).view(B, T, self.nh, self.hd)
        k = attn.k_proj(h).view(B, T, self.nkv, self.hd)
        v = attn.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = self._rotate(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
        k = self._rotate(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        return q, k, v

    def _mlp_block(self, layer, x, attn_out):
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, x):
        return self.model.lm_head(self.base.norm(x))

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
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions, x.dtype)
        gqa = self.nh != self.nkv
        for layer in self.base.layers:
            h = layer.input_layernorm(x)
            q, k, v = self._attn_qkv(layer.self_attn, h, B, T, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, nh, T, hd)
            x = self._mlp_block(layer, x, y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        return x

    # ---- incremental decoding with a preallocated cache

    def new_cache(self, B: int, T_max: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Per layer a (2, B, nkv, T_max, hd) key/value buffer."""
        return [torch.zeros(2, B, self.nkv, T_max, self.hd, dtype=dtype, device=device) for _ in range(self.n_layers)]

    def step(self, input_ids, positions, cache, start: int, key_mask) -> torch.Tensor:
        """Run new tokens (B, T) written at cache slots [start, start+T) -> logits of the last token (B, V).

        positions: (B, T) rotary positions (left-padded prompts start later than slot 0).
        key_mask: (B, start+T) bool, True where a cache slot holds a real token.
        """
        B, T = input_ids.shape
        x = self.base.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        end = start + T
        # a query attends to real keys at or before its own slot; a pad query attends to itself (no empty rows)
        slots = torch.arange(end, device=input_ids.device)
        causal = slots[None, :] <= (start + torch.arange(T, device=input_ids.device))[:, None]  # (T, end)
        own = slots[None, :] == (start + torch.arange(T, device=input_ids.device))[:, None]
        mask = (causal[None] & key_mask[:, None, :]) | own[None]  # (B, T, end)
        mask = mask[:, None]  # (B, 1, T, end)
        gqa = self.nh != self.nkv
        for layer, kv in zip(self.base.layers, cache):
            h = layer.input_layernorm(x)
            q, k, v = self._attn_qkv(layer.self_attn, h, B, T, cos, sin)
            kv[0, :, :, start:end] = k
            kv[1, :, :, start:end] = v
            y = F.scaled_dot_product_attention(q, kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask, enable_gqa=gqa)
            x = self._mlp_block(layer, x, y.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        return self._logits(x[:, -1])


def count_parameters(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
