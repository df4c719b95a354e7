"""Write one run's results folder: results.json, summary.md, rd.png, rate_accuracy.png.

The JSON is self-describing: it carries the git commit, the lcodec model digest,
every codec's version and settings, the metric and aggregation definitions, the
date and the machine, next to every per-image number. The Markdown and the
plots are views of the same data.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from . import metrics, summary
from .bench import RunLog, machine_id
from .codecs import EFFORT_TARGETS, Codec, LcodecCodec, PeerCodec


def git_state(repo: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _clean(x: object) -> object:
    """JSON has no inf/NaN: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def codec_descriptions(codecs: Sequence[Codec], log: RunLog) -> dict:
    out = {}
    for c in codecs:
        d = {"label": c.label, "version": log.codec_versions.get(c.name), "settings": c.settings(), "bytes_counted": c.stream}
        if isinstance(c, PeerCodec):
            d["knob"] = c.knob
        out[c.name] = d
    return out


def _lcodec_models(lcodec: LcodecCodec) -> dict:
    """The one-pass model (`model_info`) and the models a `bpp=` encode chooses between."""
    from lcodec.models.registry import CHOICE_MODEL_IDS, MODELS

    return {**lcodec.model_info(), "choice": ", ".join(f"{MODELS[i].name} (id {i})" for i in CHOICE_MODEL_IDS)}


def build(log: RunLog, codecs: Sequence[Codec], *, targets: Sequence[float], images_dir: Path, repo: Path,
          threads: int, argv: Sequence[str], published: dict | None) -> dict:
    rows = summary.aggregate(log.results)
    lcodec = next((c for c in codecs if isinstance(c, LcodecCodec)), None)
    labels = {c.name: c.label for c in codecs}
    return _clean({
        "schema": "lcodec kodak_eval results 1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m kodak_eval", *argv]),
        "git": git_state(repo),
        "machine": {"cpu": machine_id(), "python": sys.version.split()[0], "platform": platform.platform(),
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "threads_per_codec": threads},
        "lcodec_model": _lcodec_models(lcodec) if lcodec is not None else None,
        "images": {"folder": str(images_dir), "count": len(log.images), "list": log.images},
        "targets_bpp": list(targets),
        "effort_targets_bpp": list(EFFORT_TARGETS),
        "codecs": codec_descriptions(codecs, log),
        "skipped_codecs": log.skipped,
        "definitions": metrics.DEFINITIONS,
        "bd_range_bpp": list(summary.BD_RANGE),
        "published_reference": (published or {}).get("description"),
        "run_seconds": log.seconds,
        "results_from_cache": sum(r.cached for r in log.results),
        "cache_machines": sorted({r.machine for r in log.results if r.cached}),
        "failures": log.failures,
        "not_reached": summary.reach_lines(rows, labels),
        "notes": log.notes,
        "aggregates": rows,
        "bd": summary.bd_table(rows),
        "speed": summary.speed_table(log.results),
        "results": [asdict(r) for r in log.results],
    })


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _effort(doc: dict, codec: str) -> int:
    """The encode effort of an lcodec codec (0: one pass); 0 for a peer (whose own `effort` setting,
    as JPEG XL's, is another knob)."""
    if not codec.startswith("lcodec"):
        return 0
    return doc["codecs"].get(codec, {}).get("settings", {}).get("effort", 0)


def _effort_lines(doc: dict) -> list[str]:
    """One line per effort codec: its effort, and the targets it ran at (it is slow)."""
    allowed = ", ".join(f"{t:g}" for t in doc["effort_targets_bpp"])
    lines = []
    for name, d in doc["codecs"].items():
        if _effort(doc, name):
            ran = sorted({r["target_bpp"] for r in doc["aggregates"] if r["codec"] == name})
            lines.append(f"- {d['label']}: `effort={_effort(doc, name)}`, {d['settings']['refine_iterations']} "
                         f"refinement steps per model; slow, so it runs only at {allowed} bpp (in this run: "
                         f"{', '.join(f'{t:g}' for t in ran) or 'none'})")
    return lines


