"""Aggregate per-image results into the tables users read.

Pure functions of `Result` lists; the definitions they implement are in
`metrics.DEFINITIONS` and travel with the results.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict

from . import metrics
from .bench import Result
from .codecs import EFFORT_NAMES

BD_RANGE = (0.12, 1.0)  # bpp targets whose mean points enter BD-rate / BD-PSNR
LCODEC_MODES = ("lcodec", *EFFORT_NAMES, "lcodec-1pass")
SPEED_REFS = ("lcodec", "lcodec-1pass")  # the speed table's ratios are to these


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _median(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def aggregate(results: Sequence[Result]) -> list[dict]:
    """One row per (codec, target), in the order codecs first appear, targets rising."""
    groups: dict[tuple[str, float], list[Result]] = defaultdict(list)
    order: list[str] = []
    for r in results:
        if r.codec not in order:
            order.append(r.codec)
        groups[(r.codec, r.target_bpp)].append(r)
    rows = []
    for codec in order:
        for target in sorted(t for c, t in groups if c == codec):
            rs = groups[(codec, target)]
            files = [r for r in rs if r.has_file]
            acc = metrics.rate_accuracy([r.bpp for r in rs], target)
            rows.append({
                "codec": codec,
                "target_bpp": target,
                "n_images": len(rs),
                "n_files": len(files),
                "status": dict(Counter(r.status for r in rs)),
                "psnr": _mean([r.psnr for r in files]),
                "ssim": _mean([r.ssim for r in files]),
                "ms_ssim": _mean([r.ms_ssim for r in files]),
                "bpp": asdict(acc),
                "quality": sorted({r.quality for r in files if r.quality is not None}),
                "median_encode_s": _median([r.encode_s for r in files]),
                "median_decode_s": _median([r.decode_s for r in files]),
                "median_encode_cpu_s": _median([r.encode_cpu_s for r in files]),
                "median_decode_cpu_s": _median([r.decode_cpu_s for r in files]),
            })
    return rows


def curve(rows: Sequence[dict], codec: str, lo: float = 0.0, hi: float = float("inf")) -> tuple[list[float], list[float]]:
    """(mean bpp, mean PSNR) points of `codec` for targets in [lo, hi] where every image has a file."""
    pts = [(r["bpp"]["mean"], r["psnr"]) for r in rows
           if r["codec"] == codec and lo - 1e-9 <= r["target_bpp"] <= hi + 1e-9
           and r["n_files"] == r["n_images"] and r["psnr"] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def bd_table(rows: Sequence[dict], method: str = "pchip") -> list[dict]:
    """BD-rate and BD-PSNR of each lcodec mode against each other codec, over BD_RANGE."""
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    out = []
    for test in (c for c in LCODEC_MODES if c in codecs):
        rt, dt = curve(rows, test, *BD_RANGE)
        for anchor in (c for c in codecs if c not in LCODEC_MODES):
            ra, da = curve(rows, anchor, *BD_RANGE)
            out.append({
                "test": test,
                "anchor": anchor,
                "points_test": len(rt),
                "points_anchor": len(ra),
                "bd_rate_pct": metrics.bd_rate(ra, da, rt, dt, method),
                "bd_psnr_db": metrics.bd_psnr(ra, da, rt, dt, method),
            })
    return out


def speed_table(results: Sequence[Result]) -> list[dict]:
    """Median encode/decode wall and CPU times per codec over all its files (an effort codec's are
    at its fewer targets), with ratios to lcodec `bpp=` and one pass."""
    by_codec: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        if r.has_file:
            by_codec[r.codec].append(r)
    rows = []
    for codec, rs in by_codec.items():
        rows.append({"codec": codec, "n": len(rs),
                     **{k: _median([getattr(r, k) for r in rs]) for k in ("encode_s", "decode_s", "encode_cpu_s", "decode_cpu_s")}})
    for ref in SPEED_REFS:
        base = next((r for r in rows if r["codec"] == ref), None)
        for row in rows:
            for k in ("encode_s", "decode_s", "encode_cpu_s", "decode_cpu_s"):
                ok = base is not None and base[k] and row[k] is not None
                row[f"{k}_vs_{ref}"] = row[k] / base[k] if ok else None
    return rows


def reach_lines(rows: Sequence[dict], labels: dict[str, str]) -> list[str]:
    """One line per (codec, target) where some image did not meet the target normally."""
    lines = []
    for r in rows:
        st = r["status"]
        n = r["n_images"]
        name = labels.get(r["codec"], r["codec"])
        mean = r["bpp"]["mean"]
        if st.get("overshoot"):
            lines.append(f"{name} at {r['target_bpp']:g} bpp: {st['overshoot']}/{n} images over the byte budget even at "
                         f"the lowest quality (that file is reported; mean achieved {mean:.3f} bpp)")
        if st.get("undershoot"):
            lines.append(f"{name} at {r['target_bpp']:g} bpp: {st['undershoot']}/{n} images under the target even at "
                         f"the highest quality (mean achieved {mean:.3f} bpp)")
        if st.get("unreachable"):
            lines.append(f"{name} at {r['target_bpp']:g} bpp: {st['unreachable']}/{n} images unreachable (RateError, no file)")
        if st.get("error"):
            lines.append(f"{name} at {r['target_bpp']:g} bpp: {st['error']}/{n} images failed with an error")
    return lines
