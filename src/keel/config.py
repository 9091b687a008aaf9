"""Typed run configuration: YAML file + dotted ``key=value`` overrides.

Key names and nesting follow verl (``actor_rollout_ref.actor.entropy_coeff``,
``data.train_batch_size``, ``trainer.total_training_steps`` ...) so that a verl
user can carry a config over. Keel's own sections are ``task`` (the embedded
arithmetic task), ``reward``, ``monitor`` and ``control``.

Every bad key or value raises :class:`keel.errors.KeelError` with one line that
names the key, e.g. ``config key 'actor_rollout_ref.actor.entropy_coef' is
unknown (did you mean 'entropy_coeff'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from keel.errors import KeelError

EMBEDDED = "embedded"  # model.path / data.train_files value selecting the built-in tiny default


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    # prompt files (JSONL or Parquet; verl, TRL, GSM8K or MATH-500 rows), or "embedded" for the built-in task
    train_files: Any = EMBEDDED
    # held-out files used by validation / `keel eval`; "embedded" = the task's held-out split
    val_files: Any = EMBEDDED
    # row format: auto | verl | trl | gsm8k | math500 (auto looks at the columns)
    format: str = "auto"
    # column holding the prompt (string or chat messages)
    prompt_key: str = "prompt"
    # column holding the answer for TRL-style rows (verl rows use reward_model.ground_truth)
    answer_key: str = "answer"
    # template applied to plain-text questions before the chat template; {question} is replaced
    prompt_template: str = "{question}"
    # apply the tokenizer's chat template when it has one
    apply_chat_template: bool = True
    # prompts longer than this (tokens) are dropped, and the drop is counted and reported
    max_prompt_length: int = 512
    # generation stops after this many tokens (counted in response_length/clip_ratio)
    max_response_length: int = 64
    # prompts per training step (each gets actor_rollout_ref.rollout.n completions)
    train_batch_size: int = 16
    # held-out prompts used for validation accuracy (0 = all)
    val_size: int = 256
    # skip malformed rows (counted) instead of stopping with an error naming file and row
    skip_invalid: bool = False


@dataclass
class TaskConfig:
    # the embedded verifiable task: "addition" (two numbers, worked column trace) or "multiplication"
    # (a task.digits-digit number times one digit 2-9, worked digit-by-digit trace with carries)
    name: str = "addition"
    # digits per operand (multiplication: of the first operand)
    digits: int = 2
    # seed of the problem generator; train and held-out splits never overlap
    seed: int = 1234
    # number of held-out problems (disjoint from training problems)
    n_heldout: int = 256


@dataclass
class ModelConfig:
    # local Hugging Face model directory, or "embedded" (tiny Qwen3 built from a config, random init)
    path: str = EMBEDDED
    # tokenizer directory (defaults to model.path)
    tokenizer_path: str | None = None
    # parameter dtype for rollout and training: float32 | bfloat16 (bf16 autocast, fp32 master weights)
    dtype: str = "float32"
    # recompute each decoder layer in backward (torch.utils.checkpoint): activation memory of one layer plus an
    # (M, C) residual per layer, for ~1/3 more update compute
    enable_gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    # AdamW learning rate
    lr: float = 2e-4
    # AdamW weight decay
    weight_decay: float = 0.0
    # AdamW betas
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # linear warm-up steps for the learning rate
    lr_warmup_steps: int = 0


@dataclass
class PolicyLossConfig:
    """verl's ``actor.policy_loss`` (losses in keel/algorithms.py; docs/control.md "Entropy-preserving losses")."""

    # vanilla (PPO clip) | clip_cov | kl_cov (Cui et al. 2025, arXiv 2505.22617)
    loss_mode: str = "vanilla"
    # clip_cov: share of response tokens whose gradient is detached, drawn from lb < cov < ub
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    # kl_cov: share of response tokens (largest covariance) given the |log-ratio| penalty, and its weight
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 1.0
    # TRL's top_entropy_quantile rho: only the top-rho share of response tokens by entropy in the policy loss (1 = all)
    top_entropy_quantile: float = 1.0


