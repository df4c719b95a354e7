"""Kodak table for the model card, in the thesis's format (Tables 6.2-6.4).

    python -m lcodec.models.evaluate --kodak ../shared/data/kodak --out models/weights/kodak.json

For each trained level: the achieved bpp of real files in one-pass mode (the
level's own rate parameter, no search) -- mean / std / min / max and the share
of images within JPEG AI's ±15% -- and, at exactly controlled rate (the
codec's default `--bpp` search), mean RGB PSNR, SSIM and MS-SSIM of the
decoded 8-bit images. bpp = 8 x file bytes (header included) / (H x W).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_msssim import ms_ssim, ssim
from tqdm import tqdm

from .. import engine
from ..errors import RateError
from .registry import DEFAULT_MODEL_ID


def rgb_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over all RGB samples of two uint8 images (MSE averaged over R, G and B)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float()
    return ssim(ta, tb, data_range=255).item(), ms_ssim(ta, tb, data_range=255).item()


def evaluate(kodak: Path, limit: int | None = None, model_id: int = DEFAULT_MODEL_ID) -> dict:
    files = sorted(kodak.glob("*.png"))[:limit]
    if not files:
        raise SystemExit(f"no PNG images in {kodak}")
    info = engine.model_info(model_id)
    levels = info["levels"]
    one_pass = {i: [] for i in range(len(levels))}
    exact = {i: [] for i in range(len(levels))}
    for f in tqdm(files, desc="kodak"):
        img = np.array(Image.open(f).convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
        n = img.shape[0] * img.shape[1]
        for i, target in enumerate(levels):
            r = engine.encode_array(img, "RGB", rate=float(i), model_id=model_id)
            one_pass[i].append(8 * len(r.data) / n)
            try:
                r = engine.encode_array(img, "RGB", bpp=target, model_id=model_id)
            except RateError:
                exact[i].append(None)  # the model cannot go this low for this image
                continue
            dec, _ = engine.decode_array(r.data)
            s, ms = ssim_pair(img, dec)
            exact[i].append({"bpp": r.bpp, "psnr": rgb_psnr(img, dec), "ssim": s, "ms_ssim": ms})
    rows = []
    for i, target in enumerate(levels):
        b = np.array(one_pass[i])
        e = [x for x in exact[i] if x is not None]
        unreachable = len(exact[i]) - len(e)
        if not e:
            rows.append({"target": target, "one_pass_bpp": {"mean": b.mean(), "std": b.std(), "min": b.min(),
                         "max": b.max(), "within_15pct": float(np.mean(np.abs(b / target - 1) <= 0.15))},
                         "exact": None, "unreachable": unreachable})
            continue
        rows.append({
            "target": target,
            "one_pass_bpp": {"mean": b.mean(), "std": b.std(), "min": b.min(), "max": b.max(),
                             "within_15pct": float(np.mean(np.abs(b / target - 1) <= 0.15))},
            "exact": {k: float(np.mean([x[k] for x in e])) for k in ("bpp", "psnr", "ssim", "ms_ssim")}
                     | {"bpp_min": min(x["bpp"] for x in e), "bpp_max": max(x["bpp"] for x in e)},
            "unreachable": unreachable,
        })
    return {"model": info, "images": len(files), "rows": rows,
            "definitions": {"bpp": "8 * file bytes (header included) / (H * W)",
                            "psnr": "10 log10(255^2 / MSE) with the MSE over all RGB samples, 8-bit decoded",
                            "ssim": "pytorch_msssim.ssim / ms_ssim on RGB, data_range 255",
                            "averaging": "mean over images"}}


def markdown(result: dict) -> str:
    lines = ["| target bpp | one-pass bpp mean | std | min | max | within ±15% | exact bpp mean (min–max) | "
             "PSNR (dB) | SSIM | MS-SSIM | unreachable |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        o, e = r["one_pass_bpp"], r["exact"]
        one = (f"| {r['target']:g} | {o['mean']:.4f} | {o['std']:.4f} | {o['min']:.4f} | {o['max']:.4f} | "
               f"{100 * o['within_15pct']:.0f}% | ")
        if e is None:
            lines.append(one + f"— | — | — | — | {r['unreachable']}/{result['images']} |")
        else:
            lines.append(one + f"{e['bpp']:.4f} ({e['bpp_min']:.4f}–{e['bpp_max']:.4f}) | {e['psnr']:.2f} | "
                         f"{e['ssim']:.4f} | {e['ms_ssim']:.4f} | {r['unreachable']}/{result['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kodak", type=Path, default=Path("../shared/data/kodak"))
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (and a .md beside it)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model-id", type=int, default=DEFAULT_MODEL_ID, help="a model of the registry (default: the default)")
    args = p.parse_args(argv)
    result = evaluate(args.kodak, args.limit, args.model_id)
    md = markdown(result)
    print(md)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
