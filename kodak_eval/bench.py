"""Run every codec on every image and target, and keep one `Result` per triple.

Images are processed one at a time (so 4K folders need one image in memory),
each codec's targets in rising order so a peer's probes are shared between
targets. Peer results are cached by image pixel hash, codec, codec version,
settings and target; lcodec is always recomputed, since it is what changes.
Nothing here raises on bad input: an unreadable image or a codec failure
becomes a line in `RunLog.failures` and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from . import metrics
from .codecs import EFFORT_TARGETS, Codec, LcodecCodec, PeerCodec
from .search import Prober, search

SEARCH_VERSION = "bracket-falsepos-1"  # bump when search.py changes which file it picks


@dataclass(frozen=True)
class Result:
    """One codec on one image at one target. Sizes and metrics come from the real file."""

    image: str
    image_sha256: str
    height: int
    width: int
    codec: str
    target_bpp: float
    status: str  # ok | overshoot | undershoot | unreachable | error
    quality: float | None = None  # peer knob value; lcodec-1pass level index
    bytes: int | None = None
    bpp: float | None = None
    psnr: float | None = None  # None also when lossless (MSE 0); see message
    ssim: float | None = None
    ms_ssim: float | None = None
    encode_s: float | None = None
    encode_cpu_s: float | None = None
    decode_s: float | None = None
    decode_cpu_s: float | None = None
    search_encodes: int | None = None
    message: str | None = None
    machine: str = ""
    cached: bool = False

    @property
    def has_file(self) -> bool:
        return self.bytes is not None


@dataclass
class RunLog:
    results: list[Result] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # name, sha256, height, width, note
    failures: list[str] = field(default_factory=list)  # each makes the exit status non-zero
    notes: list[str] = field(default_factory=list)
    codec_versions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # codec -> why
    seconds: float = 0.0


def machine_id() -> str:
    """CPU model and core count: what timings depend on (the host name does not)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def load_rgb(path: Path) -> tuple[np.ndarray, str | None]:
    """8-bit RGB pixels of an image file and a note if they had to be converted."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im), None
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im).astype(np.int64)
            top = 65535 if mode.startswith("I;16") or a.max() > 255 else 255
            a = np.clip(np.rint(a * 255.0 / top), 0, 255).astype(np.uint8)
            return np.repeat(a[:, :, None], 3, axis=2), f"converted from {mode} grey to 8-bit RGB"
        return np.asarray(im.convert("RGB")), f"converted from mode {mode} to RGB" + (
            " (alpha dropped)" if "A" in mode else ""
        )


def pixel_sha256(rgb: np.ndarray) -> str:
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}x{rgb.shape[2]}:".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


class Cache:
    """Append-only JSON-lines store of peer results; a torn last line is ignored."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["result"]
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(sha: str, codec: PeerCodec, version: str, target: float) -> str:
        ident = [sha, codec.name, version, codec.settings(), codec.knob, SEARCH_VERSION, round(target, 6)]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Result | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        names = {f.name for f in fields(Result)}
        return Result(**{k: v for k, v in entry.items() if k in names and k != "cached"}, cached=True)

    def put(self, key: str, result: Result) -> None:
        if self.path is None:
            return
        record = {k: v for k, v in asdict(result).items() if k != "cached"}
        self.entries[key] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "result": record}) + "\n")


