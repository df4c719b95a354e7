"""Rate-distortion optimised rounding: which integer the encoder codes for a latent.

The decoder reads any integer symbols s and forms ŷ = s + mean; which integers to
send is the encoder's choice. Plain rounding sends the nearest one. For the
models of `RDO_LAMBDA` the encoder sends, for each gained latent less its mean v,
whichever of k0 = round(v) and its neighbour towards the mean k0 - sign(k0)
minimises

    (v - k)² + λ · bits(k)

with bits(k) the code length under the latent's own table (ẑ, and so every table,
is fixed first). A latent just past a rounding boundary is pulled back when that
saves more bits than it costs in squared error; rate control then finds the rate
parameter whose file with this rounding fills the budget, so the saved bits buy a
finer quantisation step. The error is counted in the gained domain, where the
trained gains make a unit of error cost about the same in every channel (weighting
each channel by its synthesis norm measured the same on Kodak); for a linear
synthesis (the lifting models) that is, to the near-orthonormality of the 9/7
wavelet, the pixel error. For the GDN model it is not, and the measured gain was
negative, so it keeps plain rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from .bitstream.tables import ESCAPE_MAX_BITS
from .models import context
from .models.frozen import FrozenModel, worker_threads

# λ per model architecture (`ModelConfig.arch`) as (q, λ) knots, linear between them and held beyond
# the ends; absent: plain rounding. For the lifting models 0.06 (measured on Kodak); with a subband
# context, 0.08 from q = 6 up (on held-out training crops +0.02 dB at equal rate at q 6-8, nothing at
# q 4-5, less at 0.04 or 0.1).
RDO_LAMBDA = {"lifting": ((5.0, 0.06), (6.0, 0.08))}
BITS_CAP = 64.0  # the code length of a table's unused columns (they are +inf in the tables)


def rdo_lambda(model: FrozenModel, q: float | None = None) -> float | None:
    """λ of the rounding the encoder uses with `model` at rate parameter q, or None for plain
    rounding. Without q (and for a model without a subband context, at every q) the λ of its low
    rates: the first knot's."""
    knots = RDO_LAMBDA.get(model.config.arch)
    if knots is None:
        return None
    if q is None or model.context is None:
        return knots[0][1]
    return float(np.interp(q, [k for k, _ in knots], [lam for _, lam in knots]))


def round_latents(v: torch.Tensor, idx: torch.Tensor, model: FrozenModel) -> torch.Tensor:
    """The symbols the encoder codes for the gained latents less their means `v`, coded with
    the y tables `idx` of `model` (float; `rdo_round` or plain rounding, as the model has it)."""
    lam = rdo_lambda(model)
    return torch.round(v) if lam is None else rdo_round(v, idx, model, lam)


def round_in_passes(model: FrozenModel, v: np.ndarray, idx: np.ndarray, lam: float | None = None, *,
                    gain: np.ndarray | None = None, ll: np.ndarray | None = None, q: float | None = None,
                    compact: bool = False, items: bool = False) -> tuple[np.ndarray | list, float]:
    """The symbols (M, h, w) int32 of the residuals v (M, h, w) float32 of a model with a subband
    context, whose hyper table indices are idx, rounded as `round_latents` does (with `lam`
    instead of the model's λ at rate parameter `q` if given) pass by pass in coding order, each pass under the tables
    its context gives it from the passes before; and their ideal code length in bits. The
    rounding sees the real cost of each symbol, given the symbols coded before it.

    With `gain` (M,) float32, v is the latent before the gain and `ll` the residuals of the LL
    block (3, h, w): a detail's mean is 0, so its residual is v · gain, computed one pass at a
    time (the float32 product the whole-latent `y * gain` makes), without a residual array as
    big as the latent. With `compact`, the symbols are int16 where every one fits in ±32767 (half
    the memory of a large picture's), else int32. With `items`, instead of the symbols, the
    coder's items of y (`context.pass_items` of the symbols: coded values and table indices, the
    values int8 or int16 where they fit), each as its row parts' pieces ([values], [table indices]),
    joined by `context.joined`: what a real encode codes, without computing the passes' tables again.

    A tall latent is rounded in `context.row_parts`, as many side by side as `worker_threads`:
    the same symbols as in one part (each part keeps only rows its halo makes exact), the bits
    summed part by part."""
    lam = rdo_lambda(model, q) if lam is None else lam
    ll = v[:context.LL_CHANNELS] if gain is None else ll
    parts = context.row_parts(v.shape[1])

    def in_parts(sym: np.ndarray | None, found: list[list] | None) -> float:
        return float(sum(context.map_parts(
            lambda k: _round_part(model, v, idx, ll, gain, lam, parts[k], sym, None if found is None else found[k]),
            list(range(len(parts))), worker_threads())))

    if items:
        found = [[] for _ in parts]  # each part's items, in coding order
        bits = in_parts(None, found)
        return [list(zip(*pieces)) for pieces in zip(*found)], bits
    for dtype in (np.int16, np.int32) if compact else (np.int32,):
        sym = np.empty(v.shape, dtype=dtype)
        try:
            return sym, in_parts(sym, None)
        except _Wide:  # a symbol beyond ±32767: int32 for all
            continue
    raise AssertionError("int32 holds every symbol")


class _Wide(Exception):
    """A symbol does not fit the int16 symbols being made."""


