"""TRL's GRPOTrainer with Keel's health checks: judged every step, steered by Keel's band controller, stopped when bad.

    make example-trl                      # installs the trl extra, then runs this (~2-3 min on 2 CPU cores)
    python examples/trl_health.py --steps 40 --out runs/trl_health

The model is a random-init ~0.9M-parameter Qwen3 with a character vocabulary (no download); the prompts are
Keel's embedded 2-digit additions; the reward is the share of digits in a completion (a dense signal even for
a random model). Two runs of the same setup at a high learning rate, where the policy collapses fast:

1. ``control=None, action="stop"``: TRL alone. Entropy falls through the rule set's floor and the callback stops
   the run on the bad verdict (``control.should_training_stop``);
2. ``control=band``: Keel's band controller sets ``trainer.entropy_coef`` / ``trainer.beta`` before every step.

Each step prints TRL's numbers under Keel's names and the verdict; at the end ``keel monitor`` judges both run
directories (the files a Keel run writes), and ``keel report RUN`` would plot them.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from keel.integrations.trl import HealthCallback
from keel.modeling import build_embedded
from keel.tasks import TASK_ALPHABET


def digit_share(prompts, completions, **kwargs):
    """Reward: the share of digits in a completion."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def build_model_dir(root: Path) -> tuple[Path, int]:
    model, tok = build_embedded(TASK_ALPHABET, 0, hidden=128, layers=4, heads=4, mlp=384)
    model.config.use_cache = True  # transformers' generate (TRL's sampler) wants the KV cache
    model.generation_config.use_cache = True
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root, len(tok)


def run(name: str, model_dir: Path, out: Path, steps: int, rules: Path, control) -> HealthCallback:
    args = GRPOConfig(output_dir=str(out / name / "trl"), per_device_train_batch_size=32, num_generations=8,
                      max_completion_length=16, temperature=1.0, top_k=0, beta=0.01, entropy_coef=0.001,
                      learning_rate=3e-3, lr_scheduler_type="constant", use_cpu=True, max_steps=steps,
                      logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    dataset = Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(10, 100, 3) for b in range(10, 100, 7)])
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=digit_share,
                          args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.remove_callback(PrinterCallback)  # the callback prints one line per step instead of TRL's dicts
    print(f"\n=== {name}: control={control and control['type']}, action=stop ===", flush=True)
    health = HealthCallback(trainer, rules=str(rules), action="stop", control=control, run_dir=out / name, echo=True)
    trainer.train()
    end = (f"stopped by Keel at step {health.stopped['step']}: {health.stopped['reason']}" if health.stopped
           else f"ran all {trainer.state.global_step} steps, last verdict {health.verdicts[-1][1]}")
    print(f"--> {name}: {end}", flush=True)
    return health


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="runs/trl_health")
    a = p.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, vocab = build_model_dir(Path(tempfile.mkdtemp(prefix="keel-trl-model-")))
    ln_v = math.log(vocab)
    # the health rules for this model, in nats: watch below 0.5 ln V, bad below 0.4 ln V for 3 steps in a row
    rules = out / "rules.yaml"
    rules.write_text(
        "- metric: actor/entropy\n"
        f"  good: [{0.5 * ln_v:.3f}, null]\n"
        f"  bad: [null, {0.4 * ln_v:.3f}]\n"
        "  patience: 3\n")
    band = {"type": "band", "low": round(0.5 * ln_v, 3), "high": round(0.8 * ln_v, 3), "ki": 0.1, "kp": 0.5,
            "max_entropy_coeff": 0.5}
    alone = run("trl_alone", model_dir, out, a.steps, rules, None)
    steered = run("trl_band", model_dir, out, a.steps, rules, band)
    for name in ("trl_alone", "trl_band"):
        subprocess.run([sys.executable, "-m", "keel", "monitor", str(out / name)], check=False)
    print(f"TRL alone: {'stopped at step ' + str(alone.stopped['step']) if alone.stopped else 'not stopped'}; "
          f"TRL + Keel band: {'stopped at step ' + str(steered.stopped['step']) if steered.stopped else 'not stopped'}, "
          f"last entropy {steered.last_metrics['actor/entropy']:.3f} nats (band {band['low']}-{band['high']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
