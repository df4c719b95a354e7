"""lcodec on large images: 2K, 4K and 8K made from Kodak, time, peak RSS, rate accuracy, tiling.

    nice -n 19 python -m kodak_eval.large_images --bpp 0.25 --out runs/large_images
    nice -n 19 python -m kodak_eval.large_images --sizes 8K --weights runs/x/frozen.pt --out runs/large-x

`--weights F` measures the frozen file F, installed or not, under `--model`'s id
(the files made carry that id and F's digest; the reports name F and its SHA-256).

The test images are a 2 x 2 mosaic of kodim01..04 (1536 x 1024) resized with
Pillow's LANCZOS to 2048 x 1080 (2K DCI), 3840 x 2160 (4K UHD) and 7680 x 4320
(8K UHD); they are written as .npy to a temporary directory and never kept. None
of the heights is a multiple of 64, so padding and cropping are exercised.

Every (size, phase) runs in its own child process, which reports its own peak
RSS (`ru_maxrss`; a decode's is read before the original is loaded for its PSNR, as a
user decoding a file does not hold the original): encode (at
`--bpp`, rate search included) and decode are measured separately. Rate
accuracy: the file must be <= the target and >= 97% of it. If the model cannot
reach the target (a `RateError`), the child times a one-pass encode at `--rate`
instead (its peak RSS covers both), and the row says so.

Tiling: the engine runs g_a and g_s on tiles of `lcodec.models.frozen.TILE_LATENTS`
latents (1024 x 1024 pixels) with a halo of `HALO_LATENTS` (64 pixels). On the 2K
image, a one-pass encode + decode at the same rate parameter is run once with the
default tiles and once untiled (tiles of 10**6 latents, passed to the engine as
`tile_latents`), and the PSNRs and sizes are compared (the claim: within 0.05 dB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lcodec.models.registry import DEFAULT_MODEL_ID

from .report import git_state

ROOT = Path(__file__).resolve().parents[1]
KODAK = ROOT / ".." / "shared" / "data" / "kodak"
SIZES = {"2K": (2048, 1080), "4K": (3840, 2160), "8K": (7680, 4320)}  # width, height
UNTILED = 10**6
RSS_TARGET_MB = {"8K": 1536}  # from the speed issue (#31)


def make_image(width: int, height: int):
    """The deterministic test image of that size: a Kodak mosaic resized with LANCZOS (uint8 RGB)."""
    import numpy as np
    from PIL import Image

    tiles = [Image.open(KODAK / f"kodim{i:02d}.png").convert("RGB") for i in (1, 2, 3, 4)]
    mosaic = Image.new("RGB", (1536, 1024))
    for k, tile in enumerate(tiles):
        mosaic.paste(tile.resize((768, 512)), ((k % 2) * 768, (k // 2) * 512))
    return np.asarray(mosaic.resize((width, height), Image.LANCZOS)).copy()


def psnr(a, b) -> float:
    """PSNR over all samples, summed 256 rows at a time: whole-image float64 copies would take
    800 MB each at 8K, in the process whose peak RSS is measured."""
    import numpy as np

    squared = sum(float(np.sum((a[r:r + 256].astype(np.float64) - b[r:r + 256]) ** 2)) for r in range(0, len(a), 256))
    mse = squared / a.size
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


def child(job: dict) -> dict:
    """One measurement in this process; returns its results and this process's peak RSS."""
    import numpy as np
    import torch

    from lcodec import engine
    from lcodec.errors import RateError
    from lcodec.models import frozen

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    tile_latents = UNTILED if job.get("untiled") else frozen.TILE_LATENTS
    weights = engine.Weights.load(Path(job["weights"])) if job["weights"] else engine.installed_weights(job["model"])
    coding = {"model_id": job["model"], "weights": weights}
    out: dict = {"rss_after_model_load_mb": _rss_mb(), "torch_threads": torch.get_num_threads(),
                 "weights_sha256": weights.sha256}
    lc = Path(job["lc"])
    if job["phase"] == "decode":  # the original is read after the decode: a user decoding does not hold it
        data = lc.read_bytes()
        start = time.perf_counter()
        decoded, _ = engine.decode_array(data, weights=weights)
        out["seconds"] = time.perf_counter() - start
        out["peak_rss_mb"] = _rss_mb()
        out["psnr_db"] = psnr(np.load(job["image"]), decoded)
        return out
    pixels = np.load(job["image"])
    h, w = pixels.shape[:2]
    if job["phase"] == "encode":
        if job["bpp"] == "mid":  # a target inside what the model can reach (one-pass sizes, not timed)
            lo, hi = weights.model.rate_range
            sizes = [len(engine.encode_array(pixels, "RGB", rate=q, **coding).data) for q in (lo, hi)]
            job["bpp"] = 8 * (min(sizes) * max(sizes)) ** 0.5 / (w * h)
            out["bpp_target"] = job["bpp"]
        target = int(job["bpp"] * w * h / 8)
        start = time.perf_counter()
        try:
            result = engine.encode_array(pixels, "RGB", bpp=job["bpp"], **coding)
            out.update(status="ok", warning=result.warning)
        except RateError as e:
            out.update(status="unreachable", message=str(e), search_s=time.perf_counter() - start)
            result = None
        if result is None:  # not in the except block, whose traceback keeps the failed search's latent alive
            start = time.perf_counter()
            result = engine.encode_array(pixels, "RGB", rate=job["rate"], **coding)
        out["seconds"] = time.perf_counter() - start
        size = len(result.data)
        out.update(bytes=size, target_bytes=target, bpp=8 * size / (w * h), rate=result.rate)
        if out["status"] == "ok":
            out.update(within_target=size <= target, at_least_97pct=size >= 0.97 * target)
        lc.write_bytes(result.data)
    else:  # "one-pass": encode at a fixed rate and decode, for the tiling comparison
        start = time.perf_counter()
        data = engine.encode_array(pixels, "RGB", rate=job["rate"], tile_latents=tile_latents, **coding).data
        out["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        decoded, _ = engine.decode_array(data, weights=weights, tile_latents=tile_latents)
        out["decode_s"] = time.perf_counter() - start
        out.update(bytes=len(data), bpp=8 * len(data) / (w * h), psnr_db=psnr(pixels, decoded),
                   tile_latents=tile_latents)
        np.save(job["lc"] + (".untiled" if job.get("untiled") else ".tiled") + ".decoded.npy", decoded)
    out["peak_rss_mb"] = _rss_mb()
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(job: dict, timeout: float) -> dict:
    out = Path(job["lc"] + f".{job['phase']}{'-untiled' if job.get('untiled') else ''}.json")
    cmd = [sys.executable, "-m", "kodak_eval.large_images", "--child", json.dumps(job), "--child-out", str(out)]
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-800:]}"}
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def _bpp(text: str) -> float | str:
    return text if text == "mid" else float(text)


