"""Widen the latent y of a trained hyperprior checkpoint (M -> a larger M) so that
it computes nearly the same thing, and training can go on with a wider bottleneck.

    python -m lcodec.models.widen runs/hp64/checkpoint.pt runs/hp256/checkpoint.pt --M 256

Why: with M = 96 the reconstruction of the *unquantised* latents saturates
(about 27-32 dB on Kodak crops at every level), so bits above ~1 bpp buy almost
nothing. Ballé et al. widen M for high rates for the same reason. Training a
wider model from scratch on 2 CPU cores would throw away every step so far.

The new channels start nearly silent, so the widened model reproduces the old
one closely, and gradients reach every new weight from the first step:

* g_a: new output channels keep their fresh default initialisation;
* g_s: weights from the new channels keep their fresh (small, random)
  initialisation. The new channels' lower gain (below) makes nearly all of
  their latents round to 0, so the output barely changes, but D has a
  first-order gradient on g_a's new rows through the straight-through rounding.
  With zero weights here both gradients are zero at the start (a saddle): a try
  that way (M 96 -> 256, 1700 steps) squeezed the new channels out instead of
  using them (their share of the top level's rate fell from 0.22 to 0.10 bpp
  and the unquantised PSNR did not move);
* h_a: weights from the new channels are zero (z is unchanged);
* h_s: new hidden units get fresh incoming weights and zero outgoing weights;
  new mean outputs are 0, new scale outputs have zero weights and the mean of
  the old scale biases;
* rate gains of the new channels: the mean log-gain of the old channels of the
  level, minus NEW_LOG_GAIN_OFFSET, so that they start small and cheap (at the
  top level the rate of a Kodak crop goes from 2.30 to 2.75 bpp instead of 9.6)
  while enough of them round to non-zero values for gradients to flow;
* inverse gains of the new channels: the old channels' mean plus the same
  offset, so that g_s sees new channels at the old channels' scale. Adam moves
  a weight by about the learning rate per step whatever its size, so a channel
  that reaches g_s 7x smaller learns 7x slower: a first try without this
  compensation (M 96 -> 192) had not started using its new channels after
  2000 steps (no change in the unquantised PSNR).

The result is a checkpoint without optimizer state (Adam restarts, as after a
`--small-copy`); the step count, loss states and generator carry over, so the
target-rate schedule continues where it was.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .networks import MeanScaleHyperprior, ModelConfig

NEW_LOG_GAIN_OFFSET = 2.0


def widen_state(old: dict, old_config: ModelConfig, M: int, seed: int = 0) -> tuple[dict, ModelConfig]:
    """State dict of a MeanScaleHyperprior with latent width M that computes nearly the same function
    (exactly the same wherever the new latents round to 0)."""
    if old_config.arch != "hyperprior":
        raise ValueError("only the hyperprior model can be widened")
    M0, N = old_config.M, old_config.N
    if M < M0:
        raise ValueError(f"cannot narrow M from {M0} to {M}")
    config = ModelConfig(arch="hyperprior", N=N, M=M, levels=old_config.levels)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (full or --small-copy)")
    p.add_argument("out", type=Path, help="where to write the widened checkpoint")
    p.add_argument("--M", type=int, required=True, help="the new latent width")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; refusing to overwrite a checkpoint")
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state, config = widen_state(ck["model"], ModelConfig.from_dict(ck["config"]), args.M)
    out = {k: v for k, v in ck.items() if k != "optimizer"}
    out["config"], out["model"] = config.to_dict(), state
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"widened M {ck['config']['M']} -> {args.M} at step {ck['step']}: {args.out}")


if __name__ == "__main__":
    main()
