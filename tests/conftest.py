import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def run_keel(args, cwd=None, timeout=600, env=None):
    """Run the real CLI in a subprocess: (returncode, stdout, stderr)."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=timeout, env=full_env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def sft_model() -> Path:
    """The demo's warm-start model (cached under .cache/keel; ~2-3 minutes to make on a fresh clone)."""
    code, out, err = run_keel(["sft", "configs/demo.yaml"], timeout=1200)
    assert code == 0, err[-2000:]
    return Path(out.strip().splitlines()[-1])
