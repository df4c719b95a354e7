"""Speed and memory of lcodec on the Kodak images: encode at a bpp target (rate search included) and decode.

    nice -n 19 python -m kodak_eval.speed --bpp 0.25 --runs 3 --out runs/speed
    nice -n 19 python -m kodak_eval.speed --weights runs/x/frozen.pt --out runs/speed-x
    nice -n 19 python -m kodak_eval.speed --efforts 0,1,5,9 --choice --out runs/speed-effort

`--weights F` times the frozen file F, installed or not, under `--model`'s id:
the engine takes the weights as an argument, so the files made carry that id
and F's digest, and the reports name F and its SHA-256.

Each phase runs in its own child process, so its peak RSS (`ru_maxrss`, read by
the child at its end) is that phase's alone: the torch import, the model and the
largest image's working set. Within a phase, every image is coded `--runs` times
after one warm-up, and the median is reported.

Where the time goes is measured from outside: while a phase runs, the child
wraps public functions of lcodec with a timing shim (nothing in lcodec is edited):

    g_a             FrozenModel.analyze      (the analysis transform, tiled)
    probes          Encoder.estimate_bytes   (one rate-search probe: gain, h_a, integer h_s, table costs)
    measures        Encoder.measure_bytes    (a real encode's symbols and exact size, before coding)
    real encodes    Encoder.payload          (the range coder, and the symbols unless measured)
    range encode    range_coder.encode       (inside real encodes)
    range decode    range_coder.Decoder      (__init__, decode, finish)
    h_s             FrozenModel.entropy_parameters on decode (the integer hyper-synthesis)
    g_s             FrozenModel.synthesize   (the synthesis transform, tiled)

`--efforts E,...` also times the encode at `--bpp` at each effort level E > 0
(rate search and refinement included; effort 0 is the encode above),
through the same engine call with ``effort=E``; the reports give each level's
median seconds per image and its ratio to effort 0.

Shares are of the summed median times over all images. When the model cannot
reach the target (a `RateError`: e.g. weights under training whose file size does not
rise with the rate parameter), the encode time is what the failing search cost,
the image is marked ``unreachable``, and the one-pass encode at ``--rate``
(no search) is timed as well; the Markdown then also gives a projection
g_a + P x probe + E x real encode, with the probe and encode counts P and E of
the searches that did succeed (or of a reference search with the tiny model 0 at
a target it can reach, if none did). Times are wall-clock seconds on this
machine; `load_average` in the JSON says how busy it was.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lcodec.api import DEFAULT_EFFORT, MAX_EFFORT
from lcodec.models.registry import CHOICE_MODEL_IDS, DEFAULT_MODEL_ID

from .report import git_state

if TYPE_CHECKING:
    from lcodec.engine import Weights

ROOT = Path(__file__).resolve().parents[1]
KODAK = ROOT / ".." / "shared" / "data" / "kodak"
TARGETS = {"encode_s": 0.5, "decode_s": 0.25, "peak_rss_mb": 1536}  # from the speed issue (#31)


class Shim:
    """Accumulates wall time and call counts of wrapped functions, by label; as a context
    manager, puts the original functions back at its end."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.wrapped: list[tuple[object, str, object]] = []

    def __enter__(self) -> Shim:
        return self

    def __exit__(self, *exc) -> None:
        while self.wrapped:
            owner, name, original = self.wrapped.pop()
            setattr(owner, name, original)

    def wrap(self, owner: object, name: str, label: str) -> None:
        """Time `owner.name` (a module's function or a class's own method) under `label`."""
        self.wrapped.append((owner, name, vars(owner)[name]))
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, name, timed)

    def take(self) -> tuple[dict, dict]:
        seconds, calls = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return seconds, calls


def _median_run(runs: list[dict]) -> dict:
    """Per-label medians over runs (missing labels count as 0)."""
    labels = set().union(*(r["seconds"] for r in runs))
    out = {"total": statistics.median(r["total"] for r in runs), "cpu": statistics.median(r["cpu"] for r in runs)}
    out.update({k: statistics.median(r["seconds"].get(k, 0.0) for r in runs) for k in labels})
    out["calls"] = runs[0]["calls"]
    return out


