"""The subband context model: y table indices refined by the symbols already coded.

The hyperprior gives every latent a table index t from ẑ alone (one scale per channel per
4x4 latents). A lifting model's latent is a wavelet decomposition, and a coefficient's
magnitude is predicted far better by the coefficients around it: its parent (the next
coarser level, same colour and orientation), the other subbands at the same place, and its
neighbours in the same band. With a context model the detail coefficients are coded band by
band, coarse to fine, in passes, and each pass's table indices are a learned lookup of the
hyper index and three integer activity labels computed from the symbols of earlier passes.

Coding order (bitstream/SPEC.md, "Subband context"):

* the LL block (channels 0..2) with the hyperprior's indices, as one item -- or, for a context
  with an `ll_remap`, in passes of its own: for colour c = 0, 1, 2, for parity 0 then 1 of a
  checkerboard over channel c's plane, each position's table a lookup of its hyper index and
  two labels (`same` and `cross`, as below, on the LL plane) and no prediction;
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
from concurrent.futures import ThreadPoolExecutor
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
    level: int  # 4 (coarsest) .. 1, or LL_LEVEL for the LL block
    channel: int  # of the level's 9: orientation * 3 + colour (of the LL block's 3: the colour)
    parity: int  # 0 or 1: the checkerboard half (i + j) % 2

    @property
    def colour(self) -> int:
        return self.channel % 3


PASSES = tuple(Pass(level, k, p) for level in range(LEVELS, 0, -1) for k in ORDER for p in (0, 1))
LL_LEVEL = LEVELS + 1  # the LL block's passes: before every level's, coarser than level 4
LL_PASSES = tuple(Pass(LL_LEVEL, c, p) for c in range(LL_CHANNELS) for p in (0, 1))


def passes(ctx: "SubbandContext") -> tuple[Pass, ...]:
    """The passes of a context's stream in coding order: the LL block's if it has an `ll_remap`,
    then the details'."""
    return (LL_PASSES if ctx.ll_remap is not None else ()) + PASSES


# A tall latent's passes are worked through in parts of its rows (`row_parts`), side by side.
PART_ROWS = 96  # latent rows: parts of at most about this many rows ...
PART_MIN_ROWS = 64  # ... for a latent of at least this many rows (a shorter one is one part) ...
PART_HALO = 8  # ... each computed with this many rows more on either side (even)


@dataclass(frozen=True)
class Part:
    """Latent rows `read` of a tall latent, computed on alone; of them it gives the rows `keep`
    (relative to read.start), which are `rows` of the latent."""

    read: slice
    keep: slice
    rows: slice


