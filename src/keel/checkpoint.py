"""Crash-safe checkpoints: save, verify, find the latest good one, resume bit-identically.

Layout of one run's checkpoints::

    RUN_DIR/checkpoints/
        latest                      # text file: "step_000040\\n", replaced atomically
        step_000020/
        step_000040/
            model.safetensors       # unique tensors only; tied names recorded in the header metadata
            optimizer.safetensors   # every tensor of optimizer.state_dict(): "state.{param_index}.{name}"
            optimizer.json          # param_groups + the non-tensor per-param state
            rng.safetensors         # torch CPU (and CUDA) generator states as uint8 tensors
            rng.json                # python `random` + numpy legacy MT19937 states
            state.json              # the caller's dict: controller, monitor, sampler position, metrics
            manifest.json           # written last: size + sha256 of every file above

Crash safety: everything is written into ``step_XXXXXX.tmp-<pid>/`` and fsynced, then the directory is
renamed into place, and only then is ``latest`` replaced (temp file + ``os.replace``). A crash at any
point leaves either the old ``latest`` or the new one, never a half-written checkpoint behind it.
``*.tmp-*`` leftovers are ignored by readers and deleted by the next save.

Loading never unpickles: tensors come from safetensors, everything else from JSON.

Testing aid: :func:`fault_point` lets the crash/NaN tests SIGKILL the process or poison a value at a
named point (``KEEL_FAULT_INJECT=kill@ckpt_write:4``); it does nothing when that variable is unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keel.errors import KeelError

logger = logging.getLogger(__name__)

FORMAT = "keel-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
REQUIRED_FILES = ("model.safetensors", "rng.safetensors", "rng.json", "state.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TIED_KEY = "keel_tied"  # safetensors metadata key: JSON {alias_name: stored_name}


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    # one line per newer checkpoint that was corrupt and skipped on the way to this one
    skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# small file helpers
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename / new file) -- POSIX only, a no-op elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _move_into_place(tmp: Path, final: Path) -> None:
    """rename(tmp -> final); an existing `final` is first moved aside (``.tmp-`` name) and then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.tmp-{os.getpid()}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _nonfinite_path(obj: Any, path: str = "") -> str | None:
    """Dotted path of the first NaN/inf float inside nested dicts/lists, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "<root>"
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub_path, v in items:
        found = _nonfinite_path(v, sub_path)
        if found is not None:
            return found
    return None


def _json_bytes(obj: Any, what: str, refusing: str) -> bytes:
    """Serialise for a checkpoint; NaN/inf or non-JSON values are refused with a KeelError."""
    bad = _nonfinite_path(obj)
    if bad is not None:
        raise KeelError(f"{refusing}: {what} '{bad}' is NaN/inf")
    try:
        return json.dumps(obj, allow_nan=False, indent=1).encode()
    except (TypeError, ValueError) as e:
        raise KeelError(f"{refusing}: {what} is not JSON-serialisable ({e})") from e


def _check_finite(tensors: dict[str, torch.Tensor], what: str, refusing: str) -> None:
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise KeelError(f"{refusing}: {what} tensor '{name}' has {n_bad} NaN/inf value(s) of {t.numel()}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the string metadata of one safetensors file."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# collecting state into (tensors, json) pairs
# ---------------------------------------------------------------------------------------------


def _dedupe_tied(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names that are the very same tensor as an earlier name (tied weights, e.g. Qwen3 lm_head
    == embed_tokens). Returns (unique tensors, {alias: stored name}). Partial overlaps are cloned,
    because safetensors refuses tensors that share memory."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        if t.numel() > 0:  # empty tensors all report data_ptr 0: never treat them as tied
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        unique[name] = t
    storages: dict[tuple, int] = {}
    for t in unique.values():
        if t.numel() > 0:
            sk = (t.device, t.untyped_storage().data_ptr())
            storages[sk] = storages.get(sk, 0) + 1
    for name, t in unique.items():
        shared = t.numel() > 0 and storages[(t.device, t.untyped_storage().data_ptr())] > 1
        unique[name] = t.clone() if shared else t.contiguous()
    return unique, aliases


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> ({"state.{i}.{name}" | "param_groups.{g}.{key}": tensor}, json part)."""
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict] = {}
    for idx, per_param in sd["state"].items():
        state_json[str(idx)] = {}
        for name, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().contiguous()
            else:
                state_json[str(idx)][name] = v
    groups = []
    for g, group in enumerate(sd["param_groups"]):
        plain = {}
        for key, v in group.items():
            if isinstance(v, torch.Tensor):  # e.g. a tensor lr
                tensors[f"param_groups.{g}.{key}"] = v.detach().contiguous()
            else:
                plain[key] = v
        groups.append(plain)
    return tensors, {"state": state_json, "param_groups": groups}