def markdown(doc: dict) -> str:
    rows = doc["aggregates"]
    labels = {k: v["label"] for k, v in doc["codecs"].items()}
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    fixed = [c for c in codecs if c != "lcodec-1pass"]
    targets = sorted({r["target_bpp"] for r in rows if r["codec"] != "lcodec-1pass"})
    cell = {(r["codec"], r["target_bpp"]): r for r in rows}

    def pivot(title: str, fmt) -> list[str]:
        out = [f"### {title}", "", "| codec | " + " | ".join(f"{t:g}" for t in targets) + " |",
               "|---|" + "---:|" * len(targets)]
        for c in fixed:
            out.append(f"| {labels.get(c, c)} | " + " | ".join(fmt(cell.get((c, t))) for t in targets) + " |")
        return out + [""]

    def mark(r: dict) -> str:
        return "" if r["status"].get("ok", 0) == r["n_images"] else "†"

    g = doc["git"]
    model = doc["lcodec_model"]
    lines = [
        "# kodak_eval results", "",
        f"- date: {doc['date']}; command: `{doc['command']}`",
        f"- git: {g['commit']}{' (dirty)' if g['dirty'] else ''}",
        (f"- lcodec models: `bpp=` the better file per image of {model['choice']}; one pass {model['name']} "
         f"{model['digest']}" if model and model.get("choice") else
         f"- lcodec model: {model['name']} {model['digest']}" if model else "- lcodec: not measured in this run"),
        f"- machine: {doc['machine']['cpu']}; {doc['machine']['threads_per_codec']} thread(s) per codec",
        f"- images: {doc['images']['count']} from `{doc['images']['folder']}`; run time {doc['run_seconds']:.0f} s "
        f"({doc['results_from_cache']} peer results from cache)",
        *_effort_lines(doc),
        "- every number is from a real file: bpp = 8 × file bytes (headers included) / (H × W); metrics on 8-bit RGB; "
        "means over images. Definitions, versions and per-image values: `results.json`.", "",
        "Peers are driven to each target by bisection on their quality knob (highest quality with file ≤ target). "
        "† = not every image met the target normally (see *Targets not met*).", "",
        "## Rate–distortion", "",
    ]
    lines += pivot("PSNR (dB, RGB)", lambda r: "–" if r is None or r["psnr"] is None else f"{r['psnr']:.2f}{mark(r)}")
    lines += pivot("MS-SSIM (RGB)", lambda r: "–" if r is None or r["ms_ssim"] is None else f"{r['ms_ssim']:.4f}{mark(r)}")
    lines += pivot("SSIM (RGB)", lambda r: "–" if r is None or r["ssim"] is None else f"{r['ssim']:.4f}{mark(r)}")
    lines += ["## Rate accuracy", ""]
    lines += pivot("achieved bpp: mean ± std [min, max]", lambda r: "–" if r is None or r["bpp"]["mean"] is None else
                   f"{r['bpp']['mean']:.3f} ± {r['bpp']['std']:.3f} [{r['bpp']['min']:.3f}, {r['bpp']['max']:.3f}]")
    lines += pivot("share of images within ±15 % / within −3 %…0 % of the target",
                   lambda r: "–" if r is None else f"{100 * r['bpp']['within_15pct']:.0f} % / {100 * r['bpp']['within_m3_0pct']:.0f} %")
    onepass = [r for r in rows if r["codec"] == "lcodec-1pass"]
    if onepass:
        lines += ["### lcodec one pass (`rate=i`): each trained level, target = the level's nominal bpp", "",
                  "| level | target bpp | mean ± std [min, max] bpp | ±15 % | −3 %…0 % | PSNR | MS-SSIM |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in onepass:
            b = r["bpp"]
            lines.append(f"| {', '.join(str(int(q)) for q in r['quality'])} | {r['target_bpp']:g} | "
                         f"{_f(b['mean'], '.3f')} ± {_f(b['std'], '.3f')} [{_f(b['min'], '.3f')}, {_f(b['max'], '.3f')}] | "
                         f"{100 * b['within_15pct']:.0f} % | {100 * b['within_m3_0pct']:.0f} % | {_f(r['psnr'], '.2f')} | "
                         f"{_f(r['ms_ssim'], '.4f')} |")
        lines.append("")
    lines += ["## BD-rate / BD-PSNR of lcodec against each peer", "",
              f"Bjøntegaard with piecewise cubic (PCHIP) interpolation over targets {doc['bd_range_bpp'][0]:g}–"
              f"{doc['bd_range_bpp'][1]:g} bpp (mean points; a target where some image has no file is left out). "
              "Negative BD-rate = lcodec needs fewer bits for the same PSNR.", ""]
    if doc["bd"]:
        lines += ["| lcodec mode | against | BD-rate | BD-PSNR | points (lcodec/peer) |", "|---|---|---:|---:|---:|"]
        for b in doc["bd"]:
            lines.append(f"| {b['test']} | {labels.get(b['anchor'], b['anchor'])} | {_f(b['bd_rate_pct'], '+.1f')} % | "
                         f"{_f(b['bd_psnr_db'], '+.2f')} dB | {b['points_test']}/{b['points_anchor']} |")
    else:
        lines.append("(lcodec was not measured in this run.)")
    lines += ["", "## Speed", "",
              "Median over all files of one encode / decode call (peers: the encode at the chosen quality, not the search; "
              "lcodec `bpp=`: including its rate search, and at an effort its refinement, over its targets only). Wall and process-CPU seconds; × = ratio of wall times to lcodec (`bpp=`), × 1-pass to lcodec `rate=i`. "
              "Under CPU contention CPU time is the fairer comparison.", "",
              "| codec | encode s | decode s | encode CPU s | decode CPU s | encode × | decode × | encode × 1-pass | decode × 1-pass |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in doc["speed"]:
        lines.append(f"| {labels.get(s['codec'], s['codec'])} | {_f(s['encode_s'], '.4f')} | {_f(s['decode_s'], '.4f')} | "
                     f"{_f(s['encode_cpu_s'], '.4f')} | {_f(s['decode_cpu_s'], '.4f')} | "
                     f"{_f(s['encode_s_vs_lcodec'], '.2f')} | {_f(s['decode_s_vs_lcodec'], '.2f')} | "
                     f"{_f(s['encode_s_vs_lcodec-1pass'], '.2f')} | {_f(s['decode_s_vs_lcodec-1pass'], '.2f')} |")
    lines += ["", "## Codecs", "", "| codec | version | settings | bytes counted |", "|---|---|---|---|"]
    for name, d in doc["codecs"].items():
        settings = ", ".join(f"{k}={v}" for k, v in d["settings"].items())
        lines.append(f"| {d['label']} | {d['version']} | {settings}{'; knob: ' + d['knob'] if 'knob' in d else ''} | {d['bytes_counted']} |")
    for name, why in doc["skipped_codecs"].items():
        lines.append(f"| {name} | skipped: {why} | | |")
    for title, items in (("Targets not met", doc["not_reached"]), ("Failures", doc["failures"]), ("Notes", doc["notes"])):
        lines += ["", f"## {title}", ""] + ([f"- {x}" for x in items] or ["- none"])
    lines += ["", "Plots: `rd.png` (PSNR and MS-SSIM vs bpp, published curves dashed, effort codecs dash-dotted), "
              "`rate_accuracy.png`.", ""]
    return "\n".join(lines)


def _published_codec(name: str) -> str | None:
    """Our codec key for a published curve of the same codec family, by its name."""
    low = name.lower()
    for prefix, codec in (("jpeg 2000", "jpeg2000"), ("jpeg xl", "jpegxl"), ("jpeg", "jpeg"), ("webp", "webp"),
                          ("bpg", "hevc"), ("av1", "avif")):
        if low.startswith(prefix):
            return codec
    return None


def plots(doc: dict, published: dict | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["aggregates"]
    labels = {k: v["label"] for k, v in doc["codecs"].items()}
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    xmax = 1.15 * max(doc["targets_bpp"] + [r["target_bpp"] for r in rows])
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    colours = plt.get_cmap("tab10")
    for ax, key, ylabel in ((axes[0], "psnr", "PSNR (dB, RGB)"), (axes[1], "ms_ssim", "MS-SSIM (dB) = −10·log10(1 − MS-SSIM)")):
        def y(v: float) -> float:
            return v if key == "psnr" else metrics.ms_ssim_db(v)

        for i, codec in enumerate(codecs):
            pts = [(r["bpp"]["mean"], y(r[key]), r["status"].get("ok", 0) == r["n_images"]) for r in rows
                   if r["codec"] == codec and r[key] is not None and r["bpp"]["mean"] is not None]
            if not pts:
                continue
            style = dict(color=colours(i % 10), lw=2.2 if codec.startswith("lcodec") else 1.4)
            line = "-." if _effort(doc, codec) else "-"  # an effort codec: dash-dot (published curves are dashed)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], line, label=labels.get(codec, codec), **style)
            ax.plot([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], "o", ms=5, color=style["color"])
            ax.plot([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], "o", ms=5, mfc="none", color=style["color"])
        others = iter(plt.get_cmap("Dark2").colors * 3)
        for name, c in ((published or {}).get("curves") or {}).items():
            vals = c.get("psnr" if key == "psnr" else "ms-ssim")
            if not vals:
                continue
            pts = [(b, y(v)) for b, v in zip(c["bpp"], vals) if b <= xmax]
            same = _published_codec(name)  # the measured codec it corresponds to, drawn in that colour
            colour = colours(codecs.index(same) % 10) if same in codecs else next(others)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1.0, color=colour, label=f"{name} (published)")
        ax.set_xlim(0, xmax)
        ax.set_xlabel("bits per pixel (8 × file bytes / pixels)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"Kodak, {doc['images']['count']} images: mean PSNR vs mean bpp")
    axes[1].set_title("mean MS-SSIM vs mean bpp (hollow: some image missed the target)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.74, 1))
    path = out / "rd.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    results = doc["results"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=False)
    groups = [("lcodec modes", [c for c in codecs if c.startswith("lcodec")]),
              ("peers (quality knob searched)", [c for c in codecs if not c.startswith("lcodec")])]
    for ax, (title, names) in zip(axes, groups):
        ts = sorted({r["target_bpp"] for r in results if r["codec"] in names}) or doc["targets_bpp"]
        ax.axhspan(0.85, 1.15, color="tab:green", alpha=0.12, label="±15 % (JPEG AI tolerance)")
        ax.axhspan(0.97, 1.0, color="tab:green", alpha=0.3, label="−3 %…0 %")
        ax.axhline(1.0, color="k", lw=0.8)
        clip = (0.5, 1.5) if ax is axes[0] else (0.0, math.inf)
        for k, codec in enumerate(names):
            mine = [r for r in results if r["codec"] == codec]
            pts = [(r["target_bpp"], r["bpp"] / r["target_bpp"]) for r in mine if r["bpp"] is not None]
            missing = len(mine) - len(pts)
            shift = 1 + 0.035 * (k - (len(names) - 1) / 2)  # side by side on the log axis
            colour = colours(codecs.index(codec) % 10)
            label = labels.get(codec, codec) + (f" ({missing} without a file)" if missing else "")
            inside = [p for p in pts if clip[0] <= p[1] <= clip[1]]
            ax.plot([p[0] * shift for p in inside], [p[1] for p in inside], ".", ms=4, alpha=0.7, label=label, color=colour)
            for marker, edge, beyond in (("^", clip[1], [p for p in pts if p[1] > clip[1]]),
                                         ("v", clip[0], [p for p in pts if p[1] < clip[0]])):
                if beyond:  # off the scale: drawn on the edge, not hidden
                    ax.plot([p[0] * shift for p in beyond], [edge] * len(beyond), marker, ms=5, color=colour, clip_on=False)
        if not names:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.set_xlim(min(ts) / 1.25, max(ts) * 1.25)
        ax.set_xticks(ts, [f"{t:g}" for t in ts], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("target bpp (one-pass: the level's nominal bpp)")
        ax.set_ylabel("achieved / target bpp, per image")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    axes[0].set_ylim(0.5, 1.5)
    axes[0].set_title("lcodec modes (▲/▼: beyond the scale)")
    fig.tight_layout()
    path = out / "rate_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def write(doc: dict, published: dict | None, out: Path) -> list[Path]:
    """Plots first, so a plotting failure is recorded in the JSON and Markdown written after it."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        paths = plots(doc, published, out)
    except ImportError as exc:
        paths = []
        doc["failures"].append(f"plots not drawn: {exc} (install the bench extra)")
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(doc))
    return [out / "results.json", out / "summary.md", *paths]
