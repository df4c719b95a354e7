"""Widen or narrow the latent y of a trained hyperprior checkpoint (M -> another M) so
that it computes nearly the same thing, and training can go on at the new width;
or add a rate level.

    python -m lcodec.models.training.widen runs/a/checkpoint.pt runs/b/checkpoint.pt --M 256
    python -m lcodec.models.training.widen runs/b/checkpoint.pt runs/c/checkpoint.pt --M 96 \
        --data ../shared/data/train
    python -m lcodec.models.training.widen runs/c/checkpoint.pt runs/d/checkpoint.pt --add-level 0.04

Why: a trained run holds many steps of training. When the latent turns out too
narrow (the reconstruction of the unquantised latents saturates, so extra bits
buy little) or wider than the network uses, changing M in place keeps those steps
instead of training from scratch.

Widening. The new channels start nearly silent, so the widened model reproduces
the old one, and gradients reach every new weight from the first step:

* g_a: new output channels keep their fresh default initialisation;
* g_s: weights from the new channels keep their fresh (small, random)
  initialisation, not zero. The new channels' lower gain (below) makes nearly
  all of their latents round to 0, so the output barely changes, while D has a
  first-order gradient on g_a's new rows through the straight-through rounding.
  Zero weights on both sides of a channel would be a saddle (no gradient from D
  at all), and the rate term would then squeeze the channel out;
* h_a: weights from the new channels are zero, so z is unchanged;
* h_s: new hidden units get fresh incoming weights and zero outgoing weights;
  new mean outputs are 0, new scale outputs have zero weights and the mean of
  the old scale biases;
* rate gains of the new channels: the old channels' mean log-gain of the level
  minus NEW_LOG_GAIN_OFFSET, so that they start small and cheap in rate while
  enough of their latents round to non-zero values for gradients to flow;
* inverse gains of the new channels: the old channels' mean plus the same
  offset, so that g_s sees the new channels at the old channels' scale. Adam
  moves a weight by about the learning rate per step whatever its size, so a
  channel that reached g_s e^2 times weaker would learn that much slower.

The widened model is exactly the old one wherever the new latents round to 0.

Narrowing (`--M` below the current width, with `--data`) keeps the M channels of y
that carry the most bits on training images (summed over the levels) and, in h_s,
the hidden units whose activity times outgoing weights matter most for what is
kept; everything else is cut. It is meant for channels that training has left
unused: where the cut parts are silent, the narrowed model computes the same
function, and each training step is cheaper.

`--add-level R` gives the model one more rate level, trained for R bpp, placed among
the others by rate. Its gains start where the existing ones put R (log-linear in
rate between the neighbouring levels, extrapolated past the ends) and its loss
state starts fresh. Why: a model's lowest level is the lowest rate it was trained
for; below it the codec extrapolates the gains, and there the hyper-latent z can
cost more rather than less, so smooth images may not get below the lowest level's
rate. A level trained lower extends the range the codec's rate search can reach.

The result is a checkpoint without optimizer state (Adam restarts, as after a
`--small-copy`); the step count, loss states and generator carry over, so the
target-rate schedule continues where it was.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..entropy_models import LIKELIHOODS
from .losses import make_level_losses
from ..networks import MeanScaleHyperprior, ModelConfig, interpolate_levels
from .train import load_images

NEW_LOG_GAIN_OFFSET = 2.0


def widen_state(old: dict, old_config: ModelConfig, M: int, seed: int = 0) -> tuple[dict, ModelConfig]:
    """State dict of a MeanScaleHyperprior with latent width M that computes nearly the same function
    (exactly the same wherever the new latents round to 0)."""
    if old_config.arch != "hyperprior":
        raise ValueError("only the hyperprior model can be widened")
    M0, N = old_config.M, old_config.N
    if M < M0:
        raise ValueError(f"cannot narrow M from {M0} to {M}")
    config = ModelConfig(arch="hyperprior", N=N, M=M, levels=old_config.levels, likelihood=old_config.likelihood)
    torch.manual_seed(seed)
    new = {k: v.clone() for k, v in MeanScaleHyperprior(config).state_dict().items()}
    old = {k: v.float() for k, v in old.items()}
    mid0 = M0 * 3 // 2

    for k, v in old.items():  # everything whose shape does not involve M
        if new[k].shape == v.shape:
            new[k] = v.clone()

    # g_a: the old output channels first, new ones keep their fresh weights.
    new["analysis.6.weight"][:M0] = old["analysis.6.weight"]
    new["analysis.6.bias"][:M0] = old["analysis.6.bias"]
    # g_s (ConvTranspose weight is in x out).
    new["synthesis.0.weight"][:M0] = old["synthesis.0.weight"]  # rows M0: keep their fresh weights
    # h_a (Conv weight is out x in): the new channels do not change z.
    new["hyper_analysis.0.weight"][:, :M0] = old["hyper_analysis.0.weight"]
    new["hyper_analysis.0.weight"][:, M0:] = 0
    # h_s layer 1 (in N -> out M): old units copied, new units fresh.
    new["hyper_synthesis.0.weight"][:, :M0] = old["hyper_synthesis.0.weight"]
    new["hyper_synthesis.0.bias"][:M0] = old["hyper_synthesis.0.bias"]
    # h_s layer 2 (in M -> out mid): old units read only old units; new units read all.
    new["hyper_synthesis.2.weight"][:M0, :mid0] = old["hyper_synthesis.2.weight"]
    new["hyper_synthesis.2.weight"][M0:, :mid0] = 0
    new["hyper_synthesis.2.bias"][:mid0] = old["hyper_synthesis.2.bias"]
    # h_s layer 3 (Conv, in mid -> out 2M = [mean | scale]).
    w_old, b_old = old["hyper_synthesis.4.weight"], old["hyper_synthesis.4.bias"]
    w = torch.zeros_like(new["hyper_synthesis.4.weight"])
    b = torch.zeros_like(new["hyper_synthesis.4.bias"])
    w[:M0, :mid0], b[:M0] = w_old[:M0], b_old[:M0]  # old means
    w[M:M + M0, :mid0], b[M:M + M0] = w_old[M0:], b_old[M0:]  # old scales
    b[M + M0:] = b_old[M0:].mean()  # new scales: a typical old scale until they learn
    new["hyper_synthesis.4.weight"], new["hyper_synthesis.4.bias"] = w, b
    # Rate gains: the new channels start below the mean gain of their level, and the
    # inverse gains compensate, so that gain x inverse gain matches the old channels'.
    g = old["gains.log_gain"]
    new["gains.log_gain"] = torch.cat([g, g.mean(1, keepdim=True).expand(-1, M - M0) - NEW_LOG_GAIN_OFFSET], 1)
    g = old["gains.log_inv_gain"]
    new["gains.log_inv_gain"] = torch.cat([g, g.mean(1, keepdim=True).expand(-1, M - M0) + NEW_LOG_GAIN_OFFSET], 1)
    return new, config


@torch.no_grad()
def narrow_state(old: dict, old_config: ModelConfig, M: int, images: torch.Tensor) -> tuple[dict, ModelConfig]:
    """State dict of a MeanScaleHyperprior with latent width M < old M: the channels of y that carry
    the most bits on `images` (uint8, n x 3 x H x W) over all levels, and the h_s hidden units that
    contribute most to the kept outputs. Exactly the same function where the cut parts are silent."""
    if old_config.arch != "hyperprior":
        raise ValueError("only the hyperprior model can be narrowed")
    M0 = old_config.M
    if not 0 < M < M0:
        raise ValueError(f"cannot narrow M from {M0} to {M}")
    config = ModelConfig(arch="hyperprior", N=old_config.N, M=M, levels=old_config.levels,
                         likelihood=old_config.likelihood)
    old = {k: v.float() for k, v in old.items()}
    model = MeanScaleHyperprior(old_config).eval()
    model.load_state_dict(old)
    hs = model.hyper_synthesis
    x = images.float() / 255
    bits = torch.zeros(M0)
    act1 = torch.zeros(hs[0].out_channels)
    act2 = torch.zeros(hs[2].out_channels)
    y0 = model.analysis(x)  # the same at every level: only the gain changes
    for q in range(len(old_config.levels)):
        gain, _ = model.gains(torch.full((len(x),), float(q)))
        y = y0 * gain
        z_hat = torch.round(model.hyper_analysis(y))
        h1 = hs[1](hs[0](z_hat))
        h2 = hs[3](hs[2](h1))
        mean, scale = hs[4](h2).chunk(2, dim=1)
        y_hat = torch.round(y - mean) + mean
        bits += -torch.log2(LIKELIHOODS[old_config.likelihood](y_hat, mean, scale)).sum((0, 2, 3))
        act1 += h1.mean((0, 2, 3))
        act2 += h2.mean((0, 2, 3))
    keep = bits.topk(M).indices.sort().values
    out_rows = torch.cat([keep, M0 + keep])  # the kept channels' means and scales
    w4 = old["hyper_synthesis.4.weight"][out_rows]  # out x in
    keep2 = (act2 * w4.flatten(2).norm(dim=(0, 2))).topk(M * 3 // 2).indices.sort().values
    w2 = old["hyper_synthesis.2.weight"][:, keep2]  # ConvTranspose: in x out
    keep1 = (act1 * w2.flatten(2).norm(dim=(1, 2))).topk(M).indices.sort().values

    new = dict(old)
    new["analysis.6.weight"], new["analysis.6.bias"] = old["analysis.6.weight"][keep], old["analysis.6.bias"][keep]
    new["synthesis.0.weight"] = old["synthesis.0.weight"][keep]
    new["hyper_analysis.0.weight"] = old["hyper_analysis.0.weight"][:, keep]
    new["hyper_synthesis.0.weight"] = old["hyper_synthesis.0.weight"][:, keep1]
    new["hyper_synthesis.0.bias"] = old["hyper_synthesis.0.bias"][keep1]
    new["hyper_synthesis.2.weight"] = old["hyper_synthesis.2.weight"][keep1][:, keep2]
    new["hyper_synthesis.2.bias"] = old["hyper_synthesis.2.bias"][keep2]
    new["hyper_synthesis.4.weight"] = w4[:, keep2]
    new["hyper_synthesis.4.bias"] = old["hyper_synthesis.4.bias"][out_rows]
    new["gains.log_gain"] = old["gains.log_gain"][:, keep]
    new["gains.log_inv_gain"] = old["gains.log_inv_gain"][:, keep]
    return {k: v.contiguous() for k, v in new.items()}, config


def add_level(checkpoint: dict, rate: float) -> dict:
    """A copy of a training checkpoint with one more rate level, for `rate` bpp (no optimizer state).

    The new level's log-gains are the existing ones interpolated at the level position where
    the levels' targets, linear in log rate, put `rate`; its loss state and running distortion
    start fresh, as at the first step of a run."""
    config = ModelConfig.from_dict(checkpoint["config"])
    levels = config.levels
    if rate <= 0 or any(math.isclose(rate, r) for r in levels):
        raise ValueError(f"cannot add a level at {rate} bpp to levels {levels}")
    at = sum(r < rate for r in levels)  # its index among the new levels
    i = min(max(at - 1, 0), len(levels) - 2)  # the two old levels it lies between, or nearest to
    q = i + math.log(rate / levels[i]) / math.log(levels[i + 1] / levels[i])  # its position among the old levels
    state = dict(checkpoint["model"])
    for key in ("gains.log_gain", "gains.log_inv_gain"):
        g = state[key].float()
        state[key] = torch.cat([g[:at], interpolate_levels(g, q)[None], g[at:]]).to(state[key].dtype)
    new_config = ModelConfig(arch=config.arch, N=config.N, M=config.M, levels=levels[:at] + (rate,) + levels[at:],
                             likelihood=config.likelihood)
    args = checkpoint["args"]
    fresh = make_level_losses(args["loss"], (rate,), args["steps"], args["beta_scale"], args["decay_fraction"])[0]
    out = {k: v for k, v in checkpoint.items() if k != "optimizer"}
    out |= {"config": new_config.to_dict(), "model": state,
            "level_losses": checkpoint["level_losses"][:at] + [fresh.state()] + checkpoint["level_losses"][at:],
            "d_mean": checkpoint["d_mean"][:at] + [None] + checkpoint["d_mean"][at:]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (full or --small-copy)")
    p.add_argument("out", type=Path, help="where to write the widened checkpoint")
    p.add_argument("--M", type=int, help="the new latent width")
    p.add_argument("--data", type=Path, help="training images to rank the channels by (to narrow)")
    p.add_argument("--images", type=int, default=32, help="how many of them (the first, sorted by name)")
    p.add_argument("--add-level", type=float, metavar="BPP", help="add a rate level trained for BPP")
    args = p.parse_args(argv)
    if (args.M is None) == (args.add_level is None):
        raise SystemExit("give one of --M and --add-level")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; refusing to overwrite a checkpoint")
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    old_config = ModelConfig.from_dict(ck["config"])
    if args.add_level is not None:
        try:
            out = add_level(ck, args.add_level)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        what = f"levels {list(old_config.levels)} -> {out['config']['levels']}"
    else:
        if args.M < old_config.M:
            if args.data is None:
                raise SystemExit("narrowing ranks the channels on training images: give --data")
            state, config = narrow_state(ck["model"], old_config, args.M, load_images(args.data, args.images))
        else:
            state, config = widen_state(ck["model"], old_config, args.M)
        out = {k: v for k, v in ck.items() if k != "optimizer"}
        out["config"], out["model"] = config.to_dict(), state
        what = f"M {old_config.M} -> {args.M}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"{what} at step {ck['step']}: {args.out}")


if __name__ == "__main__":
    main()