def markdown(s: dict) -> str:
    lines = [f"# lcodec on large images (model {s['model']}, weights: {s['weights']}, target {s['bpp']} bpp)", "",
             f"Weights SHA-256 {s.get('weights_sha256')}.", "",
             f"{s['torch_threads']} torch threads on {s['cpus']} CPUs; load average {s['load_average_start'][0]:.1f} "
             f"at start, {s['load_average_end'][0]:.1f} at end (other jobs share the CPUs); commit {s['commit']}.", "",
             "| image | size | encode s | encode RSS MB | decode s | decode RSS MB | bytes / target | rate ok | PSNR dB |",
             "|---|---|---:|---:|---:|---:|---:|:-:|---:|"]
    for name, r in s["sizes"].items():
        e, d = r["encode"], r["decode"]
        if "error" in e or "error" in d:
            lines.append(f"| {name} | {r['size']} | {e.get('error', '')} {d.get('error', '')} |")
            continue
        if e["status"] != "ok":
            rate_ok = f"unreachable (failed search {e['search_s']:.1f} s; timed a one pass at q = {e['rate']:g})"
        elif e["within_target"] and e["at_least_97pct"]:
            rate_ok = "yes"
        else:
            rate_ok = f"NO ({e['bytes'] / e['target_bytes']:.3f} of the target)"
        size = r["size"] + (f" (target {e['bpp_target']:.3f} bpp)" if "bpp_target" in e else "")
        lines.append(f"| {name} | {size} | {e['seconds']:.1f} | {e['peak_rss_mb']:.0f} | {d['seconds']:.1f} | "
                     f"{d['peak_rss_mb']:.0f} | {e['bytes']:,} / {e['target_bytes']:,} | {rate_ok} | "
                     f"{d['psnr_db']:.2f} |")
    t = s.get("tiling")
    if t:
        lines += ["", f"Tiling on 2K, one pass at q = {t['rate']:g}: tiled {t['tiled'].get('psnr_db', float('nan')):.3f} dB "
                      f"({t['tiled'].get('bytes')} bytes), untiled {t['untiled'].get('psnr_db', float('nan')):.3f} dB "
                      f"({t['untiled'].get('bytes')} bytes): difference {t.get('psnr_diff_db', float('nan')):.4f} dB "
                      f"(claim: <= 0.05 dB); the two decodes differ by at most {t.get('max_abs_pixel_diff')} "
                      f"in {100 * t.get('pixels_differing', float('nan')):.2f}% of samples; "
                      f"peak RSS tiled {t['tiled'].get('peak_rss_mb', 0):.0f} MB, "
                      f"untiled {t['untiled'].get('peak_rss_mb', 0):.0f} MB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpp", type=_bpp, default=0.25,
                        help="target bpp, or 'mid': the geometric mean of the model's smallest and largest "
                             "one-pass sizes for each image (a target the rate search can reach)")
    parser.add_argument("--rate", type=float, default=2.0, help="one-pass rate for the tiling check and fallbacks")
    parser.add_argument("--model", type=int, default=DEFAULT_MODEL_ID)
    parser.add_argument("--weights", type=Path,
                        help="measure this frozen weights file (installed or not) under --model's id, "
                             "instead of that model's installed weights")
    parser.add_argument("--sizes", default="2K,4K,8K")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--no-tiling-check", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "large_images")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(json.loads(args.child))))
        return 0
    import numpy as np

    summary: dict = {"model": args.model, "weights": str(args.weights) if args.weights else "installed",
                     "bpp": args.bpp, "cpus": os.cpu_count(), "machine": platform.platform(),
                     "load_average_start": os.getloadavg(), "commit": git_state(ROOT)["commit"], "sizes": {},
                     "what": "wall-clock seconds and peak RSS (ru_maxrss) of one child process per phase; "
                             "bpp = 8 x file bytes / pixels; PSNR on RGB 0..255 over the whole image"}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lcodec-large-") as tmp:
        for name in args.sizes.split(","):
            w, h = SIZES[name]
            image = str(Path(tmp) / f"{name}.npy")
            np.save(image, make_image(w, h))
            job = {"image": image, "lc": str(Path(tmp) / f"{name}.lc"), "bpp": args.bpp, "rate": args.rate,
                   "model": args.model, "weights": str(args.weights.resolve()) if args.weights else None,
                   "threads": args.threads}
            row = {"size": f"{w}x{h}", "encode": run_child({**job, "phase": "encode"}, args.timeout)}
            row["decode"] = (run_child({**job, "phase": "decode"}, args.timeout) if "error" not in row["encode"]
                             else {"error": "no file"})
            summary["sizes"][name] = row
            summary["torch_threads"] = row["encode"].get("torch_threads")
            summary["weights_sha256"] = row["encode"].get("weights_sha256")
            print(name, json.dumps(row), flush=True)
            if name == "2K" and not args.no_tiling_check:
                tiled = run_child({**job, "phase": "one-pass"}, args.timeout)
                untiled = run_child({**job, "phase": "one-pass", "untiled": True}, args.timeout)
                t = {"rate": args.rate, "tiled": tiled, "untiled": untiled}
                if "error" not in tiled and "error" not in untiled:
                    a, b = (np.load(job["lc"] + f".{k}.decoded.npy").astype(np.int16) for k in ("tiled", "untiled"))
                    t["psnr_diff_db"] = abs(tiled["psnr_db"] - untiled["psnr_db"])
                    t["bytes_diff"] = untiled["bytes"] - tiled["bytes"]
                    t["max_abs_pixel_diff"] = int(np.abs(a - b).max())
                    t["pixels_differing"] = float(np.mean(a != b))
                summary["tiling"] = t
                print("tiling", json.dumps(t), flush=True)
            os.unlink(image)
    summary["load_average_end"] = os.getloadavg()
    (args.out / "large_images.json").write_text(json.dumps(summary, indent=1))
    (args.out / "large_images.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
