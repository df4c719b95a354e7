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

import functools
import math

import numpy as np
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


def _transposed_by_phases(layer: dict, a: torch.Tensor) -> torch.Tensor:
    """A transposed convolution as stride^2 ordinary ones, one per phase of the output grid (output
    sample s i + p sums input samples i + c - m with the taps k0 + s m that land on phase p). The
    same integers as `F.conv_transpose2d` (exact sums), in 3/4 of its time on the CPU in float64
    and a quarter of its memory: its column buffer holds every tap of every input sample (220 MB
    for an h_s tile of model 12), an ordinary convolution's only the input patches."""
    s, P, weight = layer["stride"], layer["padding"], layer["weight"]
    B, _, h, w = a.shape
    K = weight.shape[2]
    size = [(n - 1) * s - 2 * P + K + layer["output_padding"] for n in (h, w)]
    out = torch.empty(B, weight.shape[1], *size, dtype=a.dtype)
    for ph in range(s):
        for pw in range(s):
            taps, pads, starts, counts = [], [], [], []
            for p, n, length in ((ph, h, size[0]), (pw, w, size[1])):
                k0 = (p + P) % s
                c = (p + P - k0) // s
                count = len(range(p, length, s))
                first, last = c - len(range(k0, K, s)) + 1, count - 1 + c  # the input samples phase p reads
                taps.append(k0)
                pads.append((max(0, -first), max(0, last - (n - 1))))
                starts.append(first + max(0, -first))
                counts.append(count)
            if min(counts) == 0:
                continue
            if max(taps) >= K:  # no tap lands on this phase: the bias alone
                out[:, :, ph::s, pw::s] = layer["bias"].view(1, -1, 1, 1)
                continue
            kernel = weight[:, :, taps[0]::s, taps[1]::s].flip(2, 3).transpose(0, 1)
            x = F.pad(a, (*pads[1], *pads[0]))[:, :, starts[0]:, starts[1]:]
            out[:, :, ph::s, pw::s] = F.conv2d(x, kernel, layer["bias"])[:, :, :counts[0], :counts[1]]
    return out


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
        last = self.layers[-1]
        self.outputs = last["bias"].numel()  # 2M
        # A pointwise last layer (the lifting models': 1x1, most of h_s's work) runs as a matrix
        # product over the tile's own latents only, and skips the output channels whose weights
        # are all zero (a lifting model's detail means): theirs is the constant floor(b 2^-shift).
        self._pointwise = not last["transposed"] and last["weight"].shape[2:] == (1, 1) and last["stride"] == 1 \
            and last["padding"] == 0
        if self._pointwise:
            weight = last["weight"].flatten(1)
            computed = weight.ne(0).any(1).nonzero().flatten()
            scale = last["scale"].flatten()
            self._constant = torch.floor(last["bias"] * scale)
            self._computed = computed
            self._weight, self._bias = weight[computed], last["bias"][computed, None]
            self._scale = scale[computed, None]

    def _input(self, z_int: torch.Tensor) -> torch.Tensor:
        a = z_int.to("cpu", torch.float64)
        if a.numel() and a.abs().max().item() > ACT_LIMIT:
            raise ValueError("hyper-latent out of range")
        return a

    @staticmethod
    def _layer(layer: dict, a: torch.Tensor) -> torch.Tensor:
        a = (_transposed_by_phases(layer, a) if layer["transposed"] else _apply_layer(layer, a))
        a = a.mul_(layer["scale"]).floor_()
        return a.clamp_(0, ACT_LIMIT) if layer["relu"] else a

    def __call__(self, z_int: torch.Tensor) -> torch.Tensor:
        a = self._input(z_int)
        for layer in self.layers:
            a = self._layer(layer, a)
        return a.to(torch.int64)

    def entropy_parameters(self, z_int: torch.Tensor, thresholds: torch.Tensor, rows: slice, cols: slice,
                           chunk: int = 8, out: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """`self(z_int)` at output `rows` and `cols` only, as the codec uses it: the means
        mean_int / 2^OUT_BITS as float32 and the table indices `table_index(scale_int, thresholds)`
        as int32, each (B, M, rows, cols). The same integers as `self(z_int)` (exact in any order:
        every sum is of integers below 2^53), in less time and memory: with a pointwise last layer
        (the lifting models'), the layer before it runs on `HIDDEN_ROWS` output rows of the
        cropped region at a time from the inputs that reach them (`_layer_region`), and the last
        layer on `chunk` of those rows at a time; no activation of the whole tile at the widest
        layer is made (150-200 MB in float64 for an h_s tile of model 12).

        With `out` (means (B, k, rows, cols) float32 of the first k <= M channels, table indices
        (B, M, rows, cols) of an integer type that holds them, e.g. views of whole-latent
        buffers), they are written there, chunk by chunk, and `out` is returned."""
        a = self._input(z_int)
        for layer in self.layers[:-2 if self._pointwise else None]:
            a = self._layer(layer, a)
        if not self._pointwise:
            a = a[:, :, rows, cols]
            mean_int, scale_int = a.to(torch.int64).chunk(2, dim=1)
            return written(mean_int.double().div_(2**OUT_BITS).float(), table_index(scale_int, thresholds), out)
        B = a.shape[0]
        h, w = len(range(rows.start, rows.stop)), len(range(cols.start, cols.stop))
        M = self.outputs // 2
        mean, index = out if out is not None else (torch.empty(B, M, h, w), torch.empty(B, M, h, w, dtype=torch.int32))
        means = mean.shape[1]
        values = self._constant[:, None].expand(-1, chunk * w).clone()  # (2M, positions) of one chunk
        for first in range(0, h, HIDDEN_ROWS):
            part = slice(rows.start + first, rows.start + min(first + HIDDEN_ROWS, h))
            hidden = _layer_region(self.layers[-2], a, part, cols)
            for b in range(B):
                for top in range(0, hidden.shape[2], chunk):
                    n = min(chunk, hidden.shape[2] - top) * w
                    acc = torch.addmm(self._bias, self._weight, hidden[b, :, top:top + chunk].flatten(1))
                    values[self._computed, :n] = acc.mul_(self._scale).floor_()
                    done = slice(first + top, first + top + n // w)
                    mean[b, :, done] = values[:means, :n].div(2**OUT_BITS).view(means, -1, w)
                    index[b, :, done] = table_index(values[M:, :n], thresholds).view(M, -1, w)
        return mean, index

    def zero_means_from(self, channel: int) -> bool:
        """Whether the means of every channel from `channel` on are 0 whatever ẑ is: a pointwise
        last layer whose weights for them are all 0 and whose bias floors to 0 (a lifting
        model's details)."""
        if not self._pointwise:
            return False
        M = self.outputs // 2
        computed = (self._computed >= channel) & (self._computed < M)
        return bool((self._constant[channel:M] == 0).all()) and not bool(computed.any())


HIDDEN_ROWS = 32  # output rows of h_s's widest layer computed at a time (`entropy_parameters`)


def written(mean: torch.Tensor, index: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, index), or with `out` (means of the first k channels, indices) copied there and
    `out` returned: how `entropy_parameters` hands over a tile's parameters."""
    if out is None:
        return mean, index
    out[0].copy_(mean[:, :out[0].shape[1]])
    out[1].copy_(index)
    return out


def _layer_region(layer: dict, a: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """`IntegerHyperSynthesis._layer(layer, a)[:, :, rows, cols]`, contiguous: for a transposed
    convolution computed from the input rows and columns that reach those outputs only (output
    o = s i + k - P sums inputs i from (o + P - K + 1) / s to (o + P) / s; one more at the end,
    so that the slice's output is long enough), the same integers."""
    if not layer["transposed"]:
        return IntegerHyperSynthesis._layer(layer, a)[:, :, rows, cols].contiguous()
    s, P, K = layer["stride"], layer["padding"], layer["weight"].shape[2]

    def reach(out: slice, n: int) -> tuple[slice, slice]:
        first = max((out.start + P - K + 1) // s, 0)
        last = min((out.stop - 1 + P) // s + 2, n)
        return slice(first, last), slice(out.start - s * first, out.stop - s * first)

    (in_rows, out_rows), (in_cols, out_cols) = reach(rows, a.shape[2]), reach(cols, a.shape[3])
    out = IntegerHyperSynthesis._layer(layer, a[:, :, in_rows, in_cols])[:, :, out_rows, out_cols]
    assert out.shape[2:] == (rows.stop - rows.start, cols.stop - cols.start)
    return out.contiguous()


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
    #{k < K-1 : t_k < scale_int} (int32), for integer scales (int64, or floats that hold
    integers). Comparisons of integers only, so encoder and decoder always agree: the scale,
    clamped to 0 .. t_{K-2} + 1 (which changes no count), is exact in float32, whose bits rise
    with it; `_cell_counts` gives the count below the cell of its top 16 bits, which holds at
    most one threshold, and one comparison with that threshold (exact in float32 too; the last,
    t_{K-1}, is never below the clamped scale) gives the rest. Thresholds that do not allow this
    are searched (`torch.searchsorted`)."""
    counts = _cell_counts(thresholds.numpy().tobytes())
    if counts is None:
        return torch.searchsorted(thresholds[:-1].contiguous(), scale_int.to(torch.int64).contiguous(), right=False,
                                  out_int32=True)
    s = scale_int.clamp(0, int(thresholds[-2]) + 1).float()
    k = counts[s.view(torch.int32) >> 16]
    return k + (s > thresholds.float()[k]).int()


@functools.lru_cache(maxsize=8)
def _cell_counts(thresholds: bytes) -> torch.Tensor | None:
    """For thresholds t (int64, as bytes) t_0 .. t_{K-1}: for every cell c of float32 bit patterns
    [c 2^16, (c + 1) 2^16) of values from 0 to 2^24, #{k < K-1 : t_k < the cell's smallest value}
    (int32), or None unless 0 <= t_0 < ... < t_{K-1} and t_{K-2} < 2^24 (so that a scale above
    t_{K-2} is not above t_{K-1}) and no cell holds two of t_0 .. t_{K-2}."""
    t = np.frombuffer(thresholds, dtype=np.int64)
    compared = t[:-1]
    if len(t) < 2 or compared[0] < 0 or compared[-1] >= 1 << 24 or np.any(np.diff(t) <= 0):
        return None
    cells = (int(np.float32(1 << 24).view(np.int32)) >> 16) + 1  # up to the clamped scales' largest
    lowest = (np.arange(cells, dtype=np.int64) << 16).astype(np.int32).view(np.float32).astype(np.float64)
    counts = np.searchsorted(compared.astype(np.float64), lowest, side="left")
    if np.any(np.diff(counts) > 1):
        return None
    return torch.from_numpy(counts.astype(np.int32))
