"""The GRPO recipe: generate -> reward -> advantage -> loss -> update -> judge -> log.

Shapes: B prompts per step (data.train_batch_size), G completions per prompt
(actor_rollout_ref.rollout.n), N = B*G rows, R longest response.

Everything random in step t is drawn from generators seeded by (trainer.seed, t), so
a run resumed from a checkpoint of step s replays steps s+1.. exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from keel import actor, algorithms, checkpoint, distributed, metrics, rollout
from keel.config import EMBEDDED, KeelConfig, to_dict
from keel.control import make_controller
from keel.distributed import Dist, init_from_env
from keel.data import PromptRow, filter_by_length, load_rows
from keel.errors import KeelError
from keel.evaluate import evaluate
from keel.modeling import LeanForward, build_embedded, count_parameters, load_model_and_tokenizer
from keel.monitor import Monitor, load_rules
from keel.nonfinite import LastFinite, weights_finite
from keel.rewards import build_reward
from keel.tasks import TASK_ALPHABET, split_problems
from keel.tracking import Tracker, flatten


# --------------------------------------------------------------------------- setup


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    lean: LeanForward | None
    device: torch.device


def set_threads(n: int) -> None:
    """On a 2-core machine oversubscription is deadly: use exactly n intra-op threads."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KeelError("config key 'trainer.device' is cuda but no CUDA device is available")
    return torch.device(name)


def load_policy(cfg: KeelConfig, device: torch.device) -> Policy:
    if cfg.model.path == EMBEDDED:
        model, tokenizer = build_embedded(TASK_ALPHABET, seed=cfg.trainer.seed)
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model.path, cfg.model.tokenizer_path, cfg.model.dtype)
    model.to(device)
    model.config.use_cache = False
    lean = LeanForward(model) if LeanForward.supports(model) else None
    return Policy(model, tokenizer, lean, device)


def embedded_rows(problems) -> list[PromptRow]:
    return [PromptRow(p.prompt, str(p.answer), p.data_source, {}, {}) for p in problems]


def load_prompts(cfg: KeelConfig, tokenizer) -> tuple[list, list, list, list, dict]:
    """(train rows, train prompt ids, val rows, val prompt ids, stats)."""
    stats: dict = {}
    train_split, held_split = (split_problems(cfg.task) if EMBEDDED in (cfg.data.train_files, cfg.data.val_files)
                               else ([], []))
    splits = []
    for split, files, embedded in (("train", cfg.data.train_files, train_split), ("val", cfg.data.val_files, held_split)):
        if files == EMBEDDED:
            rows = embedded_rows(embedded)
            texts = [r.prompt for r in rows]
            dropped = 0
        else:
            rows, st = load_rows(files, cfg.data)
            stats.update({f"data/{split}/{k}": v for k, v in st.items()})
            rows, texts, dropped = filter_by_length(rows, tokenizer, cfg.data)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        splits.append((rows, ids, dropped))
    (train_rows, train_ids, train_dropped), (val_rows, val_ids, _) = splits
    if not train_rows:
        raise KeelError(f"data.train_files {cfg.data.train_files!r}: no usable prompts (all {train_dropped} are longer "
                        f"than data.max_prompt_length={cfg.data.max_prompt_length} tokens)")
    if cfg.data.val_size and len(val_rows) > cfg.data.val_size:
        val_rows, val_ids = val_rows[: cfg.data.val_size], val_ids[: cfg.data.val_size]
    stats["data/dropped_overlong_prompts"] = train_dropped
    return train_rows, train_ids, val_rows, val_ids, stats


def make_run_dir(cfg: KeelConfig) -> Path:
    t = cfg.trainer
    if t.run_dir and Path(t.run_dir).exists() and not Path(t.run_dir).is_dir():
        raise KeelError(f"config key 'trainer.run_dir' ('{t.run_dir}') is an existing file, not a directory")
    if t.run_dir:
        return Path(t.run_dir)
    root = Path(t.default_local_dir)
    if t.resume == "auto":  # continue the newest run of this experiment
        previous = sorted(root.glob(f"{t.experiment_name}-*"))
        if previous:
            return previous[-1]
    return root / f"{t.experiment_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_metadata(cfg: KeelConfig, policy: Policy) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import transformers

    from keel import __version__

    return {
        "keel_version": __version__, "git_commit": commit, "seed": cfg.trainer.seed, "argv": sys.argv,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "hardware": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": str(policy.device),
                     "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(0) if policy.device.type == "cuda" else None},
        "model": {"path": cfg.model.path, "parameters": count_parameters(policy.model),
                  "vocab_size": len(policy.tokenizer), "lean_forward": policy.lean is not None},
        "start_time": datetime.now(timezone.utc).isoformat(),
    }


