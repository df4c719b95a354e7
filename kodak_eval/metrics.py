"""The numbers kodak_eval reports, each defined once.

Every function here works on real decoded pixels or real byte counts; nothing
estimates a rate. The definitions are repeated verbatim in the results JSON
(`DEFINITIONS`) so a reader of the numbers does not need this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFINITIONS: dict[str, str] = {
    "bpp": "8 * (bytes of the whole file as written, container/stream headers included) / (H * W)",
    "byte_budget": "a target of t bpp allows floor(t * H * W / 8) bytes; a result 'meets' the target if its file is no larger",
    "colour": "all metrics on the 8-bit RGB image the decoder returns, against the 8-bit RGB source (sRGB values as stored, no linearisation, no YCbCr)",
    "psnr": "10 * log10(255^2 / MSE), MSE the mean squared error over all H*W*3 RGB values of one image (null in the JSON when MSE is 0)",
    "ssim": "pytorch_msssim.ssim on the RGB image as float, data_range=255, 11x11 Gaussian window sigma 1.5, averaged over the 3 channels",
    "ms_ssim": "pytorch_msssim.ms_ssim, same settings, 5 scales with the standard weights; null when the shorter side is <= 160 px (too small for 5 scales)",
    "ms_ssim_db": "-10 * log10(1 - MS-SSIM), used only for plotting",
    "time": "wall-clock seconds (time.perf_counter) and process CPU seconds (time.process_time) of one in-memory encode or decode call, pixels in and bytes out; excludes file I/O and metric computation; codecs run with the thread count given by --threads",
    "peer_search": "peers have no rate control: each searches its own quality knob by bisection for the highest quality whose real file meets the byte budget, assuming file size grows with quality. 'overshoot' = even the lowest quality is over the budget (the lowest-quality file is reported); 'undershoot' = even the highest quality is under the budget (the highest-quality file is reported). Encode time is that of the one encode at the chosen quality, not of the search",
    "aggregation": "per codec and target: arithmetic mean over images of per-image PSNR, SSIM, MS-SSIM and bpp (PSNR is averaged in dB, not via mean MSE); medians for times",
    "rate_accuracy": "per codec and target over images: achieved-bpp mean, population std (ddof=0), min, max; share of images with |bpp - t| <= 0.15 t (JPEG AI tolerance) and with -0.03 t <= bpp - t <= 0 (the file is at most the target and at most 3% below it); an image with no file counts as outside both",
    "bd": "Bjontegaard delta (VCEG-M33) with piecewise cubic Hermite interpolation (PCHIP, as in the JVET CTC tool / VCEG-AL22) of the per-target mean points, over targets in [0.12, 1.0] bpp and only the overlap of the two curves. BD-rate: mean difference of log10(bpp) as a function of PSNR, reported as percent bitrate change of lcodec relative to the peer (negative = lcodec needs fewer bits for the same PSNR). BD-PSNR: mean PSNR difference (lcodec minus peer) as a function of log10(bpp), in dB",
}


def byte_budget(target_bpp: float, height: int, width: int) -> int:
    """Largest file size in bytes that meets `target_bpp` for an H x W image.

    The small epsilon keeps exactly representable budgets (0.25 * 768 * 512 / 8
    = 12288) from dropping a byte to float error in the product.
    """
    return int(math.floor(target_bpp * height * width / 8 + 1e-9))


def bpp(n_bytes: int, height: int, width: int) -> float:
    """Bits per pixel of a file of `n_bytes` for an H x W image (the whole file counts)."""
    return 8.0 * n_bytes / (height * width)


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    """RGB PSNR in dB of two uint8 arrays of the same shape; inf when they are identical."""
    if reference.shape != decoded.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {decoded.shape}")
    err = reference.astype(np.float64) - decoded.astype(np.float64)
    mse = float(np.mean(err * err))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


MS_SSIM_MIN_SIDE = 161  # pytorch_msssim asserts min side > (11 - 1) * 2**4


def ssim_pair(reference: np.ndarray, decoded: np.ndarray) -> tuple[float, float | None]:
    """(SSIM, MS-SSIM) of two uint8 H x W x 3 arrays, data_range 255 on RGB.

    MS-SSIM is None when the image is too small for five scales, instead of the
    assertion pytorch_msssim would raise.
    """
    import torch
    from pytorch_msssim import ms_ssim, ssim

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).unsqueeze(0).float()

    x, y = to_tensor(reference), to_tensor(decoded)
    with torch.no_grad():
        s = float(ssim(x, y, data_range=255, size_average=True))
        m = None
        if min(reference.shape[:2]) >= MS_SSIM_MIN_SIDE:
            m = float(ms_ssim(x, y, data_range=255, size_average=True))
    return s, m


def ms_ssim_db(value: float) -> float:
    return -10.0 * math.log10(max(1.0 - value, 1e-12))


@dataclass(frozen=True)
class RateAccuracy:
    n_images: int
    n_files: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    within_15pct: float  # share of all images, 0..1
    within_m3_0pct: float


def rate_accuracy(achieved: Sequence[float | None], target: float) -> RateAccuracy:
    """Rate-accuracy statistics of per-image achieved bpp (None = no file) against `target`."""
    files = np.array([b for b in achieved if b is not None], dtype=np.float64)
    n = len(achieved)
    if n == 0:
        raise ValueError("no images")
    rel = (files - target) / target
    within15 = int(np.sum(np.abs(rel) <= 0.15 + 1e-12))
    within3 = int(np.sum((rel >= -0.03 - 1e-12) & (rel <= 1e-12)))
    if len(files) == 0:
        return RateAccuracy(n, 0, None, None, None, None, 0.0, 0.0)
    return RateAccuracy(
        n_images=n,
        n_files=len(files),
        mean=float(files.mean()),
        std=float(files.std(ddof=0)),
        min=float(files.min()),
        max=float(files.max()),
        within_15pct=within15 / n,
        within_m3_0pct=within3 / n,
    )


def _monotone(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by x and keep only strictly increasing x (duplicates arise when a peer
    overshoots two targets with the same lowest-quality file)."""
    if len(x) == 0:
        return x, y
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    keep = np.concatenate([[True], np.diff(x) > 0])
    return x[keep], y[keep]


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str) -> float:
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        return float(PchipInterpolator(x, y).integrate(lo, hi))
    if method == "polynomial":
        poly = np.polyint(np.polyfit(x, y, 3))
        return float(np.polyval(poly, hi) - np.polyval(poly, lo))
    raise ValueError(f"unknown BD interpolation {method!r}")


