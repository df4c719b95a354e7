"""Differentiable entropy models used during training.

* `FactorizedDensity` -- the non-parametric, per-channel density of Ballé et al.
  2018 (appendix 6.1; thesis section 4.2, eq. 4.12-4.16): a monotone MLP gives a
  CDF c(x) per channel; the probability of a unit bin is c(x+1/2) - c(x-1/2).
  It is the prior of the hyper-latent z (and of y in the factorized-prior model).
* `gaussian_likelihood` -- the conditional N(mu, sigma^2) * U(-1/2, 1/2) of the
  mean-scale hyperprior (thesis eq. 4.27), and `laplace_likelihood`, the same with a
  Laplacian (`ModelConfig.likelihood`).

All return likelihoods (probabilities of unit bins); rates in bits are
-log2 of them. The frozen integer tables used by the real coder are derived
from these models in `lcodec.models.training.freeze`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import lower_bound

LIKELIHOOD_BOUND = 1e-9
SCALE_BOUND = 0.11


class FactorizedDensity(nn.Module):
    """Per-channel learned CDF: c(x) = sigmoid(f_K(...f_1(x))) with monotone f_k."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    def logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """x: (C, 1, n) -> logits of the CDF, (C, 1, n)."""
        for i, matrix in enumerate(self.matrices):
            x = torch.matmul(F.softplus(matrix), x) + self.biases[i]
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Probability of the unit bin around each value of x (B, C, H, W)."""
        b, c, h, w = x.shape
        v = x.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self.logits_cdf(v - 0.5)
        upper = self.logits_cdf(v + 0.5)
        # Evaluate in the tail where the sigmoid is accurate (sign trick).
        sign = -torch.sign(lower + upper).detach()
        p = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        p = p.reshape(c, b, h, w).permute(1, 0, 2, 3)
        return lower_bound(p, LIKELIHOOD_BOUND)

    @torch.no_grad()
    def integer_pmf(self, lo: int = -256, hi: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Bin probabilities of the integers lo..hi per channel, in float64.

        Returns (support, pmf) with pmf of shape (C, hi - lo + 1).
        """
        support = torch.arange(lo, hi + 1, dtype=torch.float64)
        v = support.view(1, 1, -1).expand(self.channels, 1, -1)
        model = self.double()
        try:
            lower = model.logits_cdf(v - 0.5)
            upper = model.logits_cdf(v + 0.5)
            sign = -torch.sign(lower + upper)
            pmf = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))[:, 0]
        finally:
            self.float()
        return support.numpy().astype(np.int64), pmf.numpy()


def gaussian_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                        bound: float = SCALE_BOUND) -> torch.Tensor:
    """P(bin of width 1 around y) under N(mean, scale^2); scale is lower-bounded."""
    scale = lower_bound(scale, bound)
    v = torch.abs(y - mean)
    # Upper tail form: Phi((1/2 - v)/s) - Phi((-1/2 - v)/s), accurate far from the mean.
    upper = _std_normal_cdf((0.5 - v) / scale)
    lower = _std_normal_cdf((-0.5 - v) / scale)
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)


def laplace_likelihood(y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                       bound: float = SCALE_BOUND) -> torch.Tensor:
    """P(bin of width 1 around y) under Laplace(mean, scale), `scale` the diversity b (the
    standard deviation is b·√2); scale is lower-bounded. Wavelet details given their scale are
    closer to Laplacian than to Gaussian: sharper at zero, heavier in the tails."""
    scale = lower_bound(scale, bound)
    v = torch.abs(y - mean)
    # Phi_L((1/2 - v)/b) - Phi_L((-1/2 - v)/b); each branch clamped so that the unused one stays finite.
    t = 0.5 - v
    upper = torch.where(t < 0, 0.5 * torch.exp(t.clamp(max=0) / scale), 1 - 0.5 * torch.exp(-t.clamp(min=0) / scale))
    lower = 0.5 * torch.exp((-0.5 - v) / scale)
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)


LIKELIHOODS = {"gaussian": gaussian_likelihood, "laplace": laplace_likelihood}


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x * (2**-0.5))
