"""Fit a subband context model (`lcodec.models.context`) to a frozen lifting model.

    python -m lcodec.models.training.context models/weights/lift-97-128-v5.pt runs/ctx/frozen.pt \
        --data ../shared/data/train --images 300

Everything of the frozen model stays as it is; what is learned is the context's remap table.
For training images at every trained level the tool codes the latent as the codec does
(one-pass symbols), goes through the passes and counts, per cell (level, colour, parity,
hyper index, three labels), how often each symbol magnitude occurs. Each cell then gets the
y table with the smallest total code length for its counts, after adding `prior` counts
drawn from the hyper index's own table (so that a cell seen rarely keeps the hyperprior's
table). Counting runs once: the histogram is saved next to the output (`.hist.npz`) and
reused by later runs with the same images and labels.
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
from ..context import LEVELS, MAGNITUDE_ONE, PASSES, RATIO_ONE, Passes, SubbandContext, pass_values, to_bands
from ..frozen import FrozenModel, sha256_file
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


def count(model: FrozenModel, ctx: SubbandContext, images: torch.Tensor, progress: bool = True) -> np.ndarray:
    """Histogram (4, 3, 2, T, B, B, B, MAX_MAGNITUDE + 1) of symbol magnitudes per cell, over
    every image at every trained level."""
    T, B, S = model.y_tables.num_tables, ctx.labels, MAX_MAGNITUDE + 1
    hist = np.zeros((LEVELS, 3, 2, T * B**3 * S), dtype=np.int64)
    levels = len(model.levels)
    for image in tqdm(images, desc="images", disable=not progress):
        enc = Encoder(model, image.permute(1, 2, 0).numpy(), "RGB")
        for level in range(levels):
            _, sym, idx = enc._symbols(level * RATE_SCALE)  # noqa: SLF001 -- the symbols as coded
            M = model.config.M
            shape = (M,) + enc.y.shape[2:]
            sym, idx = sym.reshape(shape), idx.reshape(shape)
            state = Passes(ctx, idx)
            sym_bands = to_bands(sym)
            for p in PASSES:
                s = pass_values(sym_bands, p)
                t, same, parent, cross = (a.astype(np.int64) for a in state.labels(p))
                key = (((t * B + same) * B + parent) * B + cross) * S + np.minimum(np.abs(s), MAX_MAGNITUDE)
                hist[p.level - 1, p.colour, p.parity] += np.bincount(key, minlength=hist.shape[-1])
                state.put(p, s)
    return hist.reshape(LEVELS, 3, 2, T, B, B, B, S)


def fit(hist: np.ndarray, tables: CdfTables, prior: float = PRIOR) -> np.ndarray:
    """The remap table: per cell, the y table with the least code length for its counts plus
    `prior` counts of its hyper index's own table."""
    cost = magnitude_costs(tables)  # (T, S)
    pmf = magnitude_pmf(tables)
    T, S = cost.shape
    shape = hist.shape[:-1]
    h = hist.reshape(-1, T, hist.shape[4] * hist.shape[5] * hist.shape[6], S).astype(np.float64)
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
    args = ap.parse_args(argv)

    model = FrozenModel(args.weights)
    magnitude = expected_magnitudes(model.y_tables)
    thresholds = np.array([round(t * RATIO_ONE) for t in THRESHOLDS], dtype=np.int64)
    ctx = SubbandContext.identity(magnitude, thresholds)
    hist_path = args.out.with_suffix(".hist.npz")
    if hist_path.exists():
        hist = np.load(hist_path)["hist"]
    else:
        images = load_images(args.data)
        images = images[np.linspace(0, len(images) - 1, min(args.images, len(images))).round().astype(int)]
        hist = count(model, ctx, images)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(hist_path, hist=hist)
    remap = fit(hist, model.y_tables, args.prior)
    ctx = SubbandContext(magnitude, thresholds, remap)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    state["context"] = ctx.state()
    state["info"] = dict(state.get("info", {})) | {"context": {
        "data": str(args.data), "images": args.images, "prior": args.prior, "thresholds": list(THRESHOLDS)}}
    tmp = args.out.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(args.out)
    print(f"{args.out}: sha256 {sha256_file(args.out)}")


if __name__ == "__main__":
    main()
