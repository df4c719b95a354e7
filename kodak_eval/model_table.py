"""The model card's Kodak table, in the thesis's format (Tables 6.2-6.4).

    python -m kodak_eval.model_table --kodak ../shared/data/kodak --out models/history/kodak-12.json
    python -m kodak_eval.model_table --weights runs/x/frozen.pt --out runs/x/kodak.json

For each trained level of one model: the achieved bpp of real files in one-pass
mode (the level's own rate parameter, no search) -- mean / std / min / max and
the share of images within JPEG AI's ±15% -- and, at exactly controlled rate
(the codec's default `--bpp` search), mean RGB PSNR, SSIM and MS-SSIM of the
decoded 8-bit images. The numbers are those of `metrics` (the benchmark's
definitions); bpp = 8 x file bytes (header included) / (H x W).

`--weights F` measures the frozen file F, installed or not: the files carry
`--model-id`'s id and F's digest, and decode with F.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lcodec import engine
from lcodec.errors import RateError
from lcodec.models.registry import DEFAULT_MODEL_ID

from . import metrics
from .evaluate import DEFAULT_IMAGES
from .report import git_state

REPO = Path(__file__).resolve().parent.parent
EXACT_KEYS = ("bpp", "psnr", "ssim", "ms_ssim")


def describe(weights: engine.Weights, model_id: int, path: Path | None) -> dict:
    """What the results are of: the id the files carry, the weights' name and SHA-256, and their levels."""
    return {"name": weights.name, "model_id": model_id, "digest": weights.sha256, "levels": list(weights.model.levels),
            "rate_range": weights.model.rate_range, "weights": str(path) if path else "installed"}


def measure(kodak: Path, limit: int | None = None, model_id: int = DEFAULT_MODEL_ID,
            weights_path: Path | None = None) -> dict:
    """The table's numbers for the PNG images of `kodak`, with the installed weights of `model_id`
    or the frozen file `weights_path`."""
    files = sorted(kodak.glob("*.png"))[:limit]
    if not files:
        raise SystemExit(f"no PNG images in {kodak}")
    weights = engine.Weights.load(weights_path) if weights_path else engine.installed_weights(model_id)
    info = describe(weights, model_id, weights_path)
    levels = info["levels"]
    one_pass: dict[int, list[float]] = {i: [] for i in range(len(levels))}
    exact: dict[int, list[dict | None]] = {i: [] for i in range(len(levels))}
    for f in tqdm(files, desc="kodak"):
        img = np.array(Image.open(f).convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
        h, w = img.shape[:2]
        for i, target in enumerate(levels):
            r = engine.encode_array(img, "RGB", rate=float(i), model_id=model_id, weights=weights)
            one_pass[i].append(metrics.bpp(len(r.data), h, w))
            try:
                r = engine.encode_array(img, "RGB", bpp=target, model_id=model_id, weights=weights)
            except RateError:
                exact[i].append(None)  # the model cannot go this low for this image
                continue
            dec, _ = engine.decode_array(r.data, weights=weights)
            s, ms = metrics.ssim_pair(img, dec)
            exact[i].append({"bpp": r.bpp, "psnr": metrics.psnr(img, dec), "ssim": s, "ms_ssim": ms})
    rows = []
    for i, target in enumerate(levels):
        acc = metrics.rate_accuracy(one_pass[i], target)
        e = [x for x in exact[i] if x is not None]
        rows.append({
            "target": target,
            "one_pass_bpp": {"mean": acc.mean, "std": acc.std, "min": acc.min, "max": acc.max,
                             "within_15pct": acc.within_15pct},
            "exact": _mean_exact(e) if e else None,
            "unreachable": len(exact[i]) - len(e),
        })
    return {"model": info, "images": len(files), "rows": rows, "git": git_state(REPO),
            "definitions": {k: metrics.DEFINITIONS[k] for k in ("bpp", "colour", "psnr", "ssim", "ms_ssim")} | {
                "one_pass_bpp": "per level i over images: bpp of the file coded at rate parameter i, no search; "
                                "mean, population std, min, max and the share with |bpp - t| <= 0.15 t",
                "exact": "per level over the images whose file meets t bpp under the codec's rate control: "
                         "mean bpp (and its range), PSNR, SSIM and MS-SSIM; 'unreachable' counts the others",
                "averaging": "arithmetic mean over images (PSNR in dB); null when a metric is null for an image"}}


def _mean_exact(results: list[dict]) -> dict:
    means = {k: None if any(x[k] is None for x in results) else float(np.mean([x[k] for x in results]))
             for k in EXACT_KEYS}
    return means | {"bpp_min": min(x["bpp"] for x in results), "bpp_max": max(x["bpp"] for x in results)}


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


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
            lines.append(one + f"{e['bpp']:.4f} ({e['bpp_min']:.4f}–{e['bpp_max']:.4f}) | {_num(e['psnr'], '.2f')} | "
                         f"{_num(e['ssim'], '.4f')} | {_num(e['ms_ssim'], '.4f')} | {r['unreachable']}/{result['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kodak", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (and a .md beside it)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--model-id", type=int, default=DEFAULT_MODEL_ID,
                   help="a model of the registry (default: the default); with --weights, the id the files carry")
    p.add_argument("--weights", type=Path, default=None,
                   help="measure this frozen weights file (installed or not) instead of --model-id's installed weights")
    args = p.parse_args(argv)
    result = measure(args.kodak, args.limit, args.model_id, args.weights)
    md = markdown(result)
    print(md)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
