"""Latent refinement: encode time spent for quality at the same file size (`effort`).

The analysis transform g_a guesses one image's latents in one pass. Refinement
then optimises them for that image against the real objective (Campos et al.
2019; Yang, Bamler & Mandt 2020, arXiv:2006.04240): with ẑ -- and so every
mean and table index -- held fixed at the rate parameter rate control chose,
Adam moves the gained latent u to minimise

    D(u) + μ · R(u),   D = Σ (g_s((round(u − mean) + mean) · inv_gain) − x)²  (8-bit scale)

where the rounding is the encoder's (`lcodec.rounding`) and straight-through (the
forward pass is the real reconstruction) and R sums the frozen y tables' code lengths, linearly
interpolated between integers and taken at u − mean plus uniform noise (a fixed
seed). μ starts at the slope of the model's own rate-distortion curve and
follows the byte budget: it grows while the coded size is above the aim and
shrinks while it is below. Every iterate is a candidate file; the best real
distortion whose exact code length is inside the budget is kept. The
decoder sees ordinary symbols: the format does not change.

Determinism: callers run this inside `frozen.one_thread_per_operation()` and the
noise has a fixed seed, so the same image, budget and iteration count give the
same symbols whatever the thread setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from . import rounding
from .bitstream.container import OVERHEAD_BYTES, RATE_SCALE
from .bitstream.tables import ESCAPE_MAX_BITS
from .models.frozen import FrozenModel

# Adam iterations per effort level (0: the one-pass encoder; `lcodec.api.MAX_EFFORT` is the last).
ITERATIONS = (0, 5, 10, 15, 20, 30, 40, 60, 80, 100)
# Refinement holds the synthesis's activations for the backward pass: larger images are coded at effort 0.
MAX_PIXELS = 4_194_304  # 2048 x 2048
WITHIN_DB = 1.0  # the encoder refines only models whose one-pass file is this close (PSNR) to the best
RATE_SLACK = 0.03  # a refined file may be this much under the budget (as rate control's tolerance)
AIM = 0.01  # μ steers the size towards this much under the budget ...
STEER = 3.0  # ... multiplying μ by exp(STEER * relative excess) after every iteration


def iterations(effort: int) -> int:
    return ITERATIONS[effort]


def learning_rate(bpp: float) -> float:
    """Adam's step on the gained latent (quantisation step 1): 0.003 up to 0.12 bpp, 0.01 from
    0.5 bpp, log-linear between. Larger steps at low rates move many zeros at once and lose."""
    t = min(max(math.log(bpp / 0.12) / math.log(0.5 / 0.12), 0.0), 1.0)
    return 0.003 * (0.01 / 0.003) ** t


def _proxy_bits(v: torch.Tensor, idx: torch.Tensor, model: FrozenModel) -> torch.Tensor:
    """Σ code length of the symbols v (real-valued), linear between the neighbouring integers."""
    bits, offsets, lengths = rounding.bits_table(model)
    top = (lengths[idx] - 1).clamp(min=1).to(v.dtype)
    col = (v - offsets[idx].to(v.dtype)).clamp(min=0).minimum(top)
    c0 = col.detach().floor().minimum(top - 1).clamp(min=0)
    frac = col - c0
    flat = idx * bits.shape[1] + c0.long()
    table = bits.view(-1)
    return (table[flat] * (1 - frac) + table[flat + 1] * frac).sum()


class Refiner:
    """One image at one rate parameter rq with ẑ fixed: its means, table indices and the
    distortion and exact code length of any symbols."""

    def __init__(self, model: FrozenModel, x: torch.Tensor, height: int, width: int, y: torch.Tensor, rq: int):
        self.model, self.height, self.width = model, height, width
        self.target = x[:, :, :height, :width] * 255
        self.q = rq / RATE_SCALE
        gain, self.inv_gain = model.gains(self.q)
        self.u0 = y * gain
        z = model.hyper_latent(self.u0)
        self.mean, idx = model.latent_entropy_parameters(z, np.dtype(np.int64))
        self.idx = torch.from_numpy(idx)[None]
        self.idx_np = idx.ravel()
        z_flat = z.numpy().ravel()
        self.z_bits = model.z_tables.cost_bits(z_flat, np.repeat(np.arange(model.config.N), z_flat.size // model.config.N))

    def distortion(self, symbols: torch.Tensor) -> torch.Tensor:
        """Σ squared error (8-bit scale) of the reconstruction from `symbols` (float, may carry a
        straight-through gradient) over the image's own pixels."""
        x_hat = self.model.draw((symbols + self.mean) * self.inv_gain, self.q).clamp(0, 1)
        return (x_hat[:, :, :self.height, :self.width] * 255 - self.target).square().sum()

    def file_bytes(self, symbols: np.ndarray) -> float:
        """The ideal size of the whole file with these y symbols (flat int32)."""
        return OVERHEAD_BYTES + (self.z_bits + self.model.y_tables.cost_bits(symbols, self.idx_np)) / 8

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """The symbols of the latents less their means `v` (float), rounded as the encoder does."""
        return rounding.round_latents(v, self.idx, self.model)

    def symbols(self, u: torch.Tensor) -> np.ndarray:
        # As `Encoder._symbol_tiles`: the coder refuses |s| >= 2^24 anyway.
        s = self.round(u - self.mean).clamp_(-2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS)
        return s.to(torch.int32).numpy().ravel()


