"""The lcodec library: images and files in, .lc bytes and files out.

Everything the command line does goes through these functions; the CLI only
parses options and prints. Torch is imported lazily, by the functions that
code pixels (through `lcodec.engine`), so that ``import lcodec`` and
`read_header` stay light.

Rate targets (exactly one per encode):

- ``bpp``: the whole file, header included, is at most ``bpp * W * H / 8`` bytes;
- ``size``: the whole file is at most ``size`` bytes;
- ``rate``: the model's rate parameter q itself, one pass and no search.

Files are written atomically -- through a temporary file in the destination's
directory that is renamed into place -- so a failure or Ctrl-C never leaves a
partial output, and an existing file is never replaced unless ``force=True``.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .bitstream import container
from .bitstream.container import DEFAULT_MAX_PIXELS, Header
from .errors import LcodecError, OutputExistsError, UnsupportedImageError
from .imageio import ImageSource, load_image, pixels_from_array, pixels_from_image

PathLike = str | os.PathLike


@dataclass(frozen=True)
class EncodedFile:
    """What `encode_file` wrote."""

    path: Path | None  # the .lc file; None when written to a stream
    size: int  # bytes of the whole file, header included
    width: int
    height: int
    mode: str  # "RGB" or "L"
    bpp: float  # 8 * size / (width * height): the real rate of the whole file
    rate: float  # the model's rate parameter q that made it
    target_bytes: int | None  # the size limit asked for (None for an explicit rate)
    warning: str | None = None  # e.g. the file fell well short of the target: the model's top rate


@dataclass(frozen=True)
class DecodedFile:
    """What `decode_file` wrote."""

    path: Path | None  # the image file; None when written to a stream
    format: str  # the Pillow format written, e.g. "PNG"
    width: int
    height: int
    mode: str  # "RGB" or "L", as encoded


@dataclass(frozen=True)
class ModelInfo:
    """The model this installation encodes with."""

    name: str
    model_id: int  # what .lc files store; ids are never reused
    digest: str  # hex SHA-256 of the weights (files store its first 4 bytes)
    levels: tuple[float, ...]  # the target bpp the model was trained for, per rate level
    rate_range: tuple[float, float]  # the smallest and largest rate parameter q


def encode(image: Image.Image | np.ndarray, *, bpp: float | None = None, size: int | None = None,
           rate: float | None = None) -> bytes:
    """Encode a PIL image or a uint8 array to .lc bytes; give exactly one of bpp, size, rate.

    A PIL image is mapped to RGB or grayscale as `lcodec.imageio` describes
    (EXIF orientation applied; fully opaque alpha dropped, real transparency
    refused). An array is (H, W) grayscale, (H, W, 3) RGB or opaque (H, W, 4).

    >>> data = lcodec.encode(Image.open("photo.png"), bpp=0.5)   # doctest: +SKIP
    """
    _check_one_target(bpp, size, rate)
    return _engine().encode_array(*_pixels(image), bpp=bpp, size=size, rate=rate).data


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode .lc bytes to a PIL image in the mode that was encoded ("RGB" or "L").

    The header is checked (magic, version, model, dimensions against
    `max_pixels`) before anything is allocated.
    """
    pixels, mode = _engine().decode_array(bytes(data), max_pixels=max_pixels)
    image = Image.fromarray(pixels)
    assert image.mode == mode, (image.mode, mode)
    return image


