"""End to end on real math data: a tiny random Qwen3 saved locally, verl parquet prompts, math-verify."""
import json

import pyarrow.parquet as pq
import pytest

from conftest import run_keel
from keel.config import DataConfig
from keel.data import load_rows, write_verl_parquet

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["trainer.logger=[jsonl]", "trainer.total_training_steps=2", "data.train_batch_size=2",
              "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.n=2",
              "data.max_response_length=12", "data.val_size=4", "trainer.val_before_train=false",
              "data.max_prompt_length=256", "reward.functions=[{name: math_verify, weight: 1.0}]"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("tiny") / "model"
    code, stdout, err = run_keel(["tiny-model", str(out), "--data", str(shared_data / "gsm8k" / "test.jsonl")])
    assert code == 0, err
    return out


def _check_run(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["critic/score/mean"] <= 1.0
        assert r["reward/math_verify/mean"] == r["critic/score/mean"]
        assert r["actor/entropy"] > 0 and r["response_length/mean"] <= 12
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert json.loads((run_dir / "eval.json").read_text())["n_heldout"] == 4


def test_gsm8k_converted_to_verl_parquet_trains(tiny_dir, shared_data, tmp_path):
    rows, _ = load_rows(str(shared_data / "gsm8k" / "train.jsonl"), DataConfig())
    parquet = tmp_path / "gsm8k_train.parquet"
    write_verl_parquet(rows[:64], str(parquet))
    table = pq.read_table(parquet).to_pylist()
    assert table[0]["prompt"][0]["role"] == "user" and table[0]["reward_model"]["ground_truth"] == rows[0].ground_truth
    run_dir = tmp_path / "run"
    code, out, err = run_keel(["train", "configs/demo.yaml", f"actor_rollout_ref.model.path={tiny_dir}",
                               f"data.train_files={parquet}", f"data.val_files={parquet}",
                               f"trainer.run_dir={run_dir}", *TRAIN_ARGS])
    assert code == 0, err[-2000:]
    _check_run(run_dir)


def test_math_training_parquet_trains(tiny_dir, shared_data, tmp_path):
    parquet = shared_data / "math_l3to5_verl" / "train.parquet"
    run_dir = tmp_path / "run"
    code, out, err = run_keel(["train", "configs/demo.yaml", f"actor_rollout_ref.model.path={tiny_dir}",
                               f"data.train_files={parquet}",
                               f"data.val_files={shared_data / 'math_l3to5_verl' / 'math500_test.parquet'}",
                               f"trainer.run_dir={run_dir}", *TRAIN_ARGS])
    assert code == 0, err[-2000:]
    _check_run(run_dir)
    # long MATH prompts over data.max_prompt_length are dropped and counted, not silently kept
    first = json.loads(open(run_dir / "metrics.jsonl").readline())
    assert first["data/dropped_overlong_prompts"] > 0


def test_eval_reports_mean_and_pass_at_k_on_gsm8k(tiny_dir, shared_data, tmp_path):
    out_file = tmp_path / "per_problem.jsonl"
    code, out, err = run_keel(["eval", str(tiny_dir), "--config", "configs/demo.yaml", "--data",
                               str(shared_data / "gsm8k" / "test.jsonl"), "--n", "6", "--k", "3",
                               "--out", str(out_file), "data.max_response_length=8", "data.max_prompt_length=512",
                               "reward.functions=[{name: math_verify, weight: 1.0}]"])
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 6 and result["k"] == 3
    assert 0.0 <= result["mean@3"] <= result["pass@3"] <= 1.0
    lines = [json.loads(line) for line in open(out_file)]
    assert len(lines) == 6 and all(len(x["scores"]) == 3 for x in lines)
    assert lines[0]["ground_truth"] == "18"  # GSM8K test row 0: Janet's ducks
