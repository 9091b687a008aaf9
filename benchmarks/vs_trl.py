"""Keel vs TRL: GRPO steps per second on the same tiny Qwen3, measured side by side.

    make bench                                 # ~8-9 min quiet: 1m + 20m, fp32 + bf16 at 1 thread, 20m fp32 at 2
    python benchmarks/vs_trl.py --quick        # ~1.5 min: fp32, 1 thread, 3 steps, one round
    python benchmarks/vs_trl.py --configs 20m:bfloat16:1 --steps 4

What is compared (identical for both trainers):
  * the model directory: a random-init Qwen3 with a character-level vocabulary built by
    ``keel.modeling.build_embedded`` (head_dim = hidden / heads), saved once per size;
  * prompts: the embedded 2-digit addition task ("23+48="); the reward: :func:`digit_share`
    (a TRL-signature function both trainers call);
  * B = 8 prompts x G = 8 completions, at most 32 new tokens, temperature 1, top-p 1, no top-k;
    k3 KL to the reference with beta 0.04; token-mean loss, clip 0.2, grad clip 1, lr 1e-6
    constant (TRL's default: both policies stay near their common start, so completion
    lengths stay comparable); one optimizer step per rollout; no gradient checkpointing; same
    dtype (fp32, or bf16 autocast over fp32 master weights) and the same intra-op thread count.

How it is measured:
  * every run is a fresh subprocess (warm-up steps, then timed steps); runs alternate
    TRL, Keel, TRL, Keel ... so machine drift hits both alike; round r samples with seed r in
    both trainers (completion lengths are random: both are reported, and a per-token ratio);
  * a step's time is the wall time between consecutive step ends (TRL: ``on_step_end``;
    Keel: the per-step metrics log), so it includes logging and bookkeeping for both;
  * how busy the machine was: CPU time of all other processes during the run (from
    /proc/stat minus this run's own CPU time), in cores; runs above ``--noise`` are flagged
    and their round is repeated (``--retries``); medians use the quiet rounds when any exist;
  * MFU = model FLOPs per step / step time / the matmul FLOP/s measured in the same run for
    that dtype and thread count (the best of the measurements taken before each configuration).
    Model FLOPs count every sequence's real tokens (prompt + completion, no padding): 1 forward
    for the rollout, 1 for the reference, 3 for the policy update (forward + backward), with
    causal attention and the LM head at completion positions.

Writes benchmarks/results.json (keyed by model size) and prints a markdown table.
TRL is an optional benchmark dependency (``make bench`` installs it), never a runtime one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve()
SIZES = {  # Qwen3 arch, char-level vocab; ~0.86M and ~20.5M parameters
    "1m": dict(hidden=128, layers=4, heads=4, mlp=384),
    "20m": dict(hidden=512, layers=6, heads=8, mlp=1536),
}
B, G, MAX_NEW, BETA, LR, SEED = 8, 8, 32, 0.04, 1e-6, 0
DEFAULT_CONFIGS = "1m:float32:1,20m:float32:1,1m:bfloat16:1,20m:bfloat16:1,20m:float32:2"


def digit_share(prompts, completions, **kwargs):
    """Reward: the share of digits in a completion (a dense signal even for a random-init model)."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


# --------------------------------------------------------------------------- FLOPs and machine load


def model_dims(size: str, vocab: int) -> dict:
    s = SIZES[size]
    return dict(C=s["hidden"], layers=s["layers"], nh=s["heads"], nkv=s["heads"], hd=s["hidden"] // s["heads"],
                F=s["mlp"], V=vocab)


def sequence_flops(d: dict, P: float, L: float) -> float:
    """Forward FLOPs of one sequence of P prompt + L completion tokens (LM head at the L predicting positions).

    per token: 2 * (q, k, v, o and the 3 MLP matmuls); causal attention per layer: QK^T and AV over
    S(S+1)/2 query-key pairs, 2 FLOPs per multiply-add, each.
    """
    C, nh, nkv, hd = d["C"], d["nh"], d["nkv"], d["hd"]
    per_token = 2 * d["layers"] * (C * nh * hd + 2 * C * nkv * hd + nh * hd * C + 3 * C * d["F"])
    S = P + L
    attention = d["layers"] * 2 * nh * hd * S * (S + 1)
    return per_token * S + attention + 2 * C * d["V"] * L


def step_flops(d: dict, P: float, L: float) -> float:
    """Model FLOPs of one GRPO step: rollout (1 forward) + reference (1) + policy update (3)."""
    return 5 * B * G * sequence_flops(d, P, L)


