"""Reduced-size decoding on Kodak: time against the full decode, quality against the original reduced.

    python examples/reduced_decode.py ../shared/data/kodak --bpp 0.25 1 --runs 5

Each image is encoded once per target (default model, in memory: nothing is written), then decoded
at scales 1, 1/2, 1/4, 1/8 and 1/16 with `lcodec.decode`, `--runs` times each, the scales
interleaved so that a load on the machine falls on all of them alike; a time is the median of
the runs, and the table gives the median over images of each scale's time and of its ratio to the
same image's full decode. Quality is the PSNR (RGB, 8 bits, mean of the per-image values in dB)
of the reduced picture against the original reduced by Pillow's `Image.reduce` (box filter) and,
in brackets, `Image.resize(..., LANCZOS)`; the last column is the full decode box-reduced against
the same box-reduced original: what decoding the whole picture and reducing it would give.
"transform alone" is the original itself reduced the way the decoder reduces (the model's analysis,
its inverse stopped at the level, the half-block shift) against the box-reduced original: how far
the wavelet's low band is from a box filter before any coding.
The last line times the Pillow plugin's path at 1/8: ``Image.open``, ``draft(None, (W // 8, H // 8))``,
``load()``, timed with the other scales. Torch uses `--threads` threads (default 2).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

import lcodec

SCALES = (1, 2, 4, 8, 16)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    return float(10 * np.log10(255**2 / np.mean((x - y) ** 2)))


def transform_alone(original: Image.Image, factor: int) -> Image.Image:
    """The original reduced as the decoder reduces a file, with nothing coded."""
    import torch

    from lcodec import engine
    from lcodec.models.frozen import half_block_shift

    model = engine.installed_weights().model
    x = engine._to_tensor(np.asarray(original), "RGB")
    with torch.no_grad():
        small = half_block_shift(model.analysis.inverse(model.analysis(x), factor.bit_length() - 1), factor)
    w, h = engine.reduced_size(original.width, original.height, factor)
    pixels = small[0, :, :h, :w].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kodak", type=Path)
    parser.add_argument("--bpp", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    paths = sorted(args.kodak.glob("kodim*.png"))[:args.images]
    print(f"{len(paths)} images, {args.runs} runs, {args.threads} threads, lcodec {lcodec.__version__}")
    for bpp in args.bpp:
        times = {s: [] for s in SCALES}
        ratios = {s: [] for s in SCALES}
        box_psnr = {s: [] for s in SCALES}
        lanczos_psnr = {s: [] for s in SCALES}
        full_box_psnr = {s: [] for s in SCALES}
        alone_psnr = {s: [] for s in SCALES}
        draft_times, draft_ratios = [], []
        for path in paths:
            original = Image.open(path).convert("RGB")
            data = lcodec.encode(original, bpp=bpp)
            runs = {s: [] for s in SCALES}
            draft_runs = []
            decoded = {}
            for _ in range(args.runs):
                for s in SCALES:
                    start = time.perf_counter()
                    decoded[s] = lcodec.decode(data, scale=Fraction(1, s))
                    runs[s].append(time.perf_counter() - start)
                start = time.perf_counter()
                drafted = Image.open(io.BytesIO(data))
                drafted.draft(None, (original.width // 8, original.height // 8))
                drafted.load()
                draft_runs.append(time.perf_counter() - start)
                assert drafted.size == decoded[8].size
            full = statistics.median(runs[1])
            draft_times.append(statistics.median(draft_runs))
            draft_ratios.append(statistics.median(draft_runs) / full)
            for s in SCALES:
                times[s].append(statistics.median(runs[s]))
                ratios[s].append(statistics.median(runs[s]) / full)
                box = original.reduce(s) if s > 1 else original
                box_psnr[s].append(psnr(decoded[s], box))
                lanczos_psnr[s].append(psnr(decoded[s], original.resize(decoded[s].size, Image.LANCZOS)))
                full_box_psnr[s].append(psnr(decoded[1].reduce(s) if s > 1 else decoded[1], box))
                if s > 1:
                    alone_psnr[s].append(psnr(transform_alone(original, s), box))
        print(f"\n{bpp} bpp\n")
        print("| scale | size | decode s (median) | × full decode | PSNR vs box-reduced original, dB "
              "(vs Lanczos) | full decode box-reduced, dB | transform alone, dB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for s in SCALES:
            w, h = decoded[s].size
            print(f"| {'1' if s == 1 else f'1/{s}'} | {w}×{h} | {statistics.median(times[s]):.3f} | "
                  f"{statistics.median(ratios[s]):.2f} | {np.mean(box_psnr[s]):.2f} ({np.mean(lanczos_psnr[s]):.2f}) | "
                  f"{np.mean(full_box_psnr[s]):.2f} | {np.mean(alone_psnr[s]) if s > 1 else float('inf'):.2f} |")
        print(f"\nImage.open + draft(1/8) + load: median {statistics.median(draft_times):.3f} s, "
              f"{statistics.median(draft_ratios):.2f}x the full decode (largest {max(draft_ratios):.2f}x)")


if __name__ == "__main__":
    main()