@dataclass
class FSDPConfig:
    # FSDP2 (strategy fsdp2) on GPUs: keep parameter shards (and their gradients) in CPU memory (CPUOffloadPolicy)
    param_offload: bool = False
    # ... and run the optimizer step there (FSDP2 offloads both together: either key turns it on)
    optimizer_offload: bool = False


@dataclass
class LogProbConfig:
    """Micro-batches of a no-grad log-prob pass (verl's ``rollout.*`` / ``ref.*`` log_prob keys)."""

    # rows per forward; null = the whole batch (or the token budget below)
    log_prob_micro_batch_size_per_gpu: int | None = None
    # token-budget micro-batches; null = actor_rollout_ref.actor.use_dynamic_bsz
    log_prob_use_dynamic_bsz: bool | None = None
    # tokens per forward with the budget; null = actor_rollout_ref.actor.ppo_max_token_len_per_gpu
    log_prob_max_token_len_per_gpu: int | None = None


@dataclass
class ActorConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    # prompts per optimizer step (each brings rollout.n completions); train_batch_size / this = updates per epoch
    ppo_mini_batch_size: int = 8
    # passes over each rollout batch
    ppo_epochs: int = 1
    # PPO clip range; clip_ratio_low / clip_ratio_high default to it
    clip_ratio: float = 0.2
    # lower clip: ratio >= 1 - clip_ratio_low
    clip_ratio_low: float | None = None
    # upper clip (clip-higher, DAPO): ratio <= 1 + clip_ratio_high
    clip_ratio_high: float | None = None
    # dual-clip bound for negative advantages (must be > 1)
    clip_ratio_c: float = 3.0
    # entropy bonus coefficient: loss -= entropy_coeff * agg(H)
    entropy_coeff: float = 0.0
    # add the KL-to-reference loss (the reference model is only loaded when this is on and kl_loss_coef > 0)
    use_kl_loss: bool = True
    # KL loss coefficient: loss += kl_loss_coef * agg(KL)
    kl_loss_coef: float = 0.001
    # k1 | k2 (mse) | k3 (low_var_kl) | abs
    kl_loss_type: str = "low_var_kl"
    # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_agg_mode: str = "token-mean"
    # seq-mean-token-sum-norm's constant divisor F: loss = sum(l*m) / F (None: data.max_response_length, as verl)
    loss_scale_factor: int | None = None
    # max gradient norm (<= 0 disables clipping)
    grad_clip: float = 1.0
    # rows of logits turned into entropies at once (bounds fp32 memory)
    entropy_chunk_size: int = 4096
    # the policy-gradient term: loss_mode and its knobs
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    # data-parallel engine for N processes: ddp (DistributedDataParallel) | fsdp2 (torch fully_shard: parameters,
    # gradients and optimizer state sharded over the ranks)
    strategy: str = "ddp"
    # rows per forward/backward in the update (gradient accumulation, same update); null = the whole mini-batch
    ppo_micro_batch_size_per_gpu: int | None = None
    # token-budget micro-batches instead: rows are packed while prompt+response tokens <= ppo_max_token_len_per_gpu
    # (also the log-prob passes' default); peak memory then follows the budget, not the batch
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 16384
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class ValKwargs:
    """How held-out problems are answered (verl's ``rollout.val_kwargs``). Keel's default samples at the
    rollout temperature (the demo's figures); ``do_sample: false`` is verl's default, greedy decoding."""

    # false = greedy (argmax) decoding; temperature and top_p are then ignored
    do_sample: bool = True
    # sampling temperature for evaluation (default: actor_rollout_ref.rollout.temperature)
    temperature: float | None = None
    # nucleus sampling for evaluation (default: actor_rollout_ref.rollout.top_p)
    top_p: float | None = None
    # answers per problem; the accuracy is mean@n (their mean correctness)
    n: int = 1


