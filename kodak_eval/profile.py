"""Where lcodec's time and memory go, stage by stage, as the picture grows.

    nice -n 19 python -m kodak_eval.profile --bpp 0.5 --sizes 0.4,3,12,33 --runs 3 --threads 2
    nice -n 19 python -m kodak_eval.profile --sizes 12 --runs 1 --effort 1 --out runs/profile-effort1

One photo (`--image`, by default the 12-megapixel `../shared/data/large/photo-12mp.jpg`)
is resized with Pillow's LANCZOS to each size in megapixels (its aspect ratio kept; its own
size when the size is its own), encoded at `--bpp` as the API and the command line do
(`engine.encode_best`) and decoded. Each (size, phase) runs in
its own child process, which reports its own peak RSS (`ru_maxrss`): encode (rate search included) and decode are measured apart.
Within a child a 256 x 256 crop is encoded and decoded once first (to warm up torch and
the coder's tables), then the phase runs `--runs` times and the median of each figure is
reported.

The stages are timed from outside with `kodak_eval.speed`'s shim (nothing in lcodec is
edited); nested stages are inside their parents:

    encode   g_a            FrozenModel.analyze
             probes         Encoder.estimate_bytes (rate search; count in brackets)
             measures       Encoder.measure_bytes (a real encode's symbols and exact size)
             real encodes   Encoder.payload (the range coder, and the symbols unless measured)
             range encode   range_coder.encode (inside real encodes)
    decode   h_s            FrozenModel.latent_entropy_parameters (the integer hyper-synthesis)
             passes         engine._decode_passes (the subband context and the range decoder)
             g_s            FrozenModel.synthesize, or synthesize_into for a picture of more than
                            engine.DIRECT_PIXELS (the synthesis and post-filter)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lcodec.models.registry import DEFAULT_MODEL_ID

from .report import git_state
from .speed import ROOT, Shim

IMAGE = ROOT / ".." / "shared" / "data" / "large" / "photo-12mp.jpg"


def make_image(path: Path, megapixels: float):
    """The photo at `path` as uint8 RGB, resized to about `megapixels` (its own size when that is it)."""
    import numpy as np
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = math.sqrt(megapixels * 1e6 / (image.width * image.height))
    if abs(scale - 1) > 0.02:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    return np.asarray(image)


def child(job: dict) -> dict:
    """One (size, phase) in this process: median stage seconds and this process's peak RSS."""
    import numpy as np
    import torch

    from lcodec import engine
    from lcodec.models.frozen import FrozenModel

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    weights = engine.installed_weights(job["model"])
    rgb = make_image(Path(job["image"]), job["megapixels"])
    lc = Path(job["file"])
    warm = engine.encode_best(np.ascontiguousarray(rgb[:256, :256]), "RGB", bpp=job["bpp"], model_ids=(job["model"],))
    engine.decode_array(warm.data, weights=weights)
    runs = []
    with Shim() as shim:
        if job["phase"] == "encode":
            shim.wrap(FrozenModel, "analyze", "g_a")
            shim.wrap(engine.Encoder, "estimate_bytes", "probes")
            shim.wrap(engine.Encoder, "measure_bytes", "measures")
            shim.wrap(engine.Encoder, "payload", "real_encodes")
            shim.wrap(engine.range_coder, "encode", "range_encode")
        else:
            shim.wrap(FrozenModel, "latent_entropy_parameters", "h_s")
            shim.wrap(engine, "_decode_passes", "passes")
            shim.wrap(FrozenModel, "synthesize", "g_s")
            shim.wrap(FrozenModel, "synthesize_into", "g_s")
        for _ in range(job["runs"]):
            start = time.perf_counter()
            if job["phase"] == "encode":
                result = engine.encode_best(rgb, "RGB", bpp=job["bpp"], model_ids=(job["model"],),
                                            effort=job["effort"])  # as the API
                lc.write_bytes(result.data)
            else:
                pixels, _ = engine.decode_array(lc.read_bytes(), weights=weights)
            total = time.perf_counter() - start
            seconds, calls = shim.take()
            runs.append({"total": total, **seconds, **{f"{k}_calls": v for k, v in calls.items()}})
    out = {k: statistics.median(r.get(k, 0) for r in runs) for k in runs[0]}
    out.update(width=int(rgb.shape[1]), height=int(rgb.shape[0]),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               torch_threads=torch.get_num_threads(), runs=len(runs))
    if job["phase"] == "encode":
        out["bpp"] = 8 * lc.stat().st_size / (rgb.shape[0] * rgb.shape[1])
    else:
        out["psnr"] = float(10 * np.log10(255**2 / np.mean((pixels.astype(np.float64) - rgb) ** 2)))
    return out


