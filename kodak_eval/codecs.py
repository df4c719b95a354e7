"""The codecs kodak_eval compares, behind one small interface.

A peer (`PeerCodec`) exposes an ordered list of quality-knob values, lowest
quality first, and encodes RGB pixels at one of them; `search.py` drives it to a
byte budget. lcodec (`LcodecCodec`) reaches the target itself, either by exact
rate control (`bpp=`) or in one pass at a trained level (`rate=i`); an effort
codec (`lcodec-effortE`) is `bpp=` with the latents refined per image, measured
only at `EFFORT_TARGETS` because it takes tens of seconds per image.

Every codec imports its library lazily, so a missing peer costs a message
(`unavailable()`), never an ImportError at start-up. `version()` names every
library whose output bits could change, and `settings()` every option that
does: both go into the cache key and the results JSON.
"""

from __future__ import annotations

import fractions
import glob
import io
import os
from collections.abc import Sequence

import numpy as np
from lcodec.api import DEFAULT_EFFORT, MAX_EFFORT  # constants only: lcodec.api imports torch lazily


class Codec:
    """A codec under test. Pixels are uint8 H x W x 3 RGB arrays."""

    name: str = ""  # key in results and cache
    label: str = ""  # legend / table name
    stream: str = ""  # which bytes are counted

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def unavailable(self) -> str | None:
        """None if the codec can run here, else why not (one line)."""
        return None

    def version(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def decode(self, data: bytes) -> np.ndarray:
        raise NotImplementedError


class PeerCodec(Codec):
    knob: str = ""  # what the quality values mean

    def qualities(self) -> Sequence[float]:
        """Knob values from lowest to highest quality."""
        raise NotImplementedError

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        raise NotImplementedError


def _missing(module: str) -> str | None:
    try:
        __import__(module)
    except ImportError as exc:
        return f"cannot import {module} ({exc}); install the bench extra: pip install -e .[bench]"
    return None


class JpegPillow(PeerCodec):
    name, label = "jpeg", "JPEG (libjpeg-turbo)"
    stream = "JFIF file as written by Pillow"
    knob = "Pillow quality 1..100"

    def version(self) -> str:
        import PIL
        from PIL import features

        return f"Pillow {PIL.__version__}; libjpeg-turbo {features.version('libjpeg_turbo')}"

    def settings(self) -> dict:
        return {"optimize": True, "subsampling": "4:4:4", "progressive": False}

    def qualities(self) -> Sequence[float]:
        return list(range(1, 101))

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=int(quality), optimize=True, subsampling=0)
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class _ImageCodecsPeer(PeerCodec):
    lib = ""  # imagecodecs version function prefix

    def unavailable(self) -> str | None:
        reason = _missing("imagecodecs")
        if reason:
            return reason
        import imagecodecs

        codec = getattr(imagecodecs, self.lib.upper(), None)
        if codec is None or not codec.available:
            return f"imagecodecs {imagecodecs.__version__} was built without {self.lib}"
        return None

    def version(self) -> str:
        import imagecodecs

        return f"imagecodecs {imagecodecs.__version__}; {getattr(imagecodecs, self.lib + '_version')()}"


class WebP(_ImageCodecsPeer):
    name, label, lib = "webp", "WebP (libwebp)", "webp"
    stream = "RIFF WebP file"
    knob = "libwebp quality 0..100"

    def settings(self) -> dict:
        # Lossy WebP (VP8) only has 4:2:0 chroma; there is no 4:4:4 option.
        return {"lossless": False, "method": 6, "chroma": "4:2:0 (the only lossy WebP format)"}

    def qualities(self) -> Sequence[float]:
        return list(range(0, 101))

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.webp_encode(rgb, level=int(quality), lossless=False, method=6,
                                             numthreads=self.threads))

    def decode(self, data: bytes) -> np.ndarray:
        import imagecodecs

        return imagecodecs.webp_decode(data)


