"""The networks: the mean-scale hyperprior ("parametric architecture") and the
factorized-prior ("non-parametric") model of the thesis (Guerin 2024, ch. 4,
Tables 4.1 and 4.2), both made variable-rate with per-level gain vectors.

Mean-scale hyperprior (Minnen et al. 2018 without context model)::

      x ──AnalysisTransform (g_a)──► y ──× gain(q)──► y_g ──HyperAnalysis (h_a)──► z
                                                      │                            │ Q
                                                      │                            ▼
                                                      │                     ẑ ─► factorized prior
                                                      │                            │
                                                      │       (mean, scale) ◄─HyperSynthesis (h_s)
                                                      ▼                │
                                 s = round(y_g − mean)  ─► Gaussian(0, scale) range coding
                                                      │
      x̂ ◄──SynthesisTransform (g_s)── (s + mean) × inv_gain(q)

`q` is a continuous rate parameter: level i of `levels` is trained for the
target `levels[i]` bpp, and a non-integer q interpolates the log-gains of the
two nearest levels (and extrapolates past the ends). The gain never touches the
entropy-decoding path (h_s sees only ẑ), so q only changes how y is scaled.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .entropy_models import LIKELIHOODS, SCALE_BOUND, FactorizedDensity
from .layers import GDN, conv, deconv
from .lifting import LATENT_CHANNELS, MEAN_CHANNELS, InverseLifting, LiftingTransform

# The thesis's eight target rates (bpp), also JPEG AI's.
DEFAULT_LEVELS = (0.06, 0.12, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shape of a model; stored with the weights."""

    arch: str = "hyperprior"  # "hyperprior" (parametric), "lifting" (hyperprior over lifting) or "factorized"
    N: int = 64
    M: int = 96
    levels: tuple[float, ...] = DEFAULT_LEVELS
    likelihood: str = "gaussian"  # the conditional of y given (mean, scale): "gaussian" or "laplace"
    # The smallest scale of y's conditional, in training and in the frozen tables (whose scales run
    # from it to 256). A latent predicted at this scale costs -log2 P(0) bits even when it is 0:
    # 0.015 bits for a Laplacian at 0.11, which over the 3 latents per pixel of the lifting model
    # is 0.035 bpp.
    scale_bound: float = SCALE_BOUND
    # Arch "lifting" only: how many more fixed 9/7 levels split LL4 in place (`lifting.coarse_dwt`), 0 to 2.
    coarse_levels: int = 0
    # The hidden width of the decoder's post-filter (`postfilter.PostFilter`), 0: none. Set only by
    # `lcodec.models.training.postfilter`, which trains it on a frozen model's decoded images.
    postfilter: int = 0

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; known: {', '.join(LIKELIHOODS)}")
        if not 0 < self.scale_bound <= 1:
            raise ValueError(f"scale_bound must be in (0, 1], got {self.scale_bound}")
        if self.coarse_levels not in ((0, 1, 2) if self.arch == "lifting" else (0,)):
            raise ValueError(f"coarse_levels must be 0, 1 or 2 for the lifting architecture and 0 for the others, "
                             f"got {self.coarse_levels}")
        if self.postfilter < 0:
            raise ValueError(f"postfilter must be a width >= 0, got {self.postfilter}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(arch=str(d["arch"]), N=int(d["N"]), M=int(d["M"]), levels=tuple(float(v) for v in d["levels"]),
                   likelihood=str(d.get("likelihood", "gaussian")),
                   scale_bound=float(d.get("scale_bound", SCALE_BOUND)), coarse_levels=int(d.get("coarse_levels", 0)),
                   postfilter=int(d.get("postfilter", 0)))


class AnalysisTransform(nn.Sequential):
    """g_a: x (3, H, W) -> y (M, H/16, W/16). Thesis Table 4.2, encoder column."""

    def __init__(self, N: int, M: int):
        super().__init__(conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M))


class SynthesisTransform(nn.Sequential):
    """g_s: y (M, H/16, W/16) -> x (3, H, W). Thesis Table 4.2, decoder column."""

    def __init__(self, N: int, M: int):
        super().__init__(
            deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
            deconv(N, N), GDN(N, inverse=True), deconv(N, 3),
        )


class HyperAnalysisTransform(nn.Sequential):
    """h_a: y (M, h, w) -> z (N, h/4, w/4). ReLU only, as in Table 4.2."""

    def __init__(self, N: int, M: int):
        super().__init__(conv(M, N, 3, 1), nn.ReLU(), conv(N, N), nn.ReLU(), conv(N, N))


