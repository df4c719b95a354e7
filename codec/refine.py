"""Encoder refinement: encode time spent for quality at the same file size (`effort`).

The decoder reads any hyper-latent ẑ and any symbols; which ones to send is the
encoder's choice, and the one-pass encoder sends h_a's guess and g_a's latents
rounded. Refinement searches for better ones for this image, in two stages.

1. ẑ (`refine_hyper`). ẑ sets every y table and mean, so it decides what each
   symbol costs. h_a guesses it in one pass; refinement searches for a ẑ with a
   smaller `HyperCost`

       Σ (u - s - mean)² + λ · (bits(s | ẑ) + bits(ẑ))

   with u the gained latent, s its symbols rounded as the encoder does
   (`lcodec.rounding`, under ẑ's tables) and λ the rounding's: first Adam on a
   real-valued z with straight-through rounding, then moves of the integer ẑ
   chosen by what they are expected to save, each kept only if the exact cost
   falls. The bits saved buy a finer rate parameter: refinement tries a few rates
   (`HYPER_TRIES`), each with its own ẑ, the first searched longest and the others
   starting from it, steering towards the budget; at each it fills the budget by
   rounding with a smaller or larger λ (`Refiner.fill`), and it keeps the file
   that decodes closest to the image.
2. y, with ẑ -- and so every mean and table -- held fixed. For a model whose
   encoder rounds with RDO (a linear synthesis, `lcodec.rounding`), `refine_symbols`
   moves the symbols themselves by one to lower

       D(s) + μ · bits(s),   D = Σ (x̂(s) − x)²  (8-bit scale, after the post-filter)

   each step moving the symbols that the gradient of D, the synthesis's own energy
   per symbol and the change of the code length (the symbol's own, and with a subband
   context on one tile that of the symbols whose labels count it) say will save most -- at most one
   per latent position in each level's block of channels and none in neighbouring
   positions of the same block, since neighbours' changes overlap in the picture
   and a level's do little to another's -- and keeping the move only if the exact cost
   falls within the budget. RDO rounding weighs every latent's error alike; the
   real error is the picture's after the clamp and the post-filter, and it is
   smaller for some moves than that weighing says. For the other models
   (`refine_latents`) Adam moves the gained latent u to minimise

       D(u) + μ · R(u),   D = Σ (g_s((round(u − mean) + mean) · inv_gain) − x)²  (8-bit scale)

   (Campos et al. 2019; Yang, Bamler & Mandt 2020, arXiv:2006.04240), the rounding
   straight-through and R the y tables' code lengths, linearly interpolated between
   integers and taken at u − mean plus uniform noise (a fixed seed), μ starting at the
   slope of the model's own rate-distortion curve. In both, μ follows the byte budget
   and every iterate is a candidate: the best real distortion inside the budget is kept.

The decoder sees an ordinary ẑ and ordinary symbols: the format does not change.

Determinism: callers run this inside `frozen.one_thread_per_operation()` and the
noise has a fixed seed, so the same image, budget and effort give the same
bytes whatever the thread setting.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import rounding
from .bitstream.container import OVERHEAD_BYTES, RATE_SCALE
from .bitstream.tables import ESCAPE_MAX_BITS, escape_payload_bits
from .models import context
from .models.entropy_models import LIKELIHOODS
from .models.frozen import (HYPER_HALO, PAD, TILE_LATENTS, FrozenModel, Tile, one_thread_per_operation,
                            release_free_memory, tiles)
from .models.integer_hyper import OUT_BITS

# Per effort level (0: the one-pass encoder; `lcodec.api.MAX_EFFORT` is the last): the steps of
# each search for ẑ at each rate tried, and the steps on y at the rate kept (`latent_iterations`):
# symbol moves for models with RDO rounding, Adam iterations for the others.
HYPER_ITERATIONS = (0, 4, 8, 12, 16, 24, 32, 40, 50, 60)
SYMBOL_ITERATIONS = (0, 2, 4, 6, 8, 12, 16, 20, 25, 60)
LATENT_ITERATIONS = (0, 0, 0, 0, 0, 5, 5, 10, 15, 20)
HYPER_TRIES = 3  # rates tried with a refined ẑ, the first where the file would fill the budget ...
HYPER_SAVING = 0.08  # ... if refinement made it this much smaller than the one-pass file
RETRY_SHARE = 0.25  # the later rates start from the first one's ẑ and search this share as long
HYPER_LR = 0.01  # Adam's step on z (quantisation step 1); 0.003 and 0.03 take less off the cost in 25 steps
HYPER_LAMBDA = 0.06  # λ of ẑ's cost for models with plain rounding (the lifting models' rounding λ)
HYPER_CHECK = 10  # Adam: the exact cost of ẑ is measured every this many iterations (and at the last)
FLIP_START, FLIP_MIN, FLIP_MAX = 256, 8, 4096  # elements of ẑ moved at once by the second search
SYMBOL_START, SYMBOL_MIN, SYMBOL_MAX = 64, 8, 16384  # symbols moved at once by `refine_symbols`
SYMBOL_OVER = 1.5  # μ grows this much when a move that lowers the cost would overflow the budget
IMPULSE_LATENTS = 48  # the synthesis's energy per symbol is estimated on a canvas of this many latents a side
FILL_RANGE, FILL_STEPS = 4.0, 8  # the rounding's λ may change this much to fill the budget; bisection steps
# Refinement keeps the whole latent's symbols (int32) and table indices, and on several tiles its
# gradient and code-length changes (float16): with the lifting models about 33 bytes per pixel
# besides g_a's latent and the picture; the synthesis and h_s run tile by tile (`Refiner.tiles`,
# `GRADIENT_TILE`, `SURROGATE_TILE`). Larger images than this are coded at effort 0.
MAX_PIXELS = 67_108_864  # 8192 x 8192, the decoder's default limit
# The gradient of the distortion is taken on tiles of this many latents a side, each read with this
# many latents of context: the synthesis's activations under autograd take ~600 bytes per pixel, so a
# tile with the synthesis's whole reach (`FrozenModel.halo_latents`, 24 for the lifting models) would
# need gigabytes. The gradient only ranks the moves; the distortion that decides them is exact.
GRADIENT_TILE, GRADIENT_HALO = 24, 8
SURROGATE_TILE = 12  # hyper-latents a side of the tiles ẑ's surrogate cost is differentiated on (a Kodak
# picture's 12 x 8 is one tile; a tile's graph with its halo is the largest thing alive in the search for ẑ)
ERROR_ROWS = 256  # the distortion of a large picture is summed this many rows at a time
WITHIN_DB = 1.0  # the encoder refines only models whose one-pass file is this close (PSNR) to the best
RATE_SLACK = 0.03  # a refined file may be this much under the budget (as rate control's tolerance)
# The rate search and μ steer the size towards this much under the budget, as close as the
# one-pass rate control aims (`ratecontrol.WHOLE`): on 6 Kodak images at 0.5 bpp effort 9's files
# are 0.5% under instead of 1.2%, +0.035 dB. The ceiling (0.1% and 4 bytes under) stays the limit.
AIM = 0.004
STEER = 10.0  # μ is multiplied by exp(STEER * relative excess) after every iteration


def iterations(effort: int, model: FrozenModel, height: int | None = None, width: int | None = None) -> int:
    """The progress bar's length for one refinement of `model`'s encode at `effort`: its steps
    times the synthesis tiles of a `height` x `width` image (`tile_count`; one without a size)."""
    steps = 2 * sum(_search_steps(effort, t) for t in range(HYPER_TRIES)) + latent_iterations(effort, model)
    return steps * (1 if height is None or width is None else tile_count(height, width, model))


def tile_count(height: int, width: int, model: FrozenModel) -> int:
    """The whole-transform synthesis tiles of a `height` x `width` image (`Refiner.tiles`): over one,
    refinement works in tiles and its progress counts them."""
    return len(_synthesis_tiles(model, -(-height // PAD) * PAD // 16, -(-width // PAD) * PAD // 16))


def _synthesis_tiles(model: FrozenModel, h: int, w: int) -> list[Tile]:
    """The tiles of an h x w latent under the whole transform's synthesis (`TILE_LATENTS` with its
    whole reach): over one, the distortion is the decoder's picture (`FrozenModel.synthesize`) and
    the gradient is taken tile by tile."""
    return tiles(h, w, TILE_LATENTS, model.halo_latents)


def _search_steps(effort: int, t: int) -> int:
    """The steps of each of the two searches for ẑ at the t-th rate tried (`refine_hyper`): the
    later rates start from the first one's ẑ and search `RETRY_SHARE` as long."""
    return HYPER_ITERATIONS[effort] if t == 0 else math.ceil(RETRY_SHARE * HYPER_ITERATIONS[effort])