def encode_file(src: ImageSource, dst: PathLike | BinaryIO | None = None, *, bpp: float | None = None,
                size: int | None = None, rate: float | None = None, force: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedFile:
    """Encode an image file to an .lc file; give exactly one of bpp, size, rate.

    `src` is a path or a binary file object; `dst` a path, a binary file
    object, or None for `src` with the suffix ``.lc``. An existing `dst` is an
    `OutputExistsError` unless `force`; it is checked before the (slow)
    encode and again, atomically, when the file is put in place.
    """
    _check_one_target(bpp, size, rate)
    dst = _default_output(src, dst, ".lc")
    if not _is_stream(dst):
        _check_writable(src, Path(dst), force)
    pixels, mode = load_image(src, max_pixels=max_pixels)
    with _named(src):
        result = _engine().encode_array(pixels, mode, bpp=bpp, size=size, rate=rate)
    path = _write(dst, lambda f: f.write(result.data), force)
    height, width = pixels.shape[:2]
    return EncodedFile(path, len(result.data), width, height, mode, result.bpp, result.rate,
                       result.target_bytes, result.warning)


def decode_file(src: ImageSource, dst: PathLike | BinaryIO | None = None, *, force: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS, format: str | None = None) -> DecodedFile:
    """Decode an .lc file to an image file: PNG by default, other formats by `dst`'s extension.

    `src` is a path or a binary file object; `dst` a path, a binary file
    object (PNG unless `format` names another Pillow format), or None for
    `src` with the suffix ``.png``. Nothing is written unless the whole file
    decodes, and an existing `dst` is an `OutputExistsError` unless `force`.
    """
    dst = _default_output(src, dst, ".png")
    if format is not None:
        fmt = format.upper()
        _check_can_save(fmt, format)
    else:
        fmt = "PNG" if _is_stream(dst) else _format_for(Path(dst))
    if not _is_stream(dst):
        _check_writable(src, Path(dst), force)
    data = _read_bytes(src)
    with _named(src):
        image = decode(data, max_pixels=max_pixels)
    path = _write(dst, lambda f: image.save(f, format=fmt), force)
    return DecodedFile(path, fmt, image.width, image.height, image.mode)


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


def _pixels(image: Image.Image | np.ndarray) -> tuple[np.ndarray, str]:
    if isinstance(image, Image.Image):
        return pixels_from_image(image)
    if isinstance(image, np.ndarray):
        return pixels_from_array(image)
    raise UnsupportedImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def _check_one_target(bpp: float | None, size: int | None, rate: float | None) -> None:
    given = [name for name, v in (("bpp", bpp), ("size", size), ("rate", rate)) if v is not None]
    if len(given) != 1:
        raise TypeError(f"give exactly one of bpp, size or rate (got {', '.join(given) or 'none'})")


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


def _check_writable(src: ImageSource, dst: Path, force: bool) -> None:
    """Refuse early (before the slow part) to clobber an existing file or the input itself."""
    if not _is_stream(src) and os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise OutputExistsError(f"{dst} is the input file itself; choose another output name")
    if not force and os.path.lexists(dst):
        raise _exists(dst)


def _exists(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} already exists; choose another output name or overwrite it with --force")


def _format_for(dst: Path) -> str:
    """The Pillow format that writes files named like `dst` (by extension)."""
    fmt = Image.registered_extensions().get(dst.suffix.lower())  # (loads all of Pillow's plugins)
    _check_can_save(fmt, dst.suffix or dst.name)
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


def _write(dst: PathLike | BinaryIO, write: Callable[[BinaryIO], object], force: bool) -> Path | None:
    """Write through `write(f)` to a stream, or atomically to a path; returns the path."""
    if _is_stream(dst):
        buffer = io.BytesIO()  # the whole output first: a failure writes nothing
        write(buffer)
        dst.write(buffer.getvalue())
        dst.flush()
        return None
    path = Path(dst)
    _write_atomically(path, write, force)
    return path


def _write_atomically(path: Path, write: Callable[[BinaryIO], object], force: bool) -> None:
    """Create `path` whole or not at all, and never replace an existing file unless `force`.

    The data goes to a temporary file in the same directory (so the final
    rename stays on one file system and is atomic), which is removed on any
    failure, KeyboardInterrupt included. Without `force` the temporary file is
    hard-linked into place, which fails if `path` appeared meanwhile; where
    hard links are not supported, an existence check and a rename do.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        # Mode 0o666 less the umask, as for any new file (mkstemp would make it 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise LcodecError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
        raise LcodecError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