def child(phase: str, args: argparse.Namespace, files: Path) -> dict:
    """One phase, in this (child) process: returns per-image medians and this process's peak RSS."""
    import torch

    from lcodec import engine
    from lcodec.bitstream import range_coder
    from lcodec.bitstream.tables import CdfTables
    from lcodec.models.frozen import FrozenModel

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = engine.Weights.load(args.weights) if args.weights else engine.installed_weights(args.model)
    with Shim() as shim:
        shim.wrap(FrozenModel, "analyze", "g_a")
        shim.wrap(FrozenModel, "synthesize", "g_s")
        shim.wrap(engine.Encoder, "estimate_bytes", "probes")
        shim.wrap(engine.Encoder, "measure_bytes", "measures")
        shim.wrap(engine.Encoder, "payload", "real_encodes")
        shim.wrap(range_coder, "encode", "range_encode")
        for name in ("__init__", "decode", "finish"):
            shim.wrap(range_coder.Decoder, name, "range_decode")
        # Nested inside probes and real encodes on the encode side; the whole of h_s on decode.
        shim.wrap(FrozenModel, "entropy_parameters", "h_s")
        if phase == "encode":
            shim.wrap(FrozenModel, "hyper_latent", "h_a")
            shim.wrap(CdfTables, "cost_bits", "table_costs")
        return _measure(phase, args, files, weights, shim)


