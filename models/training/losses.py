"""Training objectives: the thesis's target-rate losses and the λ-RD baseline.

Notation (thesis ch. 5-6): D is the distortion, here MSE on the 0..255 scale
(so that β has the magnitude of thesis Table 5.3); R̃ = R_est(ỹ) the rate of the
noisy latents (differentiable); R̂ = R_est(ŷ) the rate of the rounded latents
under the same entropy model (eq. 6.2). Rates are in bits per pixel and
include the hyper-latent z.

* `TargetBaseline`   eq. 5.14: J = D + β ((R_param − R̃) / R_param)², R_param fixed
                     (tuned between runs with `algorithm3_update`, Algorithm 3).
* `RateAdaptation`   eq. 6.4-6.8: R_param,t = r_target + (R̃_{t−1} − R̂_{t−1}).
* `BestStrategy`     eq. 6.14-6.20: R_param,t = r^p_t + shift_{t−1}, smoothed by
                     an EMA, with r^p_t = min(r_max, r_target · b^{max(0, T−t)/T})
                     for r_target ≤ 0.5 (exponential desired-rate decay).
* `LambdaRD`         J = λ R̃ + D, the standard Lagrangian the thesis compares to.

R_param,t and the EMA are constants for back-propagation (section 6.2.4): they
are Python floats, never tensors in the graph.

EMA convention. Thesis eq. 6.17 writes ema_t = α x_t + (1 − α) ema_{t−1} and
quotes α = 0.99, which would make the average follow the newest value almost
entirely. We take α as the weight of the history, ema_t = α ema_{t−1} + (1 − α) x_t,
which is what smoothing with "α = 0.99" means in common use (e.g. Adam's β).

One state object per rate level: in the variable-rate model every level keeps
its own R_param,t, EMA and β, and is updated only on steps that trained it.
Every class provides the `LevelLoss` protocol, which is all the training loop uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

# Thesis Table 5.3(a), parametric architecture: β per target rate (D on 0..255 MSE scale).
THESIS_BETA = {0.06: 60000.0, 0.12: 55000.0, 0.25: 30000.0, 0.5: 9000.0, 0.75: 6500.0, 1.0: 5500.0, 1.5: 5000.0, 2.0: 2500.0}


def thesis_beta(r_target: float) -> float:
    """β of Table 5.3(a) for a target rate; for a rate the thesis did not train, that of the
    nearest one in log rate."""
    nearest = min(THESIS_BETA, key=lambda r: abs(math.log(r / r_target)))
    return THESIS_BETA[nearest]


def decayed_target(r_target: float, t: int, T: int, r_max: float = 3.0, b: float = 50.0) -> float:
    """r^p_t of eq. 6.14: start high and decay exponentially to r_target by step T."""
    if r_target > 0.5 or T <= 0:
        return r_target
    return min(r_max, r_target * b ** (max(0, T - t) / T))


class LevelLoss(Protocol):
    """The loss state of one rate level, as the training loop uses it.

    Per step t that trains the level: `penalty` is the rate term added to D (R_param,t is a
    constant for back-propagation), then `observe` gets the step's batch-mean R̃ and R̂ of the
    level. `state`/`load_state` round-trip everything that carries over a checkpoint.
    `logged_param` and `beta` are for logs and change nothing: reading them does not advance
    any average.
    """

    r_target: float

    @property
    def beta(self) -> float | None:
        """The rate term's weight β (None for a loss that has none)."""

    def current_param(self, t: int) -> float:
        """R_param,t as the penalty of step t uses it (NaN for a loss without a target parameter)."""

    def logged_param(self, t: int) -> float:
        """R_param,t for the log, without any side effect on the loss state."""

    def penalty(self, bpp_noisy: torch.Tensor, t: int) -> torch.Tensor:
        """The rate term of step t for R̃ (one value per image, or the batch mean)."""

    def observe(self, bpp_noisy: float, bpp_quantized: float, t: int) -> None:
        """The level's batch-mean R̃ and R̂ of step t, after the optimizer step."""

    def state(self) -> dict:
        """What carries over a checkpoint."""

    def load_state(self, s: dict) -> None:
        """Restore what `state` returned."""


def rate_penalty(r_param: float, bpp_noisy: torch.Tensor, beta: float) -> torch.Tensor:
    """β ((R_param − R̃)/R_param)², per image (R̃ has one value per image)."""
    return beta * ((r_param - bpp_noisy) / r_param) ** 2


@dataclass
class TargetBaseline:
    """Eq. 5.14 with a fixed R_param (initially r_target, as in Algorithm 3)."""

    r_target: float
    beta: float
    r_param: float | None = None

    def __post_init__(self) -> None:
        if self.r_param is None:
            self.r_param = self.r_target

    def current_param(self, t: int) -> float:
        return float(self.r_param)

    def logged_param(self, t: int) -> float:
        return self.current_param(t)

    def penalty(self, bpp_noisy: torch.Tensor, t: int) -> torch.Tensor:
        return rate_penalty(self.current_param(t), bpp_noisy, self.beta)

    def observe(self, bpp_noisy: float, bpp_quantized: float, t: int) -> None:
        """Fixed parameter: nothing to update during training."""

    def state(self) -> dict:
        return {"r_param": self.r_param}

    def load_state(self, s: dict) -> None:
        self.r_param = s["r_param"]


