"""verl command lines under ``keel train``: a verl Hydra override list carries over.

    keel train algorithm.adv_estimator=grpo data.train_files=... actor_rollout_ref.actor.optim.lr=1e-6 ...
    keel train configs/demo.yaml <the same overrides>

Every ``key=value`` of ``python3 -m verl.trainer.main_ppo key=value ...`` is sorted into one of four kinds
(:func:`translate_overrides`):

* **Keel's key** (the same dotted path exists in Keel's config): passed through, it takes effect;
* **translated**: a verl key whose meaning Keel implements under another name or unit
  (``trainer.total_epochs`` -> ``trainer.total_training_steps``, ``trainer.resume_mode``, ...; :data:`TRANSLATED`);
* **different meaning**: an error that says what differs (``algorithm.use_kl_in_reward=True``, a learned
  reward model, LoRA, top-k sampling, a cosine schedule, ...; :data:`DIFFERENT`);
* **ignored**: any other key of verl's config (``verl_keys.txt``: parallelism, memory, offload, micro-batch
  and engine settings, ...), listed once on stderr and otherwise without effect.

A key that is neither Keel's nor verl's goes on to Keel's loader, which rejects it naming the closest key.
Hydra's ``+key`` / ``++key`` prefixes are accepted; ``~key`` (delete) is ignored.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from keel.config import KeelConfig, parse_override
from keel.errors import KeelError

VERL_KEYS_FILE = Path(__file__).resolve().parent / "verl_keys.txt"


@lru_cache(maxsize=1)
def verl_keys() -> frozenset[str]:
    lines = VERL_KEYS_FILE.read_text().splitlines()
    return frozenset(k.strip() for k in lines if k.strip() and not k.startswith("#"))


def is_verl_key(key: str) -> bool:
    """A key of verl's config, or one under a verl key that holds a mapping (``engine_kwargs.vllm.x``)."""
    keys, parts = verl_keys(), key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


@lru_cache(maxsize=1)
def keel_keys() -> frozenset[str]:
    """Every dotted leaf (and section) path of Keel's config."""
    out: set[str] = set()

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            out.add(path)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], path + ".")

    walk(KeelConfig, "")
    return frozenset(out)


def _different(why: str, ok: Callable[[Any], bool] = lambda v: False) -> Callable[[str, Any], str | None]:
    return lambda key, value: None if ok(value) else why


# verl key -> check(key, value) returning None (harmless value: ignored) or why Keel differs (an error)
DIFFERENT: dict[str, Callable[[str, Any], str | None]] = {
    "algorithm.use_kl_in_reward": _different(
        "verl subtracts a KL penalty from the reward; Keel's KL is a loss term only "
        "(actor_rollout_ref.actor.use_kl_loss / kl_loss_coef)", lambda v: v in (False, "false", "False")),
    "reward_model.enable": _different(
        "Keel has no learned reward model; score with reward.functions or custom_reward_function",
        lambda v: v in (False, "false", "False")),
    "actor_rollout_ref.model.lora_rank": _different("Keel trains all weights (no LoRA)", lambda v: v in (0, None)),
    "actor_rollout_ref.rollout.top_k": _different("Keel samples with temperature and top-p only (no top-k)",
                                                  lambda v: v in (-1, 0, None)),
    "actor_rollout_ref.rollout.val_kwargs.top_k": _different("Keel samples with temperature and top-p only (no top-k)",
                                                             lambda v: v in (-1, 0, None)),
    "actor_rollout_ref.actor.optim.lr_scheduler_type": _different(
        "Keel's learning rate is a linear warm-up then constant", lambda v: v == "constant"),
    "actor_rollout_ref.actor.optim.warmup_style": _different(
        "Keel's learning rate is a linear warm-up then constant", lambda v: v == "constant"),
    # only consulted for keys Keel does not have (Keel's policy-loss registry makes this one Keel's)
    "actor_rollout_ref.actor.policy_loss.loss_mode": _different(
        "Keel's policy loss is verl's 'vanilla' (clipped, dual-clip)", lambda v: v == "vanilla"),
    "trainer.val_only": _different("use `keel eval MODEL_DIR --data FILE` to only validate",
                                   lambda v: v in (False, "false", "False")),
    "data.truncation": _different(
        "verl truncates overlong prompts; Keel drops them (counted in data/dropped_overlong_prompts): use "
        "data.truncation=error with data.filter_overlong_prompts=True", lambda v: v == "error"),
    "data.filter_overlong_prompts": _different(
        "Keel always drops prompts over data.max_prompt_length (and counts them)", lambda v: v in (True, "true", "True")),
}


def _resume(key, value, out):
    if value not in ("auto", "disable"):
        raise KeelError(f"verl key '{key}={value}': Keel resumes with trainer.resume=auto|disable (from RUN_DIR); "
                        "resume_path is not supported")
    out.append(f"trainer.resume={value}")