def refine(model: FrozenModel, x: torch.Tensor, height: int, width: int, y: torch.Tensor, rq: int,
           budget: int, floor: float, iterations: int, progress: Callable[[], None] | None = None
           ) -> np.ndarray | None:
    """The y symbols (flat int32, C order, as `Encoder.payload` takes them) of the refined latent
    at rate parameter rq whose ideal file size is in [floor, budget - guard] bytes with the least
    distortion, or None if no iterate beat the one-pass symbols.

    `x` is the padded image (1, 3, Hp, Wp) in [0, 1], `y` g_a's latent before the gain.
    `progress` is called once per iteration.
    """
    ref = Refiner(model, x, height, width, y, rq)
    # The range coder ends within a few bytes of the ideal length (0.01% measured): keep a guard.
    ceiling = budget - 4 - 1e-3 * budget
    aim = (1 - AIM) * budget
    bpp = 8 * budget / (height * width)

    with torch.no_grad():
        s0 = ref.symbols(ref.u0)
        best_d = float(ref.distortion(torch.from_numpy(s0).view(ref.u0.shape).float()))
        mu = _initial_slope(model, x, height, width, y, rq, ref, best_d, s0)
    best = None
    u = ref.u0.clone().requires_grad_(True)
    lr = learning_rate(bpp)
    optimizer = torch.optim.Adam([u], lr=lr)
    noise = torch.Generator().manual_seed(0)
    for i in range(iterations + 1):
        v = u - ref.mean
        hard = ref.round(v.detach())
        d = ref.distortion(v + (hard - v).detach())
        symbols = ref.symbols(u.detach())
        size = ref.file_bytes(symbols)
        if i > 0 and floor <= size <= ceiling and float(d.detach()) < best_d:
            best_d, best = float(d.detach()), symbols
        if i == iterations:
            break
        u_noise = torch.rand(v.shape, generator=noise) - 0.5
        loss = d + mu * _proxy_bits(v + u_noise, ref.idx, model) / 8
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay over the run
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / iterations))
        optimizer.step()
        mu *= math.exp(STEER * (size / aim - 1))
        if progress is not None:
            progress()
    return best


def _initial_slope(model: FrozenModel, x: torch.Tensor, height: int, width: int, y: torch.Tensor, rq: int,
                   ref: Refiner, d0: float, s0: np.ndarray) -> float:
    """-dD/dbytes of the model's own curve between rq and a rate step below it (distortion per byte)."""
    below = max(rq - RATE_SCALE // 8, round(model.rate_range[0] * RATE_SCALE))
    if below == rq:
        below = rq + RATE_SCALE // 8
    other = Refiner(model, x, height, width, y, below)
    s1 = other.symbols(other.u0)
    d1 = float(other.distortion(torch.from_numpy(s1).view(other.u0.shape).float()))
    db = ref.file_bytes(s0) - other.file_bytes(s1)
    slope = (d1 - d0) / db if db else 0.0
    return slope if slope > 0 and math.isfinite(slope) else d0 / max(ref.file_bytes(s0), 1.0)
