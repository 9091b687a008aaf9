"""The FLOP formulas behind `make bench`'s MFU and work-floor columns, against hand-computed values."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("vs_trl", Path(__file__).parents[1] / "benchmarks" / "vs_trl.py")
vs_trl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_trl)  # stdlib imports only at module level: no TRL needed

# one layer, hidden 4, 2 heads of 2, MLP 8, vocab 5; the benchmark's batch is B=8 prompts x G=8
TINY = dict(C=4, layers=1, nh=2, nkv=2, hd=2, F=8, V=5)


def test_model_flops_per_step_by_hand():
    # per token: 2 * (q 4*4 + k,v 2*4*4 + o 4*4 + MLP 3*4*8) = 2 * 160 = 320
    # one sequence, P=2 prompt + L=3 completion tokens: 320*5 + attention 2*2*2*5*6 + head 2*4*5*3
    assert vs_trl.sequence_flops(TINY, 2, 3) == 320 * 5 + 240 + 120
    assert vs_trl.step_flops(TINY, 2, 3) == 5 * 64 * 1960  # rollout + reference + 3 for the update


def test_keel_work_counts_a_group_prompt_once_and_drops_the_last_token():
    # tokens per pass: 8 prompts * 2 + 64 rows * (3 - 1) = 144; attention over S = 4 positions per row
    per_pass = 320 * 144 + 64 * 2 * 2 * 2 * 4 * 5 + 64 * 2 * 4 * 5 * 3
    assert per_pass == 64000
    assert vs_trl.keel_work_flops(TINY, 2, 3) == 5 * per_pass


@pytest.mark.parametrize("size", ["1m", "20m"])
def test_keel_work_is_below_model_flops_at_benchmark_lengths(size):
    d = vs_trl.model_dims(size, vocab=17)
    work, model = vs_trl.keel_work_flops(d, 6, 25), vs_trl.step_flops(d, 6, 25)
    # 8*6 + 64*24 = 1584 token positions per pass instead of 64*31 = 1984
    assert 0.78 < work / model < 0.82
