"""Verdicts of `make gpu-check` that read files (one line each; exit 0 = PASS).

    gpu_check_report.py grpo RUN_DIR              3 finite GRPO steps in RUN_DIR/metrics.jsonl
    gpu_check_report.py scale SCALE.jsonl MATMUL.json   0.6B step: tokens/s and MFU vs the measured bf16 rate
"""
import json
import math
import sys


def grpo(run_dir: str) -> int:
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    if [r["step"] for r in rows] != [1, 2, 3]:
        print(f"steps logged: {[r['step'] for r in rows]} (want [1, 2, 3])")
        return 1
    for key in ("actor/entropy", "actor/pg_loss", "actor/grad_norm", "response_length/mean"):
        if not all(r.get(key) is not None and math.isfinite(r[key]) for r in rows):
            print(f"{key} is missing or not finite: {[r.get(key) for r in rows]}")
            return 1
    print(f"3 steps; gen tokens/s {[round(r['perf/gen_tokens_per_s']) for r in rows]}, "
          f"entropy {[round(r['actor/entropy'], 3) for r in rows]}")
    return 0


def scale(jsonl: str, matmul: str) -> int:
    row = [json.loads(line) for line in open(jsonl)][-1]
    peak = json.load(open(matmul))["bf16_matmul_flops_per_s"]
    print(f"R={row['R']} rows={row['rows']} mb={row['micro_batch']}: rollout {row['gen_tokens_per_s']:.0f} tok/s "
          f"(MFU {row['gen_flops_per_s'] / peak:.1%}), update {row['update_tokens_per_s']:.0f} tok/s "
          f"(MFU {row['update_flops_per_s'] / peak:.1%}), step {row['step_s']} s, peak {row['peak_gib']} GiB")
    return 0 if row["finite"] else 1


if __name__ == "__main__":
    kind, *paths = sys.argv[1:]
    raise SystemExit({"grpo": grpo, "scale": scale}[kind](*paths))