def keel_work_flops(d: dict, P: float, L: float) -> float:
    """FLOPs of the tokens Keel actually runs in one step (fewer than the model FLOPs above).

    A group's prompt is run once, not G times, and a response's last token is an input to nothing
    (the sampler never feeds it back, the packed passes leave it out): each forward covers
    B*P + B*G*(L-1) token positions. Attention and the LM head are counted as in sequence_flops.
    The rollout counts one forward, the reference one, the update three. This is the work floor:
    divided by the measured matmul rate it is the fastest a step could be if every FLOP ran at that
    rate and nothing else (attention kernels, norms, sampling, Python) took any time.
    """
    C, nh, nkv, hd = d["C"], d["nh"], d["nkv"], d["hd"]
    per_token = 2 * d["layers"] * (C * nh * hd + 2 * C * nkv * hd + nh * hd * C + 3 * C * d["F"])
    tokens = B * P + B * G * max(L - 1.0, 0.0)
    S = P + L - 1
    attention = B * G * d["layers"] * 2 * nh * hd * S * (S + 1)
    head = B * G * 2 * C * d["V"] * L
    return 5 * (per_token * tokens + attention + head)


def cpu_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- children (one measurement each)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _prompts() -> list[str]:
    from keel.config import TaskConfig
    from keel.tasks import split_problems

    train, _ = split_problems(TaskConfig())
    return [p.prompt for p in train]


def child_trl(o) -> dict:
    """TRL's GRPOTrainer; phase times from a subclass that times the methods it calls."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _set_threads(o.threads)
    phases: dict[int, dict[str, float]] = {}

    class TimedGRPOTrainer(GRPOTrainer):
        def _timed(self, name, fn, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            bucket = phases.setdefault(self.state.global_step, {})
            bucket[name] = bucket.get(name, 0.0) + time.perf_counter() - t0
            return out

        def _generate_single_turn(self, *args, **kwargs):
            return self._timed("gen", super()._generate_single_turn, *args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            return self._timed("reward", super()._calculate_rewards, *args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):  # no grad: reference; grad: update forward
            name = "policy_forward" if torch.is_grad_enabled() else "ref"
            return self._timed(name, super()._get_per_token_logps_and_entropies, *args, **kwargs)

    stamps, lengths = [], {}

    class Stamps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths[state.global_step] = float(logs["completions/mean_length"])

    model = AutoModelForCausalLM.from_pretrained(o.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(o.model_dir)
    dataset = Dataset.from_list([{"prompt": p} for p in _prompts()])
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=B * G, num_generations=G,
        max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=0.2,
        loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        use_cpu=True, bf16=o.dtype == "bfloat16", gradient_checkpointing=False, max_steps=o.warmup + o.steps,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=o.seed, dataloader_num_workers=0,
    )
    trainer = TimedGRPOTrainer(model=model, reward_funcs=digit_share, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[Stamps()])
    trainer.train()
    timed = range(o.warmup, o.warmup + o.steps)  # global_step during step i (0-based) is i
    step_s = [stamps[i] - stamps[i - 1] for i in timed]
    per_phase = {name: [phases.get(i, {}).get(name, 0.0) for i in timed] for name in ("gen", "reward", "ref")}
    per_phase["update"] = [s - sum(per_phase[n][k] for n in ("gen", "reward", "ref")) for k, s in enumerate(step_s)]
    return {"step_s": step_s, "phases_s": per_phase,
            "completion_len": [lengths.get(i + 1, float("nan")) for i in timed],
            "policy_forward_s": [phases.get(i, {}).get("policy_forward", 0.0) for i in timed]}


def child_keel(o) -> dict:
    """keel.trainer.train(cfg) on the same directory; step ends stamped where the step's metrics are logged."""
    import keel.trainer as kt
    from keel.config import load_config

    stamps = []

    class StampedTracker(kt.Tracker):  # instrumentation only: records when each step's metrics arrive
        def log(self, metrics, step):
            stamps.append(time.perf_counter())
            super().log(metrics, step)

    kt.Tracker = StampedTracker
    run_dir = Path(tempfile.mkdtemp(prefix="keel-bench-")) / "run"
    cfg = load_config(None, keel_overrides(o, run_dir))
    kt.train(cfg, log=lambda *a, **k: None, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = range(o.warmup, o.warmup + o.steps)
    step_s = [stamps[i] - stamps[i - 1] for i in timed]
    col = lambda key: [rows[i].get(key) or 0.0 for i in timed]  # noqa: E731
    phases = {"gen": col("timing_s/gen"), "reward": col("timing_s/reward"),
              "ref": col("timing_s/ref"), "old_log_prob": col("timing_s/old_log_prob"),
              "update": col("timing_s/update_actor")}
    phases["other"] = [s - t for s, t in zip(step_s, col("timing_s/step"))]  # metrics, monitor, logging
    return {"step_s": step_s, "phases_s": phases, "completion_len": col("response_length/mean"),
            "keel_timing_step_s": col("timing_s/step")}


def keel_overrides(o, run_dir: Path) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={o.model_dir}", f"actor_rollout_ref.model.dtype={o.dtype}",
        "data.train_files=embedded", "data.val_files=embedded", "data.val_size=8",
        f"data.train_batch_size={B}", f"data.max_response_length={MAX_NEW}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={B}", "actor_rollout_ref.actor.ppo_epochs=1",
        f"actor_rollout_ref.rollout.n={G}", "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.top_p=1.0",
        "actor_rollout_ref.actor.use_kl_loss=true", f"actor_rollout_ref.actor.kl_loss_coef={BETA}",
        "actor_rollout_ref.actor.kl_loss_type=k3", "actor_rollout_ref.actor.entropy_coeff=0.0",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean", "actor_rollout_ref.actor.clip_ratio=0.2",
        "actor_rollout_ref.actor.grad_clip=1.0", f"actor_rollout_ref.actor.optim.lr={LR}",
        f"reward.functions=[{{name: '{HERE}:digit_share'}}]",
        f"trainer.total_training_steps={o.warmup + o.steps}", "trainer.val_before_train=false",
        "trainer.logger=[jsonl]", f"trainer.run_dir={run_dir}", f"trainer.num_threads={o.threads}",
        "trainer.device=cpu", f"trainer.seed={o.seed}",
    ]


