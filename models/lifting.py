"""An exactly invertible analysis transform: a colour transform and CDF 9/7 lifting with
learned lifting steps added (after iWave, Ma et al., IEEE TMM 2020, and Dardouri et al.,
arXiv:2402.18761, which keep the fixed 9/7 steps and let small networks add to them).

One level splits a (3, H, W) band into LL and three detail bands (HL, LH, HH), each
(3, H/2, W/2), with the separable 9/7 lifting (rows, then columns), then applies two
learned 2-D lifting steps::

    details += P_l(LL)        (predict: small CNN, 3 -> 9 channels)
    LL      += U_l(details)   (update:  small CNN, 9 -> 3 channels)

Each step adds a function of the other half, so running the steps backwards with the
same weights undoes them exactly (up to float rounding): the synthesis *is* the analysis
run backwards, sharing every weight. The last layer of every learned step starts at zero,
so an untrained transform is the 9/7 wavelet itself.

Four levels; the bands are moved onto the grid of the coarsest one (H/16) by
space-to-depth, so the latent y is one (768, H/16, W/16) tensor::

    channels   0..2     LL4                     (3 colours)
               3..11    level-4 details          (3 bands x 3 colours)
              12..47    level-3 details, 2x2 positions each
              48..191   level-2 details, 4x4 positions each
             192..767   level-1 details, 8x8 positions each

and everything downstream of g_a (gains, hyperprior, tables, tiling) is that of the
other hyperprior models.

With `coarse_levels` = k > 0, LL4 is split k more times by the fixed 9/7 (no learned
steps) and the result kept in place on LL4's own grid (`coarse_dwt`): channels 0..2
then hold, per 2^k x 2^k block of latents, one LL(4+k) coefficient and the details
of levels 5..4+k. LL4 is a picture at 1/16 scale whose neighbouring samples are
strongly correlated; the hyperprior sees it only through ẑ at H/64, and coding it
as it is costs about half of the file at 0.06 bpp. Its wavelet details are small
and zero-mean, as everywhere else in y. With k = 2 a block is the 4x4 latents of
one hyper-latent, so h_s can give each position of the block its own scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# CDF 9/7 lifting coefficients (Daubechies & Sweldens 1998; JPEG 2000 Part 1, Annex F).
ALPHA = -1.586134342059924
BETA = -0.052980118572961
GAMMA = 0.882911075530934
DELTA = 0.443506852043971
KAPPA = 1.230174104914001  # the DC gain of the unscaled low band
LOW_SCALE = math.sqrt(2) / KAPPA  # scaled so that both bands are close to orthonormal
HIGH_SCALE = KAPPA / math.sqrt(2)
WAVELET_LEVELS = 4
DOWNSAMPLING = 2**WAVELET_LEVELS
LATENT_CHANNELS = 3 + sum(9 * 4**k for k in range(WAVELET_LEVELS))  # 768
MEAN_CHANNELS = 3  # LL4: the only channels whose mean the hyperprior predicts
LEVEL_REACH = 7  # samples of a level's coarse grid that one level of g_a or g_s reaches (`inverse_level`)

# RGB -> YCbCr (ITU-R BT.601), the colour transform's starting point; x is centred at 0.5 first.
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def _next(v: torch.Tensor, dim: int) -> torch.Tensor:
    """v[n+1] along dim, with the last sample repeated (whole-sample symmetric extension)."""
    n = v.shape[dim]
    return torch.cat([v.narrow(dim, 1, n - 1), v.narrow(dim, n - 1, 1)], dim)


def _prev(v: torch.Tensor, dim: int) -> torch.Tensor:
    """v[n-1] along dim, with the first sample repeated."""
    n = v.shape[dim]
    return torch.cat([v.narrow(dim, 0, 1), v.narrow(dim, 0, n - 1)], dim)


def dwt97_1d(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One 9/7 analysis step along `dim` (even length): (low, high), orthonormal-scaled."""
    s = x.unflatten(dim, (-1, 2))
    low, high = s.select(dim + 1, 0), s.select(dim + 1, 1)
    high = high + ALPHA * (low + _next(low, dim))
    low = low + BETA * (high + _prev(high, dim))
    high = high + GAMMA * (low + _next(low, dim))
    low = low + DELTA * (high + _prev(high, dim))
    return low * LOW_SCALE, high * HIGH_SCALE


