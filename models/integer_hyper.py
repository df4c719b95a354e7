"""Hyper-synthesis h_s in exact integer arithmetic.

Why: the decoder must choose the same probability table for every latent as the
encoder did, on any machine. The table index comes from the scale that h_s
predicts, and a float network can differ by an ulp between machines, thread
counts or GPUs -- enough to flip an index at a bucket boundary and derail the
range decoder. So the frozen model runs h_s on integers only (after Ballé,
Minnen & Johnston, "Integer networks for data compression", ICLR 2019):

* weights are quantised per output channel c to W_int = round(W * 2^e_c) with
  |W_int| < 2^14; biases to round(b * 2^(e_c + a_in)), with e_c also capped so
  that |b_int| <= 2^40 (a channel with tiny or zero weights would otherwise
  get a huge e_c and an unrepresentable bias);
* activations are integers in fixed point with `ACT_BITS` fractional bits
  (the input ẑ is an integer, 0 fractional bits);
* after each layer, acc (an integer) is rescaled by floor(acc * 2^-(e_c + a_in - a_out)),
  hidden activations go through ReLU and are clamped to |a| <= 2^24;
* the last layer's outputs are integers with `OUT_BITS` fractional bits:
  mean_int and scale_int. Table indices compare scale_int with integer
  thresholds.

All of this is computed with float64 tensors that only ever hold integers whose
magnitude is below 2^53 (checked when freezing: sum|W_int| * 2^24 + |b_int| <
2^52 per channel). Products and sums of such integers are exact in IEEE double
arithmetic, in any order, so the convolution result does not depend on the
BLAS, the thread count or the hardware. Multiplying by a power of two and
flooring are exact too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_BITS = 14  # |W_int| < 2^WEIGHT_BITS
ACT_BITS = 8  # fractional bits of hidden activations
OUT_BITS = 16  # fractional bits of the mean and scale outputs
ACT_LIMIT = 2.0**24  # hidden activations and the input ẑ are within ±ACT_LIMIT
EXACT_LIMIT = 2.0**52
BIAS_LIMIT = 2.0**40  # |b_int| <= BIAS_LIMIT


def quantize_hyper_synthesis(hs: nn.Sequential) -> list[dict]:
    """Turn a trained HyperSynthesisTransform into integer layers (a list of plain dicts
    of tensors, storable with torch.save and loadable with weights_only=True)."""
    layers = [m for m in hs if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    out = []
    a_in = 0
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        transposed = isinstance(layer, nn.ConvTranspose2d)
        w = layer.weight.detach().double()
        b = layer.bias.detach().double()
        ch_dim = 1 if transposed else 0
        wmax = w.abs().transpose(0, ch_dim).reshape(w.shape[ch_dim], -1).amax(1).clamp_min(1e-30)
        exps = torch.floor(torch.log2((2**WEIGHT_BITS - 1) / wmax))
        bias_room = torch.floor(torch.log2(BIAS_LIMIT / (b.abs() * 2.0**a_in).clamp_min(1e-30)))
        exps = torch.minimum(exps, bias_room).clamp(0, 60)
        shape = [1, -1, 1, 1] if transposed else [-1, 1, 1, 1]
        w_int = torch.round(w * torch.exp2(exps).view(shape))
        b_int = torch.round(b * torch.exp2(exps + a_in))
        a_out = OUT_BITS if last else ACT_BITS
        bound = w_int.abs().transpose(0, ch_dim).reshape(w.shape[ch_dim], -1).sum(1) * ACT_LIMIT + b_int.abs()
        if bound.max().item() >= EXACT_LIMIT:
            raise ValueError(f"hyper-synthesis layer {i} could exceed exact float64 integers")
        out.append({
            "transposed": transposed,
            "stride": layer.stride[0],
            "padding": layer.padding[0],
            "output_padding": layer.output_padding[0] if transposed else 0,
            "weight": w_int.to(torch.int16),  # |W_int| < 2^14: half the file of int32
            "bias": b_int.to(torch.int64),
            "shift": (exps + a_in - a_out).to(torch.int32),  # rescale acc by 2^-shift per channel
            "relu": not last,
        })
        a_in = a_out
    return out


def _apply_layer(layer: dict, a: torch.Tensor) -> torch.Tensor:
    """One (transposed) convolution of a quantised layer, with its weights and bias as given."""
    if layer["transposed"]:
        return F.conv_transpose2d(a, layer["weight"], layer["bias"], stride=layer["stride"],
                                  padding=layer["padding"], output_padding=layer["output_padding"])
    return F.conv2d(a, layer["weight"], layer["bias"], stride=layer["stride"], padding=layer["padding"])


class IntegerHyperSynthesis:
    """Runs the quantised h_s: integer ẑ (B, N, h, w) -> (B, 2M, 4h, 4w) int64 with OUT_BITS
    fractional bits, mean_int then scale_int along channels (as the float h_s of training).
    Always on the CPU in float64 holding integers."""

    def __init__(self, layers: list[dict]):
        self.layers = []
        for layer in layers:
            self.layers.append({
                **layer,
                "weight": layer["weight"].double(),
                "bias": layer["bias"].double(),
                "scale": torch.exp2(-layer["shift"].double()).view(1, -1, 1, 1),
            })

    def __call__(self, z_int: torch.Tensor) -> torch.Tensor:
        a = z_int.to("cpu", torch.float64)
        if a.numel() and a.abs().max().item() > ACT_LIMIT:
            raise ValueError("hyper-latent out of range")
        for layer in self.layers:
            a = torch.floor(_apply_layer(layer, a) * layer["scale"])
            if layer["relu"]:
                a = a.clamp(0, ACT_LIMIT)
        return a.to(torch.int64)


class ApproximateHyperSynthesis:
    """The same integer layers run in float32 without flooring, in the same fixed-point units
    (outputs carry OUT_BITS fractional bits): much cheaper than the exact path and within a
    rounding step of it. For rate estimates only, never for coding."""

    def __init__(self, layers: list[dict]):
        self.layers = []
        for layer in layers:
            scale = torch.exp2(-layer["shift"].double())
            shape = [1, -1, 1, 1] if layer["transposed"] else [-1, 1, 1, 1]
            # Fold the per-channel rescaling into the weights and bias.
            self.layers.append({**layer, "weight": (layer["weight"].double() * scale.view(shape)).float(),
                                "bias": (layer["bias"].double() * scale).float()})

    def __call__(self, z_int: torch.Tensor) -> torch.Tensor:
        a = z_int.to("cpu", torch.float32)
        for layer in self.layers:
            a = _apply_layer(layer, a)
            if layer["relu"]:
                a = a.clamp(0, ACT_LIMIT)
        return a


def scale_thresholds(scales: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """Integer thresholds of the scale table (int64): t_k = floor(s_k * 2^OUT_BITS), so that a
    predicted scale gets the smallest table scale not below it, or with `nearest` the geometric
    midpoints floor(sqrt(s_k * s_k+1) * 2^OUT_BITS) (the last threshold is never compared), so that
    it gets the table scale nearest in log. They are stored with the weights: a decoder uses
    whichever the model was frozen with."""
    s = [float(v) for v in scales]
    if nearest:
        s = [math.sqrt(a * b) for a, b in zip(s[:-1], s[1:])] + s[-1:]
    return torch.tensor([math.floor(v * 2**OUT_BITS) for v in s], dtype=torch.int64)


def table_index(scale_int: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the first table whose threshold is not below the predicted scale:
    #{k < K-1 : t_k < scale_int}. Integer comparisons only, so encoder and decoder always agree."""
    return torch.searchsorted(thresholds[:-1].contiguous(), scale_int.contiguous(), right=False, out_int32=True)
