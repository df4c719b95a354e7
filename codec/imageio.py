"""Loading the images people hand an encoder, as the 8-bit pixels the codec codes.

The codec codes two things only: 8-bit RGB, an (H, W, 3) uint8 array, and
8-bit grayscale ("L"), an (H, W) uint8 array. `load_image` (files and streams)
and `pixels_from_image` (PIL images already in memory) map what Pillow reads
onto one of the two, and refuse -- with an `UnsupportedImageError` that says
what to do -- whatever they cannot map without changing what a viewer shows:

==================  ==========================================================
Pillow mode         coded as
==================  ==========================================================
L                   L, unchanged
1                   L, black 0 and white 255
I;16, I;16B, I      L, 16-bit samples scaled with rounding:
                    ``v8 = round(v16 * 255 / 65535)`` (so 257 -> 1, 32896 -> 128);
                    "I" is clipped to 0..65535 first, Pillow's convention for
                    16-bit data
RGB                 RGB, unchanged (Pillow already keeps only the high byte of
                    48-bit PNGs)
RGBX, P, CMYK,      RGB by Pillow's own conversion (P through its palette; CMYK
YCbCr               by Pillow's plain formula, without any ICC profile)
RGBA, LA, PA, P or  RGB or L when every pixel is fully opaque (alpha 255
L/RGB with a        everywhere), which loses nothing; refused otherwise, since
transparency key    the format has no alpha channel yet and dropping it would
                    silently change the picture
F, LAB, HSV, ...    refused
==================  ==========================================================

The EXIF orientation is applied to the pixels: the .lc format has no
orientation field, so a decoded phone photo would otherwise lie on its side.
ICC colour profiles are not applied (pixels are coded as stored) and of an
animated image only the first frame is coded.
"""

from __future__ import annotations

import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .bitstream.container import DEFAULT_MAX_PIXELS
from .errors import ImageTooLargeError, UnsupportedImageError

ImageSource = str | os.PathLike | BinaryIO

_FLATTEN_HINT = (
    "lcodec does not support transparency (alpha) yet; flatten the image onto a background first, "
    "e.g. with Pillow: Image.alpha_composite(Image.new('RGBA', im.size, 'white'), "
    "im.convert('RGBA')).convert('RGB').save('flat.png')"
)


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Read an image file (a path or a binary file object) as codec pixels and mode.

    Returns ``(pixels, mode)``: uint8 (H, W, 3) with "RGB" or uint8 (H, W) with
    "L", mapped as the module docstring says. The pixel count is checked
    against `max_pixels` from the file's header, before any pixel is decoded,
    so a tiny file that claims to be huge costs nothing. Every failure is an
    `UnsupportedImageError` (or `ImageTooLargeError`) whose message starts
    with the file's name.
    """
    name = _name_of(source)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the limit that counts; Pillow's
            # hard limit (twice its warning limit) still raises and is mapped.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except FileNotFoundError:
        raise UnsupportedImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UnsupportedImageError(f"{name}: is a directory, not an image file") from None
    except PermissionError:
        raise UnsupportedImageError(f"{name}: permission denied") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        if _is_empty(source):
            raise UnsupportedImageError(f"{name}: the file is empty") from None
        raise UnsupportedImageError(f"{name}: not an image file (Pillow does not recognise its format)") from None
    except OSError as e:
        raise UnsupportedImageError(f"{name}: cannot read it: {e}") from None

    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}; "
                f"pass max_pixels={width * height} (or more) to accept it")
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{name}: {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise UnsupportedImageError(f"{name}: the image data is damaged or truncated ({e})") from None
        return pixels_from_image(im, name=name)


def pixels_from_image(image: Image.Image, *, name: str = "the image") -> tuple[np.ndarray, str]:
    """Codec pixels and mode of an in-memory PIL image (EXIF orientation applied).

    `name` only goes into error messages.
    """
    im = _upright(image)
    if im.has_transparency_data:
        im = _without_opaque_alpha(im, name)
    mode = im.mode
    try:
        if mode == "L":
            pass
        elif mode == "1":
            im = im.convert("L")
        elif mode.startswith("I;16") or mode == "I":
            return _sixteen_to_eight(np.asarray(im)), "L"
        elif mode == "RGB":
            pass
        elif mode in ("RGBX", "P", "CMYK", "YCbCr"):
            im = im.convert("RGB")
        else:
            raise UnsupportedImageError(
                f"{name}: Pillow mode {mode!r} is not supported; lcodec codes 8-bit RGB and grayscale "
                "(convert it first, e.g. im.convert('RGB'))")
    except ValueError as e:  # a conversion Pillow cannot do
        raise UnsupportedImageError(f"{name}: cannot convert mode {mode!r}: {e}") from None
    return np.array(im, dtype=np.uint8), im.mode


def pixels_from_array(pixels: np.ndarray) -> tuple[np.ndarray, str]:
    """Codec pixels and mode of a uint8 array: (H, W) or (H, W, 1) is "L", (H, W, 3) "RGB".

    An (H, W, 4) array is RGBA: accepted as RGB when the alpha plane is all
    255, refused otherwise, as for images.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        got = pixels.dtype if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise UnsupportedImageError(f"expected a uint8 numpy array, got {got}")
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        if pixels[:, :, 3].min(initial=255) < 255:
            raise UnsupportedImageError(f"the array has transparent pixels (alpha < 255); {_FLATTEN_HINT}")
        pixels = pixels[:, :, :3]
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        mode = "L"
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        mode = "RGB"
    else:
        raise UnsupportedImageError(f"expected an (H, W) or (H, W, 3) array, got shape {pixels.shape}")
    if pixels.size == 0:
        raise UnsupportedImageError(f"the array is empty (shape {pixels.shape})")
    return np.ascontiguousarray(pixels), mode


def _upright(im: Image.Image) -> Image.Image:
    """`im` with its EXIF orientation applied to the pixels (itself when there is none)."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF: Pillow raises many kinds; the pixels are still good
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im


def _without_opaque_alpha(im: Image.Image, name: str) -> Image.Image:
    """`im` without its alpha (or transparency key) if it is fully opaque, else refuse."""
    gray = im.mode in ("1", "L", "LA", "La") or im.mode.startswith("I")
    try:
        with_alpha = im.convert("LA" if gray else "RGBA")
    except ValueError as e:
        raise UnsupportedImageError(f"{name}: cannot read the transparency of mode {im.mode!r}: {e}") from None
    alpha_min, _ = with_alpha.getchannel("A").getextrema()
    if alpha_min < 255:
        raise UnsupportedImageError(f"{name} has transparent pixels; {_FLATTEN_HINT}")
    return with_alpha.convert("L" if gray else "RGB")


def _sixteen_to_eight(samples: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples to 8 bits with rounding (half up): round(v * 255 / 65535)."""
    v = np.clip(samples.astype(np.int64), 0, 65535)
    return ((v * 255 + 65535 // 2) // 65535).astype(np.uint8)


def _name_of(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _is_empty(source: ImageSource) -> bool:
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source) == 0
        return source.seek(0, os.SEEK_END) == 0
    except (OSError, AttributeError, ValueError):
        return False