class Avif(_ImageCodecsPeer):
    name, label, lib = "avif", "AVIF (libaom)", "avif"
    stream = "AVIF (HEIF/ISOBMFF) file"
    knob = "libavif quality 0..100"

    def version(self) -> str:
        import imagecodecs

        # The wheel bundles libaom; its soname carries the version.
        libs = glob.glob(os.path.join(os.path.dirname(imagecodecs.__file__), os.pardir, "imagecodecs.libs", "libaom-*.so.*"))
        aom = "libaom " + libs[0].rsplit(".so.", 1)[1] if libs else "libaom (version unknown)"
        return f"{super().version()}; {aom}"

    def settings(self) -> dict:
        return {"codec": "aom", "speed": 6, "pixelformat": "4:4:4", "bitspersample": 8}

    def qualities(self) -> Sequence[float]:
        return list(range(0, 101))

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.avif_encode(rgb, level=int(quality), speed=6, pixelformat="444", codec="aom",
                                             numthreads=self.threads))

    def decode(self, data: bytes) -> np.ndarray:
        import imagecodecs

        return imagecodecs.avif_decode(data, numthreads=self.threads)


class JpegXL(_ImageCodecsPeer):
    name, label, lib = "jpegxl", "JPEG XL (libjxl)", "jpegxl"
    stream = "bare JPEG XL codestream (no ISOBMFF container)"
    knob = "libjxl quality 0..99 (mapped to Butteraugli distance as cjxl -q does)"

    def settings(self) -> dict:
        return {"effort": 7, "container": False, "colour": "libjxl XYB (no chroma subsampling)"}

    def qualities(self) -> Sequence[float]:
        return list(range(0, 100))

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(rgb, level=int(quality), effort=7, usecontainer=False,
                                               numthreads=self.threads))

    def decode(self, data: bytes) -> np.ndarray:
        import imagecodecs

        return imagecodecs.jpegxl_decode(data, numthreads=self.threads)


class Jpeg2000(_ImageCodecsPeer):
    name, label, lib = "jpeg2000", "JPEG 2000 (OpenJPEG)", "jpeg2k"
    stream = "raw J2K codestream (no JP2 boxes)"
    knob = "OpenJPEG fixed-quality layer PSNR 15.0..70.0 dB in 0.1 dB steps"

    def settings(self) -> dict:
        return {"codecformat": "j2k", "mct": "irreversible colour transform (YCbCr 4:4:4)", "wavelet": "9/7",
                "layers": 1}

    def qualities(self) -> Sequence[float]:
        return [round(15.0 + 0.1 * i, 1) for i in range(551)]

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpeg2k_encode(rgb, level=float(quality), codecformat="j2k", mct=True,
                                               reversible=False, numthreads=self.threads))

    def decode(self, data: bytes) -> np.ndarray:
        import imagecodecs

        return imagecodecs.jpeg2k_decode(data, numthreads=self.threads)