def _warmup_steps(key, value, out):
    if value is not None and int(value) >= 0:  # verl's -1 = "use lr_warmup_steps_ratio"
        out.append(f"actor_rollout_ref.actor.optim.lr_warmup_steps={int(value)}")


# verl key -> writes the Keel override(s) that implement it (total_epochs is resolved in resolve_epochs)
TRANSLATED: dict[str, Callable[[str, Any, list[str]], None]] = {
    "trainer.resume_mode": _resume,
    "actor_rollout_ref.actor.optim.lr_warmup_steps": _warmup_steps,
}
DEFERRED = ("trainer.total_epochs", "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio")


@dataclasses.dataclass
class Translation:
    overrides: list[str]  # what Keel's loader gets
    ignored: list[str]  # verl keys without effect in Keel, in command-line order
    deferred: dict[str, Any]  # verl keys resolved once the config is known (total_epochs, warm-up ratio)


def translate_overrides(overrides: list[str]) -> Translation:
    """Sort a verl override list into Keel overrides, ignored keys and errors (module docstring)."""
    out: list[str] = []
    ignored: list[str] = []
    deferred: dict[str, Any] = {}
    for text in overrides:
        if text.startswith("~"):  # Hydra: delete a key -> Keel's default stays
            ignored.append(text[1:].split("=", 1)[0])
            continue
        text = text.lstrip("+")
        path, value = parse_override(text)
        key = ".".join(path)
        if key in DIFFERENT and key not in keel_keys():  # a key Keel has (e.g. policy_loss.loss_mode) is Keel's
            why = DIFFERENT[key](key, value)
            if why:
                raise KeelError(f"verl key '{text}' has a different meaning in Keel: {why}")
            ignored.append(key)
            continue
        if key in TRANSLATED:  # before Keel's own keys: the value may need converting (warm-up -1)
            TRANSLATED[key](key, value, out)
        elif key in keel_keys():
            out.append(text)
        elif key in DEFERRED:
            deferred[key] = value
        elif is_verl_key(key):
            ignored.append(key)
        else:
            out.append(text)  # Keel's loader names the closest key
    return Translation(out, list(dict.fromkeys(ignored)), deferred)


def count_rows(files: Any) -> int | None:
    """Rows of the training file(s) (Parquet metadata, JSONL lines); None for the embedded task."""
    if files in (None, "embedded"):
        return None
    total = 0
    for f in files if isinstance(files, list) else [files]:
        p = Path(str(f))
        if not p.is_file():
            raise KeelError(f"config key 'data.train_files': '{p}' does not exist")
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(p).metadata.num_rows
        else:
            with open(p, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
    return total


def resolve_deferred(t: Translation, cfg: KeelConfig, given: set[str]) -> list[str]:
    """Overrides for verl's epoch count and warm-up ratio, now that the data and batch size are known.

    verl: total_training_steps = len(dataloader) * total_epochs with drop_last, i.e.
    epochs * (rows // train_batch_size) (rows counted before overlong prompts are dropped); an explicit
    trainer.total_training_steps wins, as in verl. Warm-up: steps = int(ratio * total_training_steps).
    """
    extra: list[str] = []
    steps = cfg.trainer.total_training_steps
    epochs = t.deferred.get("trainer.total_epochs")
    if epochs is not None and "trainer.total_training_steps" not in given:
        rows = count_rows(cfg.data.train_files)
        if rows is None:
            from keel.tasks import split_problems

            rows = len(split_problems(cfg.task)[0])
        steps = int(epochs) * max(1, rows // cfg.data.train_batch_size)
        extra.append(f"trainer.total_training_steps={steps}")
    ratio = t.deferred.get("actor_rollout_ref.actor.optim.lr_warmup_steps_ratio")
    if ratio and "actor_rollout_ref.actor.optim.lr_warmup_steps" not in given:
        extra.append(f"actor_rollout_ref.actor.optim.lr_warmup_steps={int(float(ratio) * steps)}")
    return extra


def load_verl_config(config: str | None, overrides: list[str], announce: bool = True) -> tuple[KeelConfig, Translation]:
    """``keel train [CONFIG] OVERRIDES`` with verl's keys understood: the config, and what was ignored."""
    from keel.config import load_config

    t = translate_overrides(overrides)
    if announce and t.ignored:
        print(f"keel: ignoring {len(t.ignored)} verl key(s) Keel does not use: {', '.join(t.ignored)}",
              file=sys.stderr, flush=True)
    cfg = load_config(config, t.overrides)
    if t.deferred:
        given = {".".join(parse_override(o)[0]) for o in t.overrides}
        extra = resolve_deferred(t, cfg, given)
        if extra:
            t.overrides = t.overrides + extra
            cfg = load_config(config, t.overrides)
    return cfg, t