def run_child(job: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "kodak_eval.profile", "--child", json.dumps(job), "--child-out", out.name]
        subprocess.run(cmd, check=True, cwd=ROOT, timeout=timeout)
        return json.loads(Path(out.name).read_text())


def markdown(s: dict) -> str:
    lines = [f"# lcodec stage profile: model {s['model']}, {s['bpp']:g} bpp, effort {s.get('effort', 0)}, "
             f"{s['torch_threads']} torch threads",
             "",
             f"`{s['command']}` on {s['machine']} (load average at the start: {s['load_average']}), code "
             f"{s['git']['commit'][:10]}{' (dirty)' if s['git'].get('dirty') else ''}. Medians of {s['runs']} runs per phase; seconds, peak RSS in MB of the phase's own process.",
             "",
             "| picture | MP | encode s | g_a | probes (n) | measures (n) | real encodes | of which range coder | RSS MB "
             "| decode s | h_s | passes | g_s | RSS MB | bpp | PSNR dB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        e, d = r["encode"], r["decode"]
        lines.append(
            f"| {e['width']}x{e['height']} | {e['width'] * e['height'] / 1e6:.1f} | {e['total']:.2f} | {e['g_a']:.2f} "
            f"| {e.get('probes', 0):.2f} ({e.get('probes_calls', 0):g}) "
            f"| {e.get('measures', 0):.2f} ({e.get('measures_calls', 0):g}) | {e['real_encodes']:.2f} | {e['range_encode']:.2f} "
            f"| {e['peak_rss_mb']:.0f} | {d['total']:.2f} | {d['h_s']:.2f} | {d['passes']:.2f} | {d['g_s']:.2f} "
            f"| {d['peak_rss_mb']:.0f} | {e['bpp']:.4f} | {d['psnr']:.2f} |")
    lines.append("")
    lines.append("Per megapixel (encode / decode seconds): " + ", ".join(
        f"{r['megapixels']:g} MP {r['encode']['total'] / r['mp']:.2f} / {r['decode']['total'] / r['mp']:.2f}"
        for r in s["rows"]) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--sizes", default="0.4,3,12,33", help="megapixels, comma-separated")
    parser.add_argument("--bpp", type=float, default=0.5)
    parser.add_argument("--effort", type=int, default=0, help="the encodes' effort (refinement at 1-9)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", type=int, default=DEFAULT_MODEL_ID)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "profile")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(json.loads(args.child))))
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (float(s) for s in args.sizes.split(",")):
            row = {"megapixels": size}
            for phase in ("encode", "decode"):
                job = {"phase": phase, "image": str(args.image), "megapixels": size, "bpp": args.bpp,
                       "effort": args.effort, "runs": args.runs, "model": args.model, "threads": args.threads,
                       "file": str(Path(tmp) / f"{size:g}.lc")}
                row[phase] = run_child(job, args.timeout)
                print(f"{size:g} MP {phase}: {row[phase]['total']:.2f} s, {row[phase]['peak_rss_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
            row["mp"] = row["encode"]["width"] * row["encode"]["height"] / 1e6
            rows.append(row)
    summary = {"model": args.model, "bpp": args.bpp, "effort": args.effort, "runs": args.runs,
               "torch_threads": rows[0]["encode"]["torch_threads"],
               "image": str(args.image), "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "load_average": round(os.getloadavg()[0], 2), "git": git_state(ROOT),
               "command": "python -m kodak_eval.profile " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(summary, indent=1))
    (args.out / "profile.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
