"""Prompt data: load JSONL / Parquet rows in verl, TRL, GSM8K or MATH-500 form, render, filter, convert.

Every row becomes a :class:`PromptRow` whatever its source format:

=========  ====================================  ===================================  ======================
format     detected by columns                   prompt                               ground_truth
=========  ====================================  ===================================  ======================
verl       ``prompt`` + ``reward_model``         chat messages (or str)               ``reward_model.ground_truth``
gsm8k      ``question`` + ``answer``             ``question``                         text after the last ``####``, commas removed
math500    ``problem`` + ``answer``              ``problem``                          ``answer``
trl        ``prompt`` (``data.prompt_key``)      str or chat messages                 ``data.answer_key`` column (or solution/ground_truth/label/target)
=========  ====================================  ===================================  ======================

The format is decided once per file from the union of its columns (``data.format`` forces one).
A malformed row raises ``KeelError("data file 'x.jsonl' row 17: missing 'question'")``; rows are
numbered from 1 (the JSONL line number; the Parquet row position). With ``data.skip_invalid: true``
such rows are skipped and counted in ``stats["skipped_invalid"]`` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from keel.config import DataConfig
from keel.errors import KeelError

# data_source values written for the adapted datasets (the names verl's default reward dispatch uses)
GSM8K_SOURCE = "openai/gsm8k"
MATH500_SOURCE = "HuggingFaceH4/MATH-500"
TRL_SOURCE = "trl"
# TRL datasets name the answer column differently; tried in this order after data.answer_key
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "label", "target")
# appended to plain questions by write_verl_parquet, as verl's GSM8K / MATH preprocessing scripts do
BOXED_INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."


class DataFormat(str, Enum):
    VERL = "verl"
    TRL = "trl"
    GSM8K = "gsm8k"
    MATH500 = "math500"


@dataclass
class PromptRow:
    # a plain question (str) or chat messages [{"role": ..., "content": ...}, ...]
    prompt: str | list[dict]
    # the reference answer the reward compares against
    ground_truth: str
    # picks the "auto" reward (verl convention): "openai/gsm8k", "embedded/addition", ...
    data_source: str
    # verl's extra_info (index, split, level ...), passed to verl-style reward functions
    extra_info: dict = field(default_factory=dict)
    # every original column of the row, passed as keyword lists to TRL-style reward functions
    columns: dict = field(default_factory=dict)


class RowError(ValueError):
    """One malformed row; turned into a KeelError naming file and row (or counted when skipping)."""


# --------------------------------------------------------------------------- reading files


def _read_records(path: Path) -> list[tuple[int, Any]]:
    """(row number from 1, record) pairs; a record that is not valid JSON is a RowError instance."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise KeelError(f"data file '{path}' is not a readable Parquet file ({str(e).splitlines()[0]})") from None
        return list(enumerate(table.to_pylist(), start=1))
    if suffix in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise KeelError(f"data file '{path}' row {line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array rather than JSON lines
            try:
                return list(enumerate(json.loads(text), start=1))
            except json.JSONDecodeError as e:
                raise KeelError(f"data file '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((number, RowError(f"not valid JSON ({e.msg} at column {e.colno})")))
        return records
    raise KeelError(f"data file '{path}' has unknown extension '{path.suffix}' (expected .jsonl, .json or .parquet)")


def detect_format(columns: set[str], cfg: DataConfig) -> DataFormat:
    """Pick the row format from a file's column names (``data.format`` other than auto wins)."""
    if cfg.format != "auto":
        try:
            return DataFormat(cfg.format)
        except ValueError:
            valid = ", ".join(["auto"] + [f.value for f in DataFormat])
            raise KeelError(f"config key 'data.format' must be one of {valid}, got {cfg.format!r}") from None
    if cfg.prompt_key in columns and "reward_model" in columns:
        return DataFormat.VERL
    if "question" in columns and "answer" in columns:
        return DataFormat.GSM8K
    if "problem" in columns and "answer" in columns:
        return DataFormat.MATH500
    if cfg.prompt_key in columns:
        return DataFormat.TRL
    raise KeelError(
        f"cannot tell the row format from columns {sorted(columns)}: expected verl ({cfg.prompt_key} + reward_model), "
        f"gsm8k (question + answer), math500 (problem + answer) or trl ({cfg.prompt_key} + an answer column); "
        "set data.format or data.prompt_key"
    )


# --------------------------------------------------------------------------- row adapters


def _text(record: dict, key: str) -> str:
    if key not in record or record[key] is None:
        raise RowError(f"missing '{key}'")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"'{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _prompt(record: dict, key: str) -> str | list[dict]:
    """A plain string, or chat messages each with a string role and content."""
    if key not in record or record[key] is None:
        raise RowError(f"missing '{key}'")
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"'{key}' is empty")
        return value
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise RowError(f"'{key}' message {i} must be {{'role': str, 'content': str}}")
            messages.append({"role": message["role"], "content": message["content"]})
        return messages
    raise RowError(f"'{key}' must be a string or a non-empty list of chat messages, got {type(value).__name__}")


def gsm8k_gold(answer: str) -> str:
    """GSM8K gold: the text after the last ``####``, stripped, thousands separators removed ("1,450,000" -> "1450000")."""
    if "####" not in answer:
        raise RowError("'answer' has no '#### <gold>' line")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise RowError("'answer' has an empty '####' line")
    return gold


def _verl_row(record: dict, cfg: DataConfig) -> PromptRow:
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict):
        raise RowError("missing 'reward_model' (expected {'ground_truth': ...})")
    if reward_model.get("ground_truth") is None:
        raise RowError("missing 'reward_model.ground_truth'")
    ground_truth = reward_model["ground_truth"]
    if isinstance(ground_truth, (list, tuple)):  # some verl sets store several accepted answers; keep the first
        if not ground_truth:
            raise RowError("'reward_model.ground_truth' is an empty list")
        ground_truth = ground_truth[0]
    extra_info = record.get("extra_info") or {}
    if not isinstance(extra_info, dict):
        raise RowError(f"'extra_info' must be a mapping, got {type(extra_info).__name__}")
    return PromptRow(
        prompt=_prompt(record, cfg.prompt_key),
        ground_truth=str(ground_truth),
        data_source=str(record.get("data_source") or "unknown"),
        extra_info=dict(extra_info),
        columns=record,
    )