def step_prompts(n_rows: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Indices of the prompts of step `step` (1-based): epoch-wise shuffles derived from the seed."""
    start = (step - 1) * batch
    idx = []
    while len(idx) < batch:
        epoch, offset = divmod(start + len(idx), n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        idx.extend(perm[offset : offset + batch - len(idx)].tolist())
    return np.array(idx)


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop lines of steps > after_step (they will be replayed after a resume or rollback)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything from here on is gone
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def append_jsonl(path: Path, records: list[dict]) -> None:
    if records:
        with open(path, "a") as f:
            for r in records:
                f.write(json.dumps(metrics.clean_for_json(r)) + "\n")


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    run_dir: Path
    eval: dict
    stopped: str | None = None  # reason, when the monitor or the non-finite guard stopped the run
    exit_code: int = 0


def config_changes(saved_path: Path, cfg: KeelConfig) -> list[str]:
    """'key: old -> new' for every leaf that differs between a run's saved config.yaml and cfg."""
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        return [f"{saved_path} is unreadable"]
    old, new = flatten(saved), flatten(to_dict(cfg))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def check_resumed_state(saved: dict, ckpt: checkpoint.Checkpoint, controller=None) -> dict:
    """The trainer section of a checkpoint's state.json, its contents checked (a hash only proves it is unchanged
    since the manifest was written, not that it is a state this trainer wrote)."""
    where = f"checkpoint {ckpt.path}: state.json"
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("trainer", "controller", "monitor")):
        raise KeelError(f"{where} must hold 'trainer', 'controller' and 'monitor' objects; was it edited?")
    st = saved["trainer"]

    def count(key: str, low: int = 0) -> bool:
        v = st.get(key, 0)
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if st.get("step") != ckpt.step or not count("step"):
        raise KeelError(f"{where} 'trainer.step' is {st.get('step')!r} but the checkpoint is of step {ckpt.step}; "
                        "was it edited?")
    for key in ("nonfinite_skips", "nonfinite_in_row", "rollbacks"):
        if not count(key):
            raise KeelError(f"{where} 'trainer.{key}' must be an integer >= 0, got {st.get(key)!r}; was it edited?")
    good = st.get("last_good_ckpt_step")
    if good is not None and not (isinstance(good, int) and not isinstance(good, bool) and 0 <= good <= ckpt.step):
        raise KeelError(f"{where} 'trainer.last_good_ckpt_step' must be null or a step <= {ckpt.step}, got {good!r}")
    before = st.get("eval_before")
    if before is not None and not isinstance(before, dict):
        raise KeelError(f"{where} 'trainer.eval_before' must be null or an object, got {before!r}; was it edited?")
    current = vars(controller) if controller is not None else {}
    for key, value in saved["controller"].items():  # numbers stay finite numbers (coefficients, integrators)
        if isinstance(current.get(key), (int, float)) and not isinstance(current.get(key), bool) and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise KeelError(f"{where} 'controller.{key}' must be a finite number, got {value!r}; was it edited?")
    mon = saved["monitor"]
    verdicts = ("good", "watch", "bad")
    if mon.get("overall", "good") not in verdicts or not all(v in verdicts for v in (mon.get("prev") or {}).values()) \
            or not all(isinstance(v, int) and v >= 0 for v in (mon.get("streak") or {}).values()):
        raise KeelError(f"{where} 'monitor' holds verdicts other than good/watch/bad or negative streaks; was it edited?")
    return st