# BT.601 full-range YCbCr, as JFIF and BPG (its default colour space) use.
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 RGB -> uint8 3 x H x W planes, BT.601 full range."""
    h, w, _ = rgb.shape
    ycc = _RGB_TO_YCC @ rgb.reshape(-1, 3).T.astype(np.float64)  # (3, H*W): a plain matmul, ~5x faster than tensordot
    ycc[1:] += 128.0
    return np.clip(np.rint(ycc), 0, 255).astype(np.uint8).reshape(3, h, w)


def ycbcr_to_rgb(planes: np.ndarray) -> np.ndarray:
    """uint8 3 x H x W BT.601 full-range planes -> uint8 H x W x 3 RGB (part of the timed decode)."""
    _, h, w = planes.shape
    ycc = planes.reshape(3, -1).astype(np.float64)
    ycc[1:] -= 128.0
    rgb = np.clip(np.rint(_YCC_TO_RGB @ ycc), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb.T).reshape(h, w, 3)


class HevcX265(PeerCodec):
    """HEVC intra with x265, configured like libbpg's x265 path (the stand-in for BPG).

    Same as bpgenc: BT.601 full-range YCbCr 4:4:4, 8 bits, constant QP, one I
    frame, tune=ssim, no x265 info SEI (which alone is ~2 kB). Different from
    bpgenc: preset `medium`, not placebo, to keep a 2-core run bearable; and the
    counted bytes are the raw Annex-B stream (VPS+SPS+PPS+slice NAL units, start
    codes included) with no BPG header, which would add about 10-20 bytes.
    """

    name, label = "hevc", "HEVC intra (x265, BPG-like)"
    stream = "raw HEVC Annex-B elementary stream (VPS+SPS+PPS+1 IDR slice), no container"
    knob = "x265 constant QP 51..0"
    preset = "medium"

    def unavailable(self) -> str | None:
        reason = _missing("av")
        if reason:
            return reason
        import av

        if "libx265" not in av.codecs_available:
            return f"PyAV {av.__version__} has no libx265 encoder"
        return None

    def _params(self, qp: int, info: int = 0) -> dict:
        return {
            "preset": self.preset,
            "tune": "ssim",
            "x265-params": f"qp={qp}:keyint=1:info={info}:log-level=none:range=full:colormatrix=bt470bg"
            + (":pools=none:frame-threads=1:wpp=0" if self.threads == 1 else f":pools={self.threads}"),
        }

    def _encode_planes(self, planes: np.ndarray, qp: int, info: int = 0) -> bytes:
        import av

        _, h, w = planes.shape
        ctx = av.CodecContext.create("libx265", "w")
        ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv444p"
        ctx.time_base = fractions.Fraction(1, 25)
        ctx.options = self._params(qp, info)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(planes), format="yuv444p")
        packets = list(ctx.encode(frame)) + list(ctx.encode(None))
        return b"".join(bytes(p) for p in packets)

    def version(self) -> str:
        import av

        # x265 writes its version into the info SEI; encode a tiny frame with it on.
        data = self._encode_planes(np.full((3, 16, 16), 128, np.uint8), 30, info=1)
        start = data.find(b"x265 (build")  # "x265 (build 216) - 4.2+1-e444744:[Linux]..."
        x265 = data[start:start + 80].split(b":")[0].decode("ascii", "replace") if start >= 0 else "x265 (version unknown)"
        # "adapter 2": the YCbCr conversion became 5x faster; cached HEVC timings from adapter 1 are stale.
        return f"PyAV {av.__version__}; {x265}; kodak_eval adapter 2"

    def settings(self) -> dict:
        return {"preset": self.preset, "tune": "ssim", "rate_control": "constant QP", "chroma": "4:4:4",
                "colour": "BT.601 full-range YCbCr (numpy, as bpgenc)", "bit_depth": 8, "keyint": 1, "info_sei": False}

    def qualities(self) -> Sequence[float]:
        return list(range(51, -1, -1))

    def encode(self, rgb: np.ndarray, quality: float) -> bytes:
        return self._encode_planes(rgb_to_ycbcr(rgb), int(quality))

    def decode(self, data: bytes) -> np.ndarray:
        import av

        ctx = av.CodecContext.create("hevc", "r")
        ctx.thread_count = self.threads
        frames = []
        for packet in ctx.parse(data) + ctx.parse(None):
            frames += ctx.decode(packet)
        frames += ctx.decode(None)
        if len(frames) != 1 or frames[0].format.name != "yuv444p":
            raise RuntimeError(f"HEVC stream decoded to {len(frames)} frame(s), expected one yuv444p frame")
        return ycbcr_to_rgb(frames[0].to_ndarray())


class LcodecCodec(Codec):
    """lcodec through its library API. mode "bpp": exact rate control to the target
    (the rate search is part of the timed encode), at `effort` (0: one pass; 1-9:
    latents refined per image, the refinement timed too); mode "onepass": one encode
    at a trained level index (`rate=i`), whose nominal bpp is the target."""

    stream = "whole .lc file (header included)"

    def __init__(self, mode: str, threads: int = 1, effort: int = 0) -> None:
        super().__init__(threads)
        if mode not in ("bpp", "onepass") or not 0 <= effort <= MAX_EFFORT or (effort and mode != "bpp"):
            raise ValueError(f"mode {mode!r} at effort {effort!r}")
        self.mode, self.effort = mode, effort
        if effort:
            self.name, self.label = effort_name(effort), f"lcodec effort {effort} (bpp=, refined latents)"
        elif mode == "bpp":
            self.name, self.label = "lcodec", "lcodec (bpp=, rate control)"
        else:
            self.name, self.label = "lcodec-1pass", "lcodec (rate=i, one pass)"

    def unavailable(self) -> str | None:
        try:
            import lcodec
        except ImportError as exc:
            return f"cannot import lcodec ({exc})"
        missing = [f for f in ("encode", "decode", "model_info") if not hasattr(lcodec, f)]
        if missing:
            return (f"the installed lcodec has no {', '.join(missing)}: it is older than this checkout "
                    "(pip install -e .)")
        try:
            lcodec.model_info()
        except Exception as exc:  # noqa: BLE001 - any failure to load the model means "not available"
            return f"lcodec cannot load its model: {type(exc).__name__}: {exc}"
        return None

    def model_info(self) -> dict:
        """lcodec.model_info() as a plain dict (the library returns a frozen dataclass)."""
        import dataclasses

        import lcodec

        info = lcodec.model_info()
        return dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(info)

    def levels(self) -> list[float]:
        return [float(b) for b in self.model_info()["levels"]]

    def version(self) -> str:
        from importlib.metadata import version

        if self.mode == "bpp":  # a target: the better file of the models the encoder chooses between
            from lcodec.models.registry import CHOICE_MODEL_IDS, MODELS

            models = ", ".join(f"{MODELS[i].name} {MODELS[i].sha256}" for i in CHOICE_MODEL_IDS)
            refined = f"; effort {self.effort}: {self._iterations()} refinement steps per model" if self.effort else ""
            return f"lcodec {version('lcodec')}; per image the better of: {models}{refined}"
        info = self.model_info()
        return f"lcodec {version('lcodec')}; model {info.get('name')} {info.get('digest')}"

    def settings(self) -> dict:
        import torch

        refined = {"refine_iterations": self._iterations()} if self.effort else {}
        return {"mode": self.mode, "effort": self.effort, **refined, "torch": torch.__version__,
                "torch_threads": self.threads}

    def _iterations(self) -> int:
        from lcodec import engine, refine
        from lcodec.models.registry import CHOICE_MODEL_IDS

        return refine.iterations(self.effort, engine.load_model(CHOICE_MODEL_IDS[0]))

    def prepare(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def encode(self, rgb: np.ndarray, target: float, level: int | None = None) -> bytes:
        import lcodec
        from PIL import Image

        image = Image.fromarray(rgb)
        if self.mode == "bpp":
            return lcodec.encode(image, bpp=target, effort=self.effort)
        return lcodec.encode(image, rate=level, effort=0)

    def warm_up_encode(self, rgb: np.ndarray) -> bytes:
        """A one-pass encode at level 0: loads the model without a target a tiny image may not reach."""
        import lcodec
        from PIL import Image

        return lcodec.encode(Image.fromarray(rgb), rate=0, effort=0)

    def decode(self, data: bytes) -> np.ndarray:
        import lcodec

        return np.asarray(lcodec.decode(data).convert("RGB"))


def effort_name(effort: int) -> str:
    return f"lcodec-effort{effort}"


PEERS: tuple[type[PeerCodec], ...] = (JpegPillow, WebP, Avif, JpegXL, Jpeg2000, HevcX265)
# Effort codecs: the library's highest effort, and its default one if that refines.
EFFORTS: tuple[int, ...] = tuple(sorted({DEFAULT_EFFORT, MAX_EFFORT} - {0}))
EFFORT_NAMES: tuple[str, ...] = tuple(effort_name(e) for e in EFFORTS)
# An effort codec is slow: it runs only at these targets, both ends of the BD-rate range and one between.
EFFORT_TARGETS: tuple[float, ...] = (0.12, 0.5, 1.0)
ALL_NAMES: tuple[str, ...] = ("lcodec", *EFFORT_NAMES, "lcodec-1pass") + tuple(p.name for p in PEERS)


def make_codecs(names: Sequence[str], threads: int = 1) -> list[Codec]:
    """Codec objects for `names` (a subset of ALL_NAMES), in ALL_NAMES order."""
    unknown = sorted(set(names) - set(ALL_NAMES))
    if unknown:
        raise ValueError(f"unknown codec(s) {', '.join(unknown)}; known: {', '.join(ALL_NAMES)}")
    out: list[Codec] = []
    for name in ALL_NAMES:
        if name not in names:
            continue
        if name == "lcodec":
            out.append(LcodecCodec("bpp", threads))
        elif name in EFFORT_NAMES:
            out.append(LcodecCodec("bpp", threads, effort=EFFORTS[EFFORT_NAMES.index(name)]))
        elif name == "lcodec-1pass":
            out.append(LcodecCodec("onepass", threads))
        else:
            out.append(next(p for p in PEERS if p.name == name)(threads))
    return out
