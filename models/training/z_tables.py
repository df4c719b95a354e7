"""Count a frozen model's z tables per rate: the tables of ẑ chosen by the file's rate parameter.

    python -m lcodec.models.training.z_tables models/archive/lift-97-128-v8.pt runs/z/frozen.pt \
        --data ../shared/data/train --images 400

A hyperprior's z prior is one table per channel of ẑ, trained with the rest of the model. But
ẑ = h_a(y · gain) grows with the gain, so the one table of a channel fits some rates and not
others. This tool gives the model one set of N tables per bucket of the rate parameter q: one
bucket per integer q of its rate range. For training crops it takes ẑ at four q spread evenly
over each bucket (b - 3/8, b - 1/8, b + 1/8, b + 3/8) and counts each channel's values; a
table is its counts plus `PSEUDO_COUNT` for each value in -`SUPPORT` .. `SUPPORT`, its tails
holding less than `TAIL_MASS` trimmed (values beyond the counted ones are escaped) and quantised as
the z tables are (`pmf_tables`). The file's rate parameter picks the set
(`FrozenModel.z_table_offset`, SPEC.md "Stream"). Everything else of the model stays as it is.

The tables change what every q costs, so the levels are refitted to their targets afterwards
(`context.refit_levels`), and the tables are counted once more at the refitted gains.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...bitstream.container import RATE_SCALE
from ...bitstream.tables import pmf_tables
from ...engine import Encoder
from ..frozen import FrozenModel
from ..registry import sha256_file
from .context import refit_levels
from .freeze import _tables_state, write_frozen
from .train import load_images

SUPPORT = 255  # values counted one by one: -SUPPORT .. SUPPORT; a table escapes the others
PSEUDO_COUNT = 0.001  # added to every value's count: a value unseen amid seen ones stays in the table
TAIL_MASS = 1e-4  # the tails trimmed into the escape: far beyond the values seen, only the escape
SPREAD = (-0.375, -0.125, 0.125, 0.375)  # the q counted for bucket b, relative to b


def buckets(model: FrozenModel) -> np.ndarray:
    """The buckets' rate parameters (in 1/RATE_SCALE): every integer q of the rate range."""
    lo, hi = model.rate_range
    return np.arange(int(np.ceil(lo)), int(np.floor(hi)) + 1, dtype=np.int64) * RATE_SCALE


def count(model: FrozenModel, images: torch.Tensor, centres: np.ndarray) -> np.ndarray:
    """(buckets, N, 2·SUPPORT + 1) counts of ẑ's values per bucket and channel, clipped to ±SUPPORT."""
    N, width = model.config.N, 2 * SUPPORT + 1
    hist = np.zeros((len(centres), N, width), dtype=np.int64)
    lo, hi = (round(r * RATE_SCALE) for r in model.rate_range)
    rows = (np.arange(N) * width)[:, None]
    for image in tqdm(images, desc="z values"):
        enc = Encoder(model, image.permute(1, 2, 0).numpy(), "RGB")
        for b, centre in enumerate(centres):
            for d in SPREAD:
                rq = min(max(int(centre + d * RATE_SCALE), lo), hi)
                _, z = enc._hyper_latent(rq)  # noqa: SLF001 -- ẑ as the encoder sends it
                z = np.clip(z.numpy()[0].reshape(N, -1), -SUPPORT, SUPPORT) + SUPPORT
                hist[b].reshape(-1)[:] += np.bincount((rows + z).ravel(), minlength=N * width)
    return hist


def tables_state(hist: np.ndarray) -> dict:
    """The z tables (buckets · N of them, bucket-major) of the counts, as a frozen file stores them."""
    pmf = hist.reshape(-1, hist.shape[-1]).astype(np.float64) + PSEUDO_COUNT
    return _tables_state(pmf_tables(pmf / pmf.sum(1, keepdims=True), -SUPPORT, tail_mass=TAIL_MASS))


def with_tables(source: Path, out: Path, crops: torch.Tensor, info: dict) -> None:
    """Write `source` with z tables per bucket counted on the training `crops` (`info` says which)."""
    model = FrozenModel(source)
    centres = buckets(model)
    hist = count(model, crops, centres)
    state = torch.load(source, map_location="cpu", weights_only=True)
    state["z_tables"] = tables_state(hist)
    state["z_buckets"] = torch.from_numpy(centres)
    state["info"] = dict(state.get("info", {})) | {
        "z_tables": info | {"support": SUPPORT, "pseudo_count": PSEUDO_COUNT, "tail_mass": TAIL_MASS}}
    write_frozen(state, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", type=Path, help="a frozen model")
    ap.add_argument("out", type=Path, help="the frozen model with z tables per rate")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--level-images", type=int, default=32,
                    help="training images on which the levels are refitted to their targets (0: keep them)")
    args = ap.parse_args(argv)

    crops = load_images(args.data)
    crops = crops[np.linspace(0, len(crops) - 1, min(args.images, len(crops))).round().astype(int)]
    info = {"data": str(args.data), "images": args.images}
    with_tables(args.weights, args.out, crops, info)
    if args.level_images:
        refit_levels(args.out, args.data, args.level_images)
        with_tables(args.out, args.out, crops, info)  # counted again at the refitted gains
    print(f"{args.out}: sha256 {sha256_file(args.out)}")


if __name__ == "__main__":
    main()