def _gsm8k_row(record: dict, index: int) -> PromptRow:
    question = _text(record, "question")
    return PromptRow(question, gsm8k_gold(_text(record, "answer")), GSM8K_SOURCE, {"index": index}, record)


def _math500_row(record: dict, index: int) -> PromptRow:
    extra = {"index": index}
    extra.update({k: record[k] for k in ("subject", "level", "unique_id") if k in record})
    return PromptRow(_text(record, "problem"), _text(record, "answer").strip(), MATH500_SOURCE, extra, record)


def _trl_row(record: dict, cfg: DataConfig, answer_key: str | None, index: int) -> PromptRow:
    ground_truth = _text(record, answer_key) if answer_key else ""
    source = record.get("data_source")
    return PromptRow(
        prompt=_prompt(record, cfg.prompt_key),
        ground_truth=ground_truth.strip(),
        data_source=str(source) if isinstance(source, str) and source else TRL_SOURCE,
        extra_info={"index": index},
        columns=record,
    )


def _trl_answer_key(columns: set[str], cfg: DataConfig) -> str | None:
    """data.answer_key if the file has it, else the first common answer column, else None (rewards see "")."""
    for key in (cfg.answer_key, *ANSWER_COLUMNS):
        if key in columns:
            return key
    return None


# --------------------------------------------------------------------------- public API


