"""Entropy controllers: who sets ``entropy_coeff`` and ``kl_coef`` each step.

The entropy bonus ``entropy_coeff * H`` fades as H falls, so a fixed coefficient
cannot hold a floor: once entropy drops the bonus drops with it and collapse feeds
itself. A controller closes the loop on the measured entropy instead.

* ``fixed`` — the configured coefficients, untouched.
* ``floor`` — the published adaptive rule (Skywork-OR1, arXiv 2505.22312; TRL ``use_adaptive_entropy``)::

      c_{t+1} = clip(c_t + delta * sign(H* - H_t), c_min, c_max)
      bonus_t = c_t * H_t   if H_t < H*   else 0

* ``band`` — Keel's own: keep entropy inside [low, high] with a PI loop on a smoothed,
  slope-extrapolated log-entropy, pushing with the entropy bonus from below and with
  the KL anchor from above::

      m_t   = ema * m_{t-1} + (1 - ema) * H_t                  (smoothed entropy, m_0 = H_0)
      s_t   = log m_t - log m_{t-1}                            (log-slope per step)
      p_t   = log m_t + horizon * s_t                          (log-entropy predicted `horizon` steps ahead)
      e_t   = dz(log H* - p_t), H* = sqrt(low * high)          (error to the band's geometric centre,
      dz(x) = sign(x) * max(0, |x| - w),  w = deadband * (log high - log low) / 2     less a dead zone)
      c_{t-1} <- deadband_decay * c_{t-1}                     first, while p_t is inside the dead zone
      c_t   = clip(c_{t-1} + ki * e_t + kp * (e_t - e_{t-1}), c_min, c_max)        (velocity-form PI)
      c_t   = c_t / 2                                                   also, if p_t > log high
      k_t   = clip(max(k_{t-1} * (1 + kl_gain), k_base + kl_step), k_min, k_max)   if p_t > log high and H_0 <= high
            = k_base + (k_{t-1} - k_base) * kl_decay                               otherwise
      bonus_t = c_t * H   if p_t <= log high   else 0

  e > 0 means entropy is low or falling toward ``low``: the bonus grows; e < 0 shrinks it.
  A predicted crossing of ``high`` switches the bonus off at once, halves c_t each step it lasts
  (so a large start, e.g. 0.3, comes back small instead of re-inflating entropy at the top edge)
  and tightens the KL anchor (the reference policy's entropy is the warm start's, so the anchor
  pulls an over-random policy back down). H_0, the first step's entropy, stands for the
  reference's: when the band lies below it the anchor would pull entropy *up*, so it is not used.
  Working in log-entropy makes the gains independent of the entropy's scale; the
  velocity form has no integral wind-up at the clip bounds; the EMA keeps single noisy
  steps from moving the coefficients much, and the slope term reacts to a fast fall
  before the band is left.

* ``dual`` — the lab log's dual regularization closed on both sides, with no task-specific number:
  the band loop above on the band [rel_low, rel_high] x H_0 (H_0 = the first step's entropy, i.e. the
  reference policy's), and the KL coefficient driven by a PID Lagrangian multiplier (Stooke et al. 2020,
  arXiv 2007.03964) that holds the KL to the reference under a budget in nats/token::

      e_t = KL_t / kl_target - 1                          (relative excess; >= 1 while p_t > log high: the
                                                            reference's entropy H_0 < high, so its pull is downward)
      I_t = clip(I_{t-1} + kl_ki * e_t, 0, k_max)          (integral: slow, and released as slowly)
      k_t = clip(k_base + kl_kp * e_t + I_t + kl_kd * max(0, e_t - e_{t-1}), k_base, k_max)

  The proportional and rising-derivative terms answer a KL jump within one step at a coefficient that
  matters (a ratio-limited multiplicative rule starting from a small k_base needs ~10 steps to reach
  one); the integral removes a persistent excess. The budget is a ceiling: k never drops under the
  configured coefficient k_base (or a rollback's raise). On the entropy side the dead zone
  ``rel_deadband`` (default 0.6) makes the relative band a range to stay inside, not a setpoint, and
  inside it ``entropy_coeff`` relaxes back toward the configured value (factor ``entropy_relax`` per
  step): the bonus is the floor's push near the low edge, not a new resting level.

``on_rollback(direction)`` is the self-healing hook: after the monitor rolls a run
back, a collapse ("low") raises the entropy pressure and an over-random or KL-high
failure ("high") raises the KL pressure and halves the bonus.
"""

from __future__ import annotations

import math
from enum import Enum

from keel.config import ControlConfig
from keel.errors import KeelError


class ControllerType(str, Enum):
    FIXED = "fixed"
    FLOOR = "floor"
    BAND = "band"
    DUAL = "dual"


