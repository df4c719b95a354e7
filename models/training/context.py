"""Fit a subband context model (`lcodec.models.context`) to a frozen lifting model.

    python -m lcodec.models.training.context models/weights/lift-97-128-v5.pt runs/ctx/frozen.pt \
        --data ../shared/data/train --images 300

Everything of the frozen model stays as it is; what is learned is the context's remap table.
For training images at every trained level the tool codes the latent as the codec does
(one-pass symbols), goes through the passes and counts, per cell (level, colour, parity,
hyper index, three labels), how often each symbol magnitude occurs. Each cell then gets the
y table with the smallest total code length for its counts, after adding `prior` counts
drawn from the hyper index's own table (so that a cell seen rarely keeps the hyperprior's
table). With `--ll` the LL block is coded in passes too and its lookup (colour, parity, hyper
index, two labels) is counted the same way; a model that already has a context keeps it and
gets only the LL block's. Counting runs once: the histograms are saved next to the output
(`.hist.npz`) and reused by later runs with the same images and labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...bitstream.container import RATE_SCALE
from ...bitstream.tables import CdfTables
from ...engine import Encoder
from ..context import (LEVELS, LL_CHANNELS, LL_PASSES, MAGNITUDE_ONE, MEAN_ONE, PASSES, RATIO_ONE, Passes,
                       SubbandContext, pass_values)
from ..frozen import FrozenModel
from ..networks import interpolate_levels
from ..registry import sha256_file
from .fit_levels import GRID_STEP, fitted_positions, measured_rates, training_images
from .train import load_images

MAX_MAGNITUDE = 48  # magnitudes counted one by one; larger ones count as this one
THRESHOLDS = (0.3, 0.6, 1.0, 1.6, 2.5, 4.0)  # label boundaries of A / E
PRIOR = 5.0


def expected_magnitudes(tables: CdfTables) -> np.ndarray:
    """E|s| of every y table, in 1/`MAGNITUDE_ONE`, at least 1. An escape counts as the first
    value outside the table."""
    out = np.empty(tables.num_tables, dtype=np.int64)
    for t in range(tables.num_tables):
        n, lo = int(tables.lengths[t]), int(tables.offsets[t])
        p = tables.freqs[t, :n + 1].astype(np.float64) / 2**tables.precision
        values = np.abs(np.arange(lo, lo + n))
        mean = float(p[:n] @ values) + p[n] * (max(abs(lo - 1), abs(lo + n)))
        out[t] = max(1, round(mean * MAGNITUDE_ONE))
    return out


def magnitude_costs(tables: CdfTables) -> np.ndarray:
    """(T, MAX_MAGNITUDE + 1) code length in bits of a symbol of magnitude a (the mean of +a and
    -a) under each table, escapes with their escaped bits."""
    T = tables.num_tables
    cost = np.empty((T, MAX_MAGNITUDE + 1))
    bits = tables._bits  # noqa: SLF001 -- the tables' own code lengths
    for t in range(T):
        n, lo = int(tables.lengths[t]), int(tables.offsets[t])
        for a in range(MAX_MAGNITUDE + 1):
            c = []
            for v in {a, -a}:
                col = v - lo
                if 0 <= col < n:
                    c.append(bits[t, col])
                else:
                    c.append(bits[t, n] + 5 + (v != 0) + max(int(abs(v)).bit_length() - 1, 0))
            cost[t, a] = np.mean(c)
    return cost


def magnitude_pmf(tables: CdfTables) -> np.ndarray:
    """(T, MAX_MAGNITUDE + 1) probability of each magnitude under each table."""
    cost = magnitude_costs(tables)
    pmf = 2.0**-cost
    pmf[:, 1:] *= 2
    return pmf / pmf.sum(1, keepdims=True)


def latents(model: FrozenModel, images: torch.Tensor, progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one-pass y symbols (int16, clipped) and hyper indices (M, h, w) of every image at every
    trained level, as the frozen model codes them without a context."""
    out = []
    for image in tqdm(images, desc="latents", disable=not progress):
        enc = Encoder(model, image.permute(1, 2, 0).numpy(), "RGB")
        shape = (model.config.M,) + tuple(enc.y.shape[2:])
        for level in range(len(model.levels)):
            _, sym, idx = enc._symbols(level * RATE_SCALE)  # noqa: SLF001 -- the symbols as coded
            out.append((np.clip(sym, -32767, 32767).astype(np.int16).reshape(shape), idx.reshape(shape)))
    return out


