"""Where a Keel GRPO step spends its time, by kind of operator (torch.profiler over real trainer steps).

    python benchmarks/profile_step.py                      # 0.86M fp32, 1 thread, 5 profiled steps
    python benchmarks/profile_step.py --size 20m --steps 3

Runs ``keel.trainer.train`` with the benchmark's settings (benchmarks/vs_trl.py: 8 prompts x 8
completions, <= 32 tokens, k3 KL 0.04) on the same locally built model, profiles the steps after the
first, and prints milliseconds per step for each operator kind:

  * matmul: aten::mm / addmm / bmm / baddbmm (the FLOPs; their rate is bounded by the machine's peak),
  * attention: PyTorch's CPU flash-attention kernels, forward and backward,
  * other operators (norms, rotary, SiLU, gathers, sampling, optimizer, autograd bookkeeping),
  * python: time inside the step outside any operator (the interpreter, dispatch, the profiler's own
    cost).

The profiler adds a few microseconds per operator, so the shares matter more than the absolute
times. With ``--trl-s`` (TRL's seconds per step from a ``make bench`` run; read from
benchmarks/results.json when present) it also prints the time budget a 3x speed-up would leave and
how the matmuls alone compare with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vs_trl  # noqa: E402  (same model, prompts, reward and settings as the side-by-side benchmark)

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def kind_of(op: str) -> str:
    if op.startswith("ProfilerStep"):  # the step's own span: Python and framework time between operators
        return "python"
    if op in MATMUL:
        return "matmul"
    if "scaled_dot_product" in op and op.startswith("aten::_"):
        return "attention"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1m", choices=sorted(vs_trl.SIZES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after one unprofiled warm-up step)")
    p.add_argument("--top", type=int, default=12, help="operators listed by self time")
    p.add_argument("--trl-s", type=float, default=None, help="TRL's s/step for the 3x budget (default: results.json)")
    a = p.parse_args()

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import keel.trainer as kt
    from keel.config import load_config

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="keel-profile-"))
    model_dir, n_params = vs_trl.build_model_dir(a.size, root)
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=a.steps),
                   acc_events=True)
    stamps: list[float] = []

    class SteppingTracker(kt.Tracker):  # one profiler step per trainer step (metrics are logged once a step)
        def log(self, metrics, step):
            stamps.append(time.perf_counter())
            super().log(metrics, step)
            prof.step()

    kt.Tracker = SteppingTracker
    opts = argparse.Namespace(model_dir=model_dir, dtype=a.dtype, warmup=1, steps=a.steps, threads=1, seed=0)
    cfg = load_config(None, vs_trl.keel_overrides(opts, root / "run"))
    with prof:
        kt.train(cfg, log=lambda *x, **k: None, progress=False)
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # profiled steps, profiler overhead included

    by_kind: dict[str, float] = {}
    ops = prof.key_averages()
    for e in ops:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e3 / a.steps
    total = sum(by_kind.values())
    print(f"Keel GRPO step, {a.size} ({n_params / 1e6:.2f}M params), {a.dtype}, 1 thread, "
          f"{a.steps} profiled steps: {step_s * 1e3:.0f} ms/step under the profiler")
    print("| operator kind | ms/step | share |\n|---|---|---|")
    for kind in ("matmul", "attention", "other", "python"):
        print(f"| {kind} | {by_kind.get(kind, 0.0):.1f} | {by_kind.get(kind, 0.0) / total:.0%} |")
    print(f"\nTop {a.top} operators by self time:\n| operator | ms/step | calls/step |\n|---|---|---|")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: a.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / a.steps:.1f} | {e.count / a.steps:.0f} |")

    trl_s = a.trl_s
    results = HERE / "results.json"
    if trl_s is None and results.is_file():
        variant = json.loads(results.read_text()).get(a.size, {}).get("variants", {}).get(f"{a.dtype}/1t")
        trl_s = variant and variant["trl_s_per_step"]
    if trl_s:
        budget = trl_s / 3 * 1e3
        mm = by_kind.get("matmul", 0.0)
        print(f"\n3x TRL ({trl_s:.3f} s/step) leaves {budget:.0f} ms per step; Keel's matmuls alone take "
              f"{mm:.0f} ms of it ({mm / total:.0%} of the profiled operator time).")


if __name__ == "__main__":
    main()