def algorithm3_update(r_param: float, beta: float, r_target: float, measured_rate: float,
                      measured_var: float, allowed_var: float, delta_beta: float,
                      eps: float = 1.0) -> tuple[float, float]:
    """One iteration of thesis Algorithm 3 (lines 4-9): shift R_param by the measured
    mean error and move β by δ_β towards the allowed rate variance."""
    r_param = r_param - (measured_rate - r_target)
    if measured_var > allowed_var:
        beta = beta + delta_beta
    elif measured_var < allowed_var:
        beta = max(eps, beta - delta_beta)
    return r_param, beta


@dataclass
class RateAdaptation:
    """Eq. 6.8: R_param,t = r_target + (R̃_{t−1} − R̂_{t−1})."""

    r_target: float
    beta: float
    shift: float = 0.0  # R_shift of the last step that trained this level (eq. 6.3)

    def current_param(self, t: int) -> float:
        return self.r_target + self.shift

    def logged_param(self, t: int) -> float:
        return self.current_param(t)

    def penalty(self, bpp_noisy: torch.Tensor, t: int) -> torch.Tensor:
        return rate_penalty(self.current_param(t), bpp_noisy, self.beta)

    def observe(self, bpp_noisy: float, bpp_quantized: float, t: int) -> None:
        self.shift = bpp_noisy - bpp_quantized

    def state(self) -> dict:
        return {"shift": self.shift}

    def load_state(self, s: dict) -> None:
        self.shift = s["shift"]


@dataclass
class BestStrategy:
    """Eq. 6.20: EMA-smoothed R_param,t with exponential desired-rate decay (eq. 6.14)."""

    r_target: float
    beta: float
    T: int
    alpha: float = 0.99
    r_max: float = 3.0
    b: float = 50.0
    shift: float = 0.0
    ema: float | None = None
    _last_t: int = field(default=-1, repr=False)

    def logged_param(self, t: int) -> float:
        """The current R^ema without folding anything in (for logs)."""
        return float(self.ema) if self.ema is not None else self.raw_param(t)

    def raw_param(self, t: int) -> float:
        return decayed_target(self.r_target, t, self.T, self.r_max, self.b) + self.shift

    def current_param(self, t: int) -> float:
        """R^ema_t: folds R_param,t into the average once per step t."""
        if t != self._last_t:
            raw = self.raw_param(t)
            self.ema = raw if self.ema is None else self.alpha * self.ema + (1 - self.alpha) * raw
            self._last_t = t
        return float(self.ema)

    def penalty(self, bpp_noisy: torch.Tensor, t: int) -> torch.Tensor:
        return rate_penalty(self.current_param(t), bpp_noisy, self.beta)

    def observe(self, bpp_noisy: float, bpp_quantized: float, t: int) -> None:
        self.shift = bpp_noisy - bpp_quantized

    def state(self) -> dict:
        return {"shift": self.shift, "ema": self.ema, "last_t": self._last_t}

    def load_state(self, s: dict) -> None:
        self.shift, self.ema, self._last_t = s["shift"], s["ema"], s["last_t"]


@dataclass
class LambdaRD:
    """Standard J = λ·R̃ + D (λ per level, D on the 0..255 MSE scale)."""

    r_target: float
    lmbda: float

    @property
    def beta(self) -> None:
        """No β: λ weights the rate instead."""
        return None

    def current_param(self, t: int) -> float:
        return float("nan")

    def logged_param(self, t: int) -> float:
        return self.current_param(t)

    def penalty(self, bpp_noisy: torch.Tensor, t: int) -> torch.Tensor:
        return self.lmbda * bpp_noisy

    def observe(self, bpp_noisy: float, bpp_quantized: float, t: int) -> None:
        pass

    def state(self) -> dict:
        return {}

    def load_state(self, s: dict) -> None:
        pass


def make_level_losses(kind: str, levels: tuple[float, ...], total_steps: int,
                      beta_scale: float = 1.0, decay_fraction: float = 0.2) -> list[LevelLoss]:
    """One loss-state object per level. β from thesis Table 5.3(a) times `beta_scale`.

    decay_fraction sets T of eq. 6.14 relative to the run: the thesis used
    T = 150k of 750k steps, i.e. 0.2.
    """
    betas = [thesis_beta(r) * beta_scale for r in levels]
    if kind == "baseline":
        return [TargetBaseline(r, b) for r, b in zip(levels, betas)]
    if kind == "adaptive":
        return [RateAdaptation(r, b) for r, b in zip(levels, betas)]
    if kind == "best":
        T = max(1, int(decay_fraction * total_steps))
        return [BestStrategy(r, b, T=T) for r, b in zip(levels, betas)]
    if kind == "lambda":
        # CompressAI's MSE models minimise λ_c·255²·MSE + bpp, i.e. D + bpp/λ_c; λ_c = 0.0018
        # gives about 0.12 bpp and grows roughly as rate^1.5 across its quality range.
        lambdas = [1.0 / (0.0018 * (r / 0.12) ** 1.5) for r in levels]
        return [LambdaRD(r, lam) for r, lam in zip(levels, lambdas)]
    raise ValueError(f"unknown loss {kind!r}")
