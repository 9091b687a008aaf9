"""Data-parallel training through torch's own engines (gloo on CPU, NCCL on GPUs).

Launch: ``torchrun --nproc_per_node N -m keel train CONFIG ...`` or ``keel train --nproc N CONFIG ...``.

Each rank owns a contiguous block of the step's B prompts (whole groups, so GRPO's
group statistics stay local), generates and scores them, and computes the loss on its
rows. The training forward (:class:`keel.actor.PackedLM`, an ``nn.Module``) is wrapped by
the engine named in ``actor_rollout_ref.actor.strategy``:

* ``ddp``   -- ``DistributedDataParallel``: every rank holds the weights, gradients are
  averaged across ranks in buckets during backward;
* ``fsdp2`` -- ``torch.distributed.fsdp.fully_shard`` per decoder layer and at the root:
  parameters, gradients and optimizer state are sharded over the ranks, each layer is
  all-gathered just before it runs; ``fsdp_config.param_offload`` / ``optimizer_offload``
  keep the shards in CPU memory (FSDP2's ``CPUOffloadPolicy``, GPU runs only).

To make N ranks produce exactly the single-process update, each micro-batch's loss is its
share of the whole mini-batch's loss (:class:`keel.actor.Placement`: the mini-batch's
response lengths are gathered from every rank) times N, undoing the engine's mean:

    (1/N) sum_ranks N * sum_k share_k   ==   agg(loss over all rows of the mini-batch)

Every rank then applies the same clipped gradient. Rank 0 logs, judges and checkpoints;
decisions that change the run (monitor verdict, controller) are computed from metrics
broadcast by rank 0, so all ranks take them together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from keel.errors import KeelError

STRATEGIES = ("ddp", "fsdp2")


class Dist:
    """The process group as the trainer sees it (a single process is rank 0 of 1)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n items (contiguous blocks, as even as possible)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def all_true(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def wrap(module: nn.Module, strategy: str, d: Dist, offload: bool = False) -> nn.Module:
    """The training module under the data-parallel engine `strategy` (a single process: unchanged).

    Build the optimizer afterwards: FSDP2 replaces the parameters by their shards (DTensors).
    """
    if strategy not in STRATEGIES:
        raise KeelError(f"config key 'actor_rollout_ref.actor.strategy' must be one of {', '.join(STRATEGIES)}, "
                        f"got {strategy!r}")
    if offload and strategy != "fsdp2":
        raise KeelError("config keys 'actor_rollout_ref.actor.fsdp_config.param_offload' / 'optimizer_offload' "
                        "need actor_rollout_ref.actor.strategy=fsdp2")
    if not d.enabled:
        return module
    device = next(module.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # buffers (rotary tables) are equal on every rank: no per-forward broadcast
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload and device.type == "cuda" else OffloadPolicy()
    for layer in module.layers:
        fully_shard(layer, offload_policy=policy)
    # the root (embeddings tied to the head, final norm) reshards after every forward too: after a no-grad pass
    # nothing is left unsharded in place of the DTensor shards the optimizer holds
    fully_shard(module, offload_policy=policy, reshard_after_forward=True)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def grad_sync(module: nn.Module):
    """sync(last) -> context for one micro-batch's forward+backward: the engine reduces the
    accumulated gradients only in the last one (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``)."""

    @contextmanager
    def sync(last: bool):
        if last:
            yield
        elif hasattr(module, "no_sync"):
            with module.no_sync():
                yield
        elif is_sharded(module):
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            yield

    return sync


@contextmanager
def full_weights(module: nn.Module):
    """Inside this block every parameter of a FSDP2 module is whole on every rank (for the KV-cached
    sampler, evaluation and saving, which read the HF modules directly); other engines: a no-op."""
    if not is_sharded(module):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.unshard()
    try:
        yield
    finally:
        for m in parts:
            m.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every FSDP2 shard gathered into the whole tensor (a collective: all ranks call it)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}


class PlainCopy:
    """FSDP2 leaves each rank only its shards, but the KV-cached sampler, evaluation and saving read whole
    HF modules: a plain copy of the model (made before sharding), refreshed from the gathered shards before
    each use -- what verl does for its rollout engine. :meth:`refresh` is a collective: every rank calls it."""

    def __init__(self, model: nn.Module, make_lean):
        import copy

        self.model = copy.deepcopy(model)
        self.lean = make_lean(self.model) if make_lean is not None else None

    def refresh(self, sharded: nn.Module):
        with torch.no_grad():
            self.model.load_state_dict(full_state_dict(sharded))
        return self.model, self.lean


class FullOptimizer:
    """An optimizer whose state_dict() has every FSDP2 shard gathered; gathered at construction (a
    collective: every rank builds one), for saving by rank 0."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        sd = optimizer.state_dict()
        full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v  # noqa: E731
        self._state = {**sd, "state": {i: {k: full(v) for k, v in st.items()} for i, st in sd["state"].items()}}

    def state_dict(self) -> dict:
        return self._state


def init_from_env() -> Dist:
    """Join the process group torchrun describes in the environment (else a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group once every rank is done (a group left to interpreter exit can abort a rank:
    gloo's threads are torn down while the other rank may still be talking to it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(nproc: int, train_args: list[str]) -> int:
    """`keel train --nproc N ...`: re-run this command under torchrun with N processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "keel", "train", *train_args]
    return subprocess.call(cmd)