def row_parts(h: int) -> list[Part]:
    """The parts of an h-row latent (h even) that its passes are worked through in: an even
    number of equal runs of even rows (at most about `PART_ROWS` each), each read with
    `PART_HALO` rows more on either side (clipped at the edges); one part of everything for a
    latent of fewer than `PART_MIN_ROWS` rows. They depend on h only.

    A part gives the same table indices and predictions (and so, for the encoder, the same
    symbol choices) in the rows it keeps as the whole latent does: a pass at latent row i
    depends only on the passes before it within fewer than 4 rows of i (each level's
    `same` neighbours and prediction reach one row of its band, its `parent` one row of the
    parent band, whose own reach adds up over the coarser levels to less than 4 latent rows;
    `cross` is at the same position), so within PART_HALO rows of a part's edge its missing
    rows change nothing that is kept. Every boundary is at an even row: the checkerboard's
    parity at LL_LEVEL and level 4, one band row per latent row, is that of the row."""
    if h < PART_MIN_ROWS:
        return [Part(slice(0, h), slice(0, h), slice(0, h))]
    count = 2 * -(-h // (2 * PART_ROWS))
    rows = 2 * -(-h // (2 * count))
    parts = []
    for top in range(0, h, rows):
        bottom = min(top + rows, h)
        read = slice(max(top - PART_HALO, 0), min(bottom + PART_HALO, h))
        parts.append(Part(read, slice(top - read.start, bottom - read.start), slice(top, bottom)))
    return parts


def kept(p: Pass, part: Part, width: int) -> slice:
    """The positions, in a pass's coding order over the part's rows (of a latent `width` wide),
    of the rows the part keeps: whole band rows, r per latent row."""
    r = 1 if p.level == LL_LEVEL else 2**(LEVELS - p.level)
    per_row = r * (width * r // 2)
    return slice(part.keep.start * per_row, part.keep.stop * per_row)


def joined(item: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """An item computed in parts, [values of each part, table indices of each part], as the coder
    takes it: the parts joined in coding order (an LL block item (3, rows, w) along its rows)."""
    values, tables = item
    if values[0].ndim == 3:
        return np.concatenate(values, axis=1).ravel(), np.concatenate(tables, axis=1).ravel()
    if len(values) == 1:
        return values[0], tables[0]
    return np.concatenate(values), np.concatenate(tables)


def map_parts(fn: Callable, items: list, workers: int) -> list:
    """[fn(item) for item in items] (one per part), up to `workers` at once in threads (numpy's
    array work releases the GIL)."""
    if workers <= 1 or len(items) == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def coarse_passes(ctx: "SubbandContext", stop: int) -> int:
    """How many of `passes(ctx)` a decode that stops after level stop + 1 reads (the first ones)."""
    return sum(p.level > stop for p in passes(ctx))


def level_channels(level: int) -> tuple[int, int]:
    """The first y channel of `level`'s details and the space-to-depth factor r (y holds
    9·r² channels of it); for LL_LEVEL, the LL block's first channel (0) and r = 1."""
    if level == LL_LEVEL:
        return 0, 1
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


def _pass_rows(y: np.ndarray, p: Pass) -> list[tuple[int, np.ndarray]]:
    """For a pass of levels 3..1 (r >= 2), the views of y (M, h, w) that hold it: for each row b
    of the level's r x r space-to-depth block, its first channel and its channels (r/2, h, w) of
    columns d = 2d' + (b + parity) % 2, d' = 0 .. r/2 - 1 -- the band's positions (a·r + b,
    c·r + d). r is even, so (i + j) % 2 of a position is (b + d) % 2: a parity is half of the
    level's channels."""
    start, r = level_channels(p.level)
    first = start + p.channel * r * r
    views = []
    for b in range(r):
        c = first + b * r + (b + p.parity) % 2
        views.append((c, y[c:first + (b + 1) * r:2]))
    return views


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


def _neighbours(half: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From a band's parity-0 values in coding layout (H, W/2) (`take(plane, 0)` as rows), the
    up, down, left and right neighbour of each parity-1 position (all four are of parity 0), in
    parity 1's layout (H, W/2), zeros outside the band. On even rows a parity-1 position m is at
    column 2m + 1, between parity-0 columns 2m and 2m + 2; on odd rows at 2m, between 2m - 1 and
    2m + 1: its left and right are m and m + 1, or m - 1 and m."""
    up, down = np.zeros_like(half), np.zeros_like(half)
    up[1:], down[:-1] = half[:-1], half[1:]
    left, right = half.copy(), half.copy()
    right[0::2, :-1], right[0::2, -1] = half[0::2, 1:], 0
    left[1::2, 1:], left[1::2, 0] = half[1::2, :-1], 0
    return up, down, left, right


def _cross4(half: np.ndarray) -> np.ndarray:
    """The sum of the four `_neighbours` of each parity-1 position."""
    out = half.copy()  # on even rows the left neighbour, on odd rows the right one
    out[1:] += half[:-1]
    out[:-1] += half[1:]
    out[0::2, :-1] += half[0::2, 1:]
    out[1::2, 1:] += half[1::2, :-1]
    return out


@dataclass(frozen=True, eq=False)
class SubbandContext:
    """The stored integers of a context model (see the module docstring)."""

    magnitude: np.ndarray  # (T,) int64 >= 1: E|s| under each y table, in 1/256
    thresholds: np.ndarray  # (B - 2,) int64, increasing: label boundaries of A / E, in 1/256
    remap: np.ndarray  # (4, 3, 2, T, B, B, B) uint8: the coded table index
    weights: np.ndarray  # (4, 9, 4) int64: the prediction's weights, in 1/256
    ll_remap: np.ndarray | None = None  # (3, 2, T, B, B) uint8: the LL block's table index, if coded in passes

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
        state = {"magnitude": torch.from_numpy(self.magnitude.astype(np.int64)),
                 "thresholds": torch.from_numpy(self.thresholds.astype(np.int64)),
                 "remap": torch.from_numpy(self.remap.astype(np.uint8)),
                 "weights": torch.from_numpy(self.weights.astype(np.int64))}
        if self.ll_remap is not None:
            state["ll_remap"] = torch.from_numpy(self.ll_remap.astype(np.uint8))
        return state

    @classmethod
    def from_state(cls, state: dict) -> "SubbandContext":
        ctx = cls(state["magnitude"].numpy().astype(np.int64), state["thresholds"].numpy().astype(np.int64),
                  state["remap"].numpy().astype(np.uint8), state["weights"].numpy().astype(np.int64),
                  state["ll_remap"].numpy().astype(np.uint8) if "ll_remap" in state else None)
        ctx.check()
        return ctx

    def check(self) -> None:
        T = len(self.magnitude)
        B = self.labels
        if self.remap.shape != (LEVELS, 3, 2, T, B, B, B):
            raise ValueError(f"remap has shape {self.remap.shape}, expected {(LEVELS, 3, 2, T, B, B, B)}")
        # `label`'s float64 comparison is exact for these bounds, and a label fits a byte.
        if (int(self.remap.max()) >= T or int(self.magnitude.min()) < 1 or int(self.magnitude.max()) >= 1 << 24
                or np.any(np.diff(self.thresholds) <= 0) or int(self.thresholds.min(initial=1)) < 1
                or int(self.thresholds.max(initial=1)) >= 1 << 16 or B > 255):
            raise ValueError("invalid subband context tables")
        if self.ll_remap is not None and (self.ll_remap.shape != (LL_CHANNELS, 2, T, B, B)
                                          or int(self.ll_remap.max()) >= T):
            raise ValueError(f"invalid LL remap (shape {self.ll_remap.shape})")
        if self.weights.shape != (LEVELS, SUBBANDS, 4) or int(np.abs(self.weights).sum(-1).max(initial=0)) >= 1 << 16:
            raise ValueError(f"invalid subband context weights (shape {self.weights.shape})")

    def label(self, actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Labels (uint8) of summed capped magnitudes `actual` against summed expected ones
        (integers): 0 where nothing was expected (an empty set), else 1 + #{θ : 65536·A >= θ·E}.

        Computed as the float64 quotient q = 65536·A / E compared with each θ, which is exact:
        q >= θ when 65536·A >= θ·E (rounding is monotonic and θ is representable), and otherwise
        65536·A / E <= θ - 1/E, further from θ than the quotient's rounding error as long as
        θ·E < 2^53 (here E < 2^24·9, θ < 2^16)."""
        q = (actual * float(MAGNITUDE_ONE * RATIO_ONE)) / np.maximum(expected, 1)
        out = np.ones(q.shape, dtype=np.uint8)
        for theta in self.thresholds.astype(np.float64):
            out += q >= theta
        out[expected <= 0] = 0
        return out

    def pass_indices(self, p: Pass, hyper_idx: np.ndarray, labels: tuple[np.ndarray, ...]) -> np.ndarray:
        """The coded table index of each position from its hyper index and three labels (an LL
        pass's `parent` is always 0 and not looked up)."""
        same, parent, cross = (a.astype(np.int32) for a in labels)
        B = self.labels
        if p.level == LL_LEVEL:
            table = self.ll_remap[p.channel, p.parity].reshape(-1)
            return table[(hyper_idx.astype(np.int32) * B + same) * B + cross]
        table = self.remap[p.level - 1, p.colour, p.parity].reshape(-1)
        return table[((hyper_idx.astype(np.int32) * B + same) * B + parent) * B + cross]


class Passes:
    """One image's latent seen pass by pass: the state both coder and decoder keep while they go
    through the passes. Built from the hyper indices (M, h, w); symbols are added pass by pass
    (`put`), and `indices(p)` gives a pass's coded table indices from what was put before.
    What it keeps is in the passes' own layout (`take` of the band plane, as rows (H, W/2)): the
    capped magnitudes (one byte each) of the passes put so far that a later label reads, and the
    symbols of the channel being coded, clipped to 16 bits; the hyper indices are read from
    `hyper_idx` as needed."""

    def __init__(self, ctx: SubbandContext, hyper_idx: np.ndarray):
        self.ctx = ctx
        _, h, w = hyper_idx.shape
        self.shape = {level: (h * 2**(LEVELS - level), w * 2**(LEVELS - level) // 2) for level in range(1, LEVELS + 1)}
        self.shape[LL_LEVEL] = (h, w // 2)
        self.hyper_idx = hyper_idx
        self.mags: dict[tuple[int, int, int], np.ndarray] = {}
        self._symbols: tuple[tuple[int, int], np.ndarray] | None = None  # the current channel's parity 0
        # Of the level being coded (or the LL block), the summed capped and expected magnitudes of
        # its subbands (colours) completed so far (`cross`), per parity.
        self._cross: dict[int, list[np.ndarray]] = {}
        # The `parent` label of the channel being coded: the same array for both of its passes.
        self._parent_key: tuple[int, int] | None = None
        self._parent: np.ndarray | None = None

    def hyper(self, level: int, k: int, parity: int) -> np.ndarray:
        """A pass's hyper indices (H, W/2)."""
        return pass_values(self.hyper_idx, Pass(level, k, parity)).reshape(self.shape[level])

    def _half(self, level: int, k: int, parity: int) -> tuple[np.ndarray, np.ndarray]:
        """Capped magnitudes (int32) and expected magnitudes (int64) of one pass's symbols, put before."""
        return self.mags[level, k, parity].astype(np.int32), self.ctx.magnitude[self.hyper(level, k, parity)]

    def _parity0(self, p: Pass) -> np.ndarray:
        """The clipped symbols (int16, (H, W/2)) of parity 0 of the channel of a parity-1 pass."""
        key, symbols = self._symbols
        assert key == (p.level, p.channel)
        return symbols

    def _labels(self, p: Pass) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three labels (uint8) at the pass's positions, in its coding order."""
        ctx, level, k, parity = self.ctx, p.level, p.channel, p.parity
        none = np.zeros(self.shape[level][0] * self.shape[level][1], dtype=np.uint8)
        if parity:
            a, e = (_cross4(x) for x in self._half(level, k, 0))
            same = ctx.label(a, e).reshape(-1)
        else:
            same = none
        if level == LL_LEVEL:  # no parent; cross: the colours coded before
            parent, first = none, k == 0
        else:
            first = ORDER.index(k) == 0
            if level == LEVELS:
                parent = none
            else:
                if self._parent_key != (level, k):
                    self._parent_key, self._parent = (level, k), self._parent_label(level + 1, k)
                    del self.mags[level + 1, k, 0], self.mags[level + 1, k, 1]  # read by nothing else
                parent = self._parent
        if first:
            cross = none
        else:
            sums = self._cross[level]
            cross = ctx.label(sums[2 * parity], sums[2 * parity + 1]).reshape(-1)
        return same, parent, cross

    def _parent_label(self, level: int, k: int) -> np.ndarray:
        """The `parent` label of the children of channel k of `level` (complete), in the layout of
        either parity of the child band: a child (i, j)'s parent is (i // 2, j // 2), and position m
        of row i of a parity is at column 2m or 2m + 1, so its parent is (i // 2, m)."""
        H, W = self.shape[level][0], 2 * self.shape[level][1]
        planes = [np.zeros((H, W), dtype=np.int64) for _ in range(2)]
        for parity in (0, 1):
            for plane_, values in zip(planes, self._half(level, k, parity)):
                place(plane_, parity, values)
        a, e = (np.repeat(_sum9(x), 2, axis=0) for x in planes)
        return self.ctx.label(a, e).reshape(-1)

    def labels(self, p: Pass) -> tuple[np.ndarray, ...]:
        """The pass's hyper indices and three labels, in its coding order (for fitting)."""
        return (self.hyper(p.level, p.channel, p.parity).reshape(-1),) + self._labels(p)

    def indices(self, p: Pass) -> np.ndarray:
        """The pass's coded table indices, in its coding order (row-major over its positions)."""
        return self.ctx.pass_indices(p, self.hyper(p.level, p.channel, p.parity).reshape(-1), self._labels(p))

    def mean(self, p: Pass) -> np.ndarray:
        """The pass's predicted symbols (int32, in its coding order): for parity 1, the weighted
        sum of the four decoded neighbours in the band (each clipped to ±SYMBOL_CLIP, zero outside
        the band), rounded: floor((Σ w·s + 128) / 256); zeros for parity 0 and the LL block. `check` bounds Σ|w|
        so that the sum fits 32 bits."""
        w = [] if p.level == LL_LEVEL else [int(x) for x in self.ctx.weights[p.level - 1, p.channel]]
        if p.parity == 0 or not any(w):
            return np.zeros(self.shape[p.level][0] * self.shape[p.level][1], dtype=np.int32)
        half = self._parity0(p).astype(np.int32)  # `_neighbours`, summed in place
        acc = np.empty_like(half)
        acc[0::2] = half[0::2] * w[2]  # the left neighbour on even rows, the right one on odd rows
        acc[1::2] = half[1::2] * w[3]
        acc[1:] += half[:-1] * w[0]
        acc[:-1] += half[1:] * w[1]
        acc[0::2, :-1] += half[0::2, 1:] * w[3]
        acc[1::2, 1:] += half[1::2, :-1] * w[2]
        acc += MEAN_ONE // 2
        acc >>= 8
        return acc.reshape(-1)

    def neighbours(self, p: Pass) -> np.ndarray:
        """(n, 4) the clipped decoded neighbours (up, down, left, right) of a parity-1 pass's
        positions (for fitting)."""
        return np.stack([a.reshape(-1) for a in _neighbours(self._parity0(p))], axis=1)

    def put(self, p: Pass, symbols: np.ndarray) -> None:
        """Record the pass's symbols (in its coding order)."""
        clipped = np.clip(symbols, -SYMBOL_CLIP, SYMBOL_CLIP).astype(np.int16).reshape(self.shape[p.level])
        self.mags[p.level, p.channel, p.parity] = np.minimum(np.abs(clipped), MAGNITUDE_CAP).astype(np.uint8)
        if p.parity == 0:  # kept for the channel's parity 1: its neighbours and prediction
            self._symbols = (p.level, p.channel), clipped
            return
        self._symbols = None
        # The subband (LL colour) is complete: it joins the cross sums of those after it (each
        # below 2^31: at most 8 subbands of magnitudes below 2^24).
        if p.level not in self._cross:
            self._cross = {p.level: [np.zeros(self.shape[p.level], dtype=np.int32) for _ in range(4)]}
        sums = self._cross[p.level]
        for parity in (0, 1):
            a, e = self._half(p.level, p.channel, parity)
            sums[2 * parity] += a
            sums[2 * parity + 1] += e.astype(np.int32)
        if p.level in (1, LL_LEVEL):  # nothing is a child of level 1 or of the LL block
            del self.mags[p.level, p.channel, 0], self.mags[p.level, p.channel, 1]


def code_passes(ctx: SubbandContext, hyper_idx: np.ndarray,
                symbols_for: Callable[[Pass, np.ndarray, np.ndarray], np.ndarray]
                ) -> Iterator[tuple[Pass, np.ndarray, np.ndarray]]:
    """Go through the passes (`passes(ctx)`) in coding order: for each, its table indices t and predicted
    symbols μ from what was coded before, then `symbols_for(pass, t, μ)` -- the encoder's chosen
    or the decoder's decoded symbols s of the pass, in its coding order -- recorded for the
    passes after it. Yields (pass, s - μ, t): what the pass codes."""
    state = Passes(ctx, hyper_idx)
    for p in passes(ctx):
        t, mu = state.indices(p), state.mean(p)
        s = symbols_for(p, t, mu)
        yield p, (s - mu).astype(np.int32), t
        state.put(p, s)


def pass_values(y: np.ndarray, p: Pass, scale: np.ndarray | None = None) -> np.ndarray:
    """The values of a latent-layout array y (M, h, w) at the pass's positions, in its coding
    order (a copy): `take` of the band plane `to_bands(y)[level][channel]`, gathered from the
    pass's own channels; with `scale` (M,), each times its channel's factor (in y's dtype)."""
    start, r = level_channels(p.level)
    if r == 1:
        out = take(y[start + p.channel], p.parity)
        return out if scale is None else out * scale[start + p.channel]
    _, h, w = y.shape
    out = np.empty((h, r, w, r // 2), dtype=y.dtype)
    for b, (first, rows) in enumerate(_pass_rows(y, p)):
        out[:, b] = rows.transpose(1, 2, 0)
        if scale is not None:
            out[:, b] *= scale[first:first + r - 1:2]
    return out.reshape(-1)


def put_pass(y: np.ndarray, p: Pass, values: np.ndarray) -> None:
    """Write the pass's values (in its coding order) into the latent-layout array y (the inverse of
    `pass_values`); y need only have the channels up to the pass's level."""
    start, r = level_channels(p.level)
    if r == 1:
        place(y[start + p.channel], p.parity, values)
        return
    _, h, w = y.shape
    values = values.reshape(h, r, w, r // 2)
    for b, (_, rows) in enumerate(_pass_rows(y, p)):
        rows[...] = values[:, b].transpose(2, 0, 1)


def pass_items(ctx: SubbandContext, symbols: np.ndarray, hyper_idx: np.ndarray, workers: int = 1
               ) -> Iterator[tuple[Pass | None, np.ndarray, np.ndarray]]:
    """The y items of a context-coded latent with known symbols, in coding order: (pass,
    coded values, table indices), the LL block first (pass None, its symbols and hyper
    indices; or its passes, with an `ll_remap`). symbols and hyper_idx are (M, h, w); one band
    plane is copied out at a time. With `workers` > 1, a tall latent's `row_parts` go through
    their passes on their own (their symbols are known), side by side, each pass's parts joined
    in coding order (the same items), and the next pass is computed while the caller takes this
    one."""
    if ctx.ll_remap is None:
        yield None, symbols[:LL_CHANNELS].ravel(), hyper_idx[:LL_CHANNELS].ravel()
    if workers <= 1:
        yield from code_passes(ctx, hyper_idx, lambda p, t, mu: pass_values(symbols, p))
        return
    parts, width, order = row_parts(symbols.shape[1]), symbols.shape[2], passes(ctx)
    streams = [code_passes(ctx, hyper_idx[:, part.read], lambda p, t, mu, s=symbols[:, part.read]: pass_values(s, p))
               for part in parts]
    with ThreadPoolExecutor(max_workers=min(workers, len(parts))) as pool:
        pending = [pool.submit(next, stream) for stream in streams]
        for i, p in enumerate(order):
            got = [future.result() for future in pending]
            if i + 1 < len(order):
                pending = [pool.submit(next, stream) for stream in streams]
            where = [kept(p, part, width) for part in parts]
            yield (p, *joined(([coded[k] for (_, coded, _), k in zip(got, where)],
                               [t[k] for (_, _, t), k in zip(got, where)])))


def coded_indices(ctx: SubbandContext, symbols: np.ndarray, hyper_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The table index every symbol of a latent (M, h, w) is coded with, and its prediction μ
    (the value coded is the symbol less μ), both (M, h, w): the hyper index and 0 in an LL
    block coded as one item, the context's elsewhere."""
    out = hyper_idx.copy()
    mean = np.zeros(hyper_idx.shape, dtype=np.int64)
    for p, coded, t in pass_items(ctx, symbols, hyper_idx):
        if p is not None:
            put_pass(out, p, t)
            put_pass(mean, p, pass_values(symbols, p) - coded)
    return out, mean


def label_dependents(ctx: SubbandContext, symbols: np.ndarray, hyper_idx: np.ndarray,
                     code_length: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For each detail symbol of a latent (M, h, w): how much the code lengths of the symbols whose
    labels count its magnitude change if its capped magnitude rises by one, and if it falls by one,
    the rest as it is -- (rise, fall), float32 (M, h, w), 0 in the LL block.

    A detail symbol's magnitude enters the `same` label of its four neighbours in the band when it is
    of parity 0, the `parent` label of the children of its 3x3 neighbourhood one level finer, and
    the `cross` label of the later subbands of its level at its position; each of those codes its
    own value (symbol less prediction) under the table its labels give. `code_length(t, v)` is the
    code length of values v under tables t. Not counted: the predictions (a parity-0 symbol also
    enters its neighbours' predicted means) and the LL block's own labels."""
    M, h, w = symbols.shape
    rise, fall = np.zeros((M, h, w), np.float32), np.zeros((M, h, w), np.float32)
    coded = {p: (v, t) for p, v, t in pass_items(ctx, symbols, hyper_idx) if p is not None and p.level != LL_LEVEL}
    bands, hyper = to_bands(symbols), to_bands(hyper_idx)
    mags = {level: np.minimum(np.abs(bands[level]), MAGNITUDE_CAP).astype(np.int64) for level in bands}
    expected = {level: ctx.magnitude[hyper[level]].astype(np.int64) for level in bands}
    deltas: dict[int, dict[int, np.ndarray]] = {}  # level -> {+1/-1: (9, H, W)} per source position
    for level in range(LEVELS, 0, -1):
        H, W = bands[level].shape[1:]
        out = {d: np.zeros((SUBBANDS, H, W), np.float32) for d in (1, -1)}
        later = {d: np.zeros((SUBBANDS, H, W), np.float32) for d in (1, -1)}  # each subband's cross Δ
        children = {d: np.zeros((SUBBANDS, H, W), np.float32) for d in (1, -1)}  # each child's parent Δ
        sums = {"same": (_sum4(mags[level]), _sum4(expected[level]))}
        if level < LEVELS:
            sums["parent"] = tuple(np.repeat(np.repeat(_sum9(x[level + 1]), 2, axis=1), 2, axis=2)
                                   for x in (mags, expected))
        cross_a, cross_e = np.zeros((H, W), np.int64), np.zeros((H, W), np.int64)
        for i, k in enumerate(ORDER):
            planes = {"same": tuple(a[k] for a in sums["same"]), "cross": (cross_a, cross_e)}
            if "parent" in sums:
                planes["parent"] = tuple(a[k] for a in sums["parent"])
            for parity in (0, 1):
                p = Pass(level, k, parity)
                v, t = coded[p]
                hyp = take(hyper[level][k], parity).astype(np.int32)
                halves = {x: (take(a, parity), take(e, parity)) for x, (a, e) in planes.items()
                          if (x != "same" or parity) and (x != "cross" or i)}
                labels = {x: ctx.label(a, e) for x, (a, e) in halves.items()}
                none = np.zeros(hyp.shape, np.uint8)

                def indices(changed: dict) -> np.ndarray:
                    get = {x: changed.get(x, labels.get(x, none)) for x in ("same", "parent", "cross")}
                    return ctx.pass_indices(p, hyp, (get["same"], get["parent"], get["cross"]))

                now = code_length(t, v)
                for x, (a, e) in halves.items():
                    for d in (1, -1):
                        delta = code_length(indices({x: ctx.label(np.maximum(a + d, 0), e)}), v) - now
                        full = np.zeros((H, W), np.float32)
                        place(full, parity, delta.astype(np.float32))
                        if x == "same":
                            out[d][k] += _sum4(full)  # to its parity-0 neighbours
                        elif x == "parent":
                            children[d][k] += full
                        else:
                            later[d][k] += full
            cross_a += mags[level][k]
            cross_e += expected[level][k]
        for d in (1, -1):
            run = np.zeros((H, W), np.float32)
            for k in reversed(ORDER):  # a subband's magnitude enters the cross labels of those after it
                out[d][k] += run
                run += later[d][k]
            if level < LEVELS:  # a child's parent label sums the 3x3 neighbourhood of its parent
                per_parent = children[d].reshape(SUBBANDS, H // 2, 2, W // 2, 2).sum(axis=(2, 4))
                deltas[level + 1][d] += _sum9(per_parent)
        deltas[level] = out
    for p in PASSES:
        for d, dest in ((1, rise), (-1, fall)):
            put_pass(dest, p, take(deltas[p.level][d][p.channel], p.parity))
    return rise, fall


def _sum9(a: np.ndarray) -> np.ndarray:
    """Sum over the 3x3 neighbourhood of each position of planes (..., H, W), zeros outside, in a's dtype."""
    p = np.zeros(a.shape[:-2] + (a.shape[-2] + 2, a.shape[-1] + 2), dtype=a.dtype)
    p[..., 1:-1, 1:-1] = a
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def _sum4(a: np.ndarray) -> np.ndarray:
    """Sum of the four neighbours (up, down, left, right) of each position of planes (..., H, W),
    zeros outside."""
    out = np.zeros_like(a)
    out[..., 1:, :] += a[..., :-1, :]
    out[..., :-1, :] += a[..., 1:, :]
    out[..., :, 1:] += a[..., :, :-1]
    out[..., :, :-1] += a[..., :, 1:]
    return out
