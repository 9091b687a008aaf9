"""Keel's health monitor and entropy controllers inside a TRL ``GRPOTrainer`` run.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(..., logging_steps=1), ...)
    health = HealthCallback(trainer, rules="lablog", action="stop", control="band", run_dir="runs/trl")
    trainer.train()             # the callback registered itself; health.stopped says whether it stopped the run

Every logged step (TRL logs once per optimizer step with ``logging_steps=1``, which is required):

1. TRL's metric names become Keel's (verl's) names (:mod:`keel.integrations.names`);
2. Keel's :class:`keel.monitor.Monitor` judges the step with the rule set (``lablog``, ``embedded`` or a YAML file);
3. ``RUN_DIR/metrics.jsonl`` gets the step (mapped names, ``health/*`` codes, the coefficients used) and
   ``RUN_DIR/health.jsonl`` the verdict changes, so ``keel monitor RUN_DIR`` and ``keel report RUN_DIR`` read it
   as they read a Keel run (``RUN_DIR/config.yaml`` names the rule set);
4. ``action="stop"``: a bad overall verdict sets ``control.should_training_stop`` (TRL ends after this step);
5. ``control`` (a Keel controller, docs/control.md): its update sees the step's ``actor/entropy`` and, before every
   optimizer step, the callback writes the coefficients TRL's loss reads: ``trainer.entropy_coef`` and ``trainer.beta``.

TRL decides two things once, in ``GRPOTrainer.__init__`` (trl 1.16 ``grpo_trainer.py``), that a controller cannot undo
later, so they are errors here instead of silent no-ops:

* ``beta == 0`` at start: TRL loads no reference model (and never computes reference log-probs), so a controller that
  can raise the KL coefficient (``band``) needs ``beta > 0`` from the start;
* the entropy bonus is computed only when ``entropy_coef != 0`` or ``use_adaptive_entropy`` at start, so a controller
  needs ``entropy_coef > 0`` at start (its initial value); ``use_adaptive_entropy`` is TRL's own floor controller and
  would fight Keel's (use ``control="floor"`` instead: the same Skywork-OR1 rule, with Keel's bounds and logging).

Requires the ``trl`` extra (``pip install keel[trl]``); this module imports only ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.text import Text
from transformers import TrainerCallback

from keel.config import ControlConfig
from keel.control import ControllerType, make_controller
from keel.errors import KeelError
from keel.integrations.names import to_keel_names
from keel.monitor import BUILTIN_RULE_SETS, Monitor, load_rules, read_metrics
from keel.tracking import clean_value, console_line

ACTIONS = ("log", "stop")
# a logged dict is a training step's when it carries one of these (TRL's final summary log carries none)
STEP_KEYS = ("entropy", "reward", "completions/mean_length", "loss")


def _control_config(control: Any) -> ControlConfig | None:
    if control is None:
        return None
    if isinstance(control, ControlConfig):
        return control
    if isinstance(control, str):
        cfg = ControlConfig(type=control)
    elif isinstance(control, dict):
        names = {f.name for f in dataclasses.fields(ControlConfig)}
        unknown = sorted(set(control) - names)
        if unknown:
            raise KeelError(f"HealthCallback control: unknown key '{unknown[0]}' (valid: {', '.join(sorted(names))})")
        cfg = ControlConfig(**control)
    else:
        raise KeelError(f"HealthCallback control must be None, a controller name, a dict or a ControlConfig, "
                        f"got {type(control).__name__}")
    try:
        ControllerType(cfg.type)
    except ValueError:
        raise KeelError(f"HealthCallback control '{cfg.type}' is unknown "
                        f"(valid: {', '.join(t.value for t in ControllerType)})") from None
    return cfg


class HealthCallback(TrainerCallback):
    """Judge, log, stop and steer a TRL ``GRPOTrainer`` run with Keel's monitor and controllers (module docstring).

    Args:
        trainer: the ``trl.GRPOTrainer`` (the callback adds itself to it).
        rules: ``"lablog"`` | ``"embedded"`` | a rules YAML path (docs/health.md).
        action: ``"log"`` (verdicts only) or ``"stop"`` (a bad overall verdict ends training).
        control: None (TRL's coefficients stay as configured), a controller name (``"floor"``, ``"band"``, ``"fixed"``),
            a dict of ``keel.config.ControlConfig`` fields, or a ``ControlConfig``. Its bands are in nats of TRL's
            ``entropy`` (a token mean); Keel's defaults fit Keel's embedded task, pass your own ``low`` / ``high``.
        run_dir: where metrics.jsonl / health.jsonl / config.yaml go (default ``<output_dir>/keel``).
        vocab_size: V for rules written as fractions of ln V (default: the trainer's tokenizer length).
        echo: print one line per step (step, score, entropy, KL, coefficients, verdict) to stdout.
    Raises:
        KeelError: a setting that would make the callback a silent no-op (see the module docstring).
    """

    def __init__(self, trainer, rules: str = "lablog", action: str = "log", control: Any = None,
                 run_dir: str | Path | None = None, vocab_size: int | None = None, echo: bool = False):
        if action not in ACTIONS:
            raise KeelError(f"HealthCallback action '{action}' is unknown (valid: {', '.join(ACTIONS)})")
        args = trainer.args
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy != "steps" or args.logging_steps != 1:
            raise KeelError(f"HealthCallback judges every optimizer step: set GRPOConfig(logging_strategy='steps', "
                            f"logging_steps=1) (got logging_strategy={strategy!r}, logging_steps={args.logging_steps})")
        self.trainer, self.action, self.echo = trainer, action, echo
        if vocab_size is None and getattr(trainer, "processing_class", None) is not None:
            try:
                vocab_size = len(getattr(trainer.processing_class, "tokenizer", trainer.processing_class))
            except TypeError:
                vocab_size = None
        self.rules_spec = rules if rules in BUILTIN_RULE_SETS else str(Path(rules).resolve())
        self.rules = load_rules(self.rules_spec, vocab_size)
        self.vocab_size = vocab_size
        self.monitor = Monitor(self.rules)
        self.control_cfg = _control_config(control)
        self.controller = None
        if self.control_cfg is not None:
            self._check_trl_can_be_steered(trainer, self.control_cfg)
            self.controller = make_controller(self.control_cfg, float(trainer.entropy_coef), float(trainer.beta))
        self.run_dir = Path(run_dir) if run_dir is not None else Path(args.output_dir) / "keel"
        self.verdicts: list[tuple[int, str, str | None]] = []  # (step, overall, reason) per judged step
        self.stopped: dict | None = None  # {"step", "reason"} once action="stop" ended the run
        self.last_metrics: dict = {}  # the last judged step's row (Keel names)
        self._applied: tuple[float, float] = (float(trainer.entropy_coef), float(trainer.beta))
        trainer.add_callback(self)

    @staticmethod
    def _check_trl_can_be_steered(trainer, cfg: ControlConfig) -> None:
        kind = ControllerType(cfg.type)
        if getattr(trainer, "use_adaptive_entropy", False):
            raise KeelError(f"HealthCallback control='{kind.value}' and GRPOConfig(use_adaptive_entropy=True) would both "
                            "set trainer.entropy_coef; turn TRL's off (control='floor' is the same Skywork-OR1 rule)")
        enabled = getattr(trainer, "_entropy_bonus_enabled", trainer.entropy_coef != 0)
        if not enabled:
            raise KeelError(f"HealthCallback control='{kind.value}': TRL enables its entropy bonus only when "
                            "GRPOConfig.entropy_coef != 0 at start (got 0), so setting trainer.entropy_coef later "
                            "would do nothing; start with entropy_coef > 0 (e.g. 0.001: the controller's initial value)")
        if kind is ControllerType.BAND and trainer.beta == 0:
            raise KeelError("HealthCallback control='band' raises the KL coefficient when entropy is too high, but "
                            "GRPOConfig.beta is 0 at start, so TRL loaded no reference model; start with beta > 0 "
                            "(e.g. 0.001: the controller's base KL coefficient)")

    # ------------------------------------------------------------------ files

    def _write(self, name: str, rows: list[dict], mode: str = "a") -> None:
        with open(self.run_dir / name, mode, encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({k: clean_value(v) for k, v in row.items()}, allow_nan=False) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = {"trainer": {"name": "trl", "output_dir": str(args.output_dir)},
                  "monitor": {"rules": self.rules_spec, "action": self.action},
                  "control": dataclasses.asdict(self.control_cfg) if self.control_cfg else {"type": None}}
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        # a resumed run keeps its earlier steps and replays them, so streaks, trends and the controller continue
        metrics_file = self.run_dir / "metrics.jsonl"
        kept = [(s, m) for s, m in read_metrics(metrics_file) if s <= state.global_step] if (
            state.global_step > 0 and metrics_file.is_file()) else []
        self._write("metrics.jsonl", [{"step": s, **m} for s, m in kept], mode="w")
        if kept:
            health = [json.loads(line) for line in (self.run_dir / "health.jsonl").read_text().splitlines()
                      if line.strip()] if (self.run_dir / "health.jsonl").is_file() else []
            self._write("health.jsonl", [e for e in health if e.get("step", 0) <= state.global_step], mode="w")
        else:
            self._write("health.jsonl", [], mode="w")
        for s, m in kept:
            self.monitor.observe(s, m)
            if self.controller is not None:
                self.controller.update(s, m.get("actor/entropy"))

    def on_step_begin(self, args, state, control, **kwargs):
        """Write the controller's coefficients where TRL's loss reads them, before this optimizer step."""
        if self.controller is not None:
            entropy_coef, beta = self.controller.coefficients()
            self.trainer.entropy_coef = float(entropy_coef)
            self.trainer.beta = float(beta)
        self._applied = (float(self.trainer.entropy_coef), float(self.trainer.beta))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not any(k in logs for k in STEP_KEYS):
            return  # an eval or end-of-training summary log, not a training step
        step = int(state.global_step)
        row = to_keel_names({k: v for k, v in logs.items() if not k.startswith("eval_")})
        row.setdefault("actor/entropy_coeff", self._applied[0])  # TRL logs the one it used when its bonus is on
        row["actor/kl_coef"] = self._applied[1]
        verdict = self.monitor.observe(step, row)
        row.update(self.monitor.metrics(verdict))
        if self.controller is not None:
            self.controller.update(step, clean_value(row.get("actor/entropy")))
            row.update({k: v for k, v in self.controller.metrics().items() if k.startswith("control/")})
        self.verdicts.append((step, verdict.overall, verdict.reason))
        self.last_metrics = row
        if state.is_world_process_zero:
            self._write("metrics.jsonl", [{"step": step, **row}])
            self._write("health.jsonl", verdict.events)
            if self.echo:
                line = Text.from_markup(console_line(row, step)).plain
                print(line if verdict.reason is None else f"{line}  ({verdict.reason})", file=sys.stdout, flush=True)
        if verdict.overall == "bad" and self.action == "stop":
            control.should_training_stop = True
            self.stopped = {"step": step, "reason": verdict.reason}
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            import trl

            meta = {"trainer": "trl", "trl_version": trl.__version__, "last_step": state.global_step,
                    "stopped_by_health": self.stopped,
                    "first_warning_step": self.monitor.first_warning_step, "first_bad_step": self.monitor.first_bad_step}
            (self.run_dir / "meta.json").write_text(json.dumps(meta, indent=1))
