"""keel.integrations.trl: a real trl.GRPOTrainer on a tiny random Qwen3 on CPU, stopped and steered by Keel."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from keel.errors import KeelError  # noqa: E402
from keel.integrations.trl import HealthCallback  # noqa: E402
from keel.modeling import build_embedded  # noqa: E402
from keel.tasks import TASK_ALPHABET  # noqa: E402

torch.set_num_threads(1)


def digit_share(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_embedded(TASK_ALPHABET, 0, hidden=32, layers=1, heads=2, mlp=64)
    model.config.use_cache = True
    model.generation_config.use_cache = True
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_trainer(model_dir, tmp_path, steps=4, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
              max_completion_length=6, temperature=1.0, top_k=0, beta=0.0, learning_rate=1e-4, use_cpu=True,
              max_steps=steps, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
              dataloader_num_workers=0)
    kw.update(overrides)
    dataset = Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(10, 20) for b in range(10, 14)])
    return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=digit_share,
                       args=GRPOConfig(**kw), train_dataset=dataset,
                       processing_class=AutoTokenizer.from_pretrained(model_dir))


def test_bad_verdict_stops_trl_and_keel_monitor_reads_the_run(model_dir, tmp_path):
    rules = tmp_path / "rules.yaml"  # every completion is at most 6 tokens: bad after 2 steps in a row
    rules.write_text("- metric: response_length/mean\n  good: [100, null]\n  bad: [null, 50]\n  patience: 2\n")
    trainer = make_trainer(model_dir, tmp_path, steps=6)
    health = HealthCallback(trainer, rules=str(rules), action="stop", run_dir=tmp_path / "run")
    trainer.train()
    assert trainer.state.global_step == 2  # stopped after the second bad step, not at max_steps=6
    assert health.stopped["step"] == 2 and "response_length/mean" in health.stopped["reason"]
    assert [v[1] for v in health.verdicts] == ["watch", "bad"]  # patience 2: watch first
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("actor/entropy", "critic/score/mean", "response_length/mean", "reward/digit_share/mean",
                "batch/valid", "actor/grad_norm"):
        assert isinstance(rows[0][key], float), key
    assert 0 < rows[0]["response_length/mean"] <= 6 and [r["health/overall"] for r in rows] == [1, 2]
    events = [json.loads(line) for line in open(tmp_path / "run" / "health.jsonl")]
    assert {"step": 2, "rule": "overall", "verdict": "bad"}.items() <= events[-1].items()
    out = subprocess.run([sys.executable, "-m", "keel", "monitor", str(tmp_path / "run"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["overall"], summary["first_bad_step"], summary["steps"]) == ("bad", 2, 2)
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["stopped_by_health"]["step"] == 2
    from keel.report import write_report

    report = write_report([str(tmp_path / "run")]).with_suffix(".md").read_text()
    assert "| response_length/mean | good ≥ 100, bad < 50.0, patience 2 | 6 @2 | bad |" in report


def test_floor_controller_sets_the_entropy_coef_trl_uses(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, steps=3, entropy_coef=0.01)
    # target far above any entropy: the floor rule raises the coefficient by delta after every step
    health = HealthCallback(trainer, rules="lablog", control={"type": "floor", "target_entropy": 100.0, "delta": 0.02},
                            run_dir=tmp_path / "run")
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # actor/entropy_coeff is TRL's own logged entropy_coef: the value its loss multiplied the entropy by
    assert [round(r["actor/entropy_coeff"], 6) for r in rows] == [0.01, 0.03, 0.05]
    assert trainer.entropy_coef == pytest.approx(0.05) and health.controller.entropy_coeff == pytest.approx(0.07)
    assert all(r["control/entropy_low"] == 100.0 for r in rows)


@pytest.mark.parametrize("overrides, control, message", [
    ({"beta": 0.0, "entropy_coef": 0.01}, "band", "GRPOConfig.beta is 0 at start, so TRL loaded no reference model"),
    ({"entropy_coef": 0.0}, "floor", "TRL enables its entropy bonus only when GRPOConfig.entropy_coef != 0 at start"),
    ({"entropy_coef": 0.01, "use_adaptive_entropy": True}, "floor", "would both set trainer.entropy_coef"),
    ({"logging_steps": 2}, None, "set GRPOConfig(logging_strategy='steps', logging_steps=1)"),
])
def test_settings_that_would_be_silent_no_ops_are_errors(model_dir, tmp_path, overrides, control, message):
    trainer = make_trainer(model_dir, tmp_path, steps=1, **overrides)
    with pytest.raises(KeelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HealthCallback(trainer, rules="lablog", control=control)