def idwt97_1d(low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `dwt97_1d`."""
    low = low / LOW_SCALE
    high = high / HIGH_SCALE
    low = low - DELTA * (high + _prev(high, dim))
    high = high - GAMMA * (low + _next(low, dim))
    low = low - BETA * (high + _prev(high, dim))
    high = high - ALPHA * (low + _next(low, dim))
    return torch.stack([low, high], dim + 1).flatten(dim, dim + 1)


def dwt97_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> LL (B, C, H/2, W/2) and the details (B, 3C, H/2, W/2) as [HL, LH, HH]."""
    low, high = dwt97_1d(x, 3)  # along rows
    ll, lh = dwt97_1d(low, 2)  # along columns
    hl, hh = dwt97_1d(high, 2)
    return ll, torch.cat([hl, lh, hh], 1)


def idwt97_2d(ll: torch.Tensor, details: torch.Tensor) -> torch.Tensor:
    """The inverse of `dwt97_2d`."""
    hl, lh, hh = details.chunk(3, 1)
    return idwt97_1d(idwt97_1d(ll, lh, 2), idwt97_1d(hl, hh, 2), 3)


def coarse_dwt(band: torch.Tensor, levels: int) -> torch.Tensor:
    """`levels` levels of `dwt97_2d` on band (B, C, h, w), h and w multiples of 2^levels,
    kept in place: after each level, the LL, HL, LH and HH coefficients at (i, j) go to
    (2i, 2j), (2i, 2j+1), (2i+1, 2j) and (2i+1, 2j+1) of the same channel (torch's
    `pixel_shuffle`), the next level splitting the LL positions again."""
    if levels == 0:
        return band
    ll, details = dwt97_2d(band)
    ll = coarse_dwt(ll, levels - 1)
    hl, lh, hh = details.chunk(3, 1)
    return F.pixel_shuffle(torch.stack([ll, hl, lh, hh], 2).flatten(1, 2), 2)


def coarse_idwt(band: torch.Tensor, levels: int) -> torch.Tensor:
    """The inverse of `coarse_dwt`."""
    if levels == 0:
        return band
    ll, hl, lh, hh = F.pixel_unshuffle(band, 2).unflatten(1, (band.shape[1], 4)).unbind(2)
    return idwt97_2d(coarse_idwt(ll, levels - 1), torch.cat([hl, lh, hh], 1))


def reduced_channels(stop: int) -> int:
    """How many of y's first channels `LiftingTransform.inverse(y, stop)` reads: LL4 and the
    details of levels 4 .. stop+1 (768 for stop 0; 3, 12, 48, 192 for stop 4, 3, 2, 1)."""
    if not 0 <= stop <= WAVELET_LEVELS:
        raise ValueError(f"stop must be a level from 0 to {WAVELET_LEVELS}, got {stop}")
    return 3 + sum(9 * 4**(WAVELET_LEVELS - 1 - level) for level in range(stop, WAVELET_LEVELS))


def _step(step: nn.Sequential, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A learned lifting step of x, or, with `channels_last`, the same computed for inference in that
    layout with the ReLU in place (a ReLU that allocates its output costs as much as a convolution)."""
    if not channels_last:
        return step(x)
    hidden = step[0](x.contiguous(memory_format=torch.channels_last)).relu_()
    return step[2](hidden).contiguous()


class LiftingStep(nn.Sequential):
    """A learned lifting operator: conv 3x3 -> ReLU -> conv 3x3, the last layer zero at start."""

    def __init__(self, cin: int, cout: int, hidden: int):
        super().__init__(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, cout, 3, padding=1))
        nn.init.zeros_(self[2].weight)
        nn.init.zeros_(self[2].bias)


class LiftingTransform(nn.Module):
    """g_a (`forward`) and g_s (`inverse`) in one module: colour transform, then
    `WAVELET_LEVELS` levels of 9/7 lifting with a learned predict and update step each.

    x (B, 3, H, W) in [0, 1], H and W multiples of 16 * 2^coarse_levels -> y (B, 768, H/16, W/16),
    and back. The learned steps see their input divided by 2^level (the 9/7 low band's DC
    gain), so that every level's CNN sees values of the same order. `coarse_levels` more
    fixed levels split LL4 in place (`coarse_dwt`).
    """

    def __init__(self, hidden: int = 32, coarse_levels: int = 0):
        super().__init__()
        self.coarse_levels = coarse_levels
        self.colour = nn.Parameter(torch.tensor(YCBCR))
        self.predict = nn.ModuleList(LiftingStep(3, 9, hidden) for _ in range(WAVELET_LEVELS))
        self.update = nn.ModuleList(LiftingStep(9, 3, hidden) for _ in range(WAVELET_LEVELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = self.from_rgb(x)
        parts = []
        for level in range(WAVELET_LEVELS):
            band, details = self.forward_level(band, level)
            parts.append(details)
        out = [coarse_dwt(band, self.coarse_levels)]
        for level in reversed(range(WAVELET_LEVELS)):
            out.append(F.pixel_unshuffle(parts[level], 2**(WAVELET_LEVELS - 1 - level)))
        return torch.cat(out, 1)

    def from_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """The colour transform of RGB pictures in [0, 1]: the band that level 1 splits."""
        return torch.einsum("ij,bjhw->bihw", self.colour, x - 0.5)

    def forward_level(self, band: torch.Tensor, level: int, channels_last: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One level of `forward` (0: the finest): a band -> its LL band and details, half as large.
        An output sample reaches `LEVEL_REACH` samples of the output grid (as `inverse_level`);
        `channels_last` as there."""
        band, details = dwt97_2d(band)
        s = 2.0**(level + 1)
        details = details + _step(self.predict[level], band / s, channels_last) * s
        band = band + _step(self.update[level], details / s, channels_last) * s
        return band, details

    def inverse(self, y: torch.Tensor, stop: int = 0) -> torch.Tensor:
        """y -> x; with `stop` = k > 0, the picture at 1/2^k scale (B, 3, H/2^k, W/2^k) instead.

        Undoing levels 4 .. k+1 leaves LL_k, the band that level k+1 of the analysis split: the
        picture low-passed by k levels of the 9/7 (whose low band has a DC gain of 2 per 2-D level,
        `LOW_SCALE`) and the learned update steps of levels 1..k, sample (i, j) centred on pixel
        (2^k i, 2^k j). LL_k / 2^k through the inverse colour matrix is then the small picture.
        Only y's first `reduced_channels(k)` channels are read: the details of levels k..1 are not
        needed (and may be absent)."""
        band = self.coarsest_band(y)
        for level in reversed(range(stop, WAVELET_LEVELS)):
            band = self.inverse_level(band, self.level_details(y, level), level)
        if stop:
            band = band / 2.0**stop
        return self.to_rgb(band)

    def coarsest_band(self, y: torch.Tensor) -> torch.Tensor:
        """LL4 (B, 3, H/16, W/16) from y: its first 3 channels, the coarse levels undone."""
        return coarse_idwt(y[:, :3], self.coarse_levels)

    @staticmethod
    def level_details(y: torch.Tensor, level: int) -> torch.Tensor:
        """The detail bands of `level` (0: the finest) from y: (B, 9, H/2^(level+1), W/2^(level+1))."""
        r = 2**(WAVELET_LEVELS - 1 - level)
        start = reduced_channels(level + 1)
        return F.pixel_shuffle(y[:, start:start + 9 * r * r], r)

    def inverse_level(self, band: torch.Tensor, details: torch.Tensor, level: int,
                      channels_last: bool = False) -> torch.Tensor:
        """One level of `inverse`: its LL band and details -> the band twice as large that the
        analysis split. Output sample 2n depends on inputs n - LEVEL_REACH .. n + LEVEL_REACH at
        most (the two learned steps reach 2 each, the 9/7 2 more; measured: 6.5), so a level can
        be computed in tiles. `channels_last` (for inference) runs the learned steps in that
        layout: faster convolutions on the CPU, the same values within float rounding."""
        s = 2.0**(level + 1)
        band = band - _step(self.update[level], details / s, channels_last) * s
        details = details - _step(self.predict[level], band / s, channels_last) * s
        return idwt97_2d(band, details)

    def to_rgb(self, band: torch.Tensor) -> torch.Tensor:
        """The inverse colour transform: a band on the pixel grid -> RGB pictures around 0.5."""
        inverse_colour = torch.linalg.inv(self.colour.double()).to(band.dtype)
        return torch.einsum("ij,bjhw->bihw", inverse_colour, band) + 0.5

    @torch.no_grad()
    def synthesis_norms(self) -> torch.Tensor:
        """Per latent channel, the L2 norm (over RGB pixels in [0, 1]) of what a unit
        coefficient draws: the MSE a quantisation error of 1 in that channel adds, square-rooted.
        Measured on a grid of 8x8 latents with the coefficient in the middle (for channels
        0..2 with coarse levels, at the block position of the coarsest LL)."""
        M = LATENT_CHANNELS
        y = torch.zeros(M, M, 8, 8)
        y[torch.arange(M), torch.arange(M), 4, 4] = 1.0
        zero = self.inverse(torch.zeros(1, M, 8, 8))
        x = self.inverse(y) - zero
        return x.flatten(1).norm(dim=1)


class InverseLifting(nn.Module):
    """g_s as a module of its own, for the code that runs g_s alone: `transform.inverse`
    without registering the transform twice (it belongs to the analysis side's state)."""

    def __init__(self, transform: LiftingTransform):
        super().__init__()
        self._transform = [transform]  # a list, so that nn.Module does not register it

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._transform[0].inverse(y)