def _clip(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def _usable(entropy: float | None) -> bool:
    return entropy is not None and math.isfinite(entropy) and entropy > 0


class Controller:
    """Fixed coefficients; the base of the adaptive ones (rollback, logging, state)."""

    name = ControllerType.FIXED

    def __init__(self, cfg: ControlConfig, entropy_coeff: float, kl_coef: float):
        self.cfg = cfg
        self.entropy_coeff = entropy_coeff
        self.kl_coef = kl_coef
        self.base_kl_coef = kl_coef  # where the band's KL anchor relaxes to (raised by "high" rollbacks)
        self.rollbacks = 0

    def coefficients(self) -> tuple[float, float]:
        """(entropy_coeff, kl_coef) to use in this step's loss."""
        return self.entropy_coeff, self.kl_coef

    def update(self, step: int, entropy: float | None, kl: float | None = None) -> None:
        """Observe this step's measured entropy and KL to the reference (fixed: nothing to do)."""

    def on_rollback(self, direction: str) -> None:
        """Regularise harder in the direction the failing rule implies.

        low  (collapse):              c <- min(c_max, max(2c, c + rollback_entropy_step))
        high (over-random, KL drift): k <- min(k_max, max(2k, k + rollback_kl_step)),  c <- max(c_min, c / 2)
        """
        self.rollbacks += 1
        c = self.cfg
        if direction == "low":
            self.entropy_coeff = min(c.max_entropy_coeff,
                                     max(2 * self.entropy_coeff, self.entropy_coeff + c.rollback_entropy_step))
        else:
            self.kl_coef = min(c.max_kl_coef, max(2 * self.kl_coef, self.kl_coef + c.rollback_kl_step))
            self.base_kl_coef = self.kl_coef
            self.entropy_coeff = max(c.min_entropy_coeff, self.entropy_coeff / 2)

    def band(self) -> tuple[float | None, float | None]:
        """(low, high) entropy band in force, None where the controller has no such edge."""
        return None, None

    def metrics(self) -> dict:
        ec, kl = self.coefficients()
        low, high = self.band()
        return {"actor/entropy_coeff": ec, "actor/kl_coef": kl, "control/entropy_low": low,
                "control/entropy_high": high, "control/rollbacks": self.rollbacks}

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "cfg"}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k not in vars(self):
                raise KeelError(f"checkpoint controller state has unknown field '{k}' for controller '{self.name.value}'")
            setattr(self, k, v)


class FloorController(Controller):
    """Skywork-OR1's adaptive entropy coefficient: a bang-bang step toward the target."""

    name = ControllerType.FLOOR

    def __init__(self, cfg, entropy_coeff, kl_coef):
        super().__init__(cfg, entropy_coeff, kl_coef)
        self.below = True  # the bonus applies only while entropy is under the target

    def coefficients(self):
        return (self.entropy_coeff if self.below else 0.0), self.kl_coef

    def update(self, step, entropy, kl=None):
        c = self.cfg
        if step < c.warmup_steps or not _usable(entropy):
            return
        self.below = entropy < c.target_entropy
        change = c.delta if self.below else -c.delta
        self.entropy_coeff = _clip(self.entropy_coeff + change, c.min_entropy_coeff, c.max_entropy_coeff)

    def band(self):
        return self.cfg.target_entropy, None