def _mean_gap(x_anchor: np.ndarray, y_anchor: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              method: str) -> float | None:
    """Mean of (test - anchor) in y over the x range both curves cover; None when a curve has
    too few distinct points (2, or 4 for "polynomial") or the ranges do not overlap."""
    need = 4 if method == "polynomial" else 2
    xa, ya = _monotone(x_anchor, y_anchor)
    xt, yt = _monotone(x_test, y_test)
    if len(xa) < need or len(xt) < need:
        return None
    lo, hi = max(xa.min(), xt.min()), min(xa.max(), xt.max())
    if hi <= lo:
        return None
    return (_integral(xt, yt, lo, hi, method) - _integral(xa, ya, lo, hi, method)) / (hi - lo)


def bd_rate(
    rate_anchor: Sequence[float],
    psnr_anchor: Sequence[float],
    rate_test: Sequence[float],
    psnr_test: Sequence[float],
    method: str = "pchip",
) -> float | None:
    """Bjontegaard delta rate of `test` against `anchor`, in percent.

    Negative means the test codec needs fewer bits for the same PSNR. None when
    either curve has fewer than 2 distinct points (4 for "polynomial") or the
    PSNR ranges do not overlap.
    """
    gap = _mean_gap(np.asarray(psnr_anchor, float), np.log10(np.asarray(rate_anchor, float)),
                    np.asarray(psnr_test, float), np.log10(np.asarray(rate_test, float)), method)
    return None if gap is None else (10.0**gap - 1.0) * 100.0


def bd_psnr(
    rate_anchor: Sequence[float],
    psnr_anchor: Sequence[float],
    rate_test: Sequence[float],
    psnr_test: Sequence[float],
    method: str = "pchip",
) -> float | None:
    """Bjontegaard delta PSNR (test minus anchor) in dB over the overlapping log-rate range."""
    return _mean_gap(np.log10(np.asarray(rate_anchor, float)), np.asarray(psnr_anchor, float),
                     np.log10(np.asarray(rate_test, float)), np.asarray(psnr_test, float), method)