def _measure(phase: str, args: argparse.Namespace, files: Path, weights: Weights, shim: Shim) -> dict:
    """`child`'s measurements, with the codec's functions wrapped by `shim`."""
    import numpy as np
    import torch
    from PIL import Image

    from lcodec import engine
    from lcodec.errors import RateError

    model = weights.model
    if args.rate is None:  # the level whose target is nearest --bpp (in log rate)
        from .evaluate import nearest_levels

        args.rate = float(nearest_levels(model.levels, [args.bpp])[0])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    images = sorted(KODAK.glob("kodim*.png"))[: args.images]
    rows = []
    for k, path in enumerate(images):
        rgb = np.array(Image.open(path).convert("RGB"))
        row: dict = {"image": path.name, "height": rgb.shape[0], "width": rgb.shape[1]}
        if phase == "encode":
            efforts = [(f"effort{e}", {"bpp": args.bpp, "effort": e}) for e in args.efforts if e > 0]
            for label, kwargs in [("bpp", {"bpp": args.bpp}), ("one_pass", {"rate": args.rate}), *efforts]:
                runs = []
                for r in range(args.runs + (1 if k == 0 else 0)):  # one warm-up on the first image
                    start, cpu = time.perf_counter(), time.process_time()
                    try:
                        if args.choice and "bpp" in kwargs:  # the API's policy: the better of the models
                            result = engine.encode_best(rgb, "RGB", **kwargs)
                        else:
                            result = engine.encode_array(rgb, "RGB", model_id=args.model, weights=weights, **kwargs)
                        status, data = "ok", result.data
                    except RateError as e:
                        status, data = "unreachable", None
                        row[f"{label}_message"] = str(e)
                    total, cpu = time.perf_counter() - start, time.process_time() - cpu
                    seconds, calls = shim.take()
                    if k == 0 and r == 0:
                        continue
                    runs.append({"total": total, "cpu": cpu, "seconds": seconds, "calls": calls})
                row[label] = {"status": status, **_median_run(runs)}
                if data is not None:
                    row[label]["bytes"] = len(data)
                    row[label]["bpp"] = 8 * len(data) / (rgb.shape[0] * rgb.shape[1])
                    (files / f"{path.stem}.{label}.lc").write_bytes(data)
                    if label == "bpp" or label.startswith("effort"):  # what the effort buys (not timed)
                        decoded, _ = engine.decode_array(data, weights=None if args.choice else weights)
                        row[label]["psnr"] = _psnr(rgb, decoded)
        else:
            label = "bpp" if (files / f"{path.stem}.bpp.lc").exists() else "one_pass"
            data = (files / f"{path.stem}.{label}.lc").read_bytes()
            runs = []
            for r in range(args.runs + (1 if k == 0 else 0)):
                start, cpu = time.perf_counter(), time.process_time()
                pixels, _ = engine.decode_array(data, weights=None if args.choice and label == "bpp" else weights)
                total, cpu = time.perf_counter() - start, time.process_time() - cpu
                seconds, calls = shim.take()
                if k == 0 and r == 0:
                    continue
                runs.append({"total": total, "cpu": cpu, "seconds": seconds, "calls": calls})
            row["decode"] = {"file": label, "bytes": len(data), **_median_run(runs)}
            row["decode"]["psnr"] = _psnr(rgb, pixels)
        rows.append(row)
        print(f"{phase} {path.name}: " + json.dumps({k: v.get("total") for k, v in row.items()
                                                      if isinstance(v, dict)}), file=sys.stderr, flush=True)
    return {"rows": rows, "one_pass_rate": args.rate, "weights_sha256": weights.sha256,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_model_load_mb": base_rss, "torch_threads": torch.get_num_threads()}


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def reference_search_counts(args: argparse.Namespace) -> dict:
    """Probe and encode counts of rate searches that succeed, with the tiny model 0 on the Kodak images.

    Used only to project a search's cost when the measured model reaches no target.
    The target is each image's one-pass size at the middle of the rate range, so
    the search has to work inside the range, as a real one does.
    """
    import numpy as np
    from PIL import Image

    from lcodec import engine

    counts = []
    lo, hi = engine.load_model(0).rate_range
    for path in sorted(KODAK.glob("kodim*.png"))[: args.images]:
        rgb = np.array(Image.open(path).convert("RGB"))
        size = len(engine.encode_array(rgb, "RGB", rate=(lo + hi) / 2 + 0.37, model_id=0).data)
        result = engine.encode_array(rgb, "RGB", size=size, model_id=0)
        counts.append((result.probes, result.encodes))
    return {"probes": statistics.median(p for p, _ in counts), "encodes": statistics.median(e for _, e in counts),
            "searches": len(counts), "how": "tiny model 0, size target = its one-pass size at q = mid-range + 0.37"}


def run_phase(phase: str, argv: list[str], files: Path) -> dict:
    out = files / f"{phase}.json"
    cmd = [sys.executable, "-m", "kodak_eval.speed", "--child", phase, "--files", str(files), "--child-out", str(out),
           *argv]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def summarize(enc: dict, dec: dict, args: argparse.Namespace, search_counts: dict | None) -> dict:
    from lcodec import engine, refine
    from lcodec.models.registry import CHOICE_MODEL_IDS

    # The model whose refinement steps the effort table counts (with --choice, the first one chosen between).
    model = (engine.Weights.load(args.weights).model if args.weights and not args.choice
             else engine.load_model(CHOICE_MODEL_IDS[0] if args.choice else args.model))

    rows = [{**e, **d} for e, d in zip(enc["rows"], dec["rows"])]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    bpp_ok = [r for r in rows if r["bpp"]["status"] == "ok"]

    def shares(phase_rows: list[dict], parts: list[str]) -> dict:
        total = sum(r["total"] for r in phase_rows)
        out = {p: sum(r.get(p, 0.0) for r in phase_rows) / total for p in parts}
        out["other"] = 1 - sum(out.values())
        return {k: round(v, 4) for k, v in out.items()}

    def enc_parts(phase_rows: list[dict]) -> list[dict]:
        return [{**r, "real_encodes_excl_coder": r.get("real_encodes", 0) + r.get("measures", 0) - r.get("range_encode", 0)}
                for r in phase_rows]

    def by_effort(effort: int) -> dict:
        runs = [r["bpp" if effort == 0 else f"effort{effort}"] for r in rows]  # effort 0: the `bpp` encode
        ok = [r for r in runs if r["status"] == "ok"]
        return {"effort": effort, "iterations": refine.iterations(effort, model), "reached": len(ok),
                "median_s": med([r["total"] for r in runs]), "median_cpu_s": med([r["cpu"] for r in runs]),
                "median_bpp": med([r["bpp"] for r in ok]),
                "mean_psnr": sum(r["psnr"] for r in ok) / len(ok) if ok else None}

    one_pass = [r["one_pass"] for r in rows]
    summary = {
        "what": "wall-clock seconds per image (median of --runs runs after one warm-up), peak RSS per phase process",
        "images": len(rows), "runs": args.runs, "bpp_target": args.bpp, "one_pass_rate": enc["one_pass_rate"],
        "model_id": args.model, "choice": args.choice, "weights": str(args.weights) if args.weights else "installed",
        "weights_sha256": enc["weights_sha256"],
        "torch_threads": enc["torch_threads"], "cpus": os.cpu_count(), "machine": platform.platform(),
        "load_average_start": args.load_start, "load_average_end": os.getloadavg(),
        "commit": git_state(ROOT)["commit"],
        "encode_at_bpp": {
            "reached": len(bpp_ok), "unreachable": len(rows) - len(bpp_ok),
            "median_s": med([r["bpp"]["total"] for r in rows]),
            "median_cpu_s": med([r["bpp"]["cpu"] for r in rows]),
            "median_s_reached": med([r["bpp"]["total"] for r in bpp_ok]),
            "median_probes": med([r["bpp"]["calls"].get("probes", 0) for r in rows]),
            "median_real_encodes": med([r["bpp"]["calls"].get("real_encodes", 0) for r in rows]),
            "median_measures": med([r["bpp"]["calls"].get("measures", 0) for r in rows]),
            "inside_probes_and_encodes_s": {k: med([r["bpp"].get(k, 0.0) for r in rows])
                                            for k in ("h_a", "h_s", "table_costs")},
            "shares": shares(enc_parts([r["bpp"] for r in rows]),
                             ["g_a", "probes", "range_encode", "real_encodes_excl_coder"]),
        },
        "encode_by_effort": [by_effort(e) for e in args.efforts],
        "encode_one_pass": {
            "median_s": med([r["total"] for r in one_pass]),
            "median_cpu_s": med([r["cpu"] for r in one_pass]),
            "median_bpp": med([r.get("bpp", 0) for r in one_pass]),
            "shares": shares(enc_parts(one_pass), ["g_a", "range_encode", "real_encodes_excl_coder"]),
            "median_g_a_s": med([r.get("g_a", 0) for r in one_pass]),
            "median_real_encode_s": med([r.get("real_encodes", 0) for r in one_pass]),
        },
        "decode": {
            "median_s": med([r["decode"]["total"] for r in rows]),
            "median_cpu_s": med([r["decode"]["cpu"] for r in rows]),
            "shares": shares([r["decode"] for r in rows], ["range_decode", "h_s", "g_s"]),
            "median_psnr_db": med([r["decode"]["psnr"] for r in rows]),
            "files": collections.Counter(r["decode"]["file"] for r in rows),
        },
        "peak_rss_mb": {"encode": enc["peak_rss_mb"], "decode": dec["peak_rss_mb"],
                        "after_model_load": {"encode": enc["rss_after_model_load_mb"],
                                             "decode": dec["rss_after_model_load_mb"]}},
        "targets": TARGETS,
        "rows": rows,
    }
    probe_s = med([r["bpp"]["probes"] / r["bpp"]["calls"]["probes"] for r in rows if r["bpp"]["calls"].get("probes")])
    summary["median_probe_s"] = probe_s
    if search_counts:
        p, e = search_counts["probes"], search_counts["encodes"]
        summary["projected_encode_s"] = {
            "value": summary["encode_one_pass"]["median_g_a_s"] + p * probe_s
            + e * summary["encode_one_pass"]["median_real_encode_s"],
            "formula": f"g_a + {p:g} probes x {probe_s:.4f} s + {e:g} real encodes", "counts": search_counts}
    return summary


def _efforts(value: str) -> list[int]:
    """`--efforts`: comma-separated levels 0..MAX_EFFORT, sorted, without repeats."""
    try:
        efforts = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not efforts or not all(0 <= e <= MAX_EFFORT for e in efforts):
        raise argparse.ArgumentTypeError(f"efforts must be integers from 0 to {MAX_EFFORT}, got {value!r}")
    return efforts


def markdown(s: dict) -> str:
    e, o, d, rss = s["encode_at_bpp"], s["encode_one_pass"], s["decode"], s["peak_rss_mb"]
    ok = lambda v, t: "yes" if v is not None and v <= t else "NO"  # noqa: E731
    lines = [
        f"# lcodec speed on Kodak ({s['images']} images, model {s['model_id']}, weights: {s['weights']}"
        + (f"; bpp encodes choose per image between models {', '.join(map(str, CHOICE_MODEL_IDS))})" if s.get("choice") else ")"),
        "",
        f"Weights SHA-256 {s['weights_sha256']}. "
        f"Median wall-clock seconds per 768x512 image over {s['runs']} runs after a warm-up; "
        f"{s['torch_threads']} torch threads on {s['cpus']} CPUs; load average {s['load_average_start'][0]:.1f} "
        f"at start, {s['load_average_end'][0]:.1f} at end (other jobs share the CPUs); commit {s['commit']}. "
        "CPU s is the process's CPU time (all threads): less sensitive to other jobs than wall time.",
        "",
        "| phase | median s | median CPU s | target s | met | shares of time |",
        "|---|---:|---:|---:|:-:|---|",
        f"| encode at {s['bpp_target']:g} bpp (search included; reached on {e['reached']}/{s['images']}) | "
        f"{e['median_s']:.3f} | {e['median_cpu_s']:.3f} | {TARGETS['encode_s']} | {ok(e['median_s'], TARGETS['encode_s'])} | "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in e["shares"].items()) + " |",
        f"| encode one pass at q = {s['one_pass_rate']:g} (no search; {o['median_bpp']:.3f} bpp) | {o['median_s']:.3f} | {o['median_cpu_s']:.3f} | | | "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in o["shares"].items()) + " |",
        f"| decode | {d['median_s']:.3f} | {d['median_cpu_s']:.3f} | {TARGETS['decode_s']} | {ok(d['median_s'], TARGETS['decode_s'])} | "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in d["shares"].items()) + " |",
        "",
        f"Peak RSS: encode {rss['encode']:.0f} MB, decode {rss['decode']:.0f} MB (target {TARGETS['peak_rss_mb']} MB; "
        f"after importing torch and loading the model: {rss['after_model_load']['encode']:.0f} MB).",
        f"Rate search at {s['bpp_target']:g} bpp: median {e['median_probes']:g} probes, {e.get('median_measures', 0):g} "
        f"measures and {e['median_real_encodes']:g} real encodes per image; one probe takes {s['median_probe_s']:.4f} s. Inside probes and real encodes "
        "(median s per image): " + ", ".join(f"{k} {v:.3f}" for k, v in e["inside_probes_and_encodes_s"].items()) + ".",
    ]
    base = e["median_s"]
    lines += ["", f"Encode at {s['bpp_target']:g} bpp by effort (`--efforts`; rate search and refinement "
              "included; median s per image):", "",
              "| effort | refinement steps | median s | median CPU s | × effort 0 | median bpp | mean PSNR (dB) | "
              "Δ PSNR vs effort 0 | reached |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    psnr0 = next((x.get("mean_psnr") for x in s["encode_by_effort"] if x["effort"] == 0), None)
    for x in s["encode_by_effort"]:
        ratio = f"{x['median_s'] / base:.1f}" if base and x["median_s"] is not None else "–"
        bpp = "–" if x["median_bpp"] is None else f"{x['median_bpp']:.3f}"
        psnr = x.get("mean_psnr")
        gain = f"{psnr - psnr0:+.2f}" if psnr is not None and psnr0 is not None else "–"
        lines.append(f"| {x['effort']} | {x['iterations']} | {x['median_s']:.3f} | {x['median_cpu_s']:.3f} | {ratio} | "
                     f"{bpp} | {'–' if psnr is None else f'{psnr:.2f}'} | {gain} | {x['reached']}/{s['images']} |")
    if "projected_encode_s" in s:
        p = s["projected_encode_s"]
        lines.append(f"Projected encode with a working search: {p['value']:.3f} s = {p['formula']} "
                     f"(counts: {p['counts']['how']}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpp", type=float, default=0.25)
    parser.add_argument("--rate", type=float, default=None,
                        help="rate parameter of the one-pass encode (default: the level trained for the rate nearest --bpp)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--model", type=int, default=DEFAULT_MODEL_ID)
    parser.add_argument("--weights", type=Path,
                        help="time this frozen weights file (installed or not) under --model's id, "
                             "instead of that model's installed weights")
    parser.add_argument("--choice", action="store_true",
                        help="encode to --bpp as the API does: with each model of CHOICE_MODEL_IDS, keeping the "
                             "file with the higher PSNR (the one-pass encode stays --model's)")
    parser.add_argument("--efforts", type=_efforts, default=[DEFAULT_EFFORT],
                        help="also time the encode at --bpp at these effort levels, e.g. 0,1,5,9 "
                             f"(0-{MAX_EFFORT}; default: the library's default, {DEFAULT_EFFORT})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "speed")
    parser.add_argument("--child", choices=["encode", "decode"], help=argparse.SUPPRESS)
    parser.add_argument("--files", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(args.child, args, args.files)))
        return 0
    if not KODAK.is_dir():
        parser.error(f"the Kodak images are not at {os.path.normpath(KODAK)}")
    args.load_start = os.getloadavg()
    passed = [f"--bpp={args.bpp}", f"--runs={args.runs}", f"--images={args.images}", f"--model={args.model}",
              f"--threads={args.threads}", f"--efforts={','.join(map(str, args.efforts))}"] + (
              [f"--rate={args.rate}"] if args.rate is not None else []) + (
              [f"--weights={args.weights}"] if args.weights else []) + (["--choice"] if args.choice else [])
    with tempfile.TemporaryDirectory(prefix="lcodec-speed-") as tmp:
        enc = run_phase("encode", passed, Path(tmp))
        dec = run_phase("decode", passed, Path(tmp))
    reached = [r for r in enc["rows"] if r["bpp"]["status"] == "ok"]
    counts = None
    if not reached:
        counts = reference_search_counts(args)
    summary = summarize(enc, dec, args, counts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(summary, indent=1))
    (args.out / "speed.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