class BandController(Controller):
    """Keel's band controller (equations in the module docstring)."""

    name = ControllerType.BAND

    def __init__(self, cfg, entropy_coeff, kl_coef):
        super().__init__(cfg, entropy_coeff, kl_coef)
        self.smoothed: float | None = None  # m_t
        self.prev_error: float | None = None  # e_{t-1}
        self.predicted: float | None = None  # exp(p_t), logged
        self.above = False  # p_t > log high: bonus off, KL anchor tightening
        self.first_entropy: float | None = None  # H_0 ~ the reference policy's entropy

    def coefficients(self):
        return (0.0 if self.above else self.entropy_coeff), self.kl_coef

    def update(self, step, entropy, kl=None):
        c = self.cfg
        if not _usable(entropy):
            return
        if self.first_entropy is None:
            self.first_entropy = entropy
        low, high = self.band()
        prev = self.smoothed
        self.smoothed = entropy if prev is None else c.ema * prev + (1 - c.ema) * entropy
        slope = 0.0 if prev is None else math.log(self.smoothed) - math.log(prev)
        predicted = math.log(self.smoothed) + c.horizon * slope
        self.predicted = math.exp(predicted)
        if step < c.warmup_steps:
            return
        # e_t = dz(log H* - p_t): zero inside the dead zone around the centre, so a policy that sits well
        # inside the band is left alone; only the distance past the zone's edge counts
        error = 0.5 * (math.log(low) + math.log(high)) - predicted
        width = self._deadband() * 0.5 * (math.log(high) - math.log(low))
        error = math.copysign(max(0.0, abs(error) - width), error)
        if error == 0.0 and width > 0:  # inside the dead zone a bonus no longer needed is released gradually
            self._relax_entropy_coeff()
        d_error = 0.0 if self.prev_error is None else error - self.prev_error
        self.entropy_coeff = _clip(self.entropy_coeff + c.ki * error + c.kp * d_error,
                                   c.min_entropy_coeff, c.max_entropy_coeff)
        self.prev_error = error
        self.above = predicted > math.log(high)
        if self.above:
            self.entropy_coeff = max(c.min_entropy_coeff, self.entropy_coeff / 2)
        self._update_kl(kl)

    def _deadband(self) -> float:
        return self.cfg.deadband

    def _relax_entropy_coeff(self) -> None:
        self.entropy_coeff *= self.cfg.deadband_decay

    def _update_kl(self, kl: float | None) -> None:
        """band: tighten the anchor while above the band (when the reference sits below `high`), else relax it."""
        c = self.cfg
        if self.above and self.first_entropy <= self.band()[1]:
            raised = max(self.kl_coef * (1 + c.kl_gain), self.base_kl_coef + c.kl_step)
            self.kl_coef = _clip(raised, c.min_kl_coef, c.max_kl_coef)
        else:
            relaxed = self.base_kl_coef + (self.kl_coef - self.base_kl_coef) * c.kl_decay
            self.kl_coef = _clip(relaxed, c.min_kl_coef, c.max_kl_coef)

    def on_rollback(self, direction):
        super().on_rollback(direction)
        # the restored policy is measured afresh: no smoothing or slope across the jump back
        self.smoothed, self.prev_error, self.predicted, self.above = None, None, None, False

    def band(self):
        return self.cfg.low, self.cfg.high

    def metrics(self):
        m = super().metrics()
        m["control/entropy_smoothed"] = self.smoothed
        m["control/entropy_predicted"] = self.predicted
        return m


class DualController(BandController):
    """Entropy band relative to the reference's entropy + a KL budget (equations in the module docstring)."""

    name = ControllerType.DUAL

    def __init__(self, cfg, entropy_coeff, kl_coef):
        super().__init__(cfg, entropy_coeff, max(kl_coef, cfg.kl_floor))
        self.base_entropy_coeff = entropy_coeff  # where the bonus relaxes to inside the dead zone
        self.kl_error: float | None = None  # e_t, logged
        self.kl_integral = 0.0  # I_t

    def _deadband(self):
        return self.cfg.rel_deadband

    def _relax_entropy_coeff(self):
        base = self.base_entropy_coeff
        self.entropy_coeff = base + (self.entropy_coeff - base) * self.cfg.entropy_relax

    def band(self):
        h0 = self.first_entropy
        return (None, None) if h0 is None else (self.cfg.rel_low * h0, self.cfg.rel_high * h0)

    def _update_kl(self, kl):
        c = self.cfg
        if kl is not None and math.isfinite(kl):
            error = kl / c.kl_target - 1.0
        elif self.above:
            error = 0.0
        else:
            return
        if self.above:  # over-random: the reference (entropy H_0 < high) pulls entropy down
            error = max(error, 1.0)
        rise = 0.0 if self.kl_error is None else max(0.0, error - self.kl_error)
        self.kl_error = error
        self.kl_integral = _clip(self.kl_integral + c.kl_ki * error, 0.0, c.max_kl_coef)
        base = max(c.kl_floor, self.base_kl_coef)  # never under the configured anchor (or a rollback's raise)
        self.kl_coef = _clip(base + c.kl_kp * error + self.kl_integral + c.kl_kd * rise, base, c.max_kl_coef)

    def on_rollback(self, direction):
        super().on_rollback(direction)
        self.kl_error, self.kl_integral = None, 0.0
        if direction == "low":
            self.base_entropy_coeff = self.entropy_coeff  # a collapse raised the resting bonus

    def metrics(self):
        m = super().metrics()
        m["control/kl_error"] = self.kl_error
        m["control/kl_target"] = self.cfg.kl_target
        return m


CONTROLLERS: dict[ControllerType, type[Controller]] = {
    ControllerType.FIXED: Controller,
    ControllerType.FLOOR: FloorController,
    ControllerType.BAND: BandController,
    ControllerType.DUAL: DualController,
}


def make_controller(cfg: ControlConfig, entropy_coeff: float, kl_coef: float) -> Controller:
    """The controller named by ``control.type``, starting from the configured coefficients."""
    try:
        kind = ControllerType(cfg.type)
    except ValueError:
        valid = ", ".join(t.value for t in ControllerType)
        raise KeelError(f"config key 'control.type' is '{cfg.type}'; valid: {valid}") from None
    return CONTROLLERS[kind](cfg, entropy_coeff, kl_coef)
