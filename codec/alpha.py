"""The alpha plane, coded losslessly as a lossless WebP picture in the file's `ALPH` chunk.

The learned codec codes colour; transparency is a different kind of signal (mostly 0 and 255,
sharp edges, a few soft ones) that must come back exactly, and WebP's lossless coder (VP8L:
spatial prediction, colour cache, LZ77 and Huffman codes) is what WebP itself codes its alpha
with. Pillow bundles libwebp, so this costs no dependency. Measured on two synthetic logos and
three Kodak cut-outs (`python examples/alpha_cost.py`; the README has the table) it is within
-7%..+9% of WebP's own alpha chunk, up to 1% larger and up to 82% smaller than AVIF's alpha, and
25-57% smaller than PNG of the plane.

Where alpha is 0 the colour is invisible, and coding it as it happens to be stored would spend bits
on nothing: `fill_hidden` replaces it by a smooth continuation of the visible colour, as cwebp does
without ``-exact`` (measured on three 768x512 Kodak cut-outs at 0.5 bpp: +0.2, +0.9 and +2.5 dB
alpha-weighted PSNR at the same size).

The chunk holds a whole WebP file (RIFF) of the plane as a grey picture (R = G = B = alpha); the
decoder takes the red channel of the decoded picture, which must have the file's width and height
(bitstream/SPEC.md, "Metadata and alpha").
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, features

from .errors import CorruptFileError, ImageTooLargeError, UnsupportedImageError

__all__ = ["encode", "decode", "fill_hidden"]

# libwebp's lossless effort: method 4 at quality 100 is within 1-3% of method 6's size at a
# twentieth of its time (0.03 s against 0.6-1.5 s for a 768x512 plane).
_METHOD = 4
_QUALITY = 100


def encode(plane: np.ndarray) -> bytes:
    """The `ALPH` chunk's bytes for an (H, W) uint8 alpha plane: a lossless WebP file, checked to decode exactly."""
    _need_webp()
    height, width = plane.shape
    if max(width, height) > 16383:
        raise UnsupportedImageError(f"lcodec codes alpha as lossless WebP, which takes at most 16383 pixels a "
                                    f"side; this image is {width}x{height}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane, dtype=np.uint8)).save(out, format="WEBP", lossless=True,
                                                                      quality=_QUALITY, method=_METHOD, exact=True)
    data = out.getvalue()
    if not np.array_equal(decode(data, width, height), plane):  # a libwebp that is not lossless would be a bug
        raise AssertionError("libwebp's lossless mode did not give the alpha plane back exactly")
    return data


def decode(data: bytes, width: int, height: int) -> np.ndarray:
    """The (height, width) uint8 alpha plane of an `ALPH` chunk; `CorruptFileError` if it is not a WebP
    picture of that size."""
    _need_webp()
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise CorruptFileError("the .lc file is corrupt: its alpha chunk is not a WebP picture.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the .lc header's size was capped
            with Image.open(io.BytesIO(data), formats=["WEBP"]) as im:
                if im.size != (width, height):
                    raise CorruptFileError(f"the .lc file is corrupt: its alpha plane is {im.size[0]}x{im.size[1]}, "
                                           f"the picture {width}x{height}.")
                im.load()
                plane = np.asarray(im.getchannel(0), dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"the alpha plane is larger than Pillow decodes: {e}") from None
    except CorruptFileError:
        raise
    except Exception as e:  # noqa: BLE001 -- libwebp and Pillow's parser raise many kinds on hostile bytes
        raise CorruptFileError(f"the .lc file is corrupt: its alpha chunk does not decode ({e}).") from None
    return plane


def _need_webp() -> None:
    if not features.check("webp"):
        raise UnsupportedImageError("this Pillow was built without WebP, which lcodec codes alpha with; "
                                    "install Pillow from PyPI (its wheels include it)")


def fill_hidden(pixels: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """`pixels` ((H, W, 3) or (H, W) uint8) with the colour of fully transparent pixels (alpha 0)
    replaced by a smooth fill from the visible ones; the others unchanged.

    Push-pull: the visible colours are averaged down a pyramid of 2x2 blocks (weighted by how
    much of each block is visible), then each hidden pixel takes the value of the finest level
    that saw anything near it, blended up level by level. Linear in the number of pixels.
    """
    hidden = plane == 0
    if not hidden.any() or hidden.all():
        return pixels
    x = pixels.astype(np.float32).reshape(pixels.shape[:2] + (-1,))
    w = (~hidden).astype(np.float32)
    levels = []
    while True:
        levels.append((x, w))
        h, wd = w.shape
        if h == 1 and wd == 1:
            break
        xp = np.zeros((h + h % 2, wd + wd % 2, x.shape[2]), np.float32)
        xp[:h, :wd] = x * w[..., None]
        wp = np.zeros(xp.shape[:2], np.float32)
        wp[:h, :wd] = w
        ws = wp[0::2, 0::2] + wp[1::2, 0::2] + wp[0::2, 1::2] + wp[1::2, 1::2]
        xs = xp[0::2, 0::2] + xp[1::2, 0::2] + xp[0::2, 1::2] + xp[1::2, 1::2]
        x = xs / np.maximum(ws, 1e-9)[..., None]
        w = np.minimum(ws, 1.0)
    filled = levels[-1][0]
    for x, w in reversed(levels[:-1]):
        h, wd = w.shape
        up = np.repeat(np.repeat(filled, 2, axis=0), 2, axis=1)[:h, :wd]
        filled = x * w[..., None] + up * (1 - w[..., None])
    out = np.where(hidden[..., None], np.clip(np.round(filled), 0, 255), pixels.reshape(filled.shape))
    return out.astype(np.uint8).reshape(pixels.shape)
