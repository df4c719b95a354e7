"""The subband context model: y table indices refined by the symbols already coded.

The hyperprior gives every latent a table index t from ẑ alone (one scale per channel per
4x4 latents). A lifting model's latent is a wavelet decomposition, and a coefficient's
magnitude is predicted far better by the coefficients around it: its parent (the next
coarser level, same colour and orientation), the other subbands at the same place, and its
neighbours in the same band. With a context model the detail coefficients are coded band by
band, coarse to fine, in passes, and each pass's table indices are a learned lookup of the
hyper index and three integer activity labels computed from the symbols of earlier passes.

Coding order (bitstream/SPEC.md, "Subband context"):

* the LL block (channels 0..2) with the hyperprior's indices, as one item;
* then for level 4, 3, 2, 1, for each subband (colour c = 0, 1, 2; within it orientation
  o = HL, LH, HH), for parity 0 then 1 of a checkerboard over the band's own grid: one item
  holding the band's coefficients at positions (i, j) with (i + j) % 2 == parity, row-major.

A coefficient's three labels each compare the summed magnitudes of a set of already coded
symbols with what the hyperprior expected of them (the sum of `magnitude[t]` over their
hyper indices):

* `same`: its four neighbours in the band (parity 1 only; all are of parity 0);
* `parent`: the 3x3 neighbourhood of its parent in the same channel one level coarser
  (levels 3..1);
* `cross`: the subbands of its level coded before it, at the same position.

A label is 0 when its set is empty, else 1 + the number of `thresholds` θ with
65536 · A ≥ θ · E (A: summed magnitudes, each capped at `MAGNITUDE_CAP`; E: summed expected
magnitudes; both integers). The coded table index is
`remap[level - 1, colour, parity, t, same, parent, cross]`. Everything is integer arithmetic
on decoded integers and stored integer tables, so both sides compute the same indices on
every machine and for any thread count. A remap of the identity (`remap[..., t, ...] = t`)
codes exactly the hyperprior's bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

LEVELS = 4
SUBBANDS = 9  # 3 orientations x 3 colours: channel o * 3 + c of a level's band
ORDER = tuple(o * 3 + c for c in range(3) for o in range(3))  # coding order of a level's channels
LL_CHANNELS = 3
MAGNITUDE_CAP = 255  # a symbol's magnitude counts at most this much in a label
SYMBOL_CLIP = 32767  # a symbol counts at most this much (either sign) in a prediction
MEAN_ONE = 256  # `weights` are in units of 1/256
MAGNITUDE_ONE = 256  # `magnitude` is E|s| in units of 1/256
RATIO_ONE = 256  # `thresholds` are ratios A / E in units of 1/256


@dataclass(frozen=True)
class Pass:
    level: int  # 4 (coarsest) .. 1
    channel: int  # of the level's 9: orientation * 3 + colour
    parity: int  # 0 or 1: the checkerboard half (i + j) % 2

    @property
    def colour(self) -> int:
        return self.channel % 3


PASSES = tuple(Pass(level, k, p) for level in range(LEVELS, 0, -1) for k in ORDER for p in (0, 1))


def level_channels(level: int) -> tuple[int, int]:
    """The first y channel of `level`'s details and the space-to-depth factor r (y holds
    9·r² channels of it)."""
    start = LL_CHANNELS + sum(SUBBANDS * 4**(LEVELS - k) for k in range(LEVELS, level, -1))
    return start, 2**(LEVELS - level)


def to_bands(y: np.ndarray) -> dict[int, np.ndarray]:
    """y (768, h, w) -> per level, its details on their own grid (9, h·r, w·r) (copies)."""
    _, h, w = y.shape
    bands = {}
    for level in range(LEVELS, 0, -1):
        start, r = level_channels(level)
        part = y[start:start + SUBBANDS * r * r].reshape(SUBBANDS, r, r, h, w)
        bands[level] = np.ascontiguousarray(part.transpose(0, 3, 1, 4, 2).reshape(SUBBANDS, h * r, w * r))
    return bands


def plane(y: np.ndarray, level: int, k: int) -> np.ndarray:
    """Channel k of a level's band on its own grid, (h·r, w·r), copied out of a latent-layout
    array y (M, h, w): one plane of `to_bands(y)[level]` without the others."""
    start, r = level_channels(level)
    _, h, w = y.shape
    return y[start + k * r * r:start + (k + 1) * r * r].reshape(r, r, h, w).transpose(2, 0, 3, 1).reshape(h * r, w * r)


def set_plane(y: np.ndarray, level: int, k: int, values: np.ndarray) -> None:
    """Write a band plane (h·r, w·r) back into the latent-layout array y (M, h, w) (the inverse of `plane`)."""
    start, r = level_channels(level)
    _, h, w = y.shape
    y[start + k * r * r:start + (k + 1) * r * r] = values.reshape(h, r, w, r).transpose(1, 3, 0, 2).reshape(r * r, h, w)


def take(plane: np.ndarray, parity: int) -> np.ndarray:
    """The values of a band plane (H, W) at the positions of a checkerboard parity, in
    coding order (row-major): row i holds them at columns (i + parity) % 2, + 2, + 4, ... W is
    even: y's width is a multiple of 4, each band's a multiple of that."""
    H, W = plane.shape
    pairs = plane.reshape(H, W // 2, 2)
    out = np.empty((H, W // 2), dtype=plane.dtype)
    out[0::2] = pairs[0::2, :, parity]
    out[1::2] = pairs[1::2, :, 1 - parity]
    return out.reshape(-1)


def place(plane: np.ndarray, parity: int, values: np.ndarray) -> None:
    """Write a parity's values (in coding order) into a band plane (the inverse of `take`)."""
    H, W = plane.shape
    pairs = plane.reshape(H, W // 2, 2)
    values = values.reshape(H, W // 2)
    pairs[0::2, :, parity] = values[0::2]
    pairs[1::2, :, 1 - parity] = values[1::2]


def _padded(a: np.ndarray) -> np.ndarray:
    """a (H, W) as int64 inside a border of zeros (H + 2, W + 2)."""
    out = np.zeros((a.shape[0] + 2, a.shape[1] + 2), dtype=np.int64)
    out[1:-1, 1:-1] = a
    return out


def _box3(a: np.ndarray) -> np.ndarray:
    """Sum over each 3x3 neighbourhood, zeros outside (int64)."""
    p = _padded(a)
    rows = p[:-2] + p[1:-1] + p[2:]
    return rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]


def _neighbours(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The up, down, left and right neighbour of every position (int64), zeros outside."""
    p = _padded(a)
    return p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]


def _cross4(a: np.ndarray) -> np.ndarray:
    """Sum of the four neighbours (up, down, left, right), zeros outside (int64)."""
    up, down, left, right = _neighbours(a)
    return up + down + left + right


def _up2(a: np.ndarray) -> np.ndarray:
    """Each position of a (h, w) repeated over its 2x2 children (2h, 2w)."""
    h, w = a.shape
    return np.broadcast_to(a[:, None, :, None], (h, 2, w, 2)).reshape(2 * h, 2 * w)


@dataclass(frozen=True, eq=False)
class SubbandContext:
    """The stored integers of a context model (see the module docstring)."""

    magnitude: np.ndarray  # (T,) int64 >= 1: E|s| under each y table, in 1/256
    thresholds: np.ndarray  # (B - 2,) int64, increasing: label boundaries of A / E, in 1/256
    remap: np.ndarray  # (4, 3, 2, T, B, B, B) uint8: the coded table index
    weights: np.ndarray  # (4, 9, 4) int64: the prediction's weights, in 1/256

    @property
    def labels(self) -> int:
        return len(self.thresholds) + 2

    @classmethod
    def identity(cls, magnitude: np.ndarray, thresholds: np.ndarray) -> "SubbandContext":
        T, B = len(magnitude), len(thresholds) + 2
        remap = np.broadcast_to(np.arange(T, dtype=np.uint8).reshape(1, 1, 1, T, 1, 1, 1),
                                (LEVELS, 3, 2, T, B, B, B)).copy()
        return cls(np.asarray(magnitude, np.int64), np.asarray(thresholds, np.int64), remap,
                   np.zeros((LEVELS, SUBBANDS, 4), dtype=np.int64))

    def state(self) -> dict:
        import torch
        return {"magnitude": torch.from_numpy(self.magnitude.astype(np.int64)),
                "thresholds": torch.from_numpy(self.thresholds.astype(np.int64)),
                "remap": torch.from_numpy(self.remap.astype(np.uint8)),
                "weights": torch.from_numpy(self.weights.astype(np.int64))}

    @classmethod
    def from_state(cls, state: dict) -> "SubbandContext":
        ctx = cls(state["magnitude"].numpy().astype(np.int64), state["thresholds"].numpy().astype(np.int64),
                  state["remap"].numpy().astype(np.uint8), state["weights"].numpy().astype(np.int64))
        ctx.check()
        return ctx

    def check(self) -> None:
        T = len(self.magnitude)
        B = self.labels
        if self.remap.shape != (LEVELS, 3, 2, T, B, B, B):
            raise ValueError(f"remap has shape {self.remap.shape}, expected {(LEVELS, 3, 2, T, B, B, B)}")
        if int(self.remap.max()) >= T or int(self.magnitude.min()) < 1 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("invalid subband context tables")
        if self.weights.shape != (LEVELS, SUBBANDS, 4) or int(np.abs(self.weights).max(initial=0)) >= 1 << 16:
            raise ValueError(f"invalid subband context weights (shape {self.weights.shape})")

    def label(self, actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Labels (int64) of summed capped magnitudes `actual` against summed expected ones:
        0 where nothing was expected (an empty set), else 1 + #{θ : 65536·A >= θ·E}, which for
        integers is 1 + #{θ <= floor(65536·A / E)}."""
        ratio = (actual * (MAGNITUDE_ONE * RATIO_ONE)) // np.maximum(expected, 1)
        out = np.searchsorted(self.thresholds, ratio, side="right") + 1
        out[expected <= 0] = 0
        return out

    def pass_indices(self, p: Pass, hyper_idx: np.ndarray, labels: tuple[np.ndarray, ...]) -> np.ndarray:
        """The coded table index of each position from its hyper index and three labels."""
        same, parent, cross = labels
        B = self.labels
        table = self.remap[p.level - 1, p.colour, p.parity].reshape(-1)
        return table[((hyper_idx.astype(np.int64) * B + same) * B + parent) * B + cross]


class Passes:
    """One image's latent seen band by band: the state both coder and decoder keep while they
    go through the passes. Built from the hyper indices (M, h, w); symbols are added pass by
    pass (`put`), and `indices(p)` gives a pass's coded table indices from what was put before.
    It holds the hyper indices (one byte each) and the details' symbols clipped to 16 bits;
    labels are computed one band plane at a time."""

    def __init__(self, ctx: SubbandContext, hyper_idx: np.ndarray):
        self.ctx = ctx
        self.hyper = to_bands(hyper_idx)
        self.symbols = {level: np.zeros(band.shape, dtype=np.int16) for level, band in self.hyper.items()}
        # The sums over the subbands of the level done so far (`cross`), kept as they are coded.
        self._cross_level = None
        self._cross: list[np.ndarray] = []
        # The parent's 3x3 sums of the channel being coded: the same for both of its passes.
        self._parent_key: tuple[int, int] | None = None
        self._parent: tuple[np.ndarray, np.ndarray] = ()

    def _plane(self, level: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Capped magnitudes and expected magnitudes of one channel's band plane (int64)."""
        mags = np.minimum(np.abs(self.symbols[level][k].astype(np.int64)), MAGNITUDE_CAP)
        return mags, self.ctx.magnitude[self.hyper[level][k]]

    def _labels(self, p: Pass) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three labels at the pass's positions, in its coding order."""
        ctx, level, k, parity = self.ctx, p.level, p.channel, p.parity
        n = self.hyper[level][k].size // 2
        none = np.zeros(n, dtype=np.int64)
        if parity:
            a, e = self._plane(level, k)
            same = ctx.label(take(_cross4(a), parity), take(_cross4(e), parity))
        else:
            same = none
        if level < LEVELS:
            if self._parent_key != (level, k):
                a, e = self._plane(level + 1, k)
                self._parent_key, self._parent = (level, k), (_box3(a), _box3(e))
            parent = ctx.label(*(take(_up2(box), parity) for box in self._parent))
        else:
            parent = none
        if ORDER.index(k):
            sums = self._cross_sums(level)
            cross = ctx.label(take(sums[0], parity), take(sums[1], parity))
        else:
            cross = none
        return same, parent, cross

    def labels(self, p: Pass) -> tuple[np.ndarray, ...]:
        """The pass's hyper indices and three labels, in its coding order (for fitting)."""
        return (take(self.hyper[p.level][p.channel], p.parity),) + self._labels(p)

    def indices(self, p: Pass) -> np.ndarray:
        """The pass's coded table indices, in its coding order (row-major over its positions)."""
        return self.ctx.pass_indices(p, take(self.hyper[p.level][p.channel], p.parity), self._labels(p))

    def mean(self, p: Pass) -> np.ndarray:
        """The pass's predicted symbols (int64, in its coding order): for parity 1, the weighted
        sum of the four decoded neighbours in the band (each clipped to ±SYMBOL_CLIP, zero outside
        the band), rounded: floor((Σ w·s + 128) / 256); zeros for parity 0."""
        w = self.ctx.weights[p.level - 1, p.channel]
        if p.parity == 0 or not w.any():
            return np.zeros(self.hyper[p.level][p.channel].size // 2, dtype=np.int64)
        up, down, left, right = (take(a, 1) for a in _neighbours(self.symbols[p.level][p.channel]))
        acc = int(w[0]) * up + int(w[1]) * down + int(w[2]) * left + int(w[3]) * right
        return (acc + MEAN_ONE // 2) >> 8

    def neighbours(self, p: Pass) -> np.ndarray:
        """(n, 4) the clipped decoded neighbours (up, down, left, right) of the pass's positions (for fitting)."""
        return np.stack([take(a, p.parity) for a in _neighbours(self.symbols[p.level][p.channel])], axis=1)

    def put(self, p: Pass, symbols: np.ndarray) -> None:
        """Record the pass's symbols (in its coding order)."""
        place(self.symbols[p.level][p.channel], p.parity, np.clip(symbols, -SYMBOL_CLIP, SYMBOL_CLIP))
        if p.parity == 1:  # the subband is complete: it joins the cross sums of the subbands after it
            a, e = self._plane(p.level, p.channel)
            sums = self._cross_sums(p.level)
            sums[0] += a
            sums[1] += e

    def _cross_sums(self, level: int) -> list[np.ndarray]:
        """Summed capped and expected magnitudes of the level's subbands completed so far."""
        if self._cross_level != level:
            self._cross_level = level
            self._cross = [np.zeros(self.hyper[level].shape[1:], dtype=np.int64) for _ in range(2)]
        return self._cross


def code_passes(ctx: SubbandContext, hyper_idx: np.ndarray,
                symbols_for: Callable[[Pass, np.ndarray, np.ndarray], np.ndarray]
                ) -> Iterator[tuple[Pass, np.ndarray, np.ndarray]]:
    """Go through the detail passes in coding order: for each, its table indices t and predicted
    symbols μ from what was coded before, then `symbols_for(pass, t, μ)` -- the encoder's chosen
    or the decoder's decoded symbols s of the pass, in its coding order -- recorded for the
    passes after it. Yields (pass, s - μ, t): what the pass codes."""
    state = Passes(ctx, hyper_idx)
    for p in PASSES:
        t, mu = state.indices(p), state.mean(p)
        s = symbols_for(p, t, mu)
        yield p, (s - mu).astype(np.int32), t
        state.put(p, s)


def pass_values(y: np.ndarray, p: Pass) -> np.ndarray:
    """The values of a latent-layout array y (M, h, w) at the pass's positions, in its coding order."""
    return take(plane(y, p.level, p.channel), p.parity)


def put_pass(y: np.ndarray, p: Pass, values: np.ndarray) -> None:
    """Write the pass's values (in its coding order) into the latent-layout array y (the inverse of
    `pass_values`); y need only have the channels up to the pass's level."""
    band = plane(y, p.level, p.channel)
    place(band, p.parity, values)
    set_plane(y, p.level, p.channel, band)


def pass_items(ctx: SubbandContext, symbols: np.ndarray, hyper_idx: np.ndarray
               ) -> Iterator[tuple[Pass | None, np.ndarray, np.ndarray]]:
    """The y items of a context-coded latent with known symbols, in coding order: (pass,
    coded values, table indices), the LL block first (pass None, its symbols and hyper
    indices). symbols and hyper_idx are (M, h, w); one band plane is copied out at a time."""
    yield None, symbols[:LL_CHANNELS].ravel(), hyper_idx[:LL_CHANNELS].ravel()
    yield from code_passes(ctx, hyper_idx, lambda p, t, mu: pass_values(symbols, p))


def coded_indices(ctx: SubbandContext, symbols: np.ndarray, hyper_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The table index every symbol of a latent (M, h, w) is coded with, and its prediction μ
    (the value coded is the symbol less μ), both (M, h, w): the hyper index and 0 in the LL
    block, the context's elsewhere."""
    out = hyper_idx.copy()
    mean = np.zeros(hyper_idx.shape, dtype=np.int64)
    for p, coded, t in pass_items(ctx, symbols, hyper_idx):
        if p is not None:
            put_pass(out, p, t)
            put_pass(mean, p, pass_values(symbols, p) - coded)
    return out, mean