def fit_weights(ctx: SubbandContext, data: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The prediction weights (4, 9, 4) in 1/`MEAN_ONE`: per level and channel, the least-squares
    fit of a parity-1 symbol from its four neighbours."""
    xtx = np.zeros((LEVELS, 9, 4, 4))
    xty = np.zeros((LEVELS, 9, 4))
    for sym, idx in tqdm(data, desc="prediction"):
        state = Passes(ctx, idx)
        for p in PASSES:
            s = pass_values(sym, p).astype(np.int64)
            if p.parity == 1:
                x = state.neighbours(p).astype(np.float64)
                xtx[p.level - 1, p.channel] += x.T @ x
                xty[p.level - 1, p.channel] += x.T @ s
            state.put(p, s)
    weights = np.zeros((LEVELS, 9, 4), dtype=np.int64)
    for level in range(LEVELS):
        for k in range(9):
            w = np.linalg.lstsq(xtx[level, k] + 1e-3 * np.eye(4), xty[level, k], rcond=None)[0]
            weights[level, k] = np.round(w * MEAN_ONE)
    return weights


def count(ctx: SubbandContext, data: list[tuple[np.ndarray, np.ndarray]], num_tables: int) -> np.ndarray:
    """Histogram (4, 3, 2, T, B, B, B, MAX_MAGNITUDE + 1) of the coded values' magnitudes (the
    symbol less its prediction) per cell."""
    T, B, S = num_tables, ctx.labels, MAX_MAGNITUDE + 1
    cells = T * B**3 * S
    hist = np.zeros((LEVELS * 3 * 2, cells), dtype=np.int64)
    keys: list[np.ndarray] = []

    def flush() -> None:  # one bincount over many passes: each is the size of the whole histogram
        if keys:
            hist.reshape(-1)[:] += np.bincount(np.concatenate(keys), minlength=hist.size)
            keys.clear()

    for n, (sym, idx) in enumerate(tqdm(data, desc="counting")):
        state = Passes(ctx, idx)
        for p in PASSES:
            s = pass_values(sym, p).astype(np.int64)
            t, same, parent, cross = (a.astype(np.int64) for a in state.labels(p))
            coded = s - state.mean(p)
            group = ((p.level - 1) * 3 + p.colour) * 2 + p.parity
            keys.append(group * cells + (((t * B + same) * B + parent) * B + cross) * S
                        + np.minimum(np.abs(coded), MAX_MAGNITUDE))
            state.put(p, s)
        if n % 64 == 63:
            flush()
    flush()
    return hist.reshape(LEVELS, 3, 2, T, B, B, B, S)


def count_ll(ctx: SubbandContext, data: list[tuple[np.ndarray, np.ndarray]], num_tables: int) -> np.ndarray:
    """Histogram (3, 2, T, B, B, MAX_MAGNITUDE + 1) of the LL block's symbol magnitudes per cell
    (colour, parity, hyper index, `same`, `cross`) of its passes."""
    T, B, S = num_tables, ctx.labels, MAX_MAGNITUDE + 1
    ctx = SubbandContext(ctx.magnitude, ctx.thresholds, ctx.remap, ctx.weights, identity_ll_remap(T, B))
    keys = []
    for sym, idx in tqdm(data, desc="counting the LL block"):
        state = Passes(ctx, idx)
        for p in LL_PASSES:
            s = pass_values(sym, p).astype(np.int64)
            t, same, _, cross = (a.astype(np.int64) for a in state.labels(p))
            keys.append(((((p.channel * 2 + p.parity) * T + t) * B + same) * B + cross) * S
                        + np.minimum(np.abs(s), MAX_MAGNITUDE))
            state.put(p, s)
    return np.bincount(np.concatenate(keys), minlength=LL_CHANNELS * 2 * T * B * B * S).reshape(
        LL_CHANNELS, 2, T, B, B, S)


def identity_ll_remap(num_tables: int, labels: int) -> np.ndarray:
    """An LL lookup that gives every position its hyper index (the hyperprior's bits)."""
    return np.broadcast_to(np.arange(num_tables, dtype=np.uint8).reshape(1, 1, -1, 1, 1),
                           (LL_CHANNELS, 2, num_tables, labels, labels)).copy()


def fit(hist: np.ndarray, tables: CdfTables, prior: float = PRIOR, t_axis: int = 3) -> np.ndarray:
    """The remap table: per cell, the y table with the least code length for its counts plus
    `prior` counts of its hyper index's own table (the hyper index is axis `t_axis` of `hist`)."""
    cost = magnitude_costs(tables)  # (T, S)
    pmf = magnitude_pmf(tables)
    T, S = cost.shape
    shape = hist.shape[:-1]
    h = hist.reshape(-1, T, int(np.prod(shape[t_axis + 1:])), S).astype(np.float64)
    h = h + prior * pmf[None, :, None, :]
    totals = np.einsum("gtcs,us->gtcu", h, cost)
    return totals.argmin(-1).astype(np.uint8).reshape(shape)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", type=Path, help="a frozen lifting model")
    ap.add_argument("out", type=Path, help="the frozen model with the fitted context")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--prior", type=float, default=PRIOR)
    ap.add_argument("--ll", action="store_true",
                    help="also code the LL block in passes with a lookup of its own; a model that has a context "
                         "keeps its details' lookup and predictions, and only the LL block's is counted")
    ap.add_argument("--level-images", type=int, default=32,
                    help="training images on which the levels are refitted to their targets (0: keep them)")
    args = ap.parse_args(argv)

    model = FrozenModel(args.weights)
    T = model.y_tables.num_tables
    hist_path = args.out.with_suffix(".hist.npz")
    saved = dict(np.load(hist_path)) if hist_path.exists() else {}
    data = None
    if not saved.keys() >= ({"ll_hist"} if args.ll else set()) | ({"hist"} if model.context is None else set()):
        images = load_images(args.data)
        images = images[np.linspace(0, len(images) - 1, min(args.images, len(images))).round().astype(int)]
        data = latents(model, images)
    if model.context is None:
        magnitude = expected_magnitudes(model.y_tables)
        thresholds = np.array([round(t * RATIO_ONE) for t in THRESHOLDS], dtype=np.int64)
        ctx = SubbandContext.identity(magnitude, thresholds)
        if "hist" not in saved:
            saved["weights"] = fit_weights(ctx, data)
            saved["hist"] = count(SubbandContext(magnitude, thresholds, ctx.remap, saved["weights"]), data, T)
        ctx = SubbandContext(magnitude, thresholds, fit(saved["hist"], model.y_tables, args.prior), saved["weights"])
        info = {"data": str(args.data), "images": args.images, "prior": args.prior, "thresholds": list(THRESHOLDS)}
    else:
        ctx, info = model.context, dict(model.info["context"])
    if args.ll:
        if "ll_hist" not in saved:
            saved["ll_hist"] = count_ll(ctx, data, T)
        ll_remap = fit(saved["ll_hist"], model.y_tables, args.prior, t_axis=2)
        ctx = SubbandContext(ctx.magnitude, ctx.thresholds, ctx.remap, ctx.weights, ll_remap)
        info["ll"] = {"data": str(args.data), "images": args.images, "prior": args.prior}
    del data
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(hist_path, **saved)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    state["context"] = ctx.state()
    state["info"] = dict(state.get("info", {})) | {"context": info}
    _save(state, args.out)
    if args.level_images:
        refit_levels(args.out, args.data, args.level_images)
    print(f"{args.out}: sha256 {sha256_file(args.out)}")


def refit_levels(path: Path, data: Path, count: int) -> None:
    """Give level i of the frozen model at `path` the gains of the q where its mean coded rate on
    `count` training images is the level's target (`fit_levels`, on the frozen model as it codes,
    context included); rewrites the file."""
    model = FrozenModel(path)
    levels = model.config.levels
    qs = np.arange(-1.0, len(levels) + 1 + GRID_STEP / 2, GRID_STEP)
    rates = measured_rates(model, training_images(data, count), qs)
    positions = fitted_positions(levels, qs, rates)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name in ("log_gain", "log_inv_gain"):
        table = state[name].float()
        state[name] = torch.stack([interpolate_levels(table, q) for q in positions]).half()
    state["info"]["context"]["fitted_levels"] = {"images": count, "positions": positions}
    _save(state, path)
    for target, q in zip(levels, positions):
        print(f"level {target:g} bpp: q {q:.3f}")


def _save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    main()
