"""A Pillow plugin for .lc files: ``Image.open("photo.lc")`` works once lcodec is imported.

Opening reads and checks only the header (no torch); the pixels are decoded
by `lcodec.engine` when Pillow first needs them (``load()``, ``convert()``,
``save()``...). A file with an alpha plane opens as "RGBA" or "LA", and the
file's ICC profile, EXIF and XMP are in ``info`` (``icc_profile``, ``exif``,
``xmp``) from the start. Pillow cannot write .lc files: use `lcodec.encode`,
which needs a rate target.
"""

from __future__ import annotations

from PIL import Image, ImageFile

from .bitstream import container
from .errors import NotAnLcFileError
from .metadata import Metadata

FORMAT = "LC"


def _accept(prefix: bytes) -> bool:
    return prefix[: len(container.MAGIC)] == container.MAGIC


class LcImageFile(ImageFile.ImageFile):
    """An .lc file as a Pillow image; `header` is its `lcodec.bitstream.container.Header`."""

    format = FORMAT
    format_description = "lcodec learned image"

    def _open(self) -> None:
        assert self.fp is not None
        # The whole file: the header is checked against the CRC that ends it. An .lc file is
        # small, and `_accept` has already turned away anything without the magic.
        self._data = self.fp.read()
        try:
            self.header = container.read_header(self._data)
        except NotAnLcFileError as e:
            raise SyntaxError(str(e)) from e  # Pillow's "not this format"
        self._size = (self.header.width, self.header.height)
        self._mode = self.header.mode + ("A" if self.header.chunk(b"ALPH") is not None else "")
        self.info.update(Metadata.from_header(self.header).info())
        self.tile = []  # no Pillow decoder: `load` decodes

    def load(self):
        if self._im is None:
            from . import api, engine  # imports torch: only when pixels are wanted

            pixels, _ = engine.decode_array(self._data)
            self.im = api.with_chunks(Image.fromarray(pixels), self.header).im
            self._data = b""
            if self.fp is not None and self._exclusive_fp:
                self.fp.close()
            self.fp = None
        return Image.Image.load(self)


def register() -> None:
    """Register the .lc format with Pillow (done by ``import lcodec``; idempotent)."""
    Image.register_open(FORMAT, LcImageFile, _accept)
    Image.register_extension(FORMAT, ".lc")
    Image.register_mime(FORMAT, "image/x-lcodec")