def latent_iterations(effort: int, model: FrozenModel) -> int:
    """Steps on y at `effort`: `SYMBOL_ITERATIONS` symbol moves for a model whose encoder rounds
    with RDO (the lifting models, whose synthesis is linear up to the post-filter), else
    `LATENT_ITERATIONS` Adam iterations."""
    return (SYMBOL_ITERATIONS if rounding.rdo_lambda(model) is not None else LATENT_ITERATIONS)[effort]


def learning_rate(bpp: float) -> float:
    """Adam's step on the gained latent (quantisation step 1): 0.003 up to 0.12 bpp, 0.01 from
    0.5 bpp, log-linear between. Larger steps at low rates move many zeros at once and lose."""
    t = min(max(math.log(bpp / 0.12) / math.log(0.5 / 0.12), 0.0), 1.0)
    return 0.003 * (0.01 / 0.003) ** t


@dataclass(frozen=True)
class Refined:
    """A refined encode: the rate parameter, ẑ (int64, as h_a's) and the y symbols (flat int32, C order)."""

    rq: int
    z: torch.Tensor
    symbols: np.ndarray


def _proxy_bits(v: torch.Tensor, idx: torch.Tensor, model: FrozenModel) -> torch.Tensor:
    """Σ code length of the y symbols v (real-valued) under the tables `idx`."""
    return _interpolated_bits(v, idx, *rounding.bits_table(model))


def _proxy_hyper_bits(z: torch.Tensor, model: FrozenModel, rq: int) -> torch.Tensor:
    """Σ code length of the hyper-latents z (1, N, h, w), real-valued, under the z tables at rate rq."""
    return _interpolated_bits(z, _z_tables(z, model, rq), *rounding.bits_table(model, hyper=True))