@dataclass
class RolloutConfig:
    # hf (Keel's KV-cached sampler) | vllm
    name: str = "hf"
    # completions per prompt (the GRPO group size, >= 2)
    n: int = 8
    # sampling temperature (also divides logits for log-probs and entropy)
    temperature: float = 1.0
    # nucleus sampling
    top_p: float = 1.0
    # vLLM: fraction of GPU memory for the engine
    gpu_memory_utilization: float = 0.5
    # vLLM on CPU: KV-cache bytes (small keeps it laptop-friendly)
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    # held-out evaluation: sampled or greedy, answers per problem
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    # old log-prob pass (off-policy updates): rows or tokens per forward (see LogProbConfig)
    log_prob_micro_batch_size_per_gpu: int | None = None
    log_prob_use_dynamic_bsz: bool | None = None
    log_prob_max_token_len_per_gpu: int | None = None

    def val_sampling(self) -> tuple[float, float, int]:
        """(temperature, top_p, n) of held-out evaluation; temperature 0 = greedy."""
        v = self.val_kwargs
        if not v.do_sample:
            return 0.0, 1.0, v.n
        return (self.temperature if v.temperature is None else v.temperature,
                self.top_p if v.top_p is None else v.top_p, v.n)


@dataclass
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # the frozen reference policy's log-prob pass
    ref: LogProbConfig = field(default_factory=LogProbConfig)

    def log_prob_batching(self, part: str) -> tuple[int, int]:
        """(rows, tokens) per forward of the `part` ("rollout" | "ref") log-prob pass; 0 = unbounded."""
        c, a = getattr(self, part), self.actor
        dynamic = a.use_dynamic_bsz if c.log_prob_use_dynamic_bsz is None else c.log_prob_use_dynamic_bsz
        if dynamic:
            return 0, c.log_prob_max_token_len_per_gpu or a.ppo_max_token_len_per_gpu
        return c.log_prob_micro_batch_size_per_gpu or 0, 0

    def update_batching(self) -> tuple[int, int]:
        """(rows, tokens) per forward/backward of the update; 0 = unbounded."""
        a = self.actor
        return (0, a.ppo_max_token_len_per_gpu) if a.use_dynamic_bsz else (a.ppo_micro_batch_size_per_gpu or 0, 0)


@dataclass
class AlgorithmConfig:
    # advantage estimator (registry in keel.algorithms): grpo
    adv_estimator: str = "grpo"
    # divide group-centred rewards by the group std (GRPO); false = Dr.GRPO
    norm_adv_by_std_in_grpo: bool = True


@dataclass
class RewardConfig:
    # reward functions: names from keel.rewards' registry ("arithmetic", "math_verify", "format", ...),
    # "module.path:function" or "file.py:function"; each entry {name, weight, kwargs}
    functions: list = field(default_factory=lambda: [{"name": "auto", "weight": 1.0}])
    # score given to a sample whose reward function raised (counted in reward/errors)
    error_score: float = 0.0
    # stop the run (exit 2) when a function failed on every sample of this many batches in a row: it is
    # broken (a typo, a missing column), not unlucky, and its all-equal scores teach nothing (0 = never)
    max_failed_batches: int = 3
    # DAPO overlong buffer: penalise responses in the last `overlong_buffer_len` tokens (0 = off)
    overlong_buffer_len: int = 0
    # maximal overlong penalty
    overlong_penalty_factor: float = 1.0
    # seconds allowed for one math-verify call
    timeout_s: float = 5.0
    # seconds one reward function may take to score a whole batch (a custom function's calls, or all of a batch's
    # math-verify calls); the samples left unscored score 0 and count in reward/timeouts
    batch_timeout_s: float = 60.0


@dataclass
class CustomRewardFunctionConfig:
    # verl's custom_reward_function: a .py file (or module) and the function name
    path: str | None = None
    name: str = "compute_score"


@dataclass
class MonitorConfig:
    # rule set: "embedded", "lablog" (the Qwen3 lab-log table), or a YAML file of rules
    rules: str = "embedded"
    # extra rules appended to the rule set (same schema as the YAML file's entries)
    extra_rules: list = field(default_factory=list)
    # what a bad overall verdict does: log | stop | rollback
    action: str = "log"
    # rollbacks allowed before the run stops (action: rollback)
    max_rollbacks: int = 3


