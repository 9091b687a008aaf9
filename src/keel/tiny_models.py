"""Tiny real models for real data, built locally (no hub): `keel tiny-model OUT --data FILE`.

``--tokenizer qwen3`` pairs the model with the real Qwen3 tokenizer instead (keel.qwen3_tokenizer,
151,936-row embedding), and ``--shape qwen3-0.6b`` gives it Qwen3-0.6B's exact shape (random init).

A byte-level BPE tokenizer is trained on the prompts of a local data file, given a
ChatML chat template like Qwen's (``<|im_start|>role ... <|im_end|>``), and paired
with a random-init Qwen3 of the requested size. The directory is an ordinary Hugging
Face model directory, so it exercises exactly the loading path a real checkpoint
takes (AutoModelForCausalLM, AutoTokenizer, chat template, math-verify reward).
"""

from __future__ import annotations

from pathlib import Path

import torch

from keel.config import DataConfig
from keel.data import load_rows
from keel.errors import KeelError

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE trained on `texts`, with Qwen-style special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML_TEMPLATE
    return fast


# head_dim = hidden / heads: 64 / 2 = 32, a size every rollout backend runs (vLLM's CPU attention has no kernel
# for head_dim 16, the old default 64 / 4)
DEFAULT_HEADS = 2

QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=3072, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)  # Qwen3-0.6B's config.json (596M parameters with the tied head)


def make_tiny_model_dir(out: str | Path, data_files: str | list[str] | None = None, vocab_size: int = 512,
                        hidden: int = 64, layers: int = 2, heads: int = DEFAULT_HEADS, mlp: int = 128, seed: int = 0,
                        max_rows: int = 2000, tokenizer: str = "bpe", shape: str = "tiny") -> Path:
    """Write a random-init Qwen3 + a tokenizer: BPE trained on the prompts/answers of `data_files`, or
    Qwen3's own (tokenizer="qwen3"); shape "tiny" (hidden/layers/heads/mlp) or "qwen3-0.6b"."""
    from keel.checkpoint import save_hf_model
    from keel.errors import KeelError

    for flag, value in (("--vocab-size", vocab_size), ("--hidden", hidden), ("--layers", layers), ("--heads", heads),
                        ("--mlp", mlp)):
        if value < 1:
            raise KeelError(f"keel tiny-model {flag} must be >= 1, got {value}")
    if hidden % heads or (hidden // heads) % 2:
        raise KeelError(f"keel tiny-model --hidden {hidden} must be an even multiple of --heads {heads} "
                        f"(head_dim = hidden / heads must be a whole, even number for rotary embeddings)")
    if Path(out).exists() and not Path(out).is_dir():
        raise KeelError(f"keel tiny-model output '{out}' is an existing file")
    if tokenizer == "qwen3":
        from keel.qwen3_tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer

        tok, n_vocab = build_qwen3_tokenizer(), QWEN3_VOCAB_SIZE
    elif tokenizer == "bpe":
        if not data_files:
            raise KeelError("keel tiny-model: --data is required to train the bpe tokenizer (or use --tokenizer qwen3)")
        rows, _ = load_rows(data_files, DataConfig(skip_invalid=True))
        texts = []
        for row in rows[:max_rows]:
            prompt = row.prompt if isinstance(row.prompt, str) else " ".join(m.get("content", "") for m in row.prompt)
            texts += [prompt, str(row.ground_truth)]
        tok = build_bpe_tokenizer(texts, vocab_size)
        n_vocab = len(tok)
    else:
        raise KeelError(f"keel tiny-model: --tokenizer must be bpe or qwen3, got {tokenizer!r}")
    model = build_model(n_vocab, tok.eos_token_id, tok.pad_token_id, shape, seed, hidden=hidden, layers=layers,
                        heads=heads, mlp=mlp)
    save_hf_model(model, tok, Path(out))
    return Path(out)


def build_model(vocab_size: int, eos_token_id: int, pad_token_id: int, shape: str = "tiny", seed: int = 0,
                hidden: int = 64, layers: int = 2, heads: int = DEFAULT_HEADS, mlp: int = 128):
    """Random-init Qwen3ForCausalLM: shape "tiny" (hidden/layers/heads/mlp) or "qwen3-0.6b" (exact)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from keel.errors import KeelError

    if shape == "qwen3-0.6b":
        dims = QWEN3_0_6B
    elif shape == "tiny":
        dims = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=heads, head_dim=hidden // heads, intermediate_size=mlp,
                    max_position_embeddings=2048, tie_word_embeddings=True)
    else:
        raise KeelError(f"keel tiny-model: --shape must be tiny or qwen3-0.6b, got {shape!r}")
    config = Qwen3Config(vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         bos_token_id=None, **dims)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)
