"""The last finite state: what the trainer goes back to when an update made the policy non-finite.

The loss / gradient guard in :func:`keel.trainer.ppo_update` skips an update whose loss or gradient is
NaN/inf. An update can still break the policy with finite numbers (``optim.lr=1e30``: every weight
becomes about ±1e30, and the next forward overflows). Two checks catch that:

* after each step's update: every parameter is finite (:func:`weights_finite`);
* in the next step's sampling: the logits are finite (:class:`keel.rollout.NonFiniteLogits`), which
  proves (or disproves) the weights the last update produced.

Either way the trainer restores :class:`LastFinite` -- the parameters and optimizer state as they were
right before the update, taken after those weights had just sampled finite logits -- and counts the
update(s) as non-finite, exactly like a skipped NaN update (``actor/nonfinite_skips``,
``trainer.max_nonfinite_in_row``). The copy costs one model's parameters and optimizer state in memory.
"""

from __future__ import annotations

import copy

import torch


@torch.no_grad()
def weights_finite(model: torch.nn.Module) -> bool:
    """True when no floating-point parameter holds NaN or ±inf (FSDP2: this rank's shards)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in model.parameters())
    return all(bool(torch.isfinite(p).all()) for p in local if p.is_floating_point())


class LastFinite:
    """An in-memory copy of (parameters, optimizer state, trainer counters), restorable in place."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self._params: list[torch.Tensor] | None = None
        self._optim: dict | None = None
        self.counters: dict = {}  # the trainer's non-finite counters when the copy was taken

    @property
    def taken(self) -> bool:
        return self._params is not None

    @torch.no_grad()
    def take(self, counters: dict) -> None:
        params = [p.detach() for p in self.model.parameters()]
        if self._params is None:
            self._params = [p.clone() for p in params]
        else:  # reuse the buffers: one copy per step, no allocation
            for dst, src in zip(self._params, params):
                dst.copy_(src)
        self._optim = copy.deepcopy(self.optimizer.state_dict())
        self.counters = dict(counters)

    @torch.no_grad()
    def restore(self) -> None:
        if self._params is None:
            raise RuntimeError("LastFinite.restore() before take()")
        for p, saved in zip(self.model.parameters(), self._params):
            p.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(self._optim))