@dataclass
class ControlConfig:
    # entropy controller: fixed | floor | band | dual (equations in keel/control.py and docs/control.md)
    type: str = "fixed"
    # floor: the entropy target (nats); the bonus applies only below it (default: the embedded band's centre)
    target_entropy: float = 0.12
    # band: keep actor/entropy inside [low, high] (nats). The defaults fit the embedded task (warm start
    # ~0.15 nats/token); pick them per task from a short run's entropy (docs/control.md)
    low: float = 0.10
    high: float = 0.15
    # floor: per-step change of entropy_coeff (Skywork-OR1 uses 0.005)
    delta: float = 0.005
    # band: integral gain (coefficient units per step per unit of log-entropy error)
    ki: float = 0.05
    # band: proportional gain on the change of that error (velocity form)
    kp: float = 0.3
    # band: EMA smoothing of entropy (0 = none; higher = smoother but slower)
    ema: float = 0.5
    # band: share of the band (in log-entropy, around its centre) where the error counts as 0, so a policy well
    # inside is left alone: 0 = always pull toward the centre, 0.6 = act only in the outer 20 % at each edge
    deadband: float = 0.0
    # band: inside that dead zone entropy_coeff decays by this factor per step (1 = keeps the bonus that got it there)
    deadband_decay: float = 1.0
    # band: steps ahead the smoothed log-slope is extrapolated (reacts to a fast fall before the band is left)
    horizon: float = 2.0
    # band: while predicted entropy is above `high` the bonus is off, entropy_coeff halves each step, and (when the
    # first step's entropy, i.e. the reference's, is <= high) kl_coef <- max(kl_coef * (1 + kl_gain), base + kl_step)
    kl_gain: float = 0.5
    kl_step: float = 0.01
    # band: otherwise kl_coef relaxes toward its base (the configured kl_loss_coef) by this factor per step
    kl_decay: float = 0.9
    # bounds on the coefficients a controller may set
    min_entropy_coeff: float = 0.0
    max_entropy_coeff: float = 0.3
    min_kl_coef: float = 0.0
    max_kl_coef: float = 1.0
    # steps before the floor/band controllers move the coefficients
    warmup_steps: int = 0
    # dual: the entropy band is [rel_low, rel_high] x H_0, H_0 = the first step's entropy (the reference policy's),
    # so no number of it is task-specific; the band PI gains (ki, kp, ema, horizon, deadband) apply as for band
    rel_low: float = 0.5
    rel_high: float = 1.5
    # dual: share of the band (log scale, around its centre) where the entropy error counts as 0: the wide
    # relative band is a range to stay inside, not a setpoint (0.6 = act only in the outer 20 % at each edge)
    rel_deadband: float = 0.6
    # dual: inside the entropy dead zone entropy_coeff relaxes toward the configured value by this factor per step
    entropy_relax: float = 0.9
    # dual: the KL budget, nats/token of actor/kl_loss, held by a PID Lagrangian multiplier on e = KL / kl_target - 1:
    # kl_coef = clip(k_base + kl_kp * e + I + kl_kd * max(0, e - e_prev), k_base, max_kl_coef),  I += kl_ki * e (I >= 0)
    kl_target: float = 0.1
    kl_kp: float = 0.1
    kl_ki: float = 0.02
    kl_kd: float = 0.1
    # dual: the smallest kl_coef; the configured kl_loss_coef is never undercut (a budget is a ceiling on the KL,
    # so the anchor is only ever raised above the user's)
    kl_floor: float = 0.001
    # monitor.action=rollback: after a collapse (low) rollback entropy_coeff <- max(2c, c + this)
    rollback_entropy_step: float = 0.05
    # after an over-random / KL-high (high) rollback kl_coef <- max(2k, k + this), and entropy_coeff halves
    # (embedded task, lr 2e-4: +0.05 and +0.11 did not hold the KL, +0.5 did; docs/control.md)
    rollback_kl_step: float = 0.5


