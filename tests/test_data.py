"""keel.data: loading verl / TRL / GSM8K / MATH-500 rows, row errors, rendering, length filter, verl converter."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from keel.config import DataConfig
from keel.data import (
    BOXED_INSTRUCTION,
    GSM8K_SOURCE,
    MATH500_SOURCE,
    PromptRow,
    filter_by_length,
    load_rows,
    render_prompt,
    write_verl_parquet,
)
from keel.errors import KeelError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- real data


def test_gsm8k_rows_and_comma_golds():
    rows, stats = load_rows(str(DATA / "gsm8k" / "test.jsonl"), DataConfig())
    assert stats == {"rows": 1319, "skipped_invalid": 0}
    assert rows[0].ground_truth == "18"
    assert rows[0].data_source == GSM8K_SOURCE
    assert rows[0].prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert rows[0].columns["answer"].endswith("#### 18")
    # SOURCE.md: 14 test golds carry thousands separators; all must come out as plain integers
    raw = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in open(DATA / "gsm8k" / "test.jsonl")]
    with_commas = [i for i, g in enumerate(raw) if "," in g]
    assert len(with_commas) == 14
    for i in with_commas:
        assert rows[i].ground_truth == raw[i].replace(",", "")
    assert all(r.ground_truth.lstrip("-").isdigit() for r in rows)


def test_gsm8k_train_and_test_together():
    files = [str(DATA / "gsm8k" / "train.jsonl"), str(DATA / "gsm8k" / "test.jsonl")]
    rows, stats = load_rows(files, DataConfig())
    assert stats["rows"] == 7473 + 1319
    assert rows[0].ground_truth == "72"  # Natalia's clips: 48 + 24


def test_math500_rows():
    rows, stats = load_rows(str(DATA / "math500" / "test.jsonl"), DataConfig())
    assert stats == {"rows": 500, "skipped_invalid": 0}
    assert rows[0].ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert rows[0].data_source == MATH500_SOURCE
    assert rows[0].extra_info == {"index": 0, "subject": "Precalculus", "level": 2,
                                  "unique_id": "test/precalculus/807.json"}
    assert rows[0].prompt.startswith("Convert the point $(0,3)$")


def test_verl_parquet_rows():
    rows, stats = load_rows(str(DATA / "math_l3to5_verl" / "math500_test.parquet"), DataConfig())
    assert stats == {"rows": 500, "skipped_invalid": 0}
    first = rows[0]
    assert first.data_source == "deepscaler"
    assert first.ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert isinstance(first.prompt, list) and first.prompt[0]["role"] == "user"
    assert first.prompt[0]["content"].endswith(BOXED_INSTRUCTION)
    assert first.extra_info == {"index": 0, "split": "test"}
    assert first.columns["ability"] == "math"


def test_trl_rows_with_answer_column(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "What is 2+3?", "solution": "5", "difficulty": 1},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4+4?"}],
         "solution": "8", "difficulty": 2},
    ])
    rows, stats = load_rows(str(path), DataConfig())
    assert stats == {"rows": 2, "skipped_invalid": 0}
    assert [r.ground_truth for r in rows] == ["5", "8"]
    assert [r.data_source for r in rows] == ["trl", "trl"]
    assert rows[1].prompt[1] == {"role": "user", "content": "What is 4+4?"}
    assert rows[1].columns["difficulty"] == 2
    # data.answer_key picks the column explicitly
    rows, _ = load_rows(str(path), DataConfig(answer_key="difficulty"))
    assert [r.ground_truth for r in rows] == ["1", "2"]


def test_trl_rows_without_answer_column_have_empty_ground_truth(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write a haiku."}])
    rows, _ = load_rows(str(path), DataConfig())
    assert rows[0].ground_truth == ""


# --------------------------------------------------------------------------- errors


def test_missing_field_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"question": "1+1?", "answer": "2\n#### 2"},
        {"question": "2+2?", "answer": "4\n#### 4"},
        {"answer": "6\n#### 6"},
    ])
    with pytest.raises(KeelError, match=r"^data file '.*x\.jsonl' row 3: missing 'question'"):
        load_rows(str(path), DataConfig())


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"question": "1+1?", "answer": "2\n#### 2"},
        "{not json",
        "",  # blank line: not a row
        {"question": "no gold", "answer": "just text"},
        {"question": "3+3?", "answer": "6\n#### 6"},
        [1, 2],
    ])
    with pytest.raises(KeelError, match=r"row 2: not valid JSON"):
        load_rows(str(path), DataConfig())
    rows, stats = load_rows(str(path), DataConfig(skip_invalid=True))
    assert stats == {"rows": 2, "skipped_invalid": 3}
    assert [r.ground_truth for r in rows] == ["2", "6"]


def test_gsm8k_answer_without_hashes_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(KeelError, match=r"row 1: 'answer' has no '#### <gold>' line"):
        load_rows(str(path), DataConfig())


def test_bad_chat_messages_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(KeelError, match=r"row 1: 'prompt' message 0 must be"):
        load_rows(str(path), DataConfig())


def test_verl_row_without_ground_truth(tmp_path):
    records = [{"data_source": "d", "prompt": [{"role": "user", "content": "q"}], "reward_model": {"style": "rule"}}]
    path = write_jsonl(tmp_path / "v.jsonl", records)
    with pytest.raises(KeelError, match=r"row 1: missing 'reward_model.ground_truth'"):
        load_rows(str(path), DataConfig())


def test_file_level_errors(tmp_path):
    with pytest.raises(KeelError, match=r"data file '.*nope\.jsonl' does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), DataConfig())
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(KeelError, match=r"unknown extension '\.csv'"):
        load_rows(str(tmp_path / "d.csv"), DataConfig())
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(KeelError, match=r"cannot tell the row format from columns \['text'\]"):
        load_rows(str(path), DataConfig())
    with pytest.raises(KeelError, match=r"data.format' must be one of"):
        load_rows(str(path), DataConfig(format="alpaca"))
    empty = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "x"}])
    with pytest.raises(KeelError, match=r"no usable rows \(1 invalid\)"):
        load_rows(str(empty), DataConfig(skip_invalid=True))


def test_forced_format(tmp_path):
    # MATH-style columns read as TRL rows when forced: prompt_key "problem", answer_key "answer"
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "1+1", "answer": "2"}])
    rows, _ = load_rows(str(path), DataConfig(format="trl", prompt_key="problem"))
    assert rows[0].prompt == "1+1" and rows[0].ground_truth == "2" and rows[0].data_source == "trl"


# --------------------------------------------------------------------------- rendering and length filter


def word_tokenizer(texts: list[str], chat_template: str | None = None):
    """A real fast tokenizer (word level, built from the texts) so token counts are easy to hand-check."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def test_render_plain_text_with_template():
    cfg = DataConfig(prompt_template="Q: {question} A: \\boxed{}")
    row = PromptRow("What is $\\frac{1}{2}$?", "0.5", "x", {}, {})
    tok = word_tokenizer(["a"])  # no chat template -> plain text
    assert render_prompt(row, tok, cfg) == "Q: What is $\\frac{1}{2}$? A: \\boxed{}"
    assert render_prompt(row, None, cfg) == "Q: What is $\\frac{1}{2}$? A: \\boxed{}"
    messages = PromptRow([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "1", "x", {}, {})
    assert render_prompt(messages, tok, cfg) == "S\nU"


def test_render_with_chat_template():
    tok = word_tokenizer(["a"], chat_template=CHAT)
    row = PromptRow("23+48=", "71", "embedded/addition", {}, {})
    assert render_prompt(row, tok, DataConfig()) == "<user> 23+48= <assistant>"
    assert render_prompt(row, tok, DataConfig(apply_chat_template=False)) == "23+48="
    chat = PromptRow([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "1", "x", {}, {})
    assert render_prompt(chat, tok, DataConfig()) == "<system> S <user> U <assistant>"


def test_filter_by_length_counts_dropped():
    questions = ["one two", "one two three four", "one", "one two three four five six"]
    rows = [PromptRow(q, "1", "x", {}, {}) for q in questions]
    tok = word_tokenizer(questions + ["<user>", "<assistant>"], chat_template=CHAT)
    # rendered "<user> q <assistant>" = len(q.split()) + 2 tokens: 4, 6, 3, 8
    kept, texts, dropped = filter_by_length(rows, tok, DataConfig(max_prompt_length=6))
    assert [r.prompt for r in kept] == ["one two", "one two three four", "one"]
    assert texts[2] == "<user> one <assistant>"
    assert dropped == 1
    kept, _, dropped = filter_by_length(rows, tok, DataConfig(max_prompt_length=3))
    assert [r.prompt for r in kept] == ["one"] and dropped == 3


# --------------------------------------------------------------------------- verl converter


def test_gsm8k_to_verl_parquet_round_trip(tmp_path):
    rows, _ = load_rows(str(DATA / "gsm8k" / "test.jsonl"), DataConfig())
    out = tmp_path / "gsm8k_verl" / "test.parquet"
    write_verl_parquet(rows[:50], str(out))
    table = pq.read_table(out)
    assert table.num_rows == 50
    assert set(table.column_names) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    first = table.slice(0, 1).to_pylist()[0]
    assert first["reward_model"] == {"style": "rule", "ground_truth": "18"}
    assert first["prompt"] == [{"role": "user", "content": rows[0].prompt + BOXED_INSTRUCTION}]
    back, stats = load_rows(str(out), DataConfig())
    assert stats == {"rows": 50, "skipped_invalid": 0}
    assert [r.ground_truth for r in back] == [r.ground_truth for r in rows[:50]]
    assert all(r.data_source == GSM8K_SOURCE for r in back)
    assert back[7].extra_info == {"index": 7}


def test_math500_to_verl_parquet_with_data_source(tmp_path):
    rows, _ = load_rows(str(DATA / "math500" / "test.jsonl"), DataConfig())
    out = tmp_path / "math.parquet"
    write_verl_parquet(rows, str(out), data_source="lighteval/MATH", instruction="")
    back, _ = load_rows(str(out), DataConfig())
    assert len(back) == 500
    assert back[0].data_source == "lighteval/MATH"
    assert back[0].prompt == [{"role": "user", "content": rows[0].prompt}]
    assert back[499].ground_truth == rows[499].ground_truth
    assert back[3].extra_info["unique_id"] == rows[3].extra_info["unique_id"]
