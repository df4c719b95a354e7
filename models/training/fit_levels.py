"""Refit a trained model's rate levels to their targets, as the frozen codec codes.

    python -m lcodec.models.training.fit_levels runs/lift14a/checkpoint.pt runs/lift14a/fitted.pt

Level i of a model is trained for the target `levels[i]` bpp, but what the codec
spends at q = i can end far from it: an entropy model trained after the gains (or
the encoder's rate-distortion rounding) codes the same latents in fewer bits. This
tool freezes a copy of the checkpoint's model, measures with that frozen model
the mean payload rate of training images at q on a grid of quarter levels (the
estimate rate control uses, within ~0.01% of the real coder), finds for each level
the q where that mean is the target (log-linear between grid points) and writes a
copy of the checkpoint whose level i has the gains of that q. Only the gains'
labels move: the gain vectors a model can use are those it had, so quality at a
given rate does not change; one-pass encodes (`rate=`) land near their targets and
rate control's first guess starts closer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...bitstream.container import RATE_SCALE
from ...engine import OVERHEAD, Encoder
from ..frozen import FrozenModel
from ..networks import interpolate_levels
from .freeze import load_checkpoint
from .train import frozen_weights, load_images

GRID_STEP = 0.25  # levels between the rates measured


def measured_rates(model: FrozenModel, images: list[np.ndarray], qs: np.ndarray, progress: bool = True) -> np.ndarray:
    """Mean payload bpp (the file without its header) of `images` at each rate parameter in `qs`."""
    rates = np.zeros(len(qs))
    for pixels in tqdm(images, desc="images", disable=not progress):
        enc = Encoder(model, pixels, "RGB")
        pixels_n = pixels.shape[0] * pixels.shape[1]
        rates += [8 * (enc.estimate_bytes(round(q * RATE_SCALE)) - OVERHEAD) / pixels_n for q in qs]
    return rates / len(images)


def fitted_positions(targets: tuple[float, ...], qs: np.ndarray, rates: np.ndarray) -> list[float]:
    """For each target, the q where the measured rate is the target: log-linear between grid points.

    Only the stretch of the grid around q = 0 where the rate rises with q counts (below level 0
    the gains are extrapolated and the rate can grow again, as `ratecontrol.start` says; a small
    model can saturate at the top); a target outside it gets that stretch's end."""
    i = int(np.argmin(np.abs(qs)))
    lo = hi = i
    while lo > 0 and rates[lo - 1] < rates[lo]:
        lo -= 1
    while hi < len(qs) - 1 and rates[hi + 1] > rates[hi]:
        hi += 1
    if hi == lo:
        raise SystemExit("the measured rate does not rise with q around level 0; refusing to refit")
    log_rates = np.log(np.maximum(rates[lo:hi + 1], 1e-12))
    return [float(np.interp(np.log(t), log_rates, qs[lo:hi + 1])) for t in targets]


@torch.no_grad()
def relabel_levels(gains: torch.nn.Module, positions: list[float]) -> None:
    """Give level i of `gains` (a `RateGains` or `BalancedRateGains`) the gains it had at q = positions[i]."""
    names = ["level_log_gain"] if hasattr(gains, "level_log_gain") else ["log_gain", "log_inv_gain"]
    for name in names:
        table = getattr(gains, name)
        table.copy_(torch.stack([interpolate_levels(table, q) for q in positions]))


def training_images(folder: Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` images of `folder` (`train.load_images`), drawn with `seed`, as RGB uint8 arrays."""
    images = load_images(folder)
    picked = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return [np.ascontiguousarray(images[i].permute(1, 2, 0).numpy()) for i in sorted(picked)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path, help="the refitted checkpoint (the input is left as it is)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    p.add_argument("--images", type=int, default=64, help="training images to measure on")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    model, _ = load_checkpoint(args.checkpoint)
    levels = model.config.levels
    qs = np.arange(-2.0, len(levels) - 1 + 4.0 + GRID_STEP / 2, GRID_STEP)
    images = training_images(args.data, args.images)
    rates = measured_rates(frozen_weights(model).model, images, qs, progress=not args.no_progress)
    positions = fitted_positions(levels, qs, rates)
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    relabel_levels(model.gains, positions)
    ck["model"] = {k: v.to(ck["model"][k].dtype) for k, v in model.state_dict().items()}
    ck["fitted_levels"] = {"from": str(args.checkpoint), "images": len(images), "positions": positions}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, args.out)
    for target, q in zip(levels, positions):
        before = float(np.exp(np.interp(q, qs, np.log(rates))))
        print(f"level {target:g} bpp: q {q:.3f} (measured {before:.4f} bpp there)")


if __name__ == "__main__":
    main()
