"""A Pillow plugin for .lc files: ``Image.open("photo.lc")`` works once lcodec is imported.

Opening reads and checks only the header (no torch); the pixels are decoded
by `lcodec.engine` when Pillow first needs them (``load()``, ``convert()``,
``save()``...). A file with an alpha plane opens as "RGBA" or "LA", and the
file's ICC profile, EXIF and XMP are in ``info`` (``icc_profile``, ``exif``,
``xmp``) from the start. Pillow cannot write .lc files: use `lcodec.encode`,
which needs a rate target.

``draft(mode, size)`` -- which ``Image.thumbnail`` calls -- picks, as Pillow's JPEG plugin does,
the largest reduction 2, 4, 8 or 16 whose picture is still at least `size`; ``load()`` then
decodes only the coarse levels that picture needs (`lcodec.decode` with ``scale``), alpha included.
"""

from __future__ import annotations

from PIL import Image, ImageFile

from .api import SCALES

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
        self._reduce = 1  # set by `draft`

    def draft(self, mode: str | None, size: tuple[int, int] | None) -> tuple[str, tuple[int, int, float, float]] | None:
        """Decode at the largest reduction f (1, 2, 4, 8, 16) with f <= min(width // size[0],
        height // size[1]): the image becomes ceil(width / f) x ceil(height / f), as JPEG's draft
        makes it. Returns (mode, box), box being the original picture in the new one's
        coordinates, or None when nothing changes: no `size`, or the pixels already loaded.
        The mode stays the file's (`mode` is ignored). It may be called again before `load`."""
        if not size or self._im is not None:
            return None
        width, height = self.header.width, self.header.height
        fit = min(width // max(size[0], 1), height // max(size[1], 1))
        self._reduce = max(s.denominator for s in SCALES if s.denominator <= max(fit, 1))
        self._size = (-(-width // self._reduce), -(-height // self._reduce))
        return self.mode, (0, 0, width / self._reduce, height / self._reduce)

    def load(self):
        if self._im is None:
            from . import api, engine  # imports torch: only when pixels are wanted

            pixels, _ = engine.decode_array(self._data, reduce=self._reduce)
            self.im = api.with_chunks(Image.fromarray(pixels), self.header, self._reduce).im
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