def train(cfg: KeelConfig, log=print, progress: bool = True) -> TrainResult:
    a, r, t = cfg.actor, cfg.rollout, cfg.trainer
    set_threads(t.num_threads)
    d = init_from_env()  # a single process unless launched by torchrun
    main = d.is_main  # rank 0 writes files, logs and checkpoints
    device = pick_device(t.device)
    policy = load_policy(cfg, device)
    model, tok, lean = policy.model, policy.tokenizer, policy.lean
    train_rows, train_ids, val_rows, val_ids, data_stats = load_prompts(cfg, tok)
    reward_fn = build_reward(cfg)
    B, G = cfg.data.train_batch_size, r.n
    if B > len(train_rows):
        raise KeelError(f"config key 'data.train_batch_size' ({B}) exceeds the {len(train_rows)} training prompts")
    controller = make_controller(cfg.control, a.entropy_coeff, a.kl_loss_coef if a.use_kl_loss else 0.0)
    # the reference policy is only needed if a KL term can ever be non-zero
    needs_ref = a.use_kl_loss and (a.kl_loss_coef > 0 or cfg.control.type in ("band", "dual") or cfg.monitor.action == "rollback")
    # frozen: under bf16 autocast its weights are stored in bf16 (half the memory, the same matmul inputs)
    ref_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    ref_model = copy.deepcopy(model).to(ref_dtype).eval().requires_grad_(False) if needs_ref else None
    ref_lean = LeanForward(ref_model) if (ref_model is not None and lean is not None) else None
    # FSDP2 keeps shards only: the sampler, evaluation and saving use a plain copy refreshed from them
    sharded = d.enabled and a.strategy == "fsdp2"
    plain_copy = distributed.PlainCopy(model, LeanForward if lean is not None else None) if sharded else None
    if sharded and (t.resume == "auto" or cfg.monitor.action == "rollback"):
        raise KeelError("trainer.resume=auto and monitor.action=rollback load checkpoints, which strategy fsdp2 "
                        "does not do yet (set actor_rollout_ref.actor.strategy=ddp)")

    def whole() -> tuple:
        """(model, lean) with whole weights (FSDP2: the refreshed plain copy; every rank calls this)."""
        return plain_copy.refresh(model) if plain_copy is not None else (model, lean)

    if lean is not None:  # the training forward as a module, under the data-parallel engine (after the ref copy)
        actor.train_module(lean).checkpointing = cfg.model.enable_gradient_checkpointing
        lean.module = distributed.wrap(lean.module, a.strategy, d,
                                       offload=a.fsdp_config.param_offload or a.fsdp_config.optimizer_offload)
    elif d.enabled:
        raise KeelError(f"model type {model.config.model_type!r}: data-parallel training needs the lean forward "
                        "(Llama-family models)")
    # fused: one kernel for all parameters (20.5M: optimizer step 103 -> 26 ms on one CPU thread)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.optim.lr, weight_decay=a.optim.weight_decay,
                                  betas=tuple(a.optim.betas), fused=True)
    rules = load_rules(cfg.monitor.rules, vocab_size=len(tok), extra=cfg.monitor.extra_rules)
    monitor = Monitor(rules)
    loss_cfg = actor.LossConfig(a.clip_ratio_low if a.clip_ratio_low is not None else a.clip_ratio,
                                a.clip_ratio_high if a.clip_ratio_high is not None else a.clip_ratio,
                                a.clip_ratio_c, a.loss_agg_mode, a.entropy_coeff, a.kl_loss_coef, a.kl_loss_type,
                                ref_model is not None, r.temperature, a.entropy_chunk_size,
                                norm_len=a.loss_scale_factor or cfg.data.max_response_length,
                                policy_loss=a.policy_loss)
    algorithms.get_loss_agg_mode(a.loss_agg_mode), algorithms.get_kl_type(a.kl_loss_type)  # fail early on bad names
    algorithms.get_policy_loss(a.policy_loss.loss_mode)
    adv_fn = algorithms.get_adv_estimator(cfg.algorithm.adv_estimator)
    update_rows, update_tokens = cfg.actor_rollout_ref.update_batching()  # per forward/backward; 0 = unbounded
    # seq-mean-token-sum-norm is a sum over rows, not a mean: its logged entropy is summed over mini-batches below
    sum_norm = algorithms.get_loss_agg_mode(a.loss_agg_mode) is algorithms.LossAggMode.SEQ_MEAN_TOKEN_SUM_NORM
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16")

    run_dir = Path(d.broadcast(str(make_run_dir(cfg))))
    vllm_engine = None
    if r.name == "vllm":  # built before a resume (the engine reseeds the global RNGs at start-up) and before
        import tempfile  # the run directory is made (a failed start leaves nothing behind)

        from keel.rollout_vllm import VLLMRollout

        with tempfile.TemporaryDirectory() as scratch:  # vLLM reads the directory only at start-up
            vllm_engine = VLLMRollout.for_policy(model, tok, cfg, scratch)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    d.barrier()
    state = {"step": 0, "nonfinite_skips": 0, "nonfinite_in_row": 0, "rollbacks": 0, "eval_before": None,
             "last_good_ckpt_step": None}
    resumed = checkpoint.find_latest(run_dir) if t.resume == "auto" else None
    if resumed is not None:
        saved = checkpoint.load_checkpoint(resumed, model, optimizer)
        state.update(check_resumed_state(saved, resumed, controller))
        try:
            controller.load_state_dict(saved["controller"])
            monitor.load_state_dict(saved["monitor"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise KeelError(f"checkpoint {resumed.path}: state.json holds no valid controller/monitor state "
                            f"({type(e).__name__}: {e}); was it edited?") from None
        log(f"resumed from {resumed.path} (step {state['step']})")
        changed = config_changes(run_dir / "config.yaml", cfg)
        if changed:  # allowed (e.g. more steps, another logger), but the replay is then no longer the same run
            log("config changed since the run started: " + "; ".join(changed))
    if t.resume == "auto" and main:  # lines past the checkpoint (all of them if there is none) are replayed
        for name in ("metrics.jsonl", "samples.jsonl", "health.jsonl"):
            truncate_jsonl(run_dir / name, state["step"] if resumed is not None else -1)
        (run_dir / "STOPPED").unlink(missing_ok=True)  # the run goes on: an old stop reason no longer holds
    elif (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size > 0:
        raise KeelError(f"run directory '{run_dir}' already holds a run (metrics.jsonl); continue it with "
                        "trainer.resume=auto or choose another trainer.run_dir")
    meta = run_metadata(cfg, policy)
    meta["hardware"]["world_size"] = d.world
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    tracker = Tracker([x for x in t.logger if x != "console"], str(run_dir), t.project_name, t.experiment_name,
                      to_dict(cfg), resume_step=state["step"] if t.resume == "auto" else None) if main else None
    if not main:
        log = lambda *_: None  # noqa: E731  (rank 0 speaks for the run)
    log(f"run dir: {run_dir}  ({meta['model']['parameters']:,} parameters, {len(train_rows)} train / "
        f"{len(val_rows)} held-out prompts, {torch.get_num_threads()} thread(s), {device})")

    val_temperature, val_top_p, val_n = r.val_sampling()
    val_key = f"mean@{val_n}"  # the accuracy: mean correctness of val_kwargs.n answers per problem

    def held_out_accuracy() -> dict:
        result = None
        m, m_lean = whole()
        if main:  # rank 0 evaluates; the others wait for its answer
            try:
                with autocast:
                    result = evaluate(m, m_lean, tok, val_ids, val_rows, reward_fn, k=val_n,
                                      max_new_tokens=cfg.data.max_response_length, temperature=val_temperature,
                                      top_p=val_top_p, seed=t.seed + 7)
            except rollout.NonFiniteLogits:
                raise KeelError(f"model '{cfg.model.path}' gives non-finite logits (NaN/inf) on the held-out "
                                "prompts: its weights are broken") from None
        return d.broadcast(result)

    def save(step: int, extra: dict | None = None) -> Path:
        st = {"trainer": dict(state), "controller": controller.state_dict(), "monitor": monitor.state_dict(),
              **(extra or {})}
        m, opt = whole()[0], (distributed.FullOptimizer(optimizer) if plain_copy is not None else optimizer)
        path = checkpoint.save_checkpoint(run_dir, step, m, opt, st, keep=t.max_ckpt_to_keep) if main else None
        d.barrier()
        return path

    def start_record() -> dict:  # the held-out accuracy before training, logged at step 0 (as verl does)
        return {"val/accuracy": state["eval_before"][val_key]} if state["eval_before"] else {}

    if state["eval_before"] is None and t.val_before_train:
        state["eval_before"] = held_out_accuracy()
        log(f"held-out accuracy before GRPO: {state['eval_before'][val_key]:.3f} (n={state['eval_before']['n']})")
        monitor.observe(0, start_record())  # the reference of the held-out rules
        if main:
            tracker.log(start_record(), 0)
    final_eval = None  # (step, result) of the evaluation at the last step, judged by the monitor's at_end rules

    bar = _progress(main and progress and "console" in t.logger, t.total_training_steps, state["step"])
    stopped, exit_code = None, 0
    broken = None  # why the weights are non-finite with no copy to restore (trainer.keep_last_finite=false)
    last_finite = LastFinite(model, optimizer, enabled=t.keep_last_finite)  # weights + optimizer state before the latest update (keel.nonfinite)
    model.train()
    try:
        for step in range(state["step"] + 1, t.total_training_steps + 1):
            timing: dict[str, float] = {}
            t_step = time.perf_counter()
            entropy_coeff, kl_coef = controller.coefficients()
            loss_cfg.entropy_coeff, loss_cfg.kl_loss_coef = entropy_coeff, kl_coef
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + step + 7_919 * d.rank)

            # ---- 1. generate: G completions for each of B prompts (this rank's block of them)
            t0 = time.perf_counter()
            g_start, g_end = d.shard(B)
            idx = step_prompts(len(train_rows), B, t.seed, step)[g_start:g_end]
            batch_rows = [train_rows[i] for i in idx]
            m, m_lean = whole()
            if vllm_engine is not None:  # push this step's weights, then sample in the engine
                vllm_engine.update_weights(m)
                out = vllm_engine.generate([train_ids[i] for i in idx], G, cfg.data.max_response_length,
                                           r.temperature, r.top_p, seed=t.seed * 1_000_003 + step + 7_919 * d.rank)
            else:
                def sample(m, m_lean, gen):
                    with autocast:
                        return rollout.generate(m, [train_ids[i] for i in idx], G, cfg.data.max_response_length,
                                                r.temperature, r.top_p, tok.eos_token_id, tok.pad_token_id, gen,
                                                lean=m_lean)

                m.eval()
                try:
                    out = sample(m, m_lean, gen)
                except rollout.NonFiniteLogits:  # the last update broke the weights with finite numbers
                    if not last_finite.enabled and state["step"] > 0:
                        broken = f"non-finite logits in sampling at step {step} (the update of step {step - 1})"
                        m.train()
                        break
                    if not last_finite.taken:
                        raise KeelError(f"model '{cfg.model.path}' gives non-finite logits (NaN/inf) before any "
                                        "update of this run: its weights are broken") from None
                    last_finite.restore()  # back to the weights before that update; it counts as non-finite
                    state["nonfinite_skips"] = last_finite.counters["nonfinite_skips"] + last_finite.counters["updates"]
                    state["nonfinite_in_row"] = last_finite.counters["nonfinite_in_row"] + last_finite.counters["updates"]
                    log(f"step {step}: non-finite logits in sampling; restored the weights before step {step - 1}'s "
                        f"update ({state['nonfinite_in_row']} non-finite updates in a row)")
                    if state["nonfinite_in_row"] >= t.max_nonfinite_in_row:
                        m.train()
                        stopped = (f"{state['nonfinite_in_row']} non-finite updates in a row at step {step - 1} "
                                   "(non-finite logits in sampling)")
                        exit_code = 4
                        break
                    m, m_lean = whole()
                    # the restored weights sampled finite logits before: sample this step with them
                    out = sample(m, m_lean, torch.Generator().manual_seed(gen.initial_seed()))
                m.train()
            timing["timing_s/gen"] = time.perf_counter() - t0
            checkpoint.fault_point("gen", step)  # testing aid (KEEL_FAULT_INJECT), inert otherwise

            # ---- 2. reward every completion
            t0 = time.perf_counter()
            texts = tok.batch_decode(out.response_ids, skip_special_tokens=True)
            prompts_text = [str(row.prompt) for row in batch_rows for _ in range(G)]
            rows_per_completion = [row for row in batch_rows for _ in range(G)]
            scores, reward_metrics = reward_fn(prompts_text, texts, rows_per_completion, out.response_lengths)
            timing["timing_s/reward"] = time.perf_counter() - t0

            # ---- 3. advantages: A_i = (r_i - mean_group) / (std_group + eps)
            score_t = torch.tensor(scores, dtype=torch.float32)  # (N,)
            advantages = adv_fn(score_t, G, norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo)

            # ---- 4. old / reference log-probs (skipped when they are provably not needed)
            packed = actor.pack(out.prompt_ids, out.response_ids, tok.pad_token_id, device)
            n_mini = B // a.ppo_mini_batch_size
            on_policy = a.ppo_epochs == 1 and n_mini == 1  # old log-probs == current ones
            t0 = time.perf_counter()
            with autocast:
                old_logp = None if on_policy else actor.compute_logprobs(
                    model, lean, packed, r.temperature, a.entropy_chunk_size,
                    **_per_forward(cfg.actor_rollout_ref.log_prob_batching("rollout")))[0]
            timing["timing_s/old_log_prob"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with autocast:
                ref_logp = (actor.compute_logprobs(ref_model, ref_lean, packed, r.temperature, a.entropy_chunk_size,
                                                   **_per_forward(cfg.actor_rollout_ref.log_prob_batching("ref")))[0]
                            if ref_model is not None and kl_coef > 0 else None)
            timing["timing_s/ref"] = time.perf_counter() - t0

            # ---- 5. update: ppo_epochs x mini-batches of whole groups
            t0 = time.perf_counter()
            last_finite.take({"nonfinite_skips": state["nonfinite_skips"], "nonfinite_in_row": state["nonfinite_in_row"],
                              "updates": a.ppo_epochs * (B // a.ppo_mini_batch_size)})
            update_metrics, finite_flags = ppo_update(
                model, lean, optimizer, packed, advantages.to(device), old_logp, ref_logp, loss_cfg,
                group_ids=list(range(g_start, g_end)), n_groups=B, group_size=G,
                mini_batch_groups=a.ppo_mini_batch_size, ppo_epochs=a.ppo_epochs, seed=(t.seed, step),
                lr=_lr(a.optim, step), grad_clip=a.grad_clip, d=d, autocast=autocast,
                micro_batch_size=update_rows, max_token_len=update_tokens)
            if not d.all_true(weights_finite(model)):  # finite gradients, yet the step made weights NaN/inf
                if not last_finite.enabled:
                    broken = f"the update of step {step} made the weights non-finite"
                    break
                last_finite.restore()
                finite_flags = [False] * len(finite_flags)
                update_metrics.pop("actor/grad_norm", None)
            for ok in finite_flags:  # a NaN/inf update was skipped: count it; K in a row stops the run
                state["nonfinite_skips"] += 0 if ok else 1
                state["nonfinite_in_row"] = 0 if ok else state["nonfinite_in_row"] + 1
            timing["timing_s/update_actor"] = time.perf_counter() - t0
            timing["timing_s/step"] = time.perf_counter() - t_step

            # ---- 6. metrics (verl names), health verdict, controller, logging
            if d.enabled:  # rank 0 sees the whole batch; every rank then acts on rank 0's numbers
                parts = d.gather((update_metrics, texts, scores, out.response_lengths, prompts_text,
                                  reward_metrics, int(packed.mask.sum()), out.n_generated))
                update_metrics = {k: [v for p in parts for v in p[0].get(k, [])] for k in update_metrics}
                texts, scores = [x for p in parts for x in p[1]], [x for p in parts for x in p[2]]
                out.response_ids = [[0] * n for p in parts for n in p[3]]  # only the lengths are used below
                prompts_text = [x for p in parts for x in p[4]]
                reward_metrics = {k: _finite_mean([p[5].get(k) for p in parts]) for k in reward_metrics}
                n_tokens, out.n_generated = sum(p[6] for p in parts), sum(p[7] for p in parts)
            else:
                n_tokens = int(packed.mask.sum())
            step_metrics = {k: _finite_mean(v) for k, v in update_metrics.items()}
            if sum_norm and step_metrics.get("actor/entropy"):
                # seq-mean-token-sum-norm is a sum over rows: the whole batch's is the sum of its mini-batches'
                # (each already summed over micro-batches and ranks), which is what verl logs as actor/entropy
                step_metrics["actor/entropy"] *= n_mini
            step_metrics.update(metrics.response_metrics(texts, scores, out.response_lengths,
                                                         cfg.data.max_response_length, G))
            step_metrics.update(metrics.regularizer_balance(step_metrics.get("actor/entropy"),
                                                            step_metrics.get("actor/kl_loss"), entropy_coeff, kl_coef))
            step_metrics.update(reward_metrics)
            step_metrics.update(controller.metrics())
            step_metrics.update({"actor/entropy_coeff": entropy_coeff, "actor/kl_coef": kl_coef,
                                 "actor/lr": _lr(a.optim, step), "actor/nonfinite_skips": state["nonfinite_skips"],
                                 "critic/advantages/max": float(advantages.max()),
                                 "critic/advantages/min": float(advantages.min()),
                                 "perf/total_num_tokens": n_tokens,
                                 "perf/throughput": n_tokens / max(timing["timing_s/step"], 1e-9),
                                 "perf/gen_tokens_per_s": out.n_generated / max(timing["timing_s/gen"], 1e-9)})
            step_metrics.update(timing)
            if step == 1:
                step_metrics.update(data_stats)
            step_metrics = d.broadcast(step_metrics)  # every rank judges rank 0's numbers: same decisions
            if step == t.total_training_steps:  # the final evaluation is part of the last step's verdict
                final_eval = (step, held_out_accuracy())
                step_metrics["val/accuracy"] = final_eval[1][val_key]
            verdict = monitor.observe(step, step_metrics, at_end=step == t.total_training_steps)
            step_metrics.update(monitor.metrics(verdict))
            controller.update(step, step_metrics.get("actor/entropy"), step_metrics.get("actor/kl_loss"))
            # the smoothing and prediction are of this step's entropy: log them with this step, not the next
            step_metrics.update({k: v for k, v in controller.metrics().items()
                                 if k in ("control/entropy_smoothed", "control/entropy_predicted")})
            state["step"] = step
            if t.test_freq > 0 and step % t.test_freq == 0 and step < t.total_training_steps:
                ev = held_out_accuracy()
                step_metrics["val/accuracy"] = ev[val_key]
            if main:
                tracker.log(step_metrics, step)
                append_jsonl(run_dir / "health.jsonl", verdict.events)
                append_jsonl(run_dir / "samples.jsonl", [
                    {"step": step, "prompt": prompts_text[i], "response": texts[i], "score": scores[i]}
                    for i in range(0, len(texts), max(1, len(texts) // max(1, t.n_samples_logged)))][: t.n_samples_logged])
            bar.update(step, step_metrics, verdict.overall, controller.rollbacks)

            # ---- 7. act on the verdict; checkpoint
            if state["nonfinite_in_row"] >= t.max_nonfinite_in_row:
                stopped = f"{state['nonfinite_in_row']} non-finite updates in a row at step {step}"
                exit_code = 4
                break
            if verdict.overall == "bad" and cfg.monitor.action == "stop":
                stopped, exit_code = verdict.reason, 3
                break
            if verdict.overall == "bad" and cfg.monitor.action == "rollback":
                target = state["last_good_ckpt_step"]
                if state["rollbacks"] >= cfg.monitor.max_rollbacks or target is None:
                    stopped = f"{verdict.reason}; no rollback left" if target is not None else \
                        f"{verdict.reason}; no healthy checkpoint to roll back to"
                    exit_code = 3
                    break
                good = checkpoint.open_checkpoint(run_dir / "checkpoints" / f"step_{target:06d}")
                checkpoint.load_checkpoint(good, model, optimizer, restore_rng=False)
                failing = verdict.failing_rule
                controller.on_rollback((failing and failing.direction) or "low")
                monitor = Monitor(rules)  # judge the restored policy afresh (from the same held-out start)
                monitor.observe(0, start_record())
                final_eval = None
                state["rollbacks"] += 1
                event = {"step": step, "rule": failing.rule if failing else None, "verdict": "rollback",
                         "reason": f"{verdict.reason}; rolled back to step {target}, "
                                   f"entropy_coeff {controller.entropy_coeff:.4g}, kl_coef {controller.kl_coef:.4g}"}
                if main:
                    append_jsonl(run_dir / "health.jsonl", [event])
                log(event["reason"])
                continue
            if t.save_freq > 0 and step % t.save_freq == 0 and step < t.total_training_steps:
                if cfg.monitor.action != "rollback" or verdict.overall == "good":
                    save(step)
                    state["last_good_ckpt_step"] = step if verdict.overall == "good" else state["last_good_ckpt_step"]
    finally:
        bar.close()
        if tracker is not None:
            tracker.close()

    if broken is not None:  # nothing finite in memory to save or evaluate: the last checkpoint is the last finite state
        last = checkpoint.find_latest(run_dir) if main else None
        where = f"the checkpoint {last.path}" if last is not None else f"the starting model {cfg.model.path} (no checkpoint yet)"
        stopped, exit_code = f"{broken}; trainer.keep_last_finite=false, so {where} is the last finite state", 4
        if main:
            (run_dir / "STOPPED").write_text(stopped + "\n")
            append_jsonl(run_dir / "health.jsonl", [{"step": state["step"], "rule": "run", "verdict": "stop",
                                                      "reason": stopped}])
        log(f"run stopped at step {state['step']}: {stopped}")
        return TrainResult(run_dir, None, stopped, exit_code)

    # ---- the end: final checkpoint (stop: the reason alongside), model directory, held-out accuracy
    save(state["step"])
    if stopped and main:
        (run_dir / "STOPPED").write_text(stopped + "\n")
        append_jsonl(run_dir / "health.jsonl", [{"step": state["step"], "rule": "run", "verdict": "stop",
                                                  "reason": stopped}])
    if stopped:
        log(f"run stopped at step {state['step']}: {stopped}")
    m = whole()[0]
    if main:
        checkpoint.save_hf_model(m, tok, run_dir / "model")
    after = final_eval[1] if final_eval is not None and final_eval[0] == state["step"] else held_out_accuracy()
    result = {"heldout_accuracy_before": (state["eval_before"] or {}).get(val_key),
              "heldout_accuracy_after": after[val_key], "n_heldout": after["n"],
              "temperature": val_temperature, "samples_per_problem": val_n, "steps": state["step"]}
    if main:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        meta["end_time"] = datetime.now(timezone.utc).isoformat()
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return TrainResult(run_dir, result, stopped, exit_code)


def ppo_update(model, lean, optimizer, packed: actor.Packed, advantages: torch.Tensor,
               old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, loss_cfg: actor.LossConfig, *,
               group_ids: list[int], n_groups: int, group_size: int, mini_batch_groups: int, ppo_epochs: int,
               seed: tuple[int, int], lr: float, grad_clip: float, d: Dist | None = None,
               autocast=None, micro_batch_size: int = 0,
               max_token_len: int = 0) -> tuple[dict[str, list[float]], list[bool]]:
    """ppo_epochs x mini-batches of whole groups over this process's rows; returns (metrics, finite per update).

    `packed`/`advantages`/`old_logp`/`ref_logp` hold this rank's rows: groups `group_ids` of the step's
    n_groups, G rows each. Mini-batch m of an epoch is the same set of global groups on every rank; each
    rank runs its members as micro-batches (micro_batch_size rows, or max_token_len tokens, each; 0 = all
    at once) and each micro-batch's loss is its exact share of the mini-batch loss, so any number of ranks
    and micro-batches computes the single-pass gradient (see keel.actor.Placement, keel.distributed).
    """
    d = d or Dist()
    autocast = autocast or contextlib.nullcontext()
    step = seed[1]
    module = actor.train_module(lean) if lean is not None else model
    if d.enabled and module is model:
        raise KeelError("data-parallel training needs the lean forward (Llama-family models)")
    sync = distributed.grad_sync(module)
    position = {g: i for i, g in enumerate(group_ids)}  # global group -> local group index
    metrics_out: dict[str, list[float]] = {}
    finite_flags: list[bool] = []
    for epoch in range(ppo_epochs):
        order = np.random.default_rng([*seed, epoch]).permutation(n_groups)
        for m in range(n_groups // mini_batch_groups):
            chosen = order[m * mini_batch_groups : (m + 1) * mini_batch_groups]
            mine = [(slot, position[g]) for slot, g in enumerate(chosen) if g in position]
            span = torch.arange(group_size)
            rows = torch.cat([g * group_size + span for _, g in mine]) if mine else torch.zeros(0, dtype=torch.long)
            optimizer.zero_grad(set_to_none=True)
            mb = packed.select(rows) if len(rows) else None
            micro = actor.micro_batches(mb, micro_batch_size, max_token_len) if mb is not None else []
            n_micro = d.max(len(micro))
            place_rows = lengths = None
            if d.enabled or n_micro > 1:  # shares of the whole mini-batch (every rank's rows)
                place_rows = (torch.cat([slot * group_size + span for slot, _ in mine]) if mine
                              else torch.zeros(0, dtype=torch.long)).to(packed.mask.device)
                mine_len = mb.mask.sum(1).long().cpu().tolist() if mb is not None else []
                lengths = torch.zeros(len(chosen) * group_size, dtype=torch.long)
                for slots, lens in d.gather((place_rows.cpu().tolist(), mine_len)):
                    lengths[slots] = torch.tensor(lens, dtype=torch.long)
                lengths = lengths.to(packed.mask.device)
            poison = mb is not None and checkpoint.fault_point("loss", step)  # testing aid: a NaN loss
            lm, finite = actor.backward_mini_batch(
                model, lean, mb, advantages[rows], None if old_logp is None else old_logp[rows],
                None if ref_logp is None else ref_logp[rows], loss_cfg, micro=micro, place_rows=place_rows,
                lengths=lengths, n_micro=n_micro, loss_scale=float(d.world), fallback=packed.select(torch.arange(1)),
                sync=sync, autocast=autocast, poison=poison)
            if d.enabled:  # each rank holds its rows' shares: the mini-batch's metrics are their sums
                parts = d.gather(lm)
                lm = {k: sum(p.get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p})}
            finite = d.all_true(finite)
            if finite:
                if checkpoint.fault_point("grad", step):  # testing aid: a NaN gradient
                    next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
                clip = grad_clip if grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                finite = math.isfinite(grad_norm)
            if finite:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                checkpoint.fault_point("update", step)  # testing aid: a crash mid-update
                lm["actor/grad_norm"] = grad_norm
            else:  # skip the update: a NaN/inf gradient must never reach the weights
                optimizer.zero_grad(set_to_none=True)
            finite_flags.append(finite)
            for k, v in lm.items():
                metrics_out.setdefault(k, []).append(v)
    return metrics_out, finite_flags


def _per_forward(batching: tuple[int, int]) -> dict[str, int]:
    """compute_logprobs' micro_batch / max_tokens for a (rows, tokens) batching (0 = unbounded)."""
    return {"micro_batch": batching[0], "max_tokens": batching[1]}


def _lr(optim_cfg, step: int) -> float:
    if optim_cfg.lr_warmup_steps > 0:
        return optim_cfg.lr * min(1.0, step / optim_cfg.lr_warmup_steps)
    return optim_cfg.lr


def _finite_mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


class _progress:
    """A rich progress bar with step, reward, entropy, verdict and ETA (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled and total > 0
        if not self.enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task("grpo", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, m: dict, verdict: str, rollbacks: int) -> None:
        if not self.enabled:
            return
        ent = m.get("actor/entropy")
        info = (f"score {m.get('critic/score/mean', 0):.3f}  entropy {ent if ent is None else f'{ent:.4f}'}  "
                f"health {verdict}" + (f"  rollbacks {rollbacks}" if rollbacks else ""))
        self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
