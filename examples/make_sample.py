"""Draw ``examples/sample.png``, the picture the README's first command encodes.

    python examples/make_sample.py          # rewrites examples/sample.png

The picture is computed, not photographed -- a landscape of sky, sun, ridges,
a lake and grass made of hashed value noise -- so it is as free to use as the
rest of the repository (MIT) and needs nothing beside the checkout. It mixes
smooth areas, edges and fine texture, as a photo does, at 256x176 pixels.
Only integer hashing and float64 arithmetic go into it, so it comes out the
same on any machine (tests/test_readme.py regenerates it and compares).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 256, 176
PATH = Path(__file__).resolve().with_name("sample.png")


def _hash(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """A value in [0, 1) for each integer lattice point (a 32-bit integer hash; no RNG stream)."""
    h = (ix.astype(np.uint64) * 0x8DA6B343 + iy.astype(np.uint64) * 0xD8163841 + seed * 0xCB1AB31F) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0x5BD1E995) & 0xFFFFFFFF
    h ^= h >> 15
    return h.astype(np.float64) / 2.0**32


def _noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1): the lattice hash, interpolated with a smoothstep."""
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64) + 1_000_000, iy.astype(np.int64) + 1_000_000  # hash non-negative integers
    top = _hash(ix, iy, seed) * (1 - sx) + _hash(ix + 1, iy, seed) * sx
    bottom = _hash(ix, iy + 1, seed) * (1 - sx) + _hash(ix + 1, iy + 1, seed) * sx
    return top * (1 - sy) + bottom * sy


def _fractal(x: np.ndarray, y: np.ndarray, seed: int, octaves: int) -> np.ndarray:
    """Octaves of value noise, each twice as fine and half as strong; about [0, 1)."""
    total, weight, norm = np.zeros(np.broadcast(x, y).shape), 1.0, 0.0
    for k in range(octaves):
        total = total + weight * _noise(x * 2**k, y * 2**k, seed + k)
        norm += weight
        weight /= 2
    return total / norm


def sample_pixels() -> np.ndarray:
    """The sample picture as a (HEIGHT, WIDTH, 3) uint8 RGB array."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    u, v = x / WIDTH, y / HEIGHT
    horizon = 0.62

    # Sky: a blue gradient with soft clouds and a sun with a halo.
    sky = np.stack([70 + 120 * v, 120 + 100 * v, 200 + 40 * v], axis=-1)
    clouds = np.clip((_fractal(x / 60, y / 25, 1, 3) - 0.5) * 3, 0, 1)[..., None]
    sky = sky * (1 - 0.8 * clouds) + 245 * 0.8 * clouds
    d2 = (u - 0.72) ** 2 + ((v - 0.22) * HEIGHT / WIDTH) ** 2
    glow = 1 / (1 + d2 * 900)
    sky = sky + glow[..., None] * np.array([90.0, 70.0, 20.0])
    sky = np.where((d2 < 0.0016)[..., None], np.array([255.0, 244.0, 214.0]), sky)
    image = sky

    # Two ridges of mountains, the far one hazier.
    for seed, base, height, colour, octaves in ((10, 0.50, 0.20, (120, 130, 160), 6),
                                                 (20, 0.58, 0.16, (60, 85, 70), 7)):
        ridge = base - height * _fractal(x[:1] / 90, np.full((1, WIDTH), seed * 7.0), seed, octaves)
        rock = _fractal(x / 12, y / 12, seed + 5, 3)[..., None]
        shade = np.array(colour, np.float64) * (0.85 + 0.3 * rock)
        image = np.where((v > ridge)[..., None], shade, image)

    # A lake below the horizon that mirrors the sky and ridges, with ripples.
    lake = (v > horizon) & (v < 0.8)
    mirror_row = np.clip(np.round(2 * horizon * HEIGHT - y), 0, HEIGHT - 1).astype(np.int64)
    ripple = np.round(3 * (_noise(x / 9, y / 2.5, 40) - 0.5)).astype(np.int64)
    mirror_col = np.clip(x.astype(np.int64) + ripple, 0, WIDTH - 1)
    mirrored = image[mirror_row, mirror_col] * 0.7 + np.array([10.0, 25.0, 40.0])
    image = np.where(lake[..., None], mirrored, image)

    # Grass in front: green with fine blades of texture.
    grass_edge = 0.8 - 0.03 * _noise(x / 30, np.zeros_like(x), 50)
    blades = _fractal(x / 2, y / 8, 60, 2)[..., None]
    grass = np.array([70.0, 120.0, 40.0]) * (0.75 + 0.5 * blades) + 30 * (v[..., None] - 0.8)
    image = np.where((v > grass_edge)[..., None], grass, image)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def main() -> None:
    from PIL import Image

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PATH
    Image.fromarray(sample_pixels()).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