def _interpolated_bits(v: torch.Tensor, idx: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
    """Σ code length of real values v under the tables `idx`, linear between the neighbouring integers."""
    top = (lengths[idx] - 1).clamp(min=1).to(v.dtype)
    col = (v - offsets[idx].to(v.dtype)).clamp(min=0).minimum(top)
    c0 = col.detach().floor().minimum(top - 1).clamp(min=0)
    frac = col - c0
    flat = idx * bits.shape[1] + c0.long()
    table = bits.view(-1)
    return (table[flat] * (1 - frac) + table[flat + 1] * frac).sum()


class Refiner:
    """One image at one rate parameter rq with ẑ fixed (by default h_a's): its means, table
    indices and the distortion and exact code length of any symbols.

    Only the latent-sized arrays that every step needs are kept: the table indices (as small an
    integer type as holds them for a model with a subband context) and the means (float32) --
    with a subband context only the LL block's (`_mean`, (1, LL_CHANNELS, h, w)): a detail's
    mean is 0 (checked at load), and the rounding takes a detail's residual as y · gain. On more than
    one tile (`tiles`) the synthesis runs in bounded memory, as the decoder's."""

    def __init__(self, model: FrozenModel, x: torch.Tensor, height: int, width: int, y: torch.Tensor, rq: int,
                 z: torch.Tensor | None = None):
        self.model, self.x, self.y, self.height, self.width = model, x, y, height, width
        self.shape = tuple(y.shape)
        self.rq, self.q = rq, rq / RATE_SCALE
        self.gain, self.inv_gain = model.gains(self.q)
        self.z = model.hyper_latent(self.u0) if z is None else z
        self._mean, idx = _entropy_parameters(model, self.z)
        self.idx = torch.from_numpy(idx)[None]
        self.idx_np = idx.ravel()
        self.z_bits = _hyper_bits(model, self.z, rq)
        self.tiles = _synthesis_tiles(model, self.shape[2], self.shape[3])

    @property
    def u0(self) -> torch.Tensor:
        """The gained latent y · gain(q) (computed when asked for: it is as large as y)."""
        return self.y * self.gain

    @property
    def mean(self) -> torch.Tensor:
        """The means of all of y (1, M, h, w), float32 (made when asked for with a subband context)."""
        if self.model.context is None:
            return self._mean
        full = torch.zeros(self.shape)
        full[:, :context.LL_CHANNELS] = self._mean
        return full

    def plus_mean(self, v: torch.Tensor, read: tuple[slice, ...] | None = None) -> torch.Tensor:
        """v (1, M, ...) float plus the means (of the region `read` of the latent), a new tensor
        (differentiable in v): with a subband context only the LL block is added to, the same
        values as adding the details' zero means."""
        mean = self._mean if read is None else self._mean[read]
        if self.model.context is None:
            return v + mean
        block = context.LL_CHANNELS
        return torch.cat([v[:, :block] + mean, v[:, block:]], dim=1)

    def distortion(self, symbols: torch.Tensor) -> torch.Tensor:
        """Σ squared error (8-bit scale) of the reconstruction from `symbols` (float, may carry a
        straight-through gradient) over the image's own pixels, the whole image at once."""
        x_hat = self.model.draw(self.plus_mean(symbols) * self.inv_gain, self.q).clamp(0, 1)
        return (x_hat[:, :, :self.height, :self.width] * 255 - self.x[:, :, :self.height, :self.width] * 255
                ).square().sum()

    def distortion_and_gradient(self, symbols: torch.Tensor, known: float | None = None,
                                dtype: torch.dtype = torch.float32) -> tuple[float, torch.Tensor]:
        """`distortion` of `symbols` (integers, any dtype) and its gradient with respect to them
        (in `dtype`). On more than one tile the gradient is taken tile by tile with a context of
        `GRADIENT_HALO` latents (close to the whole image's, in bounded memory) and the
        distortion is `distortion_of`'s (or `known`, if the caller has it)."""
        if len(self.tiles) > 1:
            d = known if known is not None else self.distortion_of(_coded(symbols))
            return d, self._tiled_gradient(symbols, dtype)
        s = symbols.detach().float().requires_grad_(True)
        d = self.distortion(s)
        d.backward()
        return float(d.detach()), s.grad.to(dtype)

    def _tiled_gradient(self, symbols: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The gradient of the distortion with respect to `symbols` (integers, any dtype), summed
        in `dtype` over tiles of `GRADIENT_TILE` latents, each tile's error over its own pixels
        drawn from its latents and `GRADIENT_HALO` around them."""
        grad = torch.zeros(self.shape, dtype=dtype)
        for t in tiles(self.shape[2], self.shape[3], GRADIENT_TILE, GRADIENT_HALO):
            read = (slice(None), slice(None), t.read_rows, t.read_cols)
            s = symbols[read].detach().float().requires_grad_(True)
            self._tile_error(self.plus_mean(s, read) * self.inv_gain, t).backward()
            grad[read] += s.grad
        release_free_memory()
        return grad

    def _tile_error(self, y_read: torch.Tensor, t: Tile) -> torch.Tensor:
        """Σ squared error (8-bit scale) over the image pixels of tile t's own latents, drawn from
        ŷ (after the inverse gain) on its read region."""
        top, bottom = 16 * t.rows.start, min(16 * t.rows.stop, self.height)
        left, right = 16 * t.cols.start, min(16 * t.cols.stop, self.width)
        if bottom <= top or right <= left:  # only padding
            return y_read.sum() * 0
        r0, c0 = 16 * t.read_rows.start, 16 * t.read_cols.start
        x_hat = self.model.draw(y_read, self.q)[:, :, top - r0:bottom - r0, left - c0:right - c0].clamp(0, 1)
        return (x_hat * 255 - self.x[:, :, top:bottom, left:right] * 255).square().sum()

    def file_bytes(self, symbols: np.ndarray) -> float:
        """The ideal size of the whole file with these y symbols (flat int32)."""
        return OVERHEAD_BYTES + (self.z_bits + _latent_bits(self.model, symbols, self.idx_np, self.shape)) / 8

    def round(self, v: torch.Tensor, lam: float | None = None) -> torch.Tensor:
        """The symbols of the latents less their means `v` (float), rounded as the encoder does
        (with `lam` instead of the model's λ if given)."""
        return _round(self.model, v, self.idx, lam)

    def symbols(self, u: torch.Tensor) -> np.ndarray:
        """The symbols of the gained latent u (1, M, h, w) as the coder takes them (`_coded`)."""
        if self.model.context is None:
            return self._rounded(u - self._mean)
        v = u.clone()
        v[:, :context.LL_CHANNELS] -= self._mean
        return self._rounded(v)

    def one_pass_symbols(self, lam: float | None = None) -> np.ndarray:
        """`symbols` of u0 (with `lam` instead of the rounding's λ if given). With a subband
        context rounded from y and the gain pass by pass, as `Encoder` does (the same float32
        residuals, none as big as the latent); else its residuals computed in place."""
        if len(self.tiles) > 1:
            release_free_memory()
        if self.model.context is None:
            return self._rounded(self.u0.sub_(self._mean), lam)
        block = context.LL_CHANNELS
        ll = (self.y[:, :block] * self.gain[:, :block] - self._mean)[0].numpy()
        sym, _ = rounding.round_in_passes(self.model, self.y[0].numpy(), self.idx_np.reshape(self.shape[1:]), lam,
                                          gain=self.gain.numpy().ravel(), ll=ll, q=self.q)
        return np.clip(sym, -2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS, out=sym).ravel()

    def _rounded(self, v: torch.Tensor, lam: float | None = None) -> np.ndarray:
        """`round` of v as the coder takes it (`_coded`); with a subband context straight from the
        rounding's int32, without the latent-sized float copies."""
        if self.model.context is None:
            return _coded(self.round(v, lam))
        sym, _ = rounding.round_in_passes(self.model, v[0].numpy(), self.idx_np.reshape(self.shape[1:]), lam, q=self.q)
        return np.clip(sym, -2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS, out=sym).ravel()

    def fill(self, ceiling: float) -> tuple[np.ndarray, float] | None:
        """The symbols of u0 rounded with the largest file not above `ceiling` bytes that the
        rounding's λ, taken between λ / FILL_RANGE and λ · FILL_RANGE, gives, and that file's
        ideal size; None for a model with plain rounding, or if no such λ fits. One rounding's
        symbols are alive at a time: those of the λ found are made again unless they are the last."""
        lam = rounding.rdo_lambda(self.model, self.q)
        if lam is None:
            return None
        v = self.u0.sub_(self._mean) if self.model.context is None else None

        def rounded(log_lam: float) -> np.ndarray:
            return self.one_pass_symbols(math.exp(log_lam)) if v is None else self._rounded(v, math.exp(log_lam))

        found = None  # the log λ and size of the largest file that fits
        lo, hi = math.log(lam / FILL_RANGE), math.log(lam * FILL_RANGE)  # small λ: larger files
        for step in range(FILL_STEPS):
            mid = (lo + hi) / 2
            s = rounded(mid)
            size = self.file_bytes(s)
            if size <= ceiling:
                found, hi = (mid, size), mid
                if step == FILL_STEPS - 1:
                    return s, size
            else:
                lo = mid
            del s
        return None if found is None else (rounded(found[0]), found[1])

    @torch.no_grad()
    def distortion_of(self, symbols: np.ndarray) -> float:
        """`distortion` of symbols (flat int32); on more than one tile the decoder's own picture
        (`FrozenModel.synthesize`'s tiled draw), its error summed as the tiles come, a band of
        rows at a time, without the whole picture."""
        s = torch.from_numpy(symbols).view(self.shape)
        if len(self.tiles) == 1:
            return float(self.distortion(s.float()))
        release_free_memory()
        y = s.float()
        if self.model.context is None:
            y.add_(self._mean)
        else:
            y[:, :context.LL_CHANNELS] += self._mean
        y.mul_(self.inv_gain)
        total = 0.0

        def add(t: Tile, crop: torch.Tensor) -> None:
            """Add the error of the picture's tile t (1, 3, rows, columns), unclamped."""
            nonlocal total
            left, right = 16 * t.cols.start, min(16 * t.cols.stop, self.width)
            if right <= left:  # only padding
                return
            for top in range(16 * t.rows.start, min(16 * t.rows.stop, self.height), ERROR_ROWS):
                bottom = min(top + ERROR_ROWS, 16 * t.rows.stop, self.height)
                x_hat = crop[:, :, top - 16 * t.rows.start:bottom - 16 * t.rows.start, :right - left].clamp(0, 1)
                total += float((x_hat * 255 - self.x[:, :, top:bottom, left:right] * 255).square_().sum())

        with one_thread_per_operation() as threads:  # as `FrozenModel.synthesize`
            self.model._draw_tiled(y, self.q, TILE_LATENTS, threads, add)
        del y
        release_free_memory()  # the tiles' temporaries, kept in their threads' arenas
        return total

    def one_pass(self) -> tuple[np.ndarray, float, float]:
        """The rounded symbols of u0 under ẑ, their file's ideal size and their distortion."""
        s = self.one_pass_symbols()
        return s, self.file_bytes(s), self.distortion_of(s)


def _entropy_parameters(model: FrozenModel, z_int: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """`FrozenModel.latent_entropy_parameters` of ẑ (the same values, tiles side by side as there)
    with `_index_dtype`'s indices (M, h, w); with a subband context only the LL block's means
    (1, LL_CHANNELS, h, w), the details' being 0 (checked when the model is loaded): no
    latent-sized means."""
    if model.context is None:
        return model.latent_entropy_parameters(z_int, _index_dtype(model))
    return model.context_entropy_parameters(z_int, _index_dtype(model))


def _index_dtype(model: FrozenModel) -> np.dtype:
    """The dtype refinement keeps y's hyper table indices in: with a subband context (whose rounding
    reads them in numpy) the smallest that holds them, else int64 (torch indexes tables with them)."""
    return np.dtype(np.int64) if model.context is None else np.min_scalar_type(model.y_tables.num_tables - 1)


def _coded(s: torch.Tensor) -> np.ndarray:
    """Rounded latents (float) as the coder takes them: flat int32, C order. Clamped as in
    `Encoder._symbol_tiles`, so that the conversion is defined (the coder refuses |s| >= 2^24)."""
    return s.clamp(-2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS).to(torch.int32).numpy().ravel()


def _round(model: FrozenModel, v: torch.Tensor, idx: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """`v` (1, M, h, w) rounded as the encoder does under the hyper indices `idx`: pass by pass
    with a subband context (`rounding.round_in_passes`), else `rounding.round_latents` (or
    `rounding.rdo_round` with `lam`)."""
    if model.context is not None:
        sym, _ = rounding.round_in_passes(model, v[0].numpy(), idx[0].numpy(), lam)
        return torch.from_numpy(sym)[None].float()
    return rounding.round_latents(v, idx, model) if lam is None else rounding.rdo_round(v, idx, model, lam)


def _latent_bits(model: FrozenModel, symbols: np.ndarray, idx: np.ndarray, shape: tuple[int, ...]) -> float:
    """The code length in bits of the y symbols (flat int32) with hyper indices `idx` (flat) of a
    latent of `shape` (1, M, h, w), as the coder codes them."""
    if model.context is None:
        return model.y_tables.cost_bits(symbols, idx)
    shape = tuple(shape[1:])
    return sum(model.y_tables.cost_bits(s, t)
               for _, s, t in context.pass_items(model.context, symbols.reshape(shape), idx.reshape(shape)))


def _hyper_bits(model: FrozenModel, z_int: torch.Tensor, rq: int) -> float:
    """The code length in bits of ẑ (int64, (1, N, h, w)) under the z tables at rate rq."""
    z_flat = z_int.numpy().ravel()
    return model.z_tables.cost_bits(z_flat, model.z_index(rq, z_flat.size // model.config.N))


def _hyper_bits_each(model: FrozenModel, z_int: torch.Tensor, rq: int) -> torch.Tensor:
    """The code length in bits of each element of ẑ (int64, (1, N, h, w)) under its table at rate
    rq, flat; outside its table, the escape symbol's and the escaped value's own bits, as
    `CdfTables.cost_bits` counts them (z tables are trimmed to the values seen in training)."""
    return _escaped_code_lengths(_z_tables(z_int, model, rq).flatten(), rounding.bits_table(model, hyper=True))(
        z_int.flatten())


def _z_tables(z: torch.Tensor, model: FrozenModel, rq: int) -> torch.Tensor:
    """The z table of each element of z (1, N, h, w) at rate rq (`FrozenModel.z_index`), shaped as z."""
    return torch.from_numpy(model.z_index(rq, z[0, 0].numel())).view(z.shape)


def refine(model: FrozenModel, x: torch.Tensor, height: int, width: int, y: torch.Tensor, rq: int,
           budget: int, floor: float, effort: int, progress: Callable[[], None] | None = None,
           fixed_rate: bool = False) -> Refined | None:
    """The refined encode whose ideal file size is in [floor, budget - guard] bytes with the least
    distortion, or None if none beat the one-pass file at rate parameter rq.

    `x` is the padded image (1, 3, Hp, Wp) in [0, 1], `y` g_a's latent before the gain, `rq` the
    one-pass file's rate parameter, which `fixed_rate` keeps. `progress` is called
    `iterations(effort, model, height, width)` times in all: each step once per synthesis tile.
    """
    release_free_memory()  # what the one-pass encode freed
    ref = Refiner(model, x, height, width, y, rq)
    units = len(ref.tiles)

    def tick() -> None:
        if progress is not None:
            for _ in range(units):
                progress()

    # The range coder ends within a few bytes of the ideal length (0.01% measured): keep a guard.
    ceiling = budget - 4 - 1e-3 * budget
    _, size0, d0 = ref.one_pass()
    best, best_d = None, d0
    if HYPER_ITERATIONS[effort]:
        # One refiner's means and indices alive at a time (300 MB at 12 MP with the lifting models):
        # the one the symbols are refined with is built again from its rate and ẑ (the same arrays).
        start_z, ref = ref.z, None
        tried: dict[int, float] = {}
        shift = None
        at = rq if fixed_rate else _next_rate(model, {rq: (1 - HYPER_SAVING) * size0}, (1 - AIM) * budget, ceiling)
        for t in range(HYPER_TRIES):
            if at in tried or (fixed_rate and t > 0):
                for _ in range(2 * _search_steps(effort, t)):
                    tick()
                continue
            z, shift = refine_hyper(model, y, at, _search_steps(effort, t), tick, shift)
            candidate = Refiner(model, x, height, width, y, at, z)
            s = candidate.one_pass_symbols()
            size = tried[at] = candidate.file_bytes(s)
            if rounding.rdo_lambda(model) is not None:
                del s  # `fill` rounds u0 again; its symbols and these are not kept side by side
                filled = candidate.fill(ceiling)
                if filled is not None and filled[1] >= floor:
                    s, size = filled
                else:
                    s = candidate.one_pass_symbols()
                del filled
            if floor <= size <= ceiling and (d := candidate.distortion_of(s)) < best_d:
                best, best_d = Refined(at, z, s), d
            del candidate, s
            at = _next_rate(model, tried, (1 - AIM) * budget, ceiling)
    steps = latent_iterations(effort, model)
    if steps:
        if ref is None:
            ref = Refiner(model, x, height, width, y, *((best.rq, best.z) if best is not None else (rq, start_z)))
        if rounding.rdo_lambda(model) is not None:
            start_symbols = best.symbols if best is not None else ref.one_pass()[0]
            symbols = refine_symbols(ref, start_symbols, budget, floor, steps, tick, best_d)
        else:
            symbols = refine_latents(ref, budget, floor, steps, tick, best_d)
        if symbols is not None:
            best = Refined(ref.rq, ref.z, symbols)
    return best


def _next_rate(model: FrozenModel, tried: dict[int, float], aim: float, ceiling: float) -> int:
    """The next rate parameter to try: towards `aim` bytes, from the tried sizes. Along the
    model's levels log(size) is close to linear in the rate parameter with the slope of the
    levels' log bpp; with two tried rates on either side of the aim, their secant is used."""
    lo, hi = round(model.rate_range[0] * RATE_SCALE), round(model.rate_range[1] * RATE_SCALE)
    fits = [r for r, b in tried.items() if b <= ceiling]
    over = [r for r, b in tried.items() if b > ceiling]
    base = max(fits) if fits else min(over)
    if fits and over and min(over) > base:
        r0, r1 = base, min(over)
        slope = (math.log(tried[r1]) - math.log(tried[r0])) / (r1 - r0)
    else:
        levels = np.log(np.asarray(model.levels))
        i = min(max(int(base // RATE_SCALE), 0), len(levels) - 2)
        slope = (levels[i + 1] - levels[i]) / RATE_SCALE
    step = math.log(aim / tried[base]) / slope if slope > 0 else 0.0
    nxt = min(max(base + math.floor(step), lo), hi)
    if fits and over:
        nxt = min(max(nxt, base + 1), min(over) - 1) if min(over) - base > 1 else base
    return nxt


class HyperCost:
    """The cost of a hyper-latent for the gained latent u: Σ (u - s - mean)² + λ · (bits(s | ẑ) +
    bits(ẑ)), s rounded as the encoder does under ẑ's tables. `exact` is the real cost of an
    integer ẑ; `surrogate` a differentiable stand-in for a real-valued one; `move_gains` what
    moving each element of an integer ẑ by one is expected to save."""

    def __init__(self, model: FrozenModel, y: torch.Tensor, gain: torch.Tensor, rq: int):
        # u = y · gain is computed where it is read (the same floats): one latent-sized array less.
        self.model, self.y, self.gain, self.rq = model, y, gain, rq
        self.lam = rounding.rdo_lambda(model) or HYPER_LAMBDA
        self.likelihood = LIKELIHOODS[model.config.likelihood]
        self.thresholds = model.scale_thresholds[:-1].contiguous()
        self.y_scale = 1.0  # the surrogate's y bits times this: the context's share of the hyperprior's
        # On more than one synthesis tile the exact cost is summed a few channels at a time (with a
        # subband context): the same cost but for the float sum's order, so only where one tile's
        # bytes cannot change.
        self._tiled = model.context is not None and len(_synthesis_tiles(model, y.shape[2], y.shape[3])) > 1

    @property
    def u(self) -> torch.Tensor:
        """The gained latent (1, M, h, w), computed when asked for."""
        return self.y * self.gain

    def calibrate(self, z_int: torch.Tensor) -> None:
        """With a subband context, set `y_scale` to the ratio of the y bits coded with the context
        to those under the hyper tables alone, at ẑ = z_int: the surrogate prices y's bits with
        the hyperprior's scales, which the context codes in fewer."""
        model = self.model
        if model.context is None:
            return
        if self._tiled:  # the tables' lookups take int64 per element: a few channels at a time
            release_free_memory()
            mean, idx = _entropy_parameters(model, z_int)
            s, _ = self._symbols_and_error(mean, idx)
            del mean
            s = np.clip(s, -2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS, out=s)
            hyper = sum(model.y_tables.cost_bits(s[c:c + SAVING_CHANNELS].ravel(), idx[c:c + SAVING_CHANNELS].ravel())
                        for c in range(0, s.shape[0], SAVING_CHANNELS))
            s = s.ravel()
        else:
            mean, idx = model.latent_entropy_parameters(z_int, _index_dtype(model))
            s = _coded(_round(model, self.u - mean, torch.from_numpy(idx)[None]))
            hyper = model.y_tables.cost_bits(s, idx.ravel())
        self.y_scale = _latent_bits(model, s, idx.ravel(), self.y.shape) / max(hyper, 1.0)

    def exact(self, z_int: torch.Tensor) -> float:
        model = self.model
        if self._tiled:
            release_free_memory()
            mean, idx = _entropy_parameters(model, z_int)
            s, error = self._symbols_and_error(mean, idx)
            del mean
            s = np.clip(s, -2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS, out=s).ravel()
            return error + self.lam * (_hyper_bits(model, z_int, self.rq) + _latent_bits(model, s, idx.ravel(), self.y.shape))
        mean, idx = model.latent_entropy_parameters(z_int, _index_dtype(model))
        u = self.u
        s = _round(model, u - mean, torch.from_numpy(idx)[None])
        bits = _hyper_bits(model, z_int, self.rq) + _latent_bits(model, _coded(s), idx.ravel(), self.y.shape)
        return float((u - s - mean).square().sum()) + self.lam * bits

    def _symbols_and_error(self, ll_mean: torch.Tensor, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """The symbols (M, h, w) int32 of u rounded under the table indices of a ẑ and its means,
        with a subband context, whose LL block's means are `ll_mean` (the details' are 0), and
        Σ (u - s - mean)², summed a few channels at a time: no latent-sized float temporaries
        (the rounding takes the details' residuals pass by pass, as `Encoder` does)."""
        block = context.LL_CHANNELS
        ll = (self.y[:, :block] * self.gain[:, :block] - ll_mean)[0].numpy()
        s, _ = rounding.round_in_passes(self.model, self.y[0].numpy(), idx, gain=self.gain.numpy().ravel(), ll=ll)
        del ll
        error = 0.0
        for c in range(0, s.shape[0], SAVING_CHANNELS):
            part = (slice(None), slice(c, c + SAVING_CHANNELS))
            u = self.y[part] * self.gain[part]
            residual = u - torch.from_numpy(s[c:c + SAVING_CHANNELS])[None]
            if c == 0:  # SAVING_CHANNELS > LL_CHANNELS: the LL block is in the first part
                residual[:, :block] -= ll_mean
            error += float(residual.square_().sum())
        return s, error

    def surrogate(self, z: torch.Tensor) -> torch.Tensor:
        """`latent_surrogate` of z rounded (straight through) plus λ times ẑ's code length
        interpolated in its tables at z itself: taken at the rounded z, that interpolation's
        slope would be the one towards z + 1 whichever way z moves."""
        return self.latent_surrogate(_straight_through(z)) + self.lam * _proxy_hyper_bits(z, self.model, self.rq)

    def surrogate_backward(self, z: torch.Tensor) -> None:
        """Add the gradient of `surrogate` at z (a leaf) to z.grad; on a large ẑ, tile by tile
        (`SURROGATE_TILE`), so that only one tile's graph is alive at a time."""
        grid = self._tiles(z)
        if len(grid) == 1:
            self.surrogate(z).backward()
            return
        for t in grid:
            self.latent_surrogate(_straight_through(z[:, :, t.read_rows, t.read_cols]), t).backward()
        (self.lam * _proxy_hyper_bits(z, self.model, self.rq)).backward()
        release_free_memory()

    def latent_surrogate_backward(self, z: torch.Tensor) -> None:
        """Add the gradient of `latent_surrogate` at z (a leaf) to z.grad, tile by tile on a large ẑ."""
        grid = self._tiles(z)
        if len(grid) == 1:
            self.latent_surrogate(z).backward()
            return
        for t in grid:
            self.latent_surrogate(z[:, :, t.read_rows, t.read_cols], t).backward()
        release_free_memory()

    @staticmethod
    def _tiles(z: torch.Tensor) -> list[Tile]:
        return tiles(z.shape[2], z.shape[3], SURROGATE_TILE, HYPER_HALO)

    def latent_surrogate(self, z: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
        """The cost's y terms through the float hyper-synthesis, the rate from the model's continuous
        conditional at the predicted scale (s held at its rounding); with `tile`, z is the tile's
        read region of ẑ and the terms are those of the tile's own latents."""
        model = self.model
        out = model.approximate_hyper_synthesis(z)
        if tile is None:
            u = self.u
        else:
            top, left = 4 * (tile.rows.start - tile.read_rows.start), 4 * (tile.cols.start - tile.read_cols.start)
            h, w = 4 * (tile.rows.stop - tile.rows.start), 4 * (tile.cols.stop - tile.cols.start)
            out = out[:, :, top:top + h, left:left + w]
            u = self.y[:, :, 4 * tile.rows.start:4 * tile.rows.stop, 4 * tile.cols.start:4 * tile.cols.stop] * self.gain
        mean, scale = (out / 2**OUT_BITS).chunk(2, dim=1)
        with torch.no_grad():
            idx = torch.searchsorted(self.thresholds, (scale * 2**OUT_BITS).floor().long().contiguous(),
                                     out_int32=True)
            s = rounding.round_latents(u - mean, idx, model)
        y_bits = -torch.log2(self.likelihood(s, torch.zeros_like(s), scale, model.config.scale_bound)).sum() * self.y_scale
        return (u - s - mean).square().sum() + self.lam * y_bits

    def move_gains(self, z_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each element of ẑ (flat): the cost it is expected to save by moving one step, and
        that step (+1 or -1). The y terms to first order (`latent_surrogate`'s gradient), ẑ's own
        code length exactly (it is a sum over the elements)."""
        z = z_int.float().requires_grad_(True)
        self.latent_surrogate_backward(z)
        grad = z.grad.flatten()
        now = _hyper_bits_each(self.model, z_int, self.rq)
        up = grad + self.lam * (_hyper_bits_each(self.model, z_int + 1, self.rq) - now)
        down = -grad + self.lam * (_hyper_bits_each(self.model, z_int - 1, self.rq) - now)
        return -torch.minimum(up, down), torch.where(up < down, 1, -1)


def _straight_through(z: torch.Tensor) -> torch.Tensor:
    """z rounded, with the gradient passed straight through to z."""
    return z + (torch.round(z) - z).detach()


def refine_hyper(model: FrozenModel, y: torch.Tensor, rq: int, iterations: int, tick: Callable[[], None],
                 shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ẑ (int64, as `FrozenModel.hyper_latent`) for g_a's latent y at rate parameter rq with the
    least exact `HyperCost` found, h_a's included, and that ẑ less h_a(u).

    Two searches of `iterations` steps each. Adam, from h_a(u) + `shift` (a refinement at a
    nearby rate moves z much as this one would), moves a real-valued z with straight-through
    rounding; it changes the ẑ that were close to a rounding boundary. Then, from the best ẑ,
    each step moves by one the k elements of ẑ expected to save most (`HyperCost.move_gains`),
    and keeps the move if the exact cost falls: k doubles after a kept move and halves after
    a refused one (at the smallest k a refused set is not proposed again).
    """
    gain = model.gains(rq / RATE_SCALE)[0]
    cost = HyperCost(model, y, gain, rq)
    z0 = model.hyper_analysis(y * gain)
    best_z = torch.round(z0).to(torch.int64)
    cost.calibrate(best_z)
    best_cost = cost.exact(best_z)
    z = z0.clone() if shift is None else z0 + shift
    if shift is not None:
        z_int = torch.round(z).to(torch.int64)
        c = cost.exact(z_int)
        if c < best_cost:
            best_cost, best_z = c, z_int
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=HYPER_LR)
    for i in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        cost.surrogate_backward(z)
        optimizer.step()
        tick()
        if (i + 1) % HYPER_CHECK == 0 or i + 1 == iterations:
            z_int = torch.round(z.detach()).to(torch.int64)
            c = cost.exact(z_int)
            if c < best_cost:
                best_cost, best_z = c, z_int

    k, refused = FLIP_START, torch.zeros(best_z.numel(), dtype=torch.bool)
    gains = None
    for _ in range(iterations):
        tick()
        if gains is None:  # after a refused move ẑ, and so every estimate, is what it was
            gains, steps = cost.move_gains(best_z)
        promising = gains.masked_fill(refused, 0)
        moved = torch.topk(promising, min(k, int((promising > 0).sum()))).indices
        if not len(moved):
            continue
        candidate = best_z.flatten().clone()
        candidate[moved] += steps[moved]
        c = cost.exact(candidate.view_as(best_z))
        if c < best_cost:
            best_cost, best_z, k, gains = c, candidate.view_as(best_z), min(2 * k, FLIP_MAX), None
        elif k > FLIP_MIN:
            k //= 2
        else:
            refused[moved] = True
    return best_z, best_z.to(z0.dtype) - z0


def refine_symbols(ref: Refiner, symbols: np.ndarray, budget: int, floor: float, iterations: int,
                   tick: Callable[[], None], to_beat: float) -> np.ndarray | None:
    """The y symbols (flat int32, C order) found from `symbols` at `ref`'s rate and ẑ whose ideal
    file size is in [floor, budget - guard] bytes with the least distortion, or None if no step's
    distortion is below `to_beat`. Takes over `symbols`: it is moved in place, and at the end
    holds the symbols found (and is returned), or with None what it held.

    Each step moves by one the (at most k) symbols expected to lower D + μ·bits most, one per
    latent position in each block of `_move_blocks` and none in neighbouring positions of the
    same block (`_spread`): the saving of a step ±1 is
    ∓dD/ds (the gradient through the synthesis and the post-filter) less the synthesis's energy
    per symbol (`_symbol_energy`) and μ times the change of the code length (`_bit_changes`). A move is kept
    if the exact cost falls and the file fits: k doubles after a kept move and halves after a
    refused one (at the smallest k a refused set is not proposed again); a move refused only for
    its size raises μ by `SYMBOL_OVER`. μ starts at the rounding's λ in the picture's units and
    follows the budget as in `refine_latents`.

    Memory: the current symbols are `symbols` itself, moved in place and moved back when refused;
    the best ones are the current ones less the moves kept since (a list of index arrays), and
    refused symbols a list of indices. On more than one synthesis tile the gradient and the
    code-length changes, which only rank the moves, are kept in float16 (`_estimate_dtype`), and
    the code-length changes are dropped while a candidate is drawn (and made again from the same
    symbols after a refusal: the same values).
    """
    model = ref.model
    ceiling = budget - 4 - 1e-3 * budget
    aim = (1 - AIM) * budget
    energy = (_symbol_energy(model) * ref.inv_gain.flatten() ** 2).view(1, -1, 1, 1)
    blocks = _move_blocks(model)
    mu = float(energy.median()) * rounding.rdo_lambda(model)
    s = symbols
    s_view = torch.from_numpy(s).view(ref.shape)  # shares s's memory
    size = ref.file_bytes(s)
    k, refused = SYMBOL_START, torch.zeros(0, dtype=torch.int64)
    since_best: list[tuple[np.ndarray, np.ndarray]] = []  # the moves kept since the best symbols (or the start)
    dtype = _estimate_dtype(ref)
    found, best_d = False, to_beat
    d = ref.distortion_of(s) if len(ref.tiles) > 1 else None  # on one tile, the gradient's pass gives it
    grad = up_bits = down_bits = None
    for _ in range(iterations):
        tick()
        if grad is None:  # after a refused move s, and so every estimate, is what it was
            up_bits = down_bits = None
            d, grad = ref.distortion_and_gradient(s_view, d, dtype)
        if up_bits is None:
            up_bits, down_bits = _bit_changes(ref, s, dtype)
        per_position, channel, step = _best_moves(grad, energy, mu, up_bits, down_bits, refused, blocks)
        if len(ref.tiles) > 1:  # not alive beside the candidate's picture; made again after a refusal
            up_bits = down_bits = None
        chosen = _spread_positions(per_position, channel, k)
        if not len(chosen):
            continue  # nothing left to propose: the remaining steps only tick
        moved, change = chosen.numpy(), step.view(-1)[chosen].numpy().astype(np.int32)
        del per_position, channel, step
        s[moved] += change  # the candidate, in place
        coded = _clamped(s, moved)
        d_c, size_c = ref.distortion_of(coded), ref.file_bytes(coded)
        kept = False
        if d_c + 8 * mu * size_c < d + 8 * mu * size:
            if size_c <= ceiling:
                kept, d, size, grad, k = True, d_c, size_c, None, min(2 * k, SYMBOL_MAX)
                since_best.append((moved, change))
                if size >= floor and d < best_d:
                    found, best_d, since_best = True, d, []
            else:
                mu *= SYMBOL_OVER
        elif len(moved) > SYMBOL_MIN:
            k = len(moved) // 2
        else:
            refused = torch.cat([refused, chosen])
        if not kept:
            s[moved] -= change
        del coded
        mu *= math.exp(STEER * (size / aim - 1))
    for moved, change in reversed(since_best):
        s[moved] -= change
    if not found:
        return None
    limit = 2**ESCAPE_MAX_BITS  # as the coder took them (`_clamped`)
    return np.clip(s, -limit, limit, out=s)


def _clamped(s: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """s as the coder takes it (`_coded`) after moving the elements `moved`: s itself unless a
    moved one has left the coder's range, then a clamped copy."""
    limit = 2**ESCAPE_MAX_BITS
    if np.abs(s[moved]).max() <= limit:
        return s
    return np.clip(s, -limit, limit)


def _estimate_dtype(ref: Refiner) -> torch.dtype:
    """The dtype `refine_symbols` keeps its latent-sized estimates in (the gradient, the code
    lengths' changes): float32 on one synthesis tile (Kodak: the bytes as they were), float16
    on more, where each such array would take 150 MB at 12 MP. They only rank the moves."""
    return torch.float32 if len(ref.tiles) == 1 else torch.float16


SAVING_CHANNELS = 64  # the savings of this many channels at a time: latent-sized temporaries stay small


def _bit_changes(ref: Refiner, s: np.ndarray, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The change of the code length of the file when one of the symbols `s` (flat int32, C order)
    moves by +1 or by -1, the others as they are, shaped as y in `dtype`: the symbol's own, under its
    table as the symbols around it now make it (with a subband context), an escape's payload
    included, computed item by item as the coder codes them (a band plane of a pass, or a few
    channels: no latent-sized table indices or predictions); and with a subband context on one
    synthesis tile, the change it makes to the code lengths of the symbols whose labels count its
    magnitude (`context.label_dependents`; larger pictures leave it out, as it takes several
    latent-sized arrays). Exact for a symbol that no prediction reads; a parity-0 symbol also
    moves its neighbours' predictions, which is not counted."""
    up, down = torch.empty(ref.shape, dtype=dtype), torch.empty(ref.shape, dtype=dtype)
    up_np, down_np = up[0].numpy(), down[0].numpy()
    sym = s.reshape(ref.shape[1:])
    tables = rounding.bits_table(ref.model)
    for put, coded, t in _items(ref, sym):
        code_length = _escaped_code_lengths(torch.from_numpy(t.astype(np.int64)), tables)
        v = torch.from_numpy(coded)
        now = code_length(v)
        put(up_np, (code_length(v + 1) - now).numpy())
        put(down_np, (code_length(v - 1) - now).numpy())
    if ref.model.context is not None and len(ref.tiles) == 1:
        def lengths(t: np.ndarray, v: np.ndarray) -> np.ndarray:
            return _escaped_code_lengths(torch.from_numpy(t.astype(np.int64)), tables)(torch.from_numpy(v)).numpy()

        rise, fall = (torch.from_numpy(a)[None]
                      for a in context.label_dependents(ref.model.context, sym, ref.idx_np.reshape(sym.shape), lengths))
        s_view = torch.from_numpy(s).view(ref.shape)
        up += torch.where(s_view >= 0, rise, fall).to(dtype)  # +1 raises a magnitude unless s < 0
        down += torch.where(s_view <= 0, rise, fall).to(dtype)
    return up, down


def _escaped_code_lengths(idx: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`rounding.code_lengths`, and outside its table an integer costs the escaped value's own
    bits as well, as `CdfTables.cost_bits` counts them: a table is trimmed to the values its
    scale makes likely, and a move out of it costs the payload too."""
    idx = idx.long()
    code_length = rounding.code_lengths(idx, tables)
    offset, length = tables[1][idx], tables[2][idx]

    def escaped(sym: torch.Tensor) -> torch.Tensor:
        bits = code_length(sym)
        col = sym.long() - offset
        outside = (col < 0) | (col >= length)
        if bool(outside.any()):
            bits[outside] += torch.from_numpy(escape_payload_bits(sym[outside].numpy()).astype(np.float32))
        return bits

    return escaped


def _items(ref: Refiner, sym: np.ndarray) -> Iterator[tuple[Callable[[np.ndarray, np.ndarray], None],
                                                            np.ndarray, np.ndarray]]:
    """The symbols sym (M, h, w) as they are coded, a part at a time: (how to write a value per
    symbol of the part into a latent-layout array, the coded values, their table indices)."""
    idx = ref.idx_np.reshape(sym.shape)
    if ref.model.context is None:
        for c in range(0, sym.shape[0], SAVING_CHANNELS):
            part = slice(c, c + SAVING_CHANNELS)

            def put(out: np.ndarray, values: np.ndarray, part: slice = part) -> None:
                out[part] = values.reshape(out[part].shape)

            yield put, sym[part], idx[part]
        return
    for p, coded, t in context.pass_items(ref.model.context, sym, idx):
        if p is None:

            def put(out: np.ndarray, values: np.ndarray) -> None:
                out[:context.LL_CHANNELS] = values.reshape(out[:context.LL_CHANNELS].shape)

        else:

            def put(out: np.ndarray, values: np.ndarray, p: context.Pass = p) -> None:
                context.put_pass(out, p, values)

        yield put, coded, t


def _move_blocks(model: FrozenModel) -> tuple[tuple[int, int], ...]:
    """The blocks of y's channels (first, last + 1) in each of which `refine_symbols` moves at
    most one symbol per latent position: for a lifting model the LL block and each level's
    details (one level's synthesis responses overlap another's little); else all of y."""
    M = model.config.M
    if model.config.arch != "lifting":
        return ((0, M),)
    starts = [context.level_channels(level)[0] for level in range(context.LL_LEVEL, 0, -1)]
    return tuple(zip(starts, starts[1:] + [M]))


def _best_moves(grad: torch.Tensor, energy: torch.Tensor, mu: float, up_bits: torch.Tensor,
                down_bits: torch.Tensor, refused: torch.Tensor, blocks: tuple[tuple[int, int], ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of channels and latent position (B, h, w): the largest saving of moving one of
    its symbols by one (not one of the flat indices `refused`), that symbol's channel, and per
    symbol (1, M, h, w) the step (+1 or -1) that saves more. A few channels at a time; ties go to
    the first channel, as `Tensor.max` gives them."""
    h, w = grad.shape[2], grad.shape[3]
    best = torch.empty((len(blocks), h, w))
    channel = torch.empty((len(blocks), h, w), dtype=torch.int64)
    step = torch.empty(grad.shape, dtype=torch.int8)
    plane = h * w
    for b, (first, end) in enumerate(blocks):
        for c in range(first, end, SAVING_CHANNELS):
            part = slice(c, min(c + SAVING_CHANNELS, end))
            g, e = grad[:, part].float(), energy[:, part]
            up = g + e + mu * up_bits[:, part].float()
            down = -g + e + mu * down_bits[:, part].float()
            step[:, part] = torch.where(up < down, 1, -1)
            saving = -torch.minimum(up, down)
            inside = refused[(refused >= c * plane) & (refused < (c + g.shape[1]) * plane)]
            saving.view(-1)[inside - c * plane] = 0
            value, where = saving[0].max(dim=0)
            if c == first:
                best[b], channel[b] = value, where + c
            else:
                better = value > best[b]
                best[b], channel[b] = torch.where(better, value, best[b]), torch.where(better, where + c, channel[b])
    return best, channel, step


def _spread(saving: torch.Tensor, k: int, blocks: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """The flat indices of the (at most k) largest positive savings (1, M, h, w), at most one
    per latent position in each block of channels (by default all of them; its channel's
    largest) and none in the 8 positions around a chosen one of the same block."""
    blocks = blocks or ((0, saving.shape[1]),)
    maxima = [saving[0, first:end].max(dim=0) for first, end in blocks]
    return _spread_positions(torch.stack([m.values for m in maxima]),
                             torch.stack([m.indices + first for m, (first, _) in zip(maxima, blocks)]), k)


def _spread_positions(per_position: torch.Tensor, channel: torch.Tensor, k: int) -> torch.Tensor:
    """`_spread` of the largest saving per block and position (B, h, w) and its channel."""
    peak = torch.nn.functional.max_pool2d(per_position[:, None], 3, stride=1, padding=1)[:, 0]
    candidates = torch.where((per_position == peak) & (per_position > 0), per_position, 0).flatten()
    chosen = torch.topk(candidates, min(k, int((candidates > 0).sum()))).indices
    plane = per_position.shape[1] * per_position.shape[2]
    return channel.flatten()[chosen] * plane + chosen % plane


@functools.lru_cache(maxsize=8)
def _symbol_energy(model: FrozenModel) -> torch.Tensor:
    """The squared change of the synthesis's picture (8-bit scale, before the post-filter) per unit
    of one symbol of each channel of ŷ before the gain (M,): for the linear synthesis S, the
    diagonal of SᵀS averaged over a channel's positions, estimated as r · SᵀS r for random signs r
    (a fixed seed) on a canvas of `IMPULSE_LATENTS` latents a side (within 8% of each channel's
    impulse response on the lifting models)."""
    M, n = model.config.M, IMPULSE_LATENTS
    r = torch.randint(0, 2, (1, M, n, n), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    r.requires_grad_(True)
    with torch.no_grad():
        blank = model.synthesis(torch.zeros(1, M, n, n))
    (0.5 * (model.synthesis(r) - blank).square().sum()).backward()
    return (r.detach() * r.grad).mean(dim=(0, 2, 3)) * 255**2


def refine_latents(ref: Refiner, budget: int, floor: float, iterations: int, tick: Callable[[], None],
                   to_beat: float) -> np.ndarray | None:
    """The y symbols (flat int32, C order) of the refined latent at `ref`'s rate and ẑ whose
    ideal file size is in [floor, budget - guard] bytes with the least distortion, or None if
    no iterate's distortion is below `to_beat`."""
    ceiling = budget - 4 - 1e-3 * budget
    aim = (1 - AIM) * budget
    bpp = 8 * budget / (ref.height * ref.width)
    s0, _, d0 = ref.one_pass()
    best_d = to_beat
    with torch.no_grad():
        mu = _initial_slope(ref, d0, s0)
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
        loss = d + mu * _proxy_bits(v + u_noise, ref.idx, ref.model) / 8
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay over the run
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / iterations))
        optimizer.step()
        mu *= math.exp(STEER * (size / aim - 1))
        tick()
    return best


def _initial_slope(ref: Refiner, d0: float, s0: np.ndarray) -> float:
    """-dD/dbytes of the model's own curve between ref's rate and a rate step below it, where
    h_a's ẑ is used (distortion per byte)."""
    model, rq = ref.model, ref.rq
    below = max(rq - RATE_SCALE // 8, round(model.rate_range[0] * RATE_SCALE))
    if below == rq:
        below = rq + RATE_SCALE // 8
    other = Refiner(model, ref.x, ref.height, ref.width, ref.y, below)
    s1, b1, d1 = other.one_pass()
    db = ref.file_bytes(s0) - b1
    slope = (d1 - d0) / db if db else 0.0
    return slope if slope > 0 and math.isfinite(slope) else d0 / max(ref.file_bytes(s0), 1.0)
