"""Entropy controllers: who sets ``entropy_coeff`` and ``kl_coef`` each step.

The entropy bonus ``entropy_coeff * H`` fades as H falls, so a fixed coefficient
cannot hold a floor: once entropy drops the bonus drops with it and collapse feeds
itself. A controller closes the loop on the measured entropy instead.

* ``fixed`` — the configured coefficients, untouched.
* ``floor`` — the published adaptive rule (Skywork-OR1; TRL ``use_adaptive_entropy``)::

      c_{t+1} = clip(c_t + delta * sign(H* - H_t), c_min, c_max)
      bonus_t = c_t * H_t   if H_t < H*   else 0

* ``band`` — Keel's own: keep entropy inside [low, high] with a PI loop on a smoothed,
  slope-extrapolated log-entropy, pushing with the entropy bonus from below and with
  the KL anchor from above::

      m_t   = ema * m_{t-1} + (1 - ema) * H_t                 (smoothed entropy)
      s_t   = log m_t - log m_{t-1}                           (log-slope per step)
      e_t   = log H* - (log m_t + horizon * s_t),   H* = sqrt(low * high)
      c_t   = clip(c_{t-1} + ki * e_t + kp * (e_t - e_{t-1}), c_min, c_max)    (velocity-form PI)
      k_t   = clip(k_{t-1} * (1 + kl_gain), k_min, k_max)    if log m_t + horizon*s_t > log high
            = k_base + (k_{t-1} - k_base) * kl_decay           otherwise

  e > 0 means entropy is low or falling toward ``low``: the bonus grows; e < 0 shrinks it,
  and a predicted crossing of ``high`` also tightens the KL anchor. Working in log-entropy
  makes the gains independent of the model's vocabulary size; the velocity form has no
  integral wind-up, and the EMA keeps it from chasing single noisy steps.

``on_rollback(direction)`` is the self-healing hook: after the monitor rolls a run
back, a collapse ("low") raises the entropy pressure and an over-random or KL-high
failure ("high") raises the KL pressure and lowers the bonus.
"""

from __future__ import annotations

import math

from keel.config import ControlConfig


class Controller:
    """Fixed coefficients; the base of the adaptive ones."""

    name = "fixed"

    def __init__(self, cfg: ControlConfig, entropy_coeff: float, kl_coef: float):
        self.cfg = cfg
        self.entropy_coeff = entropy_coeff
        self.kl_coef = kl_coef
        self.base_kl_coef = kl_coef
        self.rollbacks = 0

    def coefficients(self) -> tuple[float, float]:
        """(entropy_coeff, kl_coef) to use in this step's loss."""
        return self.entropy_coeff, self.kl_coef

    def update(self, step: int, entropy: float) -> None:
        """Observe this step's measured entropy (fixed: nothing to do)."""

    def on_rollback(self, direction: str) -> None:
        """Regularise harder in the direction the failing rule implies."""
        self.rollbacks += 1
        c = self.cfg
        if direction == "low":  # collapse: more entropy pressure
            self.entropy_coeff = min(c.max_entropy_coeff, max(2 * self.entropy_coeff, self.entropy_coeff + 0.01))
        else:  # over-random / drifting: more KL pressure, less bonus
            self.kl_coef = min(c.max_kl_coef, max(2 * self.kl_coef, self.kl_coef + 0.01))
            self.entropy_coeff = max(c.min_entropy_coeff, self.entropy_coeff / 2)

    def metrics(self) -> dict:
        return {
            "actor/entropy_coeff": self.coefficients()[0],
            "actor/kl_coef": self.coefficients()[1],
            "control/entropy_low": self.cfg.low if self.name == "band" else None,
            "control/entropy_high": self.cfg.high if self.name == "band" else None,
            "control/rollbacks": self.rollbacks,
        }

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "cfg"}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class FloorController(Controller):
    name = "floor"

    def __init__(self, cfg, entropy_coeff, kl_coef):
        super().__init__(cfg, entropy_coeff, kl_coef)
        self.below = True  # the bonus applies only while entropy is under the target

    def coefficients(self):
        return (self.entropy_coeff if self.below else 0.0), self.kl_coef

    def update(self, step, entropy):
        c = self.cfg
        if step < c.warmup_steps or entropy is None or not math.isfinite(entropy):
            return
        self.below = entropy < c.target_entropy
        change = c.delta if self.below else -c.delta
        self.entropy_coeff = min(c.max_entropy_coeff, max(c.min_entropy_coeff, self.entropy_coeff + change))

    def metrics(self):
        m = super().metrics()
        m["control/entropy_low"] = self.cfg.target_entropy
        return m


class BandController(Controller):
    name = "band"

    def __init__(self, cfg, entropy_coeff, kl_coef):
        super().__init__(cfg, entropy_coeff, kl_coef)
        self.smoothed: float | None = None
        self.prev_error = 0.0

    def update(self, step, entropy):
        c = self.cfg
        if entropy is None or not math.isfinite(entropy) or entropy <= 0:
            return
        prev = self.smoothed
        self.smoothed = entropy if prev is None else c.ema * prev + (1 - c.ema) * entropy
        if step < c.warmup_steps:
            return
        slope = 0.0 if prev is None else math.log(self.smoothed) - math.log(prev)
        predicted = math.log(self.smoothed) + c.horizon * slope
        error = 0.5 * (math.log(c.low) + math.log(c.high)) - predicted  # log H* - predicted
        self.entropy_coeff += c.ki * error + c.kp * (error - self.prev_error)
        self.entropy_coeff = min(c.max_entropy_coeff, max(c.min_entropy_coeff, self.entropy_coeff))
        self.prev_error = error
        if predicted > math.log(c.high):
            self.kl_coef = min(c.max_kl_coef, max(self.kl_coef * (1 + c.kl_gain), c.kl_floor_step))
        else:
            self.kl_coef = self.base_kl_coef + (self.kl_coef - self.base_kl_coef) * c.kl_decay
        self.kl_coef = max(c.min_kl_coef, self.kl_coef)


CONTROLLERS = {"fixed": Controller, "floor": FloorController, "band": BandController}


def make_controller(cfg: ControlConfig, entropy_coeff: float, kl_coef: float) -> Controller:
    return CONTROLLERS[cfg.type](cfg, entropy_coeff, kl_coef)
