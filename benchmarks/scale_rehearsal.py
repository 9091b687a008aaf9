"""CPU rehearsal of the lab log's job: one GRPO step of a Qwen3-0.6B-shaped policy on MATH prompts.

    PYTHONPATH=src python benchmarks/scale_rehearsal.py --response-length 1024 --micro-batch 1

The policy is a random-initialised model with Qwen3-0.6B's exact shape (596,049,920 parameters: hidden
1024, 28 layers, 16 query / 8 KV heads, head_dim 128, MLP 3072, vocab 151,936, tied embeddings, rope
theta 1e6), the tokenizer is the real Qwen3 one (keel.qwen3_tokenizer), the prompts are the first of
../shared/data/math_l3to5_verl/train.parquet (rendered with the chat template, as training does), and the
run settings are configs/qwen3_0.6b_math_v3.yaml with only counts changed (prompts per step, group size,
mini-batch, response length, micro-batches) plus rollout.name=hf (Keel's sampler; the real job uses vLLM).
Responses are forced to exactly R tokens (EOS never stops a row), so every row is the worst case.

One step runs the trainer's own pieces in the trainer's order -- generate, reward, advantages, old and
reference log-probs, ppo_update (fp32 master weights + grads + fused AdamW, bf16 autocast, bf16 frozen
reference, activation checkpointing, chunked log-prob head) -- and prints, per phase, the seconds and the
peak resident memory of the process during that phase (Linux VmHWM, reset before each phase). A watchdog
stops the process (exit 3) if its resident memory passes --max-rss-gib.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from keel import actor, algorithms, rollout, trainer  # noqa: E402
from keel.config import load_config  # noqa: E402
from keel.modeling import LeanForward  # noqa: E402
from keel.qwen3_tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer  # noqa: E402
from keel.rewards import build_reward  # noqa: E402
from keel.tiny_models import build_model  # noqa: E402

CONFIG = REPO / "configs" / "qwen3_0.6b_math_v3.yaml"
GIB = 1024**3


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_gib() -> float:
    return _status_kib("VmHWM") * 1024 / GIB


def watchdog(limit_gib: float) -> None:
    def watch():
        while True:
            rss = _status_kib("VmRSS") * 1024 / GIB
            if rss > limit_gib:
                print(f"scale_rehearsal: resident memory {rss:.1f} GiB passed --max-rss-gib {limit_gib}; stopped",
                      flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--response-length", type=int, default=1024, help="R: every response is exactly R tokens")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per forward/backward (update and log-probs)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step (data.train_batch_size)")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (rollout.n)")
    p.add_argument("--mini-batch", type=int, default=1, help="prompts per update (ppo_mini_batch_size)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rss-gib", type=float, default=18.0)
    p.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--shape", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny"], help="tiny: a smoke test")
    p.add_argument("--device", default="cpu", help="cpu (peak = resident memory) or cuda (peak = allocated)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        watchdog(args.max_rss_gib)
    trainer.set_threads(args.threads)
    R, mb = args.response_length, args.micro_batch
    counts = [f"data.train_batch_size={args.prompts}", f"actor_rollout_ref.rollout.n={args.group}",
              f"actor_rollout_ref.actor.ppo_mini_batch_size={args.mini_batch}", f"data.max_response_length={R}",
              f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={mb}",
              f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={mb}",
              f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={mb}", "data.val_size=1",
              "actor_rollout_ref.actor.use_dynamic_bsz=false",
              "actor_rollout_ref.rollout.name=hf", f"trainer.device={device.type}", f"trainer.num_threads={args.threads}"]
    cfg = load_config(CONFIG, counts)
    cfg.data.train_files = str(REPO / cfg.data.train_files)
    cfg.data.val_files = str(REPO / cfg.data.val_files)
    a, r = cfg.actor, cfg.rollout
    phases: dict[str, dict] = {}

    def phase(name: str):
        class _Phase:
            def __enter__(self):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    reset_peak()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if cuda:
                    torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / GIB if cuda else peak_gib()
                phases[name] = {"s": round(time.perf_counter() - self.t0, 2), "peak_gib": round(peak, 2)}
                print(f"  {name:<14} {phases[name]['s']:>7.1f} s   peak RSS {phases[name]['peak_gib']:.2f} GiB",
                      flush=True)

        return _Phase()

    # ---- setup: policy (fp32 master weights), bf16 frozen reference, optimizer, prompts, reward
    with phase("setup"):
        tok = build_qwen3_tokenizer()
        with device:  # initialised where it lives (a 596M-parameter CPU init takes ~30 s)
            model = build_model(QWEN3_VOCAB_SIZE, tok.eos_token_id, tok.pad_token_id, args.shape,
                                seed=cfg.trainer.seed)
        model.config.use_cache = False
        model.to(device)
        n_params = sum(t.numel() for t in model.parameters())
        lean = LeanForward(model)
        actor.train_module(lean).checkpointing = cfg.model.enable_gradient_checkpointing
        ref = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
        ref_lean = LeanForward(ref)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.optim.lr, weight_decay=a.optim.weight_decay,
                                      betas=tuple(a.optim.betas), fused=True)
        train_rows, train_ids, _, _, _ = trainer.load_prompts(cfg, tok)
        reward_fn = build_reward(cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16")
    B, G = cfg.data.train_batch_size, r.n
    idx = trainer.step_prompts(len(train_rows), B, cfg.trainer.seed, 1)
    rows = [train_rows[i] for i in idx]
    gen = torch.Generator().manual_seed(cfg.trainer.seed)

    # ---- 1. generate (forced length: EOS id -1 never matches, every row decodes R tokens)
    with phase("gen"):
        model.eval()
        with autocast:
            out = rollout.generate(model, [train_ids[i] for i in idx], G, R, r.temperature, r.top_p, -1,
                                   tok.pad_token_id, gen, lean=lean)
        model.train()
    # ---- 2. reward, 3. advantages
    with phase("reward"):
        texts = tok.batch_decode(out.response_ids, skip_special_tokens=True)
        scores, _ = reward_fn([str(x.prompt) for x in rows for _ in range(G)], texts,
                              [x for x in rows for _ in range(G)], out.response_lengths)
        advantages = algorithms.get_adv_estimator(cfg.algorithm.adv_estimator)(
            torch.tensor(scores, dtype=torch.float32), G, norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo)
        if float(advantages.abs().max()) == 0:  # a random model scores 0 everywhere: give the update a signal
            advantages = torch.randn(len(scores), generator=gen)
    packed = actor.pack(out.prompt_ids, out.response_ids, tok.pad_token_id, device)
    advantages = advantages.to(device)
    # ---- 4. old and reference log-probs
    old = None  # as the trainer: one epoch of one mini-batch is on-policy (old log-probs == current ones)
    if a.ppo_epochs > 1 or B // a.ppo_mini_batch_size > 1:
        with phase("old_log_prob"), autocast:
            old = actor.compute_logprobs(model, lean, packed, r.temperature, a.entropy_chunk_size, False,
                                         *cfg.actor_rollout_ref.log_prob_batching("rollout"))[0]
    with phase("ref"), autocast:
        ref_logp = actor.compute_logprobs(ref, ref_lean, packed, r.temperature, a.entropy_chunk_size, False,
                                          *cfg.actor_rollout_ref.log_prob_batching("ref"))[0]
    # ---- 5. update: ppo_mini_batch_size prompts per optimizer step, micro-batches of mb rows
    loss_cfg = actor.LossConfig(a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c, a.loss_agg_mode, a.entropy_coeff,
                                a.kl_loss_coef, a.kl_loss_type, True, r.temperature, a.entropy_chunk_size,
                                norm_len=cfg.data.max_response_length)
    rows_per_mb, tokens_per_mb = cfg.actor_rollout_ref.update_batching()
    with phase("update_actor"):
        metrics, finite = trainer.ppo_update(
            model, lean, optimizer, packed, advantages, old, ref_logp, loss_cfg, group_ids=list(range(B)), n_groups=B,
            group_size=G, mini_batch_groups=a.ppo_mini_batch_size, ppo_epochs=a.ppo_epochs, seed=(cfg.trainer.seed, 1),
            lr=a.optim.lr, grad_clip=a.grad_clip, autocast=autocast, micro_batch_size=rows_per_mb,
            max_token_len=tokens_per_mb)
    tokens = int(packed.mask.sum())
    result = {
        "shape": args.shape, "R": R, "micro_batch": mb, "rows": B * G, "prompts": B, "mini_batch_rows": a.ppo_mini_batch_size * G,
        "updates": len(finite), "parameters": n_params, "threads": args.threads,
        "prompt_tokens_mean": round(sum(len(p) for p in out.prompt_ids) / len(out.prompt_ids), 1),
        "response_tokens": tokens, "finite": all(finite),
        "grad_norm": metrics.get("actor/grad_norm"), "phases": phases,
        "peak_gib": max(v["peak_gib"] for v in phases.values()),
        "step_s": round(sum(v["s"] for k, v in phases.items() if k != "setup"), 1),
        "gen_tokens_per_s": round(out.n_generated / phases["gen"]["s"], 1),
        "update_tokens_per_s": round(tokens * a.ppo_epochs / phases["update_actor"]["s"], 1),
        "checkpointing": cfg.model.enable_gradient_checkpointing, "entropy_chunk_size": a.entropy_chunk_size,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    # model FLOPs (PaLM appendix B): 2N per token forward (+ attention 4 L C T), x3 with backward
    n_layers, width = model.config.num_hidden_layers, model.config.num_attention_heads * model.config.head_dim
    ctx = result["prompt_tokens_mean"] + R / 2  # mean attended length
    fwd = 2 * n_params + 4 * n_layers * width * ctx
    result["gen_flops_per_s"] = fwd * result["gen_tokens_per_s"]
    # the update: forward (+ recompute when checkpointing) + backward for each token, plus the old and ref passes
    result["update_flops_per_s"] = fwd * (4 if cfg.model.enable_gradient_checkpointing else 3) * tokens * a.ppo_epochs \
        / phases["update_actor"]["s"]
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0 if all(finite) else 1


if __name__ == "__main__":
    raise SystemExit(main())