def load_rows(files: str | list[str], cfg: DataConfig) -> tuple[list[PromptRow], dict]:
    """Read every file into PromptRows -> (rows, {"rows": n, "skipped_invalid": k}).

    Raises KeelError for a missing file, an unknown extension, an unrecognised column set, or (unless
    ``cfg.skip_invalid``) a malformed row, naming the file and the row number.
    """
    paths = [files] if isinstance(files, (str, Path)) else list(files)
    if not paths:
        raise KeelError("no data files given")
    rows: list[PromptRow] = []
    skipped = 0
    for name in paths:
        path = Path(name)
        if path.is_dir():
            raise KeelError(f"data file '{path}' is a directory; name the .jsonl / .json / .parquet file(s) in it")
        if not path.is_file():
            raise KeelError(f"data file '{path}' does not exist")
        records = _read_records(path)
        if not records:
            raise KeelError(f"data file '{path}' is empty (no rows)")
        columns = set().union(*(r.keys() for _, r in records if isinstance(r, dict)))
        try:
            fmt = detect_format(columns, cfg)
        except KeelError as e:
            if cfg.format != "auto":  # a bad data.format value: the message names the key already
                raise
            raise KeelError(f"data file '{path}': {e}") from None
        answer_key = _trl_answer_key(columns, cfg) if fmt is DataFormat.TRL else None
        answers = [str(r.get("answer")) for _, r in records if isinstance(r, dict) and r.get("answer") is not None]
        if fmt is DataFormat.GSM8K and cfg.format == "auto" and not cfg.skip_invalid and answers and all(
                len(a.split()) == 1 and "####" not in a for a in answers):  # bare final answers, not solutions
            raise KeelError(f"data file '{path}': columns question + answer look like GSM8K, but no 'answer' has a "
                            "'#### <gold>' line; for plain answers (AIME style) name the question column 'problem', "
                            "or set data.format=trl data.prompt_key=question")
        for number, record in records:
            try:
                if isinstance(record, RowError):
                    raise record
                if not isinstance(record, dict):
                    raise RowError(f"must be an object with named fields, got {type(record).__name__}")
                if fmt is DataFormat.VERL:
                    row = _verl_row(record, cfg)
                elif fmt is DataFormat.GSM8K:
                    row = _gsm8k_row(record, number - 1)
                elif fmt is DataFormat.MATH500:
                    row = _math500_row(record, number - 1)
                else:
                    row = _trl_row(record, cfg, answer_key, number - 1)
            except RowError as e:
                if not cfg.skip_invalid:
                    raise KeelError(f"data file '{path}' row {number}: {e} (or set data.skip_invalid: true)") from None
                skipped += 1
                continue
            rows.append(row)
    if not rows:
        raise KeelError(f"data file(s) {', '.join(repr(str(p)) for p in paths)} hold no usable rows ({skipped} invalid)")
    return rows, {"rows": len(rows), "skipped_invalid": skipped}


def _messages_as_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def render_prompt(row: PromptRow, tokenizer: Any, cfg: DataConfig) -> str:
    """The exact text the policy is conditioned on.

    A plain question first goes through ``data.prompt_template`` ({question} is replaced; chat messages are
    used as they are). Then, when the tokenizer has a chat template and ``data.apply_chat_template`` is on,
    the messages are rendered with ``add_generation_prompt=True``; otherwise the plain text is used
    (the contents of chat messages joined by newlines).
    """
    if isinstance(row.prompt, str):
        text = cfg.prompt_template.replace("{question}", row.prompt)  # not str.format: LaTeX is full of braces
        messages = [{"role": "user", "content": text}]
    else:
        text, messages = None, row.prompt
    if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text if text is not None else _messages_as_text(messages)


def filter_by_length(rows: list[PromptRow], tokenizer: Any, cfg: DataConfig) -> tuple[list[PromptRow], list[str], int]:
    """Drop rows whose rendered prompt is longer than ``data.max_prompt_length`` tokens.

    Returns (kept rows, their rendered texts, number dropped). Token counts use
    ``tokenizer(texts, add_special_tokens=False)``: the chat template already wrote its special tokens.
    """
    texts = [render_prompt(row, tokenizer, cfg) for row in rows]
    if not texts:
        return [], [], 0
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [i for i, n in enumerate(lengths) if n <= cfg.max_prompt_length]
    return [rows[i] for i in kept], [texts[i] for i in kept], len(rows) - len(kept)


def write_verl_parquet(rows: list[PromptRow], path: str, data_source: str | None = None,
                       instruction: str = BOXED_INSTRUCTION) -> None:
    """Write rows in verl's RLHFDataset layout (what verl's gsm8k.py / math_dataset.py preprocessing writes).

    Columns: data_source, prompt (one user message: question + instruction; chat messages are kept as
    they are), ability "math", reward_model {"style": "rule", "ground_truth"}, extra_info (the row's, with
    "index"). ``data_source`` overrides each row's own.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise KeelError(f"write_verl_parquet('{path}'): no rows to write")
    records = []
    for index, row in enumerate(rows):
        prompt = [{"role": "user", "content": row.prompt + instruction}] if isinstance(row.prompt, str) else row.prompt
        records.append({
            "data_source": data_source or row.data_source,
            "prompt": prompt,
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row.ground_truth},
            "extra_info": {"index": index, **row.extra_info},
        })
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # e.g. extra_info values of mixed types across rows
        raise KeelError(f"write_verl_parquet('{path}'): rows do not form one table ({e})") from None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