class HyperSynthesisTransform(nn.Sequential):
    """h_s: ẑ (N, h/4, w/4) -> (mean, scale) (2M, h, w).

    ReLU and (transposed) convolutions only, so that the frozen model can run it
    in exact integer arithmetic (see `lcodec.models.training.freeze`). The hidden widths are
    M and 3M/2 by default (Minnen et al. 2018).
    """

    def __init__(self, N: int, M: int, hidden: tuple[int, int] | None = None, last_kernel: int = 3):
        h1, h2 = hidden or (M, M * 3 // 2)
        super().__init__(deconv(N, h1), nn.ReLU(), deconv(h1, h2), nn.ReLU(), conv(h2, 2 * M, last_kernel, 1))


def interpolate_levels(table: torch.Tensor, q: float) -> torch.Tensor:
    """Row q of a per-level table (L, ...): linear between the two nearest levels, extrapolated
    past the ends. `RateGains` applies the same rule to a batch of q."""
    i = min(max(math.floor(q), 0), table.shape[0] - 2)
    t = q - i
    return (1 - t) * table[i] + t * table[i + 1]


class RateGains(nn.Module):
    """Per-level gain vectors on y (and learned inverse gains before g_s).

    gain(q) = exp((1 - t) log g_i + t log g_{i+1}) with i = clamp(floor(q), 0, L-2),
    t = q - i; the same for the inverse gain. Outside [0, L-1] this extrapolates.
    """

    def __init__(self, levels: tuple[float, ...], M: int):
        super().__init__()
        L = len(levels)
        # Start with gains spread geometrically, small gain = coarse quantisation = low rate.
        init = torch.linspace(-1.5, 1.5, L).view(L, 1).expand(L, M).clone()
        self.log_gain = nn.Parameter(init)
        self.log_inv_gain = nn.Parameter(-init.clone())

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B,) float level positions -> gain, inv_gain of shape (B, M, 1, 1)."""
        L = self.log_gain.shape[0]
        i = q.floor().clamp(0, L - 2).long()
        t = (q - i.to(q.dtype)).unsqueeze(1)
        lg = (1 - t) * self.log_gain[i] + t * self.log_gain[i + 1]
        lig = (1 - t) * self.log_inv_gain[i] + t * self.log_inv_gain[i + 1]
        return lg.exp()[..., None, None], lig.exp()[..., None, None]


class BalancedRateGains(RateGains):
    """Rate gains whose shape across channels is fixed: log gain(l, c) = a_l + s_c, with one
    learned a_l per level and s_c set once (`LiftingHyperprior.init_gains`); the inverse gain
    is exactly 1 / gain.

    Why: training reconstructs through straight-through rounding, which hides the rounding
    error from the distortion term, so a free per-channel gain feels only the rate's pull and
    drifts; free per-channel inverse gains, updated only when their level is drawn, random-walk
    under Adam (a 30% error on the LL band's scale costs several dB). With an invertible
    transform the balanced shape (equal MSE per rounding error in every subband) is what a
    uniform quantiser of a near-orthonormal transform wants, and 1 / gain undoes the gain;
    the level offsets a_l hit the targets.
    """

    def __init__(self, levels: tuple[float, ...], M: int):
        nn.Module.__init__(self)
        L = len(levels)
        self.level_log_gain = nn.Parameter(torch.linspace(-1.5, 1.5, L).view(L, 1))
        self.channel_log_gain = nn.Parameter(torch.zeros(1, M), requires_grad=False)

    @property
    def log_gain(self) -> torch.Tensor:
        return self.level_log_gain + self.channel_log_gain

    @property
    def log_inv_gain(self) -> torch.Tensor:
        return -self.log_gain


def _uniform_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.empty_like(x).uniform_(-0.5, 0.5)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


class MeanScaleHyperprior(nn.Module):
    """Variable-rate mean-scale hyperprior (the thesis's parametric architecture)."""

    # Training only: the synthesis of the training pass sees y with uniform noise instead of
    # y rounded straight-through (`train --noisy-synthesis`). Straight-through rounding hides the
    # rounding error from the distortion's gradient, which a transform that learns can exploit.
    noisy_synthesis = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        N, M = config.N, config.M
        self.analysis = AnalysisTransform(N, M)
        self.synthesis = SynthesisTransform(N, M)
        self.hyper_analysis = HyperAnalysisTransform(N, M)
        self.hyper_synthesis = HyperSynthesisTransform(N, M)
        self.hyper_prior = FactorizedDensity(N)
        self.gains = RateGains(config.levels, M)

    @property
    def likelihood(self):
        """The conditional of y given (mean, scale), as `ModelConfig.likelihood` names it, with
        the scale bounded below by `ModelConfig.scale_bound`."""
        return functools.partial(LIKELIHOODS[self.config.likelihood], bound=self.config.scale_bound)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass. Returns x_hat and per-image bits of the noisy latents
        (the differentiable R̃), of the rounded latents (y and z rounded straight-through, so
        differentiable with respect to the entropy model) and the same value without a graph (R̂)."""
        gain, inv_gain = self.gains(q)
        y = self.analysis(x) * gain
        z = self.hyper_analysis(y)
        z_tilde = _uniform_noise(z)
        mean, scale = self.hyper_synthesis(z_tilde).chunk(2, dim=1)
        y_tilde = _uniform_noise(y)
        bits_y = -torch.log2(self.likelihood(y_tilde, mean, scale)).sum((1, 2, 3))
        bits_z = -torch.log2(self.hyper_prior.likelihood(z_tilde)).sum((1, 2, 3))
        # Synthesis sees the rounded residual (straight-through), as the decoder will; or, with
        # `noisy_synthesis`, y plus uniform noise, so that the distortion feels a quantisation error.
        y_q = y_tilde if self.noisy_synthesis else _round_ste(y - mean) + mean
        x_hat = self.synthesis(y_q * inv_gain)
        # What the coder spends: y and z rounded, straight-through, so that h_s sees the integer ẑ
        # it will see when coding. On a noisy ẑ an entropy model whose scales may go far below
        # 0.11 learns wider ones than the coder needs: a confidently small scale costs more there.
        z_hat = _round_ste(z)
        mean_h, scale_h = self.hyper_synthesis(z_hat).chunk(2, dim=1)
        y_hat = _round_ste(y - mean_h) + mean_h
        bits_rounded = -torch.log2(self.likelihood(y_hat, mean_h, scale_h)).sum((1, 2, 3))
        bits_rounded = bits_rounded - torch.log2(self.hyper_prior.likelihood(z_hat)).sum((1, 2, 3))
        return {"x_hat": x_hat, "bits_noisy": bits_y + bits_z, "bits_rounded": bits_rounded,
                "bits_quantized": bits_rounded.detach()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference-time pass with real rounding: x_hat and the estimated bits per image."""
        gain, inv_gain = self.gains(q)
        y = self.analysis(x) * gain
        z_hat = torch.round(self.hyper_analysis(y))
        mean, scale = self.hyper_synthesis(z_hat).chunk(2, dim=1)
        y_hat = torch.round(y - mean) + mean
        bits = -torch.log2(self.likelihood(y_hat, mean, scale)).sum((1, 2, 3))
        bits = bits - torch.log2(self.hyper_prior.likelihood(z_hat)).sum((1, 2, 3))
        return {"x_hat": self.synthesis(y_hat * inv_gain), "bits": bits}


class FactorizedPrior(nn.Module):
    """Variable-rate factorized-prior model (the thesis's non-parametric architecture).

    x ─g_a─► y × gain ─Q─► factorized density ─► × inv_gain ─g_s─► x̂
    Trainable for comparison; the shipped codec uses `MeanScaleHyperprior`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.analysis = AnalysisTransform(config.N, config.M)
        self.synthesis = SynthesisTransform(config.N, config.M)
        self.prior = FactorizedDensity(config.M)
        self.gains = RateGains(config.levels, config.M)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
        gain, inv_gain = self.gains(q)
        y = self.analysis(x) * gain
        bits_noisy = -torch.log2(self.prior.likelihood(_uniform_noise(y))).sum((1, 2, 3))
        x_hat = self.synthesis(_round_ste(y) * inv_gain)
        with torch.no_grad():
            bits_hat = -torch.log2(self.prior.likelihood(torch.round(y))).sum((1, 2, 3))
        return {"x_hat": x_hat, "bits_noisy": bits_noisy, "bits_quantized": bits_hat}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
        gain, inv_gain = self.gains(q)
        y_hat = torch.round(self.analysis(x) * gain)
        bits = -torch.log2(self.prior.likelihood(y_hat)).sum((1, 2, 3))
        return {"x_hat": self.synthesis(y_hat * inv_gain), "bits": bits}


class LiftingHyperprior(MeanScaleHyperprior):
    """The mean-scale hyperprior over an exactly invertible lifting transform.

    g_a is `LiftingTransform` (colour transform + four levels of CDF 9/7 lifting with
    learned predict/update steps, y = 768 channels at H/16, LL4 split further in place
    with `ModelConfig.coarse_levels`) and g_s is the same
    transform run backwards with the same weights, so without quantisation x̂ = x
    at every step of training. h_s is narrower than M (hidden widths N and 3N/2,
    a 1x1 output layer): it predicts 1536 channels from ẑ at H/64.

    The gains start from the transform's synthesis norms (`init_gains`): at gain
    g·‖s_c‖ for channel c a rounding error costs the same MSE in every channel, as
    uniform quantisation of an orthonormal transform would.
    """

    def __init__(self, config: ModelConfig):
        if config.M != LATENT_CHANNELS:
            raise ValueError(f"the lifting transform has M = {LATENT_CHANNELS} latent channels, not {config.M}")
        nn.Module.__init__(self)
        self.config = config
        N, M = config.N, config.M
        self.analysis = LiftingTransform(coarse_levels=config.coarse_levels)
        self.synthesis = InverseLifting(self.analysis)
        self.hyper_analysis = HyperAnalysisTransform(N, M)
        self.hyper_synthesis = HyperSynthesisTransform(N, M, hidden=(N, N * 3 // 2), last_kernel=1)
        # The predicted mean is zero for every channel but LL4's three, always: wavelet details
        # are zero-mean, and a mean predicted for them bought no rate and cost up to 1.2 dB
        # (rounding away from zero). Their weights start at zero and their gradient is masked,
        # so the frozen integer h_s gives them mean_int = 0 exactly. LL4's mean starts at zero
        # too, so that step 0 is plain uniform quantisation of the 9/7 coefficients.
        last = self.hyper_synthesis[-1]
        with torch.no_grad():
            last.weight[:M].zero_()
            last.bias[:M].zero_()
        free = torch.ones(2 * M)
        free[MEAN_CHANNELS:M] = 0
        last.weight.register_hook(lambda g: g * free.to(g).view(-1, 1, 1, 1))
        last.bias.register_hook(lambda g: g * free.to(g))
        self.hyper_prior = FactorizedDensity(N)
        self.gains = BalancedRateGains(config.levels, M)

    @torch.no_grad()
    def init_gains(self, x: torch.Tensor) -> list[float]:
        """Set every level's gains to g_l·‖s_c‖ (see the class), g_l chosen so that the
        zeroth-order entropy of round(y·gain) per channel on the images `x` (B, 3, H, W)
        is the level's target. A hyperprior codes the same latents in fewer bits, so the
        rates start below their targets and training raises the gains. Returns the g_l."""
        norms = self.analysis.synthesis_norms()
        y = self.analysis(x).transpose(0, 1).flatten(1)  # (M, samples)
        pixels = x.shape[0] * x.shape[2] * x.shape[3]

        def bpp(log_g: float) -> float:
            v = torch.round(y * (norms[:, None] * math.exp(log_g))).long()
            v -= v.min()
            width = int(v.max()) + 1
            keys = v + width * torch.arange(v.shape[0])[:, None]  # one histogram per channel
            counts = torch.bincount(keys.flatten(), minlength=v.shape[0] * width).double()
            counts = counts[counts > 0]
            return -(counts * torch.log2(counts / v.shape[1])).sum().item() / pixels

        found = []
        for target in self.config.levels:
            lo, hi = -2.0, 10.0
            for _ in range(18):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if bpp(mid) < target else (lo, mid)
            found.append((lo + hi) / 2)
        self.gains.level_log_gain.copy_(torch.tensor(found).view(-1, 1))
        self.gains.channel_log_gain.copy_(norms.log().view(1, -1))
        return [math.exp(v) for v in found]


def build_model(config: ModelConfig) -> nn.Module:
    if config.arch == "hyperprior":
        return MeanScaleHyperprior(config)
    if config.arch == "lifting":
        return LiftingHyperprior(config)
    if config.arch == "factorized":
        return FactorizedPrior(config)
    raise ValueError(f"unknown architecture {config.arch!r}")