def _warm_up(codec: Codec) -> None:
    """One untimed encode/decode so library and model loading do not land in the first timing.

    Best effort: if it fails, the real encode fails too and is reported there.
    """
    rgb = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    try:
        if isinstance(codec, PeerCodec):
            q = codec.qualities()
            codec.decode(codec.encode(rgb, q[len(q) // 2]))
        elif isinstance(codec, LcodecCodec):
            codec.prepare()
            codec.decode(codec.warm_up_encode(rgb))
    except Exception:  # noqa: BLE001
        pass


def _measure(codec: Codec, rgb: np.ndarray, data: bytes, base: dict) -> Result:
    """Decode `data`, time it and fill in size and quality metrics."""
    h, w = rgb.shape[:2]
    w0, c0 = time.perf_counter(), time.process_time()
    decoded = codec.decode(data)
    decode_s, decode_cpu = time.perf_counter() - w0, time.process_time() - c0
    if decoded.shape != rgb.shape or decoded.dtype != np.uint8:
        raise RuntimeError(f"decoder returned {decoded.dtype} {decoded.shape}, expected uint8 {rgb.shape}")
    p = metrics.psnr(rgb, decoded)
    s, m = metrics.ssim_pair(rgb, decoded)
    message = base.pop("message", None)
    if p == float("inf"):
        message = "; ".join(x for x in (message, "lossless (MSE 0), PSNR left null") if x)
    return Result(**base, bytes=len(data), bpp=metrics.bpp(len(data), h, w), psnr=None if p == float("inf") else p,
                  ssim=s, ms_ssim=m, decode_s=decode_s, decode_cpu_s=decode_cpu, message=message)


def _tasks(codec: Codec, targets: Sequence[float], levels: Sequence[int] | None) -> list[tuple[float, int | None]]:
    """(target, level) pairs: lcodec one pass at its levels; an effort codec (slow) at the targets
    that are also in EFFORT_TARGETS; every other codec at every target."""
    if isinstance(codec, LcodecCodec) and codec.mode == "onepass":
        all_levels = codec.levels()
        chosen = range(len(all_levels)) if levels is None else levels
        return sorted((all_levels[i], i) for i in chosen)
    if isinstance(codec, LcodecCodec) and codec.effort:
        targets = [t for t in targets if any(abs(t - e) < 1e-9 for e in EFFORT_TARGETS)]
    return [(t, None) for t in sorted(targets)]


def run(
    image_paths: Sequence[Path],
    codecs: Sequence[Codec],
    targets: Sequence[float],
    cache: Cache,
    progress: bool = True,
    onepass_levels: Sequence[int] | None = None,
    threads: int = 1,
) -> RunLog:
    """Measure `codecs` (already checked available) on every image and target."""
    import torch
    from tqdm import tqdm

    # SSIM/MS-SSIM run in torch. On a loaded machine its default thread pool spins:
    # 2 threads took 9x the CPU time of 1 for one Kodak image here.
    torch.set_num_threads(threads)

    log = RunLog()
    start = time.perf_counter()
    machine = machine_id()
    for codec in codecs:
        log.codec_versions[codec.name] = codec.version()
    plan = {c.name: _tasks(c, targets, onepass_levels) for c in codecs}
    for codec in codecs:
        if isinstance(codec, LcodecCodec) and codec.effort and not plan[codec.name]:
            allowed = ", ".join(f"{t:g}" for t in EFFORT_TARGETS)
            log.notes.append(f"{codec.name} not measured: it runs only at {allowed} bpp")
    warmed: set[str] = set()
    hints: dict[tuple[str, float], int] = {}  # (codec, target) -> quality index chosen for the previous image
    bar = tqdm(total=len(image_paths) * sum(len(t) for t in plan.values()), unit="result", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    for path in image_paths:
        try:
            rgb, note = load_rgb(path)
            if rgb.shape[0] < 1 or rgb.shape[1] < 1:
                raise ValueError("empty image")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal
            log.failures.append(f"{path.name}: unreadable image ({type(exc).__name__}: {exc}); skipped")
            bar.update(sum(len(t) for t in plan.values()))
            continue
        sha = pixel_sha256(rgb)
        h, w = rgb.shape[:2]
        log.images.append({"name": path.name, "sha256": sha, "height": h, "width": w, "note": note})
        if note:
            log.notes.append(f"{path.name}: {note}")
        for codec in codecs:
            bar.set_description(f"{path.name} {codec.name}")
            for result in _run_codec(codec, rgb, path.name, sha, plan[codec.name], cache, machine, warmed, hints, log):
                log.results.append(result)
                if result.status == "error" or (isinstance(codec, LcodecCodec) and result.status == "overshoot"):
                    log.failures.append(f"{result.image}: {result.codec} at {result.target_bpp:g} bpp failed: {result.message}")
                bar.update(1)
    bar.close()
    log.seconds = time.perf_counter() - start
    return log


def _run_codec(codec: Codec, rgb: np.ndarray, name: str, sha: str, tasks: list[tuple[float, int | None]],
               cache: Cache, machine: str, warmed: set[str], hints: dict[tuple[str, float], int],
               log: RunLog) -> Iterator[Result]:
    h, w = rgb.shape[:2]
    version = log.codec_versions[codec.name]
    prober: Prober | None = None
    for target, level in tasks:
        base = {"image": name, "image_sha256": sha, "height": h, "width": w, "codec": codec.name,
                "target_bpp": target, "machine": machine}
        key = Cache.key(sha, codec, version, target) if isinstance(codec, PeerCodec) else None
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                yield replace(hit, image=name)  # the key is the pixels: the same image may have been renamed
                continue
        try:
            if codec.name not in warmed:
                _warm_up(codec)
                warmed.add(codec.name)
            if isinstance(codec, PeerCodec):
                qualities = codec.qualities()
                if prober is None:
                    prober = Prober(lambda i: codec.encode(rgb, qualities[i]), len(qualities))
                found = search(prober, metrics.byte_budget(target, h, w), hints.get((codec.name, target)))
                hints[(codec.name, target)] = found.index
                base.update(status=found.status, quality=qualities[found.index], encode_s=found.probe.wall_s,
                            encode_cpu_s=found.probe.cpu_s, search_encodes=found.encodes)
                if found.status == "overshoot":
                    base["message"] = f"even the lowest quality ({qualities[0]}) is over the budget"
                elif found.status == "undershoot":
                    base["message"] = f"even the highest quality ({qualities[-1]}) is under the budget"
                result = _measure(codec, rgb, found.probe.data, base)
                cache.put(key, result)
                yield result
            else:
                yield _run_lcodec(codec, rgb, target, level, base)
        except Exception as exc:  # noqa: BLE001 - a codec failure is a reported result, not a crash
            yield Result(**base, status="error", message=f"{type(exc).__name__}: {exc}")


def _run_lcodec(codec: LcodecCodec, rgb: np.ndarray, target: float, level: int | None, base: dict) -> Result:
    from lcodec.errors import RateError

    w0, c0 = time.perf_counter(), time.process_time()
    try:
        data = codec.encode(rgb, target, level=level)
    except RateError as exc:
        return Result(**base, status="unreachable", quality=level, message=f"RateError: {exc}")
    base.update(status="ok", quality=level, encode_s=time.perf_counter() - w0, encode_cpu_s=time.process_time() - c0,
                search_encodes=None)
    if codec.mode == "bpp" and len(data) > metrics.byte_budget(target, base["height"], base["width"]):
        # The contract is file <= target; say so loudly rather than average it in quietly.
        base.update(status="overshoot", message="lcodec returned a file over the byte budget (breaks its contract)")
    return _measure(codec, rgb, data, base)
