"""Supervised warm-start of the embedded model on worked addition solutions (`keel sft`).

GRPO only learns when some sampled answers are right and some are wrong, so the
random-init model is first taught the task's three solution styles — including
self-consistent slips — until it answers correctly only part of the time.

Loss: next-token cross-entropy on the solution tokens (+ EOS), prompt tokens masked.
The result is a normal Hugging Face directory (safetensors + tokenizer), cached: a
second call with the same settings returns it without training.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from keel.checkpoint import save_hf_model
from keel.config import KeelConfig, to_dict
from keel.modeling import LeanForward, build_embedded
from keel.tasks import TASK_ALPHABET, sft_example, split_problems

STAMP = "keel_sft.json"


def settings_key(cfg: KeelConfig) -> str:
    """What the warm-start depends on; a cached model is reused only if this matches."""
    payload = {"sft": to_dict(cfg.sft), "task": to_dict(cfg.task), "version": 1}
    payload["sft"].pop("output_dir")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_model_dir(cfg: KeelConfig) -> Path | None:
    out = Path(cfg.sft.output_dir)
    stamp = out / STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("key") == settings_key(cfg):
                return out
        except json.JSONDecodeError:
            return None
    return None


def run_sft(cfg: KeelConfig, log=print) -> Path:
    """Train (or reuse) the warm-start model; returns its directory."""
    cached = cached_model_dir(cfg)
    if cached is not None:
        log(f"warm-start model cached at {cached} (same settings); skipping SFT")
        return cached
    s = cfg.sft
    torch.manual_seed(s.seed)
    model, tokenizer = build_embedded(TASK_ALPHABET, seed=s.seed)
    lean = LeanForward(model)
    train, _ = split_problems(cfg.task)
    rng = random.Random(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, s.steps // 20)
    start = time.time()
    model.train()
    for step in range(1, s.steps + 1):
        lr = s.lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / s.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, targets = make_batch(tokenizer, [rng.choice(train) for _ in range(s.batch_size)], rng, s.slip_prob)
        logits = lean.forward(ids)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == s.steps:
            log(f"sft step {step}/{s.steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    save_model_dir(model, tokenizer, Path(s.output_dir), {"key": settings_key(cfg), "sft": to_dict(s)})
    log(f"warm-start model written to {s.output_dir}")
    return Path(s.output_dir)


def make_batch(tokenizer, problems, rng: random.Random, slip_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) inputs and next-token targets with prompt/pad positions = -100."""
    rows = []
    for p in problems:
        prompt, answer = sft_example(p, rng, slip_prob)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, answer_ids))
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a)
        ids[i, : len(seq)] = seq
        targets[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)  # position t predicts token t+1
    return ids, targets


def save_model_dir(model, tokenizer, out: Path, stamp: dict | None = None) -> None:
    """Write an HF model directory atomically; the cache stamp goes in last (no stamp = not reusable)."""
    save_hf_model(model, tokenizer, out)
    if stamp is not None:
        tmp = Path(out) / (STAMP + ".tmp")
        tmp.write_text(json.dumps(stamp, indent=1))
        tmp.replace(Path(out) / STAMP)