@dataclass
class TrainerConfig:
    # name used by trackers (verl convention)
    project_name: str = "keel"
    experiment_name: str = "demo"
    # run directories are created under this folder
    default_local_dir: str = "runs"
    # exact run directory (overrides default_local_dir/experiment_name-timestamp)
    run_dir: str | None = None
    # training steps (one rollout batch each)
    total_training_steps: int = 80
    # any of console, jsonl, tensorboard, wandb, mlflow (jsonl is always written)
    logger: list = field(default_factory=lambda: ["console", "jsonl"])
    # checkpoint every N steps (-1 = only at the end / on stop)
    save_freq: int = -1
    # checkpoints kept
    max_ckpt_to_keep: int = 2
    # validate every N steps (-1 = only before and after)
    test_freq: int = -1
    # validate before the first step
    val_before_train: bool = True
    # seed of everything random (sampling, prompt order, init)
    seed: int = 1
    # torch intra-op threads (1 is fastest on a loaded 2-core machine; 0 = torch's default)
    num_threads: int = 1
    # device: cpu | cuda | auto
    device: str = "auto"
    # non-finite updates in a row that stop the run
    max_nonfinite_in_row: int = 5
    # keep an in-memory copy of the weights + optimizer state before each update, so an update that makes the
    # weights non-finite is undone exactly (costs 3x the fp32 weights with AdamW); false: such an update stops the
    # run (exit 4) and the last periodic checkpoint is the last finite state
    keep_last_finite: bool = True
    # resume: disable | auto (continue from the latest complete checkpoint in run_dir)
    resume: str = "disable"
    # completions written to samples.jsonl every step
    n_samples_logged: int = 4


@dataclass
class SFTConfig:
    # warm-start steps on the embedded task's worked solutions
    steps: int = 400
    # sequences per step
    batch_size: int = 64
    lr: float = 1e-3
    # probability that a worked column contains a self-consistent +-1 slip (keeps the model imperfect)
    slip_prob: float = 0.15
    # where `keel sft` writes the warm-started model (reused when it was made with the same settings)
    output_dir: str = ".cache/keel/sft-addition"
    # seed of model init and example order
    seed: int = 0


@dataclass
class KeelConfig:
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    # short handles used all over the loop
    @property
    def actor(self) -> ActorConfig:
        return self.actor_rollout_ref.actor

    @property
    def rollout(self) -> RolloutConfig:
        return self.actor_rollout_ref.rollout

    @property
    def model(self) -> ModelConfig:
        return self.actor_rollout_ref.model


