"""The decoder's post-filter: a small CNN that the synthesis ends with.

A coarsely quantised wavelet decodes to a picture whose errors are not noise
but structure: ringing beside edges, blur, the faint checkerboard of the
coarsest bands' basis functions. Those errors are predictable from the decoded
picture itself, and a few convolutions remove part of them::

    x̂ = x̃ + s(q) · F(pixel_unshuffle(x̃ − 0.5, 2), q)       (x̃: the inverse transform's output)

F sees x̃ in 2x2 blocks (12 channels at half resolution, so that four 3x3
layers reach 8 pixels on every side) and the rate parameter q of the file as
one more constant channel (q / 8: the levels span q = 0..8), so that it learns
how strong the artefacts of each rate are. Its last layer starts at zero: an
untrained filter is the identity. s(q) is a strength per level (linear between
levels, held beyond the ends), fitted after training by least squares on
held-out images decoded at each level and clipped to [0, 1], so that where the
network does not help (at the highest rates, where little is left to remove) it
is turned down instead of costing quality. It is trained after everything else, on the
frozen codec's own decoded training images (`lcodec.models.training.postfilter`),
so it changes nothing the encoder codes; a file decodes with it whenever its
model has one (`ModelConfig.postfilter`, the hidden width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = 4
REACH = 2 * LAYERS  # pixels of context on every side that one output pixel depends on
Q_SCALE = 8.0  # q is fed as q / Q_SCALE
STRIP = 256  # rows filtered at a time ...
STRIP_CONTEXT = 2 * REACH  # ... each read with this many rows of context above and below


class PostFilter(nn.Module):
    """x̃ (B, 3, H, W), H and W even, and q (float or (B,)) -> x̃ + s(q) F(x̃, q) (see the module), for a
    model with `levels` rate levels.

    Taller inputs are filtered in strips of `STRIP` rows, each with `STRIP_CONTEXT` rows of context
    (more than the reach), so that only one strip's activations are alive at a time (an 8K
    decode tile would otherwise hold 150 MB per layer) and the result is the same."""

    def __init__(self, width: int, levels: int):
        super().__init__()
        self.register_buffer("strength", torch.ones(levels))
        layers: list[nn.Module] = [nn.Conv2d(13, width, 3, padding=1)]
        for _ in range(LAYERS - 2):
            layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(width, 12, 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
        H = x.shape[2]
        if H <= STRIP + 2 * STRIP_CONTEXT:
            return self.filter_whole(x, q)
        strips = []
        for top in range(0, H, STRIP):
            lo, hi = max(top - STRIP_CONTEXT, 0), min(top + STRIP + STRIP_CONTEXT, H)
            strips.append(self.filter_whole(x[:, :, lo:hi], q)[:, :, top - lo:min(top + STRIP, H) - lo])
        return torch.cat(strips, 2)

    def strength_at(self, q: torch.Tensor) -> torch.Tensor:
        """s(q) for a batch of q (B,): linear between the levels' strengths, held beyond the ends."""
        last = len(self.strength) - 1
        q = q.clamp(0, last)
        i = q.floor().clamp(max=max(last - 1, 0)).long()
        t = q - i.to(q.dtype)
        return (1 - t) * self.strength[i] + t * self.strength[(i + 1).clamp(max=last)]

    def filter_whole(self, x: torch.Tensor, q: float | torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """As `forward`, without strips: for inputs whose activations fit in memory (a tile). With
        `channels_last` (for inference only: not differentiable) the convolutions run in that layout
        and the ReLUs in place: the same values within float rounding, 2-3x faster on the CPU
        (oneDNN's convolutions; a ReLU that allocates its output costs as much as a convolution)."""
        q = torch.as_tensor(q, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return x + self.strength_at(q).view(-1, 1, 1, 1) * self.residual(x, q, channels_last)

    def residual(self, x: torch.Tensor, q: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """F(x̃, q) at strength 1, for q (B,)."""
        blocks = F.pixel_unshuffle(x - 0.5, 2)
        rate = (q / Q_SCALE).view(-1, 1, 1, 1).expand(blocks.shape[0], 1, blocks.shape[2], blocks.shape[3])
        blocks = torch.cat([blocks, rate], 1)
        if not channels_last:
            return F.pixel_shuffle(self.layers(blocks), 2)
        a = blocks.contiguous(memory_format=torch.channels_last)
        for layer in self.layers:  # for inference only: ReLUs in place
            a = a.relu_() if isinstance(layer, nn.ReLU) else layer(a)
        return F.pixel_shuffle(a.contiguous(), 2)