def _join_optimizer(tensors: dict[str, torch.Tensor], js: dict, live_groups: list[dict]) -> dict:
    """Inverse of _split_optimizer. Lists that the live optimizer holds as tuples (betas) become tuples again."""
    state: dict[int, dict] = {int(idx): dict(per_param) for idx, per_param in js["state"].items()}
    groups = [dict(g) for g in js["param_groups"]]
    for key, t in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = t
        else:
            groups[int(index)][name] = t
    for group, live in zip(groups, live_groups):
        for key, v in group.items():
            if isinstance(v, list) and isinstance(live.get(key), tuple):
                group[key] = tuple(v)
    return {"state": state, "param_groups": groups}


def _capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    version, mt_state, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    js = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "key": key.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    return tensors, js


def _restore_rng(tensors: dict[str, torch.Tensor], js: dict) -> None:
    py = js["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = js["numpy"]
    key = np.asarray(npy["key"], dtype=np.uint32)
    np.random.set_state((npy["bit_generator"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda.")), key=lambda k: int(k[11:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d device(s) but %d are visible; CUDA RNG not restored",
                len(cuda), torch.cuda.device_count(),
            )


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write RUN_DIR/checkpoints/step_{step:06d}/, point `latest` at it, keep the newest `keep`.

    Everything is validated (finite tensors, finite plain-JSON state) before the first byte is written:
    a failure raises KeelError and leaves the checkpoint directory untouched.

    Retention: the new checkpoint plus the `keep - 1` newest ones with a smaller step survive. Any
    checkpoint with a *larger* step is deleted too: after resuming from an older checkpoint those belong
    to an abandoned timeline and must never be picked up as a fallback.
    """
    if keep < 1:
        raise KeelError(f"config key 'trainer.max_ckpt_to_keep' must be >= 1, got {keep}")
    if step < 0:
        raise KeelError(f"checkpoint step must be >= 0, got {step}")

    # ---- collect and validate everything in memory first ----
    refusing = f"refusing to save checkpoint at step {step}"
    model_tensors, tied = _dedupe_tied(model.state_dict())
    _check_finite(model_tensors, "model", refusing)
    files_json: dict[str, bytes] = {}
    files_tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]] = {
        "model.safetensors": (model_tensors, {_TIED_KEY: json.dumps(tied)}),
    }
    if optimizer is not None:
        opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
        _check_finite(opt_tensors, "optimizer", refusing)
        files_tensors["optimizer.safetensors"] = (opt_tensors, None)
        files_json["optimizer.json"] = _json_bytes(opt_json, "optimizer state", refusing)
    rng_tensors, rng_json = _capture_rng()
    files_tensors["rng.safetensors"] = (rng_tensors, None)
    files_json["rng.json"] = _json_bytes(rng_json, "rng state", refusing)
    files_json["state.json"] = _json_bytes(state, "state", refusing)
    if json.loads(files_json["state.json"]) != state:
        raise KeelError(
            f"{refusing}: state would not load back equal "
            "(use str dict keys and lists, not int keys or tuples)"
        )

    # ---- write into a temp dir, fsync, manifest last ----
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, (tensors, metadata) in files_tensors.items():
            save_file(tensors, str(tmp / name), metadata=metadata)
            _fsync_file(tmp / name)
            fault_point("ckpt_write", step)  # testing aid: a crash with the checkpoint half written
        for name, data in files_json.items():
            _write_bytes(tmp / name, data)
        names = sorted([*files_tensors, *files_json])
        manifest = {
            "format": FORMAT,
            "step": step,
            "files": {n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names},
        }
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("ckpt_publish", step)  # testing aid: complete on disk, `latest` not yet updated

    # ---- publish: `latest` only ever names a complete checkpoint ----
    latest_tmp = ckpt_root / f"{LATEST}.tmp-{os.getpid()}"
    _write_bytes(latest_tmp, f"{final.name}\n".encode())
    os.replace(latest_tmp, ckpt_root / LATEST)
    _fsync_dir(ckpt_root)

    # ---- retention + crash leftovers ----
    older = sorted((s, p) for s, p in _step_dirs(ckpt_root) if s < step)
    doomed = [p for s, p in _step_dirs(ckpt_root) if s > step]  # abandoned timeline
    doomed += [p for _, p in older[: max(0, len(older) - (keep - 1))]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.iterdir():
        if ".tmp-" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif ".tmp-" in p.name:
            p.unlink(missing_ok=True)
    return final


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_NNNNNN directory (never a .tmp-* one), any order."""
    out = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return out


# ---------------------------------------------------------------------------------------------
# verify / find / load
# ---------------------------------------------------------------------------------------------


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems found in one checkpoint directory (empty list = complete and intact).

    Each problem is one short phrase starting with the file name, e.g.
    ``model.safetensors: size 812 bytes, manifest says 1620 (truncated?)`` or ``rng.json: sha256 mismatch``.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path.name}: not a directory"]
    if not (path / MANIFEST).is_file():
        return [f"{MANIFEST}: missing (checkpoint write did not finish)"]
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        files = manifest["files"]
        int(manifest["step"])
        entries = {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"]
    problems = [f"{name}: not listed in {MANIFEST}" for name in REQUIRED_FILES if name not in entries]
    for name, (size, sha) in entries.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{name}: size {f.stat().st_size} bytes, manifest says {size} (truncated?)")
        elif _sha256(f) != sha:
            problems.append(f"{name}: sha256 mismatch")
    return problems


def _open_verified(path: Path, skipped: list[str]) -> Checkpoint:
    manifest = json.loads((path / MANIFEST).read_bytes())
    state = json.loads((path / "state.json").read_bytes())
    return Checkpoint(path=path, step=int(manifest["step"]), state=state, skipped=skipped)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A specific checkpoint directory, verified; KeelError listing the problems if it is damaged."""
    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise KeelError(f"checkpoint {path} is corrupt ({'; '.join(problems)})")
    return _open_verified(path, [])


def find_latest(run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint `latest` points at, or -- if that one is corrupt -- the newest intact earlier one.

    Every skipped checkpoint produces one log line (logger ``keel.checkpoint``, WARNING) and an entry in
    ``Checkpoint.skipped``:
    ``checkpoint <path> is corrupt (<file>: sha256 mismatch); falling back to <previous path>``.
    Returns None when there is no intact checkpoint at all (the messages are still logged).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    by_step = sorted(_step_dirs(ckpt_root), reverse=True)  # newest first
    messages: list[str] = []
    candidates = [p for _, p in by_step]
    latest_file = ckpt_root / LATEST
    if latest_file.is_file():
        name = latest_file.read_text().strip()
        m = _STEP_DIR.match(name)
        if m and (ckpt_root / name).is_dir():
            # follow `latest`, then older ones; newer dirs are leftovers of an abandoned timeline
            latest_step = int(m.group(1))
            candidates = [ckpt_root / name] + [p for s, p in by_step if s < latest_step]
        else:
            messages.append(f"checkpoint marker {latest_file} names {name!r}, which does not exist; "
                            f"falling back to {candidates[0] if candidates else 'no checkpoint'}")
            logger.warning(messages[-1])

    for i, path in enumerate(candidates):
        problems = verify_checkpoint(path)
        if not problems:
            return _open_verified(path, messages)
        nxt = str(candidates[i + 1]) if i + 1 < len(candidates) else "no checkpoint (none intact)"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        messages.append(f"checkpoint {path} is corrupt ({problems[0]}{more}); falling back to {nxt}")
        logger.warning(messages[-1])
    return None


def load_checkpoint(
    ckpt: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load weights (and optimizer / RNG states) in place; return the saved `state` dict.

    Tensors are copied exactly (no dtype conversion: a dtype or shape mismatch is a KeelError), so the
    next optimizer step is bit-identical to the one the original run would have taken.
    """
    path = ckpt.path
    # ---- model ----
    tensors, metadata = _read_safetensors(path / "model.safetensors")
    for alias, stored in json.loads(metadata.get(_TIED_KEY, "{}")).items():
        tensors[alias] = tensors[stored]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeelError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} (different model config?)"
        )
    for name, want in expected.items():
        t = tensors[name]
        if t.dtype != want.dtype or t.shape != want.shape:
            raise KeelError(
                f"checkpoint {path}: '{name}' is {t.dtype} {tuple(t.shape)} but the model has "
                f"{want.dtype} {tuple(want.shape)} (was actor_rollout_ref.model.dtype or the model changed?)"
            )
    model.load_state_dict(tensors, strict=True)

    # ---- optimizer ----
    if optimizer is not None:
        if not (path / "optimizer.json").is_file():
            raise KeelError(f"checkpoint {path} has no optimizer state (saved with optimizer=None)")
        opt_tensors, _ = _read_safetensors(path / "optimizer.safetensors")
        opt_json = json.loads((path / "optimizer.json").read_bytes())
        try:
            optimizer.load_state_dict(_join_optimizer(opt_tensors, opt_json, optimizer.param_groups))
        except (ValueError, KeyError, IndexError) as e:
            raise KeelError(f"checkpoint {path}: optimizer state does not fit this optimizer ({e})") from e

    # ---- RNG ----
    if restore_rng:
        rng_tensors, _ = _read_safetensors(path / "rng.safetensors")
        _restore_rng(rng_tensors, json.loads((path / "rng.json").read_bytes()))
    return ckpt.state


# ---------------------------------------------------------------------------------------------
# final export
# ---------------------------------------------------------------------------------------------


def save_hf_model(model, tokenizer, out_dir: str | Path) -> None:
    """Write the final model as a Hugging Face directory (config.json, model.safetensors, tokenizer
    files), atomically: built in ``<out_dir>.tmp-<pid>`` and renamed into place, replacing an old one.
    transformers >= 5 always writes safetensors, so there is no `safe_serialization` switch to set."""
    out_dir = Path(out_dir)
    unique, _ = _dedupe_tied(model.state_dict())
    _check_finite(unique, "model", f"refusing to save the model to {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in out_dir.parent.glob(f"{out_dir.name}.tmp-*"):  # left by an earlier crashed export
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# fault injection: a TESTING AID, inert unless the KEEL_FAULT_INJECT environment variable is set
# ---------------------------------------------------------------------------------------------

FAULT_ENV = "KEEL_FAULT_INJECT"
FAULT_POINTS = ("gen", "loss", "grad", "update", "ckpt_write", "ckpt_publish")


def _fault_steps(spec: str) -> range:
    """"3" -> {3}; "3-5" -> {3, 4, 5}; "3-" -> every step from 3 on."""
    lo, dash, hi = spec.partition("-")
    return range(int(lo), (int(hi) + 1) if hi else (1 << 62)) if dash else range(int(lo), int(lo) + 1)


def fault_point(point: str, step: int) -> bool:
    """Testing aid for the crash-resume and non-finite tests (tests/test_resume.py, tests/test_nonfinite.py).

    ``KEEL_FAULT_INJECT`` holds comma-separated ``ACTION@POINT:STEPS`` entries, e.g.
    ``kill@ckpt_write:4`` or ``nan@grad:3-`` (STEPS: ``N``, ``N-M`` or ``N-`` = from N on). When the
    code reaches a matching (point, step):

    * ``kill`` -- the process sends itself SIGKILL right here: no cleanup, no flush, a real crash;
    * ``nan``  -- returns True; the caller then poisons its value with NaN (a real non-finite path;
      only the ``loss`` and ``grad`` points act on it).

    Points: ``gen`` (rollout sampled, before rewards), ``loss`` (a mini-batch loss computed, before
    backward), ``grad`` (after backward, before clipping), ``update`` (after each optimizer step),
    ``ckpt_write`` (checkpoint files half written in the temp dir), ``ckpt_publish`` (checkpoint
    renamed into place, ``latest`` not yet updated).
    Returns False when the variable is unset, which is always the case outside tests.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        try:
            action, rest = entry.split("@", 1)
            where, steps = rest.split(":", 1)
            at_steps = _fault_steps(steps)
        except ValueError:
            raise KeelError(f"{FAULT_ENV} entry {entry!r} must look like ACTION@POINT:STEPS, e.g. kill@gen:3") from None
        if action not in ("kill", "nan") or where not in FAULT_POINTS:
            raise KeelError(f"{FAULT_ENV} entry {entry!r}: action must be kill or nan, "
                            f"point one of {', '.join(FAULT_POINTS)}")
        if where == point and step in at_steps:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return True
    return False
