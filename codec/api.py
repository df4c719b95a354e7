"""The lcodec library: images and files in, .lc bytes and files out.

Everything the command line does goes through these functions; the CLI only
parses options and prints. Torch is imported lazily, by the functions that
code pixels (through `lcodec.engine`), so that ``import lcodec`` and
`read_header` stay light.

Rate targets (exactly one per encode):

- ``bpp``: the whole file, header included, is at most ``bpp * W * H / 8`` bytes;
- ``size``: the whole file is at most ``size`` bytes;
- ``rate``: the model's rate parameter q itself, one pass and no search.

Besides the colour, a file keeps the input's alpha plane, coded losslessly (`lcodec.alpha`;
the colour of fully transparent pixels, which nobody sees, is not kept but filled in), and its ICC profile, EXIF and XMP (`lcodec.metadata`; ``strip_metadata=True`` drops EXIF and
XMP, never the ICC profile). They count in the size: the colour gets what they leave of the
target. Decoding gives them back: the image's mode has an "A", its ``info`` holds
``icc_profile``, ``exif`` and ``xmp``, and `decode_file` writes them into formats that hold them.

Decoding can give a smaller picture (``scale=1/2``, 1/4, 1/8 or 1/16) for a fraction of the time:
the wavelet's coarse levels alone are that picture (bitstream/SPEC.md, "Reduced-size decoding").

Files are written atomically -- through a temporary file in the destination's
directory that is renamed into place -- so a failure or Ctrl-C never leaves a
partial output, and an existing file is never replaced unless ``force=True``.
The temporary file is created before the (slow) coding starts, so an output
that cannot be written (no such directory, no permission, a directory in the
way) is an error at once rather than after the work.

Errors name this module's keyword arguments (``force=True``, ``max_pixels=``);
the command line rewords them for its options.
"""

from __future__ import annotations

import contextlib
import errno
import fractions
import io
import math
import os
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from . import alpha, metadata, ratecontrol
from .bitstream import container
from .bitstream.container import DEFAULT_MAX_PIXELS, OVERHEAD_BYTES, Chunk, Header
from .errors import LcodecError, LcodecWarning, OutputExistsError, RateError, UnsupportedImageError
from .imageio import ImageSource, Picture, load_picture, picture_from_array, picture_from_image
from .metadata import Metadata

PathLike = str | os.PathLike

# The scales a file can be decoded at: 1/2^k of its width and height, k = 0..4.
SCALES = (fractions.Fraction(1), *(fractions.Fraction(1, 2**k) for k in range(1, 5)))

# Encode effort: 0 is the one-pass encoder; 1-9 search longer for a better encode (`lcodec.refine`),
# for a better picture at the same size. Images of more than 4 megapixels are coded at effort 0.
MAX_EFFORT = 9
DEFAULT_EFFORT = 0


@dataclass(frozen=True)
class EncodedFile:
    """What `encode_file` wrote."""

    path: Path | None  # the .lc file; None when written to a stream
    size: int  # bytes of the whole file, header included
    width: int
    height: int
    mode: str  # "RGB" or "L", with "A" when the alpha plane was kept ("RGBA", "LA")
    bpp: float  # 8 * size / (width * height): the real rate of the whole file
    rate: float  # the model's rate parameter q that made it
    target_bytes: int | None  # the size limit asked for (None for an explicit rate)
    warning: str | None = None  # e.g. the file fell well short of the target: the model's top rate
    kept: tuple[str, ...] = ()  # what the file holds besides the colour: "ICC profile", "EXIF", "XMP", "alpha"
    kept_bytes: int = 0  # the bytes that costs, of `size`


@dataclass(frozen=True)
class DecodedFile:
    """What `decode_file` wrote."""

    path: Path | None  # the image file; None when written to a stream
    format: str  # the Pillow format written, e.g. "PNG"
    width: int
    height: int
    mode: str  # "RGB", "L", "RGBA" or "LA", as encoded
    warning: str | None = None  # e.g. the format is lossy, or cannot hold the ICC profile


@dataclass(frozen=True)
class ModelInfo:
    """The model this installation encodes with."""

    name: str
    model_id: int  # what .lc files store; ids are never reused
    digest: str  # hex SHA-256 of the weights (files store its first 4 bytes)
    levels: tuple[float, ...]  # the target bpp the model was trained for, per rate level
    rate_range: tuple[float, float]  # the smallest and largest rate parameter q


def encode(image: Image.Image | np.ndarray, *, bpp: float | None = None, size: int | None = None,
           rate: float | None = None, effort: int = DEFAULT_EFFORT, progress=None,
           strip_metadata: bool = False) -> bytes:
    """Encode a PIL image or a uint8 array to .lc bytes; give exactly one of bpp, size, rate.

    `effort` (0-9) buys quality with encode time at the same size: the encode is
    refined for this image (`lcodec.refine`); the file decodes like any other. `progress`, a tqdm-like
    object, is reset to the number of refinement steps and updated after each.

    A PIL image is mapped to RGB or grayscale as `lcodec.imageio` describes
    (EXIF orientation applied); its alpha is kept unless fully opaque, and its ICC
    profile, EXIF and XMP (``image.info``) are kept, EXIF and XMP unless `strip_metadata`.
    Metadata too malformed to keep is dropped with a `LcodecWarning`. An array is
    (H, W) grayscale, (H, W, 2) grayscale and alpha, (H, W, 3) RGB or (H, W, 4) RGBA.

    >>> data = lcodec.encode(Image.open("photo.png"), bpp=0.5)   # doctest: +SKIP
    """
    _check_target(bpp, size, rate)
    _check_effort(effort)
    picture = _picture(image)
    for note in picture.notes:
        warnings.warn(note, LcodecWarning, stacklevel=2)
    return _encode(picture, bpp=bpp, size=size, rate=rate, effort=effort, progress=progress,
                   strip_metadata=strip_metadata).data


@dataclass(frozen=True)
class _Encoded:
    data: bytes
    rate: float
    target_bytes: int | None
    warning: str | None
    kept: tuple[str, ...]
    kept_bytes: int


def _encode(picture: Picture, *, bpp: float | None, size: int | None, rate: float | None, effort: int, progress,
            strip_metadata: bool) -> _Encoded:
    """The colour by the default model at `rate`, or for a bpp or size target by the better of the
    models the encoder chooses between (`engine.encode_best`), within what the chunks (metadata,
    alpha) leave of the target; then the chunks are put in the file."""
    kept = picture.metadata.without_private() if strip_metadata else picture.metadata
    chunks = kept.chunks()
    names = kept.names()
    if picture.alpha is not None:
        chunks += (Chunk(b"ALPH", alpha.encode(picture.alpha)),)
        names.append("alpha")
    extra = container.chunks_size(chunks)
    engine = _engine()
    pixels, mode = picture.pixels, picture.mode
    if picture.alpha is not None:
        pixels = alpha.fill_hidden(pixels, picture.alpha)  # invisible colour: coded as cheaply as can be
    height, width = pixels.shape[:2]
    if rate is not None:
        result = engine.encode_array(pixels, mode, rate=rate, effort=effort, progress=progress)
    elif not chunks:
        result = engine.encode_best(pixels, mode, bpp=bpp, size=size, effort=effort, progress=progress)
    else:
        goal = ratecontrol.target(width, height, bpp=bpp, size=size)
        left = goal.bytes - extra
        what = _listed(names)
        hint = "; pass strip_metadata=True to drop EXIF and XMP" if kept != kept.without_private() else ""
        if left <= OVERHEAD_BYTES:
            raise RateError(f"{goal.asked} is too small for this image: its {what} alone take {extra:,} bytes, "
                            f"leaving {max(left, 0):,} for the picture, which needs more than {OVERHEAD_BYTES}; "
                            f"give a larger target{hint}")
        try:
            result = engine.encode_best(pixels, mode, size=left, effort=effort, progress=progress)
        except RateError as e:
            raise RateError(f"{goal.asked} leaves {left:,} bytes for the picture after its {what} "
                            f"({extra:,} bytes): {e}{hint}") from None
        result = replace(result, target_bytes=goal.bytes)
    data = result.data
    if chunks:
        header, payload = container.unpack(data, max_pixels=width * height)
        data = container.pack(replace(header, chunks=chunks), payload)
    return _Encoded(data, result.rate, result.target_bytes, result.warning, tuple(names), extra)


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, scale: float | str = 1) -> Image.Image:
    """Decode .lc bytes to a PIL image in the mode that was encoded ("RGB" or "L", "RGBA" or "LA"
    with alpha), with the file's ICC profile, EXIF and XMP in its ``info``.

    `scale` 1/2, 1/4, 1/8 or 1/16 (a number or a string such as ``"1/8"``) gives the picture that
    much smaller -- ceil(width * scale) x ceil(height * scale), as Pillow's `Image.reduce` -- decoding
    only what it needs (`reduction`); the alpha plane is box-reduced to it.

    The header is checked (magic, version, model, dimensions against
    `max_pixels`) before anything is allocated.
    """
    factor = reduction(scale)
    data = bytes(data)
    header = container.read_header(data, max_pixels)
    pixels, mode = _engine().decode_array(data, max_pixels=max_pixels, reduce=factor)
    image = Image.fromarray(pixels)
    assert image.mode == mode, (image.mode, mode)
    return with_chunks(image, header, factor)


def reduction(scale: float | str | fractions.Fraction) -> int:
    """The factor a picture is decoded smaller by at `scale` (1, 2, 4, 8 or 16 for 1 .. 1/16);
    ValueError for any other scale. Strings are read as fractions ("1/8", "0.125")."""
    try:
        value = fractions.Fraction(scale.strip() if isinstance(scale, str) else scale)
    except (TypeError, ValueError, ZeroDivisionError):
        value = None
    if isinstance(scale, bool) or value not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(map(str, SCALES))}, got {scale!r}")
    return value.denominator


def with_chunks(image: Image.Image, header: Header, reduce: int = 1) -> Image.Image:
    """`image`, the decoded colour of the file with `header` (`reduce` times smaller than the file's
    size), with the file's alpha plane (box-reduced as much: `Image.reduce`) and metadata."""
    plane = header.chunk(b"ALPH")
    if plane is not None:
        mask = Image.fromarray(alpha.decode(plane, header.width, header.height))
        image.putalpha(mask.reduce(reduce) if reduce > 1 else mask)
    image.info.update(Metadata.from_header(header).info())
    return image


def encode_file(src: ImageSource, dst: PathLike | BinaryIO | None = None, *, bpp: float | None = None,
                size: int | None = None, rate: float | None = None, force: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS, effort: int = DEFAULT_EFFORT, progress=None,
                strip_metadata: bool = False) -> EncodedFile:
    """Encode an image file to an .lc file; give exactly one of bpp, size, rate
    (`effort`, `progress` and `strip_metadata` as for `encode`; metadata dropped as
    malformed is named in the result's `warning`).

    `src` is a path or a binary file object; `dst` a path, a binary file
    object, or None for `src` with the suffix ``.lc``. An existing `dst` is an
    `OutputExistsError` unless `force`; it is checked before the (slow)
    encode and again, atomically, when the file is put in place. An image of
    more than `max_pixels` pixels is an `ImageTooLargeError`, checked from its
    header before its pixels are read.
    """
    _check_target(bpp, size, rate)
    _check_effort(effort)
    dst = _default_output(src, dst, ".lc")
    with _output(src, dst, force) as out:
        picture = load_picture(src, max_pixels=max_pixels)
        with _named(src):
            result = _encode(picture, bpp=bpp, size=size, rate=rate, effort=effort, progress=progress,
                             strip_metadata=strip_metadata)
        out.write(result.data)
    height, width = picture.pixels.shape[:2]
    warning = "; ".join(filter(None, [*picture.notes, result.warning])) or None
    return EncodedFile(_path_of(dst), len(result.data), width, height, picture.image_mode,
                       8 * len(result.data) / (width * height), result.rate, result.target_bytes, warning,
                       result.kept, result.kept_bytes)


def decode_file(src: ImageSource, dst: PathLike | BinaryIO | None = None, *, force: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS, format: str | None = None,
                scale: float | str = 1) -> DecodedFile:
    """Decode an .lc file to an image file: PNG by default, other formats by `dst`'s extension;
    `scale` (1/2 .. 1/16) writes the smaller picture `decode` gives at that scale.

    `src` is a path or a binary file object; `dst` a path, a binary file
    object (PNG unless `format` names another Pillow format), or None for
    `src` with the suffix ``.png``. A path without an extension is an
    `UnsupportedImageError` unless `format` is given. Nothing is written
    unless the whole file decodes, and an existing `dst` is an
    `OutputExistsError` unless `force`.

    A format that does not keep 8-bit pixels exactly with Pillow's default
    settings (JPEG, WebP, AVIF, RGB as GIF...) is written anyway, and the
    result's `warning` says so: the file holds the decoded picture compressed
    again, not the decoded pixels. The file's ICC profile, EXIF and XMP are written
    into PNG, JPEG, WebP, TIFF and AVIF; what a format cannot hold is named in the
    `warning`. A picture with alpha cannot be written as JPEG (`UnsupportedImageError`).
    """
    reduction(scale)  # a bad scale is an error before anything is read or written
    dst = _default_output(src, dst, ".png")
    if format is not None:
        fmt = format.upper()
        _check_can_save(fmt, format)
    else:
        fmt = "PNG" if _is_stream(dst) else _format_for(Path(dst))
    with _output(src, dst, force) as out:
        data = _read_bytes(src)
        with _named(src):
            header = container.read_header(data, max_pixels)
            if header.chunk(b"ALPH") is not None and fmt in _NO_ALPHA_FORMATS:
                raise UnsupportedImageError(f"cannot write {_name(dst)} as {fmt}: the picture has an alpha "
                                            f"channel, which {fmt} cannot hold; name the output .png, .webp or .tif")
            image = decode(data, max_pixels=max_pixels, scale=scale)
        dropped = _save(image, out, fmt, _name(dst), Metadata.from_header(header))
    warnings_ = []
    if image.mode not in _EXACT_FORMATS.get(fmt, ()):
        warnings_.append(f"{fmt} changes the decoded pixels (Pillow writes it at its default settings, which are "
                         "lossy here); name the output .png to keep them exactly")
    if dropped:
        warnings_.append(f"{fmt} as Pillow writes it cannot hold {_listed(dropped)} of the file: left out")
    return DecodedFile(_path_of(dst), fmt, image.width, image.height, image.mode, "; ".join(warnings_) or None)


def _save(image: Image.Image, out: BinaryIO, fmt: str, name: str, kept: Metadata) -> list[str]:
    """Write `image` to `out` as `fmt` with the metadata `kept`, as the file has it; what `fmt` did not take."""
    options, dropped = metadata.save_options(fmt, kept)
    start = out.tell()
    try:
        image.save(out, format=fmt, **options)
    except ValueError as e:  # what Pillow raises for a mode this format cannot store
        raise UnsupportedImageError(f"cannot write {name} as {fmt}: {e}") from None
    except (OSError, TypeError, KeyError, SyntaxError) as e:
        # Pillow's writers parse EXIF (TIFF) and refuse what they cannot: write the picture without it.
        if not options:
            raise
        out.seek(start)
        out.truncate()
        icc = {"icc_profile": options["icc_profile"]} if "icc_profile" in options else {}
        image.save(out, format=fmt, **icc)
        dropped += [f"{n} ({e})" for n in kept.names() if n != "ICC profile"]
    return dropped


def read_header(source: PathLike | BinaryIO | bytes | bytearray | memoryview) -> Header:
    """The header of an .lc file (path, binary file object, or bytes), checked; no torch needed.

    Raises `NotAnLcFileError` for anything that is not an .lc file and the
    container's errors for a damaged or unsupported one.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return container.read_header(bytes(source))
    data = _read_bytes(source)
    with _named(source):
        return container.read_header(data)


def model_info() -> ModelInfo:
    """Name, id, weights digest and rate range of the model encodes use (loads it: imports torch)."""
    info = _engine().model_info()
    return ModelInfo(name=info["name"], model_id=int(info["model_id"]), digest=info["digest"],
                     levels=tuple(float(v) for v in info["levels"]),
                     rate_range=(float(info["rate_range"][0]), float(info["rate_range"][1])))


# -- helpers ------------------------------------------------------------------------------------


def _engine():
    """`lcodec.engine`, imported on first use: it imports torch, which `import lcodec` must not."""
    from . import engine

    return engine


def _picture(image: Image.Image | np.ndarray) -> Picture:
    if isinstance(image, Image.Image):
        return picture_from_image(image)
    if isinstance(image, np.ndarray):
        return picture_from_array(image)
    raise UnsupportedImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def _listed(names: list[str] | tuple[str, ...]) -> str:
    """"a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _check_target(bpp: float | None, size: int | None, rate: float | None) -> None:
    """Exactly one target, and a usable value for it (checked here, before any pixel is touched)."""
    given = [name for name, v in (("bpp", bpp), ("size", size), ("rate", rate)) if v is not None]
    if len(given) != 1:
        raise TypeError(f"give exactly one of bpp, size or rate (got {', '.join(given) or 'none'})")
    if bpp is not None and not (bpp > 0 and math.isfinite(bpp)):
        raise RateError(f"bpp must be a positive number, got {bpp}")
    if size is not None and not (size > 0 and float(size).is_integer()):
        raise RateError(f"size must be a positive whole number of bytes, got {size}")
    if rate is not None and not math.isfinite(rate):
        raise RateError(f"rate must be a finite number, got {rate}")


def _check_effort(effort: int) -> None:
    if isinstance(effort, bool) or not isinstance(effort, int) or not 0 <= effort <= MAX_EFFORT:
        raise ValueError(f"effort must be an integer from 0 to {MAX_EFFORT}, got {effort!r}")


@contextlib.contextmanager
def _named(src: ImageSource) -> Iterator[None]:
    """Prefix the engine's errors (which know no file names) with the input's name."""
    try:
        yield
    except LcodecError as e:
        raise type(e)(f"{_name(src)}: {e}") from e


def _name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _is_stream(obj: object) -> bool:
    return not isinstance(obj, (str, os.PathLike))


def _default_output(src: ImageSource, dst: PathLike | BinaryIO | None, suffix: str) -> PathLike | BinaryIO:
    if dst is not None:
        return dst
    if _is_stream(src):
        raise TypeError("dst is required when src is a file object")
    return Path(src).with_suffix(suffix)


def _path_of(dst: PathLike | BinaryIO) -> Path | None:
    return None if _is_stream(dst) else Path(dst)


def _check_writable(src: ImageSource, dst: Path, force: bool) -> None:
    """Refuse early (before the slow part) to clobber an existing file, a directory or the input itself."""
    if os.path.isdir(dst):
        raise LcodecError(f"cannot write {dst}: it is a directory")
    if not _is_stream(src) and os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise OutputExistsError(f"{dst} is the input file itself; choose another output name")
    if not force and os.path.lexists(dst):
        raise _exists(dst)


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} already exists; choose another output name or pass force=True to overwrite it")


# Formats whose Pillow writer, at its default settings, stores these modes' 8-bit pixels exactly.
_EXACT_FORMATS: dict[str, tuple[str, ...]] = {
    fmt: ("RGB", "L") for fmt in ("BMP", "DIB", "PPM", "SGI", "PCX", "DDS", "JPEG2000")
} | {fmt: ("RGB", "L", "RGBA", "LA") for fmt in ("PNG", "TIFF")} | {"QOI": ("RGB",), "GIF": ("L",),
                                                                   "TGA": ("RGB", "L", "RGBA")}
# Formats Pillow writes without an alpha channel.
_NO_ALPHA_FORMATS = frozenset({"JPEG", "MPO", "PPM", "PCX", "EPS", "PDF", "MPEG", "BLP"})


def _format_for(dst: Path) -> str:
    """The Pillow format that writes files named like `dst` (by extension)."""
    if not dst.suffix:
        raise UnsupportedImageError(
            f"{dst} has no extension to choose the image format by; name it .png, .bmp, .tif, .webp or .jpg")
    fmt = Image.registered_extensions().get(dst.suffix.lower())  # (loads all of Pillow's plugins)
    _check_can_save(fmt, dst.suffix)
    return fmt


def _check_can_save(fmt: str | None, what: str) -> None:
    Image.init()
    if fmt not in Image.SAVE:
        raise UnsupportedImageError(
            f"cannot write {what!r} images; name the output .png (the default), .bmp, .tif, .webp or .jpg")


def _read_bytes(source: PathLike | BinaryIO) -> bytes:
    if _is_stream(source):
        return source.read()
    try:
        with open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise LcodecError(f"{_name(source)}: no such file") from None
    except IsADirectoryError:
        raise LcodecError(f"{_name(source)}: is a directory") from None
    except OSError as e:
        raise LcodecError(f"{_name(source)}: cannot read it: {e.strerror or e}") from None


@contextlib.contextmanager
def _output(src: ImageSource, dst: PathLike | BinaryIO, force: bool) -> Iterator[BinaryIO]:
    """A file object whose content becomes `dst` whole, when the block ends without an exception.

    For a path, the checks of `_check_writable` and the creation of the
    temporary file (see `_atomic_file`) come first, so a block that does
    slow work fails at once for an output that cannot be written. For a
    stream, the content is collected and written in one go at the end: a
    failure writes nothing.
    """
    if _is_stream(dst):
        buffer = io.BytesIO()
        yield buffer
        dst.write(buffer.getvalue())
        dst.flush()
        return
    path = Path(dst)
    _check_writable(src, path, force)
    with _atomic_file(path, force) as f:
        yield f


@contextlib.contextmanager
def _atomic_file(path: Path, force: bool) -> Iterator[BinaryIO]:
    """Create `path` whole or not at all, and never replace an existing file unless `force`.

    The data goes to a temporary file in the same directory (so the final
    rename stays on one file system and is atomic), created on entry and
    removed on any failure, KeyboardInterrupt included. Without `force` the
    temporary file is hard-linked into place, which fails if `path` appeared
    meanwhile; where hard links are not supported, an existence check and a
    rename do.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        # Mode 0o666 less the umask, as for any new file (mkstemp would make it 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists(path) from None
        except OSError:  # no hard links here (some network or FAT file systems)
            if os.path.lexists(path):
                raise _exists(path) from None
            os.replace(tmp, path)
    except OSError as e:
        raise _cannot_write(path, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _cannot_write(path: Path, e: OSError) -> LcodecError:
    if e.errno == errno.ENOENT:
        why = f"there is no directory {path.parent}"
    elif e.errno == errno.ENOTDIR:
        why = f"{path.parent} is not a directory"
    else:
        why = e.strerror or str(e)
    return LcodecError(f"cannot write {path}: {why}")
