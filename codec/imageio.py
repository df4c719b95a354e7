"""Loading the images people hand an encoder, as the 8-bit pixels the codec codes.

The learned codec codes two things only: 8-bit RGB, an (H, W, 3) uint8 array, and
8-bit grayscale ("L"), an (H, W) uint8 array; an alpha plane and the metadata go
beside them. `load_picture` (files and streams), `picture_from_image` (PIL images
already in memory) and `picture_from_array` give a `Picture`: they map what Pillow
reads onto one of the two, and refuse -- with an `UnsupportedImageError` that says
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
RGBA, LA, PA, P or  RGB or L and an alpha plane (`Picture.alpha`), coded
L/RGB with a        losslessly beside the colour (`lcodec.alpha`); when every
transparency key    pixel is fully opaque (alpha 255 everywhere) the alpha is
                    dropped, which loses nothing and costs nothing
F, LAB, HSV, ...    refused
==================  ==========================================================

The EXIF orientation is applied to the pixels: the .lc format has no
orientation field, so a decoded phone photo would otherwise lie on its side
(the kept EXIF then says orientation 1). ICC colour profiles are not applied:
pixels are coded as stored and the profile is kept with them
(`lcodec.metadata`, as are EXIF and XMP). Of an animated image only the first
frame is coded.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .bitstream.container import DEFAULT_MAX_PIXELS
from .errors import ImageTooLargeError, UnsupportedImageError
from .metadata import Metadata, from_info

ImageSource = str | os.PathLike | BinaryIO


@dataclass(frozen=True, eq=False)
class Picture:
    """What an encode codes: the colour the learned codec codes, the alpha plane and the metadata."""

    pixels: np.ndarray  # uint8, (H, W, 3) for "RGB" or (H, W) for "L"
    mode: str  # "RGB" or "L"
    alpha: np.ndarray | None = None  # uint8 (H, W); None when every pixel is fully opaque
    metadata: Metadata = field(default_factory=Metadata)
    notes: tuple[str, ...] = ()  # what was dropped while reading, and why (to show as warnings)

    @property
    def image_mode(self) -> str:
        """The Pillow mode of the whole picture: "RGB", "L", "RGBA" or "LA"."""
        return self.mode + ("A" if self.alpha is not None else "")

    def array(self) -> np.ndarray:
        """The whole picture as one array: the colour, with the alpha as a last channel where there is one."""
        if self.alpha is None:
            return self.pixels
        colour = self.pixels if self.pixels.ndim == 3 else self.pixels[:, :, None]
        return np.concatenate([colour, self.alpha[:, :, None]], axis=2)


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """The pixels and Pillow mode of an image file, as `load_picture` reads it: uint8 (H, W, 3)
    "RGB", (H, W) "L", (H, W, 4) "RGBA" or (H, W, 2) "LA" (without its metadata)."""
    picture = load_picture(source, max_pixels=max_pixels)
    return picture.array(), picture.image_mode


def load_picture(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read an image file (a path or a binary file object) as a `Picture`.

    Colour, alpha and metadata are mapped as the module docstring says. The pixel count is checked
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
        return picture_from_image(im, name=name)


def picture_from_image(image: Image.Image, *, name: str = "the image") -> Picture:
    """The `Picture` of an in-memory PIL image (EXIF orientation applied, metadata from its ``info``).

    `name` only goes into error messages.
    """
    im, turned = _upright(image)
    metadata, notes = from_info(image.info, orientation_applied=turned)
    alpha = None
    if im.has_transparency_data:
        im, alpha = _split_alpha(im, name)
    pixels, mode = _colour(im, name)
    return Picture(pixels, mode, alpha, metadata, tuple(f"{name}: {note}" for note in notes))


def _colour(im: Image.Image, name: str) -> tuple[np.ndarray, str]:
    """Codec pixels and mode of an image without alpha."""
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


def picture_from_array(pixels: np.ndarray) -> Picture:
    """The `Picture` of a uint8 array: (H, W) or (H, W, 1) is "L", (H, W, 2) "LA", (H, W, 3) "RGB",
    (H, W, 4) "RGBA"; an alpha plane that is 255 everywhere is dropped. An array has no metadata."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        got = pixels.dtype if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise UnsupportedImageError(f"expected a uint8 numpy array, got {got}")
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2, 3, 4):
        channels = pixels.shape[2]
        alpha = pixels[:, :, -1] if channels in (2, 4) else None
        pixels = pixels[:, :, 0] if channels in (1, 2) else pixels[:, :, :3]
    elif pixels.ndim == 2:
        alpha = None
    else:
        raise UnsupportedImageError(f"expected an (H, W) array or (H, W, C) with C = 1, 2, 3 or 4, "
                                    f"got shape {pixels.shape}")
    if pixels.size == 0:
        raise UnsupportedImageError(f"the array is empty (shape {pixels.shape})")
    if alpha is not None and alpha.min() == 255:
        alpha = None
    return Picture(np.ascontiguousarray(pixels), "L" if pixels.ndim == 2 else "RGB",
                   None if alpha is None else np.ascontiguousarray(alpha))


def _upright(im: Image.Image) -> tuple[Image.Image, bool]:
    """`im` with its EXIF orientation applied to the pixels, and whether it had one to apply."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF: Pillow raises many kinds; the pixels are still good
        return im, False
    if orientation not in range(2, 9):
        return im, False
    return ImageOps.exif_transpose(im), True


def _split_alpha(im: Image.Image, name: str) -> tuple[Image.Image, np.ndarray | None]:
    """`im` without its alpha (or transparency key), and the alpha plane unless it is fully opaque."""
    gray = im.mode in ("1", "L", "LA", "La") or im.mode.startswith("I")
    try:
        with_alpha = im.convert("LA" if gray else "RGBA")
    except ValueError as e:
        raise UnsupportedImageError(f"{name}: cannot read the transparency of mode {im.mode!r}: {e}") from None
    alpha = np.array(with_alpha.getchannel("A"), dtype=np.uint8)
    return with_alpha.convert("L" if gray else "RGB"), (None if alpha.min() == 255 else alpha)


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
