"""Building blocks: GDN / IGDN and the strided convolutions of Ballé et al.

GDN (generalized divisive normalization, Ballé, Laparra & Simoncelli, ICLR 2016;
thesis section 2.2.7) computes, per pixel and channel i,

    y_i = x_i / sqrt(beta_i + sum_j gamma_ij * x_j^2)

and IGDN multiplies instead of dividing. beta and gamma are kept positive by a
squared reparametrisation with a small pedestal, as in the original code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PEDESTAL = 2.0**-18


class _LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still flows where it would raise x.

    A plain clamp has zero gradient below the bound, so a parameter (or a
    predicted scale) that falls under it can never climb back out.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through.to(grad.dtype), None


def lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    return _LowerBound.apply(x, bound)


class GDN(nn.Module):
    """Generalized divisive normalization (or its inverse, IGDN)."""

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = inverse
        self._beta_bound = (beta_min + _PEDESTAL) ** 0.5
        self._gamma_bound = _PEDESTAL**0.5
        self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + _PEDESTAL))
        self.gamma = nn.Parameter(torch.sqrt(gamma_init * torch.eye(channels) + _PEDESTAL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta = lower_bound(self.beta, self._beta_bound) ** 2 - _PEDESTAL
        gamma = lower_bound(self.gamma, self._gamma_bound) ** 2 - _PEDESTAL
        c = gamma.shape[0]
        norm = F.conv2d(x * x, gamma.view(c, c, 1, 1), beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


def conv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    """A 'same'-padded convolution that downsamples by `stride`."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    """A transposed convolution that upsamples exactly by `stride`."""
    return nn.ConvTranspose2d(
        cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )
