"""Held-out evaluation: mean@k and pass@k of sampled answers.

For each problem draw k completions at the given temperature and score them with
the run's reward; a completion is correct when its score is > 0 (the same split as
the ``pos``/``neg`` metrics). ``mean@k`` is the share of correct completions over all
k·n (the expected accuracy of one sample); ``pass@k`` is the share of problems with
at least one correct completion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from keel import rollout


def sample_and_score(model, lean, tokenizer, prompt_ids: list[list[int]], rows, reward_fn, k: int,
                     max_new_tokens: int, temperature: float, top_p: float, seed: int,
                     batch_size: int = 64) -> tuple[list[list[float]], list[list[str]]]:
    """k scored completions per prompt (lists of k floats / texts, in prompt order)."""
    generator = torch.Generator().manual_seed(seed)
    scores, texts = [], []
    per_batch = max(1, batch_size // k)
    for s in range(0, len(prompt_ids), per_batch):
        chunk = prompt_ids[s : s + per_batch]
        chunk_rows = rows[s : s + per_batch]
        out = rollout.generate(model, chunk, max(k, 1), max_new_tokens, temperature, top_p,
                               tokenizer.eos_token_id, tokenizer.pad_token_id, generator, lean=lean)
        completions = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        prompts = tokenizer.batch_decode(out.prompt_ids, skip_special_tokens=True)
        row_per_completion = [r for r in chunk_rows for _ in range(k)]
        got, _ = reward_fn(prompts, completions, row_per_completion, out.response_lengths)
        for i in range(len(chunk)):
            scores.append(list(got[i * k : (i + 1) * k]))
            texts.append(completions[i * k : (i + 1) * k])
    return scores, texts


def evaluate(model, lean, tokenizer, prompt_ids, rows, reward_fn, k: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, out_file: str | Path | None = None) -> dict:
    """mean@k / pass@k over the given problems; per-problem results optionally written as JSONL."""
    was_training = model.training
    model.eval()
    scores, texts = sample_and_score(model, lean, tokenizer, prompt_ids, rows, reward_fn, k, max_new_tokens,
                                     temperature, top_p, seed)
    if was_training:
        model.train()
    n = len(scores)
    correct = [[s > 0 for s in row] for row in scores]
    mean_at_k = sum(sum(row) for row in correct) / max(1, n * k)
    pass_at_k = sum(any(row) for row in correct) / max(1, n)
    mean_score = sum(sum(row) for row in scores) / max(1, n * k)
    result = {f"mean@{k}": mean_at_k, f"pass@{k}": pass_at_k, "mean_score": mean_score, "n": n, "k": k,
              "temperature": temperature}
    if out_file is not None:
        path = Path(out_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w") as f:
            for row, sc, tx in zip(rows, scores, texts):
                f.write(json.dumps({"ground_truth": row.ground_truth, "scores": sc, "completions": tx}) + "\n")
        tmp.replace(path)
    return result