def narrowed(values: np.ndarray) -> np.ndarray:
    """Integers as int8 if every one is within ±127, else as int16 if within ±32767 (the same
    values), else as they are."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype, bound in ((np.int8, 127), (np.int16, 32767)):
        if -bound <= low and high <= bound:
            return values if values.dtype == dtype else values.astype(dtype)
    return values


def _round_part(model: FrozenModel, v: np.ndarray, idx: np.ndarray, ll: np.ndarray, gain: np.ndarray | None,
                lam: float | None, part: context.Part, sym: np.ndarray | None, items: list | None) -> float:
    """`round_in_passes` on the latent rows `part.read` of v, idx and ll: the symbols of the rows
    the part keeps go to `sym` (int16 or int32: `_Wide` where one does not fit), or their coder's
    items to `items`, and their code length in bits is returned."""
    tables = model.y_tables
    bits_np = _bits_numpy(model)
    v, idx, ll, width, keep = v[:, part.read], idx[:, part.read], ll[:, part.read], v.shape[2], part.keep
    out = None if sym is None else sym[:, part.rows]

    def rounded(values: np.ndarray, t: np.ndarray) -> np.ndarray:
        values, t = values.ravel(), t.ravel()
        k = np.rint(np.clip(values, -2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS))
        if lam is not None:  # as `rdo_round`, in numpy: a pass is small, torch's per-call cost is not
            nonzero = np.flatnonzero(k)
            k0, vv, tt = k[nonzero], values[nonzero], t[nonzero]
            k1 = k0 - np.sign(k0)
            j0 = np.square(vv - k0) + lam * _numpy_code_length(bits_np, tt, k0)
            j1 = np.square(vv - k1) + lam * _numpy_code_length(bits_np, tt, k1)
            k[nonzero] = np.where(j1 < j0, k1, k0)
        return k.astype(np.int32)

    def check(s: np.ndarray) -> np.ndarray:
        if out.dtype == np.int16 and s.size and (s.min() < -32767 or s.max() > 32767):
            raise _Wide
        return s

    block = slice(0, context.LL_CHANNELS)
    bits = 0.0
    if model.context.ll_remap is None:  # the LL block is one item under its hyper indices
        s = rounded(ll, idx[block]).reshape(ll.shape)[:, keep]
        if out is not None:
            out[block] = check(s)
        else:
            items.append((narrowed(s), idx[block, keep].copy()))
        bits = tables.cost_bits(s.ravel(), idx[block, keep].ravel())

    def choose(p: context.Pass, t: np.ndarray, mu: np.ndarray) -> np.ndarray:
        if p.level == context.LL_LEVEL:
            s = rounded(context.pass_values(ll, p), t)
        else:  # rounded about the prediction μ (an integer): the RDO's neighbour is towards μ
            s = rounded(context.pass_values(v, p, gain) - mu.astype(np.float32), t) + mu
        if out is not None:
            context.put_pass(out, p, check(s[context.kept(p, part, width)]))
        return s

    for p, coded, t in context.code_passes(model.context, idx, choose):
        k = context.kept(p, part, width)
        coded, t = coded[k], t[k]
        bits += tables.cost_bits(coded, t)
        if items is not None:
            items.append((narrowed(coded), t.copy()))
    return bits


def rdo_round(v: torch.Tensor, idx: torch.Tensor, model: FrozenModel, lam: float) -> torch.Tensor:
    """v rounded to round(v) or its neighbour towards 0, whichever has the smaller
    (v - k)² + lam · bits(k) under the y table `idx` of each latent."""
    k = torch.round(v)
    nonzero = k != 0  # a zero has no neighbour towards 0: only the others (few at low rates) are looked at
    k0, v, idx = k[nonzero], v[nonzero], idx[nonzero]
    k1 = k0 - torch.sign(k0)
    code_length = code_lengths(idx, bits_table(model))
    j0 = (v - k0).square_().add_(code_length(k0), alpha=lam)
    j1 = (v - k1).square_().add_(code_length(k1), alpha=lam)
    k[nonzero] = torch.where(j1 < j0, k1, k0)
    return k


def code_lengths(idx: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The code length of integers each under its table `idx` (of `tables`, as `bits_table` gives
    them), as a function of the integers (shaped as idx). Outside its table an integer costs the
    escape's (capped, without the escaped value's own bits)."""
    bits, offsets, lengths = tables
    idx = idx.long()
    row, offset, length, flat = idx * bits.shape[1], offsets[idx], lengths[idx], bits.view(-1)

    def code_length(sym: torch.Tensor) -> torch.Tensor:
        col = sym.long() - offset
        return flat[row + torch.where((col >= 0) & (col < length), col, length)]

    return code_length


def _numpy_code_length(tables: tuple[np.ndarray, np.ndarray, np.ndarray], idx: np.ndarray, sym: np.ndarray
                       ) -> np.ndarray:
    """`code_lengths` in numpy: the code length (float32) of integers `sym` (float) under tables `idx`."""
    bits, offsets, lengths = tables
    col = sym.astype(np.int64) - offsets[idx]
    length = lengths[idx]
    return bits[idx, np.where((col >= 0) & (col < length), col, length)]


@functools.lru_cache(maxsize=8)
def _bits_numpy(model: FrozenModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(a.numpy() for a in bits_table(model))


@functools.lru_cache(maxsize=8)
def bits_table(model: FrozenModel, hyper: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The y tables (with `hyper`, the z tables) as (code length of every column, the escape's at
    column lengths[t], capped at `BITS_CAP`; offsets; lengths) as float32/int64 tensors."""
    tables = model.z_tables if hyper else model.y_tables
    bits = np.minimum(tables._bits, BITS_CAP)  # noqa: SLF001 -- the tables' own code lengths
    return (torch.from_numpy(bits.astype(np.float32)), torch.from_numpy(tables.offsets.astype(np.int64)),
            torch.from_numpy(tables.lengths.astype(np.int64)))
