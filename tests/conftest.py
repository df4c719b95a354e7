"""Shared fixtures for the user-facing tests (api, cli, imageio).

Images are small so that the real engine on CPU codes each in well under a
second; the one natural photo (a Kodak crop, for rate accuracy) is read from
../shared/data and its tests skip, saying why, where it is absent.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

KODAK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kodak"
# The weights of the released models that the package does not ship (registry.SHIPPED_MODEL_IDS).
ARCHIVE = Path(__file__).resolve().parents[1] / "models" / "archive"

# A --size every model reaches for the small test images (a few KB even at its top rate), for
# tests about the plumbing rather than rate control; those aim at a natural image instead.
ANY_SIZE = 100_000


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like uint8 RGB image: smooth gradients and a little texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [128 + 90 * np.sin(x / (7 + 3 * c) + y / (11 + 2 * c) + c) for c in range(3)]
    img = np.stack(planes, axis=2) + rng.normal(0, 6, (height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def kodak_photo(name: str, h: int, w: int, stand_in=smooth_rgb) -> np.ndarray:
    """The top-left h x w crop of a Kodak image, or `stand_in(h, w)` where ../shared is absent."""
    path = KODAK / name
    if not path.exists():
        return stand_in(h, w)
    return np.array(Image.open(path).convert("RGB"))[:h, :w]


def save(path: Path, image: Image.Image | np.ndarray, **params) -> Path:
    """Write `image` (format by suffix) and return the path."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **params)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def quick_lc(pixels: np.ndarray) -> bytes:
    """.lc bytes of `pixels` in one pass (the middle of the model's rate range, no search)."""
    import lcodec

    lo, hi = lcodec.model_info().rate_range
    return lcodec.encode(pixels, rate=(lo + hi) / 2)


@pytest.fixture
def archived_weights(monkeypatch) -> Path:
    """The archived weights where a decoder looks for weights that are not installed: on
    LCODEC_WEIGHTS_PATH, as a user who has them would put them."""
    monkeypatch.setenv("LCODEC_WEIGHTS_PATH", str(ARCHIVE))
    return ARCHIVE


@pytest.fixture
def rgb_png(tmp_path: Path) -> Path:
    """A 64x48 RGB PNG."""
    return save(tmp_path / "photo.png", smooth_rgb(48, 64))


@pytest.fixture(scope="session")
def kodak_crop() -> np.ndarray:
    """A 256x256 crop of kodim23 (parrots): a natural image for rate-accuracy claims."""
    path = KODAK / "kodim23.png"
    if not path.exists():
        pytest.skip(f"needs the Kodak images at {os.path.normpath(KODAK)} (../shared/data/kodak)")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").crop((256, 128, 512, 384))).copy()


@pytest.fixture
def no_leftovers():
    """Assert a directory holds exactly the given names (no output, no temporary `.part` file)."""

    def check(directory: Path, *names: str) -> None:
        assert sorted(p.name for p in directory.iterdir()) == sorted(names)

    return check


@pytest.fixture
def cli():
    """Run the lcodec command line in-process: cli("encode", "x.png", "--bpp", "1", input=b"...")."""
    from lcodec.cli import main

    def run(*args: str, input: bytes | None = None) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    return run