def child_sampler(o) -> dict:
    """Keel's sampler vs transformers' model.generate (TRL's call) on the same 64 rows."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from keel import rollout
    from keel.modeling import LeanForward

    _set_threads(o.threads)
    model = AutoModelForCausalLM.from_pretrained(o.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(o.model_dir)
    lean = LeanForward(model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in _prompts()[:B]]
    rows = torch.tensor([p for p in prompts for _ in range(G)])  # all prompts have the same length here
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if o.dtype == "bfloat16" else contextlib.nullcontext()

    def keel(fixed: bool) -> int:
        eos = -1 if fixed else tok.eos_token_id  # -1: no token stops a row, every row gets MAX_NEW tokens
        with autocast:
            out = rollout.generate(model, prompts, G, MAX_NEW, 1.0, 1.0, eos, tok.pad_token_id,
                                   torch.Generator().manual_seed(SEED), lean=lean)
        return out.n_generated

    def hf(fixed: bool) -> int:
        config = GenerationConfig(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW if fixed else 0, do_sample=True,
                                  temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id,
                                  eos_token_id=[tok.eos_token_id], use_cache=True, disable_compile=True)
        with torch.no_grad(), autocast:
            seqs = model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), generation_config=config)
        new = seqs[:, rows.shape[1]:]
        ended = (new == tok.eos_token_id).int()
        # a row's tokens end at its first EOS (kept); the rest is padding
        return int(torch.where(ended.any(1), ended.argmax(1) + 1, new.shape[1]).sum())

    result = {}
    for fixed in (False, True):
        times = {"keel": [], "hf": []}
        tokens = {}
        for fn in (keel, hf):  # warm-up
            fn(fixed)
        for _ in range(o.steps):
            for name, fn in (("keel", keel), ("hf", hf)):
                t0 = time.perf_counter()
                tokens[name] = fn(fixed)
                times[name].append(time.perf_counter() - t0)
        key = "fixed_length" if fixed else "natural_length"
        result[key] = {name: {"s": statistics.median(times[name]), "tokens": tokens[name],
                              "tokens_per_s": tokens[name] / statistics.median(times[name])} for name in times}
        result[key]["speedup"] = result[key]["hf"]["s"] / result[key]["keel"]["s"]
    return result


def child_peak(o) -> dict:
    """The machine's matmul rate for this dtype and thread count (best of a few large shapes)."""
    import torch

    _set_threads(o.threads)
    dtype = getattr(torch, o.dtype)
    best = 0.0
    for m, k, n in ((2048, 1024, 1024), (2048, 512, 1536), (2048, 1536, 512), (4096, 512, 512)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.6:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return {"matmul_flops": best}


CHILDREN = {"trl": child_trl, "keel": child_keel, "sampler": child_sampler, "peak": child_peak}


def run_child_main(o) -> None:
    result = CHILDREN[o.child](o)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(o.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def spawn(kind: str, size: str, dtype: str, threads: int, model_dir: Path, steps: int, warmup: int,
          seed: int = SEED) -> dict:
    """Run one child; add how busy the rest of the machine was meanwhile (in cores)."""
    out = Path(tempfile.mkstemp(prefix=f"bench-{kind}-", suffix=".json")[1])
    cmd = [sys.executable, str(HERE), "--child", kind, "--size", size, "--dtype", dtype, "--threads", str(threads),
           "--model-dir", str(model_dir), "--steps", str(steps), "--warmup", str(warmup), "--seed", str(seed),
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    log_file = out.with_suffix(".log")
    busy0, wall0, self0 = cpu_busy_seconds(), time.perf_counter(), time.process_time()
    with open(log_file, "w") as log:  # a file, not a pipe: a chatty child can never block on a full pipe
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - wall0
    own = usage.ru_utime + usage.ru_stime + time.process_time() - self0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({' '.join(cmd)}):\n{log_file.read_text()[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    log_file.unlink()
    result["other_cores"] = max(0.0, (cpu_busy_seconds() - busy0 - own) / wall)
    result["wall_s"] = wall
    return result


def build_model_dir(size: str, root: Path) -> tuple[Path, int]:
    from keel.modeling import build_embedded, count_parameters
    from keel.tasks import TASK_ALPHABET

    model, tok = build_embedded(TASK_ALPHABET, SEED, **SIZES[size])
    # the embedded config turns the HF KV cache off (Keel trains with its own forward); transformers'
    # generate - TRL's sampler - would then recompute the whole prefix at every token
    model.config.use_cache = True
    model.generation_config.use_cache = True
    path = root / size
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, count_parameters(model)


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def compare(size: str, dtype: str, threads: int, model_dir: Path, a) -> dict:
    """Alternate TRL and Keel runs; repeat a noisy round (up to a.retries times, within the time budget)."""
    rounds, retries = [], a.retries
    while len(rounds) < a.rounds or (retries > 0 and not rounds[-1]["quiet"]
                                     and time.time() - a.started < 60 * a.budget_min):
        if len(rounds) >= a.rounds:
            retries -= 1
        pair = {}
        for kind in ("trl", "keel"):
            print(f"  {size} {dtype} {threads}t: {kind} (round {len(rounds) + 1})", flush=True)
            # round r samples with seed r in both trainers: different prompts and draws per round, same for both
            pair[kind] = spawn(kind, size, dtype, threads, model_dir, a.steps, a.warmup, seed=len(rounds))
        pair["quiet"] = all(pair[k]["other_cores"] <= a.noise for k in ("trl", "keel"))
        rounds.append(pair)
    used = [r for r in rounds if r["quiet"]] or rounds
    d = model_dims(size, a.vocab)
    out = {"dtype": dtype, "threads": threads, "noisy": not any(r["quiet"] for r in rounds),
           "rounds": [{k: {"s_per_step": median(r[k]["step_s"]), "other_cores": round(r[k]["other_cores"], 3)}
                       for k in ("trl", "keel")} | {"quiet": r["quiet"]} for r in rounds]}
    peak = max(a.peaks[(dtype, threads)])
    for k in ("trl", "keel"):
        steps = [s for r in used for s in r[k]["step_s"]]
        lengths = [x for r in used for x in r[k]["completion_len"]]
        s, L = median(steps), statistics.fmean(lengths)
        flops = step_flops(d, a.prompt_len, L)
        phases = {name: median([x for r in used for x in r[k]["phases_s"][name]]) for name in used[0][k]["phases_s"]}
        out.update({
            f"{k}_s_per_step": s, f"{k}_steps_per_hour": 3600 / s, f"{k}_step_s_all": [round(x, 4) for x in steps],
            f"{k}_mean_completion_len": L, f"{k}_model_gflop_per_step": flops / 1e9, f"{k}_mfu": flops / s / peak,
            f"{k}_gen_tokens_per_s": B * G * L / phases["gen"],
            f"{k}_train_tokens_per_s": B * G * (a.prompt_len + L) / s,
            f"{k}_peak_rss_mb": max(r[k]["peak_rss_mb"] for r in used), f"{k}_phases_s": phases,
            f"{k}_completion_len_all": [round(x, 2) for x in lengths],
        })
    out["speedup"] = out["trl_s_per_step"] / out["keel_s_per_step"]
    # the bound: Keel's own work at the measured matmul rate, with every other cost at zero
    work = keel_work_flops(d, a.prompt_len, out["keel_mean_completion_len"])
    out["keel_work_gflop_per_step"] = work / 1e9
    out["keel_floor_s_per_step"] = work / peak
    out["max_speedup_at_peak"] = out["trl_s_per_step"] / out["keel_floor_s_per_step"]
    out["keel_share_of_peak"] = out["keel_floor_s_per_step"] / out["keel_s_per_step"]
    # the same ratio per token processed, in case sampling left the two at different completion lengths
    out["speedup_per_token"] = out["keel_train_tokens_per_s"] / out["trl_train_tokens_per_s"]
    out["peak_matmul_gflops"] = peak / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of size:dtype:threads")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run (>= 1)")
    p.add_argument("--rounds", type=int, default=3, help="TRL/Keel pairs per config (round r samples with seed r)")
    p.add_argument("--retries", type=int, default=1, help="extra rounds while the last round was noisy")
    p.add_argument("--noise", type=float, default=0.25, help="other processes' CPU (cores) above which a run is noisy")
    p.add_argument("--budget-min", type=float, default=14, help="no retry rounds once the run has taken this long")
    p.add_argument("--sampler-reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="fp32, 1 thread, 3 timed steps, one round")
    p.add_argument("--out", default=str(HERE.parent / "results.json"))
    # child mode (internal)
    p.add_argument("--child", choices=sorted(CHILDREN))
    p.add_argument("--size"), p.add_argument("--dtype"), p.add_argument("--threads", type=int)
    p.add_argument("--model-dir"), p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args()
    if a.child:
        run_child_main(a)
        return
    if a.quick:
        a.configs, a.steps, a.warmup, a.rounds, a.retries, a.sampler_reps = \
            "1m:float32:1,20m:float32:1", 3, 1, 1, 0, 1
    a.warmup = max(1, a.warmup)  # a step's time is measured from the end of the step before
    configs = [(s, d, int(t)) for s, d, t in (c.split(":") for c in a.configs.split(","))]
    started = a.started = time.time()
    root = Path(tempfile.mkdtemp(prefix="keel-vs-trl-"))
    from transformers import AutoTokenizer

    dirs, params = {}, {}
    for size in dict.fromkeys(s for s, _, _ in configs):
        dirs[size], params[size] = build_model_dir(size, root)
    tok = AutoTokenizer.from_pretrained(dirs[configs[0][0]])
    a.vocab = len(tok)
    a.prompt_len = statistics.fmean(len(tok(p, add_special_tokens=False)["input_ids"]) for p in _prompts())
    a.peaks = {}
    results: dict = {}
    for size, dtype, threads in configs:
        peak = spawn("peak", size, dtype, threads, dirs[size], 1, 0)["matmul_flops"]  # the machine, right now
        a.peaks.setdefault((dtype, threads), []).append(peak)
        res = compare(size, dtype, threads, dirs[size], a)
        results.setdefault(size, {"parameters": params[size], "variants": {}})["variants"][f"{dtype}/{threads}t"] = res
        print(f"  -> {size} {dtype} {threads}t: TRL {res['trl_s_per_step']:.3f} s/step, Keel "
              f"{res['keel_s_per_step']:.3f} s/step, x{res['speedup']:.2f}, Keel MFU {res['keel_mfu']:.0%}"
              + ("  (NOISY)" if res["noisy"] else ""), flush=True)
    for entry in results.values():  # MFU against the best matmul rate measured for that dtype/threads
        for res in entry["variants"].values():
            peak = max(a.peaks[(res["dtype"], res["threads"])])
            res["peak_matmul_gflops"] = peak / 1e9
            for k in ("trl", "keel"):
                res[f"{k}_mfu"] = res[f"{k}_model_gflop_per_step"] * 1e9 / res[f"{k}_s_per_step"] / peak
            res["keel_floor_s_per_step"] = res["keel_work_gflop_per_step"] * 1e9 / peak
            res["max_speedup_at_peak"] = res["trl_s_per_step"] / res["keel_floor_s_per_step"]
            res["keel_share_of_peak"] = res["keel_floor_s_per_step"] / res["keel_s_per_step"]
            if res["dtype"] == "float32" and res["threads"] == 1:  # the primary figures sit at the top
                entry.update({k: v for k, v in res.items() if k != "rounds"})
    for size in results:
        if a.sampler_reps > 0:
            print(f"sampler {size}", flush=True)
            sampler = spawn("sampler", size, "float32", 1, dirs[size], a.sampler_reps, 0)
            results[size]["sampler"] = {k: sampler[k] for k in ("natural_length", "fixed_length", "other_cores")}

    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    results["meta"] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "wall_s": round(time.time() - started), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl_version,
        "settings": {"prompts": B, "group": G, "max_new_tokens": MAX_NEW, "beta": BETA, "kl": "k3", "lr": LR,
                     "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "noise_cores": a.noise,
                     "prompt_len": a.prompt_len, "vocab": a.vocab},
        "peak_matmul_gflops": {f"{d}/{t}t": max(v) / 1e9 for (d, t), v in a.peaks.items()},
    }
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(results))
    print(phase_table(results))
    print(bound_table(results))
    print(f"wrote {a.out} ({time.time() - started:.0f} s)")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(results: dict) -> str:
    lines = ["| model | dtype | threads | TRL s/step | Keel s/step | speedup | per token | Keel MFU | TRL MFU | "
             "gen tok/s TRL / Keel | train tok/s TRL / Keel | completion len TRL / Keel | peak RSS MB TRL / Keel "
             "| other load (cores) |",
             "|" + "---|" * 14]
    for size, entry in results.items():
        if size == "meta":
            continue
        for r in entry["variants"].values():
            used = [x for x in r["rounds"] if x["quiet"] or r["noisy"]]
            load = max(x[k]["other_cores"] for x in used for k in ("trl", "keel"))
            lines.append(
                f"| {size} ({entry['parameters'] / 1e6:.2f}M) | {r['dtype']} | {r['threads']} | "
                f"{r['trl_s_per_step']:.3f} | {r['keel_s_per_step']:.3f} | **{r['speedup']:.2f}x** | "
                f"{r['speedup_per_token']:.2f}x | {r['keel_mfu']:.0%} | {r['trl_mfu']:.0%} | "
                f"{r['trl_gen_tokens_per_s']:.0f} / {r['keel_gen_tokens_per_s']:.0f} | "
                f"{r['trl_train_tokens_per_s']:.0f} / {r['keel_train_tokens_per_s']:.0f}"
                f" | {r['trl_mean_completion_len']:.1f} / {r['keel_mean_completion_len']:.1f} | "
                f"{r['trl_peak_rss_mb']:.0f} / {r['keel_peak_rss_mb']:.0f} | {load:.2f}"
                + (" (noisy)" if r["noisy"] else "") + " |")
    return "\n".join(lines)


def phase_table(results: dict) -> str:
    """Median seconds per phase (TRL / Keel): where each trainer spends a step."""
    lines = ["| model | dtype | threads | generate | reward | reference log-probs | update (+ rest for TRL) | step |",
             "|" + "---|" * 8]
    for size, entry in results.items():
        if size == "meta":
            continue
        for r in entry["variants"].values():
            t, k = r["trl_phases_s"], r["keel_phases_s"]
            keel_rest = k["update"] + k.get("old_log_prob", 0.0) + k.get("other", 0.0)
            lines.append(f"| {size} | {r['dtype']} | {r['threads']} | {t['gen']:.3f} / {k['gen']:.3f} | "
                         f"{t['reward']:.3f} / {k['reward']:.3f} | {t['ref']:.3f} / {k['ref']:.3f} | "
                         f"{t['update']:.3f} / {keel_rest:.3f} | "
                         f"{r['trl_s_per_step']:.3f} / {r['keel_s_per_step']:.3f} |")
    return "\n".join(lines)


def bound_table(results: dict) -> str:
    """How far each speed-up could go on this machine: Keel's own work at the measured matmul rate."""
    lines = ["| model | dtype | threads | Keel work GFLOP/step | floor s/step (work / matmul peak) | Keel s/step "
             "| Keel at % of peak | TRL s/step | best possible speed-up |", "|" + "---|" * 9]
    for size, entry in results.items():
        if size == "meta":
            continue
        for r in entry["variants"].values():
            lines.append(f"| {size} | {r['dtype']} | {r['threads']} | {r['keel_work_gflop_per_step']:.2f} | "
                         f"{r['keel_floor_s_per_step']:.3f} | {r['keel_s_per_step']:.3f} | "
                         f"{r['keel_share_of_peak']:.0%} | {r['trl_s_per_step']:.3f} | "
                         f"{r['max_speedup_at_peak']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