# --------------------------------------------------------------------------- loading


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(options))})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotation; raise KeelError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except KeelError:
                pass
        raise KeelError(f"config key '{key}' must be {' or '.join(a.__name__ for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise KeelError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise KeelError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # .inf / .nan are never a usable setting
            raise KeelError(f"config key '{key}' must be a finite number, got {value!r}")
        if number is not None:
            return number
        raise KeelError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise KeelError(f"config key '{key}' must be a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise KeelError(f"config key '{key}' must be a list, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise KeelError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise KeelError(f"config key '{prefix}{key}' is unknown{_suggest(str(key), names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value)."""
    if "=" not in text:
        raise KeelError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise KeelError(f"override '{text}': value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KeelError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path, empty_ok: bool = True) -> dict:
    path = Path(path)
    if path.is_dir():
        raise KeelError(f"config file '{path}' is a directory, not a YAML file")
    if not path.is_file():
        raise KeelError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise KeelError(f"config file '{path}' is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KeelError(f"config file '{path}'{where}: malformed YAML ({problem})") from None
    if raw is None and not empty_ok:  # a user who names a file expects its settings, not every default
        raise KeelError(f"config file '{path}' is empty (no settings); give a config with its sections, "
                        "e.g. configs/demo.yaml")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise KeelError(f"config file '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KeelConfig:
    """Read YAML (optional), apply dotted overrides, validate keys, types and ranges."""
    raw = read_yaml(path, empty_ok=False) if path is not None else {}
    raw.pop("defaults", None)  # tolerated for Hydra-style files
    raw = apply_overrides(raw, list(overrides or []))
    cfg = _build(KeelConfig, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> KeelConfig:
    cfg = _build(KeelConfig, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise KeelError(message)


def validate(cfg: KeelConfig) -> None:
    a, r, d, t = cfg.actor, cfg.rollout, cfg.data, cfg.trainer
    _check(r.n >= 2, f"config key 'actor_rollout_ref.rollout.n' must be >= 2 (GRPO needs a group), got {r.n}")
    _check(a.entropy_coeff >= 0, f"config key 'actor_rollout_ref.actor.entropy_coeff' must be >= 0, got {a.entropy_coeff}")
    _check(a.kl_loss_coef >= 0, f"config key 'actor_rollout_ref.actor.kl_loss_coef' must be >= 0, got {a.kl_loss_coef}")
    _check(a.optim.lr > 0, f"config key 'actor_rollout_ref.actor.optim.lr' must be > 0, got {a.optim.lr}")
    _check(a.loss_scale_factor is None or a.loss_scale_factor > 0,
           f"config key 'actor_rollout_ref.actor.loss_scale_factor' must be > 0 or null, got {a.loss_scale_factor}")
    _check(a.clip_ratio_c > 1, f"config key 'actor_rollout_ref.actor.clip_ratio_c' must be > 1, got {a.clip_ratio_c}")
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high"):
        v = getattr(a, name)
        _check(v is None or v >= 0, f"config key 'actor_rollout_ref.actor.{name}' must be >= 0, got {v}")
    pl = a.policy_loss
    _check(0 < pl.clip_cov_ratio <= 1 and 0 < pl.kl_cov_ratio <= 1,
           "config keys 'actor_rollout_ref.actor.policy_loss.clip_cov_ratio' / 'kl_cov_ratio' must be in (0, 1]")
    _check(pl.clip_cov_lb < pl.clip_cov_ub, "config key 'actor_rollout_ref.actor.policy_loss.clip_cov_lb' must be < clip_cov_ub")
    _check(pl.ppo_kl_coef >= 0, f"config key 'actor_rollout_ref.actor.policy_loss.ppo_kl_coef' must be >= 0, got {pl.ppo_kl_coef}")
    _check(0 < pl.top_entropy_quantile <= 1, "config key 'actor_rollout_ref.actor.policy_loss.top_entropy_quantile' "
           f"must be in (0, 1], got {pl.top_entropy_quantile}")
    _check(a.ppo_epochs >= 1, f"config key 'actor_rollout_ref.actor.ppo_epochs' must be >= 1, got {a.ppo_epochs}")
    _check(a.ppo_mini_batch_size >= 1, "config key 'actor_rollout_ref.actor.ppo_mini_batch_size' must be >= 1")
    _check(
        d.train_batch_size % a.ppo_mini_batch_size == 0,
        f"config key 'data.train_batch_size' ({d.train_batch_size}) must be a multiple of "
        f"'actor_rollout_ref.actor.ppo_mini_batch_size' ({a.ppo_mini_batch_size})",
    )
    for key, v in (("actor.ppo_micro_batch_size_per_gpu", a.ppo_micro_batch_size_per_gpu),
                   ("actor.ppo_max_token_len_per_gpu", a.ppo_max_token_len_per_gpu),
                   ("rollout.log_prob_micro_batch_size_per_gpu", r.log_prob_micro_batch_size_per_gpu),
                   ("rollout.log_prob_max_token_len_per_gpu", r.log_prob_max_token_len_per_gpu),
                   ("ref.log_prob_micro_batch_size_per_gpu", cfg.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu),
                   ("ref.log_prob_max_token_len_per_gpu", cfg.actor_rollout_ref.ref.log_prob_max_token_len_per_gpu)):
        _check(v is None or v >= 1, f"config key 'actor_rollout_ref.{key}' must be >= 1, got {v}")
    _check(a.strategy in ("ddp", "fsdp2"),
           f"config key 'actor_rollout_ref.actor.strategy' must be ddp or fsdp2, got {a.strategy!r}")
    _check(r.temperature > 0, f"config key 'actor_rollout_ref.rollout.temperature' must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, f"config key 'actor_rollout_ref.rollout.top_p' must be in (0, 1], got {r.top_p}")
    _check(cfg.reward.max_failed_batches >= 0,
           f"config key 'reward.max_failed_batches' must be >= 0, got {cfg.reward.max_failed_batches}")
    v = r.val_kwargs
    _check(v.n >= 1, f"config key 'actor_rollout_ref.rollout.val_kwargs.n' must be >= 1, got {v.n}")
    _check(v.temperature is None or v.temperature > 0,
           f"config key 'actor_rollout_ref.rollout.val_kwargs.temperature' must be > 0 (greedy: do_sample=false), "
           f"got {v.temperature}")
    _check(v.top_p is None or 0 < v.top_p <= 1,
           f"config key 'actor_rollout_ref.rollout.val_kwargs.top_p' must be in (0, 1], got {v.top_p}")
    _check(r.name in ("hf", "vllm"), f"config key 'actor_rollout_ref.rollout.name' must be hf or vllm, got {r.name!r}")
    _check(d.max_response_length >= 1, "config key 'data.max_response_length' must be >= 1")
    _check(d.train_batch_size >= 1, "config key 'data.train_batch_size' must be >= 1")
    _check(t.total_training_steps >= 0, "config key 'trainer.total_training_steps' must be >= 0")
    _check(t.resume in ("disable", "auto"), f"config key 'trainer.resume' must be disable or auto, got {t.resume!r}")
    _check(
        cfg.model.dtype in ("float32", "bfloat16"),
        f"config key 'actor_rollout_ref.model.dtype' must be float32 or bfloat16, got {cfg.model.dtype!r}",
    )
    _check(cfg.monitor.action in ("log", "stop", "rollback"), f"config key 'monitor.action' must be log, stop or rollback, got {cfg.monitor.action!r}")
    _check(cfg.control.type in ("fixed", "floor", "band", "dual"),
           f"config key 'control.type' must be fixed, floor, band or dual, got {cfg.control.type!r}")
    _check(0 < cfg.control.rel_low < 1 < cfg.control.rel_high,
           f"config keys 'control.rel_low' / 'control.rel_high' must satisfy 0 < rel_low < 1 < rel_high, "
           f"got {cfg.control.rel_low} / {cfg.control.rel_high}")
    _check(0 <= cfg.control.rel_deadband < 1,
           f"config key 'control.rel_deadband' must be in [0, 1), got {cfg.control.rel_deadband}")
    _check(cfg.control.kl_target > 0 and cfg.control.kl_floor >= 0,
           "config keys 'control.kl_target' must be > 0 and 'control.kl_floor' >= 0")
    _check(min(cfg.control.kl_kp, cfg.control.kl_ki, cfg.control.kl_kd) >= 0 and 0 <= cfg.control.entropy_relax <= 1,
           "config keys 'control.kl_kp', 'control.kl_ki', 'control.kl_kd' must be >= 0 and 'control.entropy_relax' in [0, 1]")
    _check(cfg.control.type != "dual" or cfg.actor_rollout_ref.actor.use_kl_loss,
           "config key 'control.type' is dual, which adapts the KL loss: set actor_rollout_ref.actor.use_kl_loss=true")
    _check(cfg.control.low < cfg.control.high, "config keys 'control.low' must be < 'control.high'")
    _check(cfg.control.low > 0, f"config key 'control.low' must be > 0 (entropy in nats), got {cfg.control.low}")
    _check(0 < cfg.control.deadband_decay <= 1,
           f"config key 'control.deadband_decay' must be in (0, 1], got {cfg.control.deadband_decay}")
    _check(0 <= cfg.control.deadband < 1, f"config key 'control.deadband' must be in [0, 1), got {cfg.control.deadband}")
    _validate_ranges(cfg)
    bad = [x for x in t.logger if x not in ("console", "jsonl", "tensorboard", "wandb", "mlflow")]
    _check(not bad, f"config key 'trainer.logger' has unknown logger(s) {bad}; valid: console, jsonl, tensorboard, wandb, mlflow")
    # names of estimators / losses are checked against their registries where they are looked up


def _validate_ranges(cfg: KeelConfig) -> None:
    """Ranges of the numeric keys the checks above do not cover: all of them are checked before the first step."""
    a, r, d, t, rw, c = cfg.actor, cfg.rollout, cfg.data, cfg.trainer, cfg.reward, cfg.control
    o = a.optim
    betas = o.betas
    _check(len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                   for b in betas),
           f"config key 'actor_rollout_ref.actor.optim.betas' must be two numbers in [0, 1), got {betas!r}")
    ranges = [  # (key, value, lowest allowed, lowest is allowed itself)
        ("actor_rollout_ref.actor.optim.weight_decay", o.weight_decay, 0, True),
        ("actor_rollout_ref.actor.optim.lr_warmup_steps", o.lr_warmup_steps, 0, True),
        ("actor_rollout_ref.actor.entropy_chunk_size", a.entropy_chunk_size, 1, True),
        ("actor_rollout_ref.rollout.gpu_memory_utilization", r.gpu_memory_utilization, 0, False),
        ("actor_rollout_ref.rollout.kv_cache_memory_bytes", r.kv_cache_memory_bytes, 1, True),
        ("data.max_prompt_length", d.max_prompt_length, 1, True),
        ("data.val_size", d.val_size, 0, True),
        ("task.digits", cfg.task.digits, 1, True),
        ("task.n_heldout", cfg.task.n_heldout, 1, True),
        ("reward.overlong_buffer_len", rw.overlong_buffer_len, 0, True),
        ("reward.overlong_penalty_factor", rw.overlong_penalty_factor, 0, True),
        ("reward.timeout_s", rw.timeout_s, 0, False),
        ("reward.batch_timeout_s", rw.batch_timeout_s, 0, False),
        ("monitor.max_rollbacks", cfg.monitor.max_rollbacks, 0, True),
        ("trainer.max_ckpt_to_keep", t.max_ckpt_to_keep, 1, True),
        ("trainer.max_nonfinite_in_row", t.max_nonfinite_in_row, 1, True),
        ("trainer.num_threads", t.num_threads, 0, True),
        ("trainer.n_samples_logged", t.n_samples_logged, 0, True),
        ("sft.steps", cfg.sft.steps, 0, True),
        ("sft.batch_size", cfg.sft.batch_size, 1, True),
        ("sft.lr", cfg.sft.lr, 0, False),
        ("sft.slip_prob", cfg.sft.slip_prob, 0, True),
    ]
    ranges += [(f"control.{k}", getattr(c, k), 0, True) for k in (
        "target_entropy", "delta", "ki", "kp", "ema", "horizon", "kl_gain", "kl_step", "kl_decay", "min_entropy_coeff",
        "max_entropy_coeff", "min_kl_coef", "max_kl_coef", "warmup_steps", "rollback_entropy_step", "rollback_kl_step")]
    for key, value, low, closed in ranges:
        ok = value >= low if closed else value > low
        _check(ok, f"config key '{key}' must be {'>=' if closed else '>'} {low}, got {value}")
    for key, value in (("actor_rollout_ref.rollout.gpu_memory_utilization", r.gpu_memory_utilization),
                       ("sft.slip_prob", cfg.sft.slip_prob), ("control.ema", c.ema), ("control.kl_decay", c.kl_decay)):
        _check(value <= 1, f"config key '{key}' must be <= 1, got {value}")
    _check(c.min_entropy_coeff <= c.max_entropy_coeff,
           "config keys 'control.min_entropy_coeff' must be <= 'control.max_entropy_coeff'")
    _check(c.min_kl_coef <= c.max_kl_coef, "config keys 'control.min_kl_coef' must be <= 'control.max_kl_coef'")
    device = t.device
    _check(device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit()),
           f"config key 'trainer.device' must be cpu, cuda, cuda:<index> or auto, got {device!r}")
