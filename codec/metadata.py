"""What a picture carries besides its pixels: the ICC colour profile, EXIF and XMP.

The learned codec codes pixel values as they are stored; the ICC profile says what colours
they mean (a Display-P3 or Adobe-RGB photo looks wrong without it), EXIF and XMP say where,
when and by whom. They travel in the .lc file's chunks `ICCP`, `EXIF` and `XMP `
(bitstream/SPEC.md, "Metadata and alpha"), byte for byte, except that an EXIF orientation the
encoder applied to the pixels is reset to 1 (otherwise a viewer would turn the picture twice).

Pillow spells them differently per format; this module maps its ``info`` to one form and back:

* ``icc_profile``: the profile's bytes, as in every format;
* ``exif``: the TIFF structure (starting ``II*\\0`` or ``MM\\0*``) in the file; Pillow's
  ``info["exif"]`` gets the JPEG/PNG convention, with the ``Exif\\0\\0`` prefix;
* ``xmp``: the XMP packet's bytes (UTF-8 XML); PNG's Pillow reader gives it as text.

Malformed metadata never stops an encode or a decode: it is dropped, and the caller gets a
note saying what and why, to show as a warning.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from .bitstream.container import Chunk, Header

__all__ = ["Metadata", "from_info", "save_options", "describe_icc"]

EXIF_PREFIX = b"Exif\x00\x00"  # JPEG's APP1 marker and Pillow's info["exif"] start with it; the .lc chunk does not
ICC_HEADER_BYTES = 128
_ORIENTATION_TAG = 0x0112
_XMP_ORIENTATION = re.compile(rb'(tiff:Orientation=")[0-9]+(")|(<tiff:Orientation>)[0-9]+(</tiff:Orientation>)')

# Formats whose Pillow writer stores each kind (how, see `save_options`).
_ICC_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF", "AVIF", "MPO", "JPEG2000"})
_EXIF_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF", "AVIF", "MPO"})
_XMP_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF", "AVIF", "MPO"})
_JPEG_MARKER_BYTES = 65533  # the most an APP marker holds (Pillow refuses longer EXIF; XMP has 29 bytes of name)


@dataclass(frozen=True)
class Metadata:
    """The ICC profile, EXIF (TIFF structure, no ``Exif\\0\\0``) and XMP packet of a picture; None where absent."""

    icc_profile: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.icc_profile, self.exif, self.xmp))

    def without_private(self) -> Metadata:
        """Only the ICC profile: EXIF and XMP can say where, when and with what a photo was taken."""
        return Metadata(icc_profile=self.icc_profile)

    def chunks(self) -> tuple[Chunk, ...]:
        """The file's chunks for this metadata, in the order SPEC.md gives (ICCP, EXIF, XMP)."""
        pairs = ((b"ICCP", self.icc_profile), (b"EXIF", self.exif), (b"XMP ", self.xmp))
        return tuple(Chunk(tag, data) for tag, data in pairs if data is not None)

    @classmethod
    def from_header(cls, header: Header) -> Metadata:
        return cls(icc_profile=header.chunk(b"ICCP"), exif=header.chunk(b"EXIF"), xmp=header.chunk(b"XMP "))

    def info(self) -> dict[str, bytes]:
        """Pillow's ``info`` entries for this metadata (``icc_profile``, ``exif``, ``xmp``)."""
        out = {}
        if self.icc_profile is not None:
            out["icc_profile"] = self.icc_profile
        if self.exif is not None:
            out["exif"] = EXIF_PREFIX + self.exif
        if self.xmp is not None:
            out["xmp"] = self.xmp
        return out

    def names(self) -> list[str]:
        """What it holds, in words: e.g. ["ICC profile", "EXIF"]."""
        return [name for name, v in (("ICC profile", self.icc_profile), ("EXIF", self.exif), ("XMP", self.xmp))
                if v is not None]


def from_info(info: dict, *, orientation_applied: bool) -> tuple[Metadata, list[str]]:
    """The metadata in a Pillow image's ``info``, and notes on what was dropped as malformed.

    With `orientation_applied` (the EXIF orientation was applied to the pixels), the orientation
    in EXIF and in XMP is set to 1, every other byte kept.
    """
    notes: list[str] = []
    icc = _as_bytes(info.get("icc_profile"))
    if icc is not None:
        why = _icc_problem(icc)
        if why:
            notes.append(f"the ICC profile is malformed ({why}): dropped, so the colours are read as sRGB")
            icc = None
    exif = _as_bytes(info.get("exif"))
    if exif is not None:
        if exif.startswith(EXIF_PREFIX):
            exif = exif[len(EXIF_PREFIX):]
        if not exif:
            exif = None
        elif exif[:4] not in (b"II*\x00", b"MM\x00*"):
            notes.append("the EXIF data is malformed (it does not start with a TIFF header): dropped")
            exif = None
        elif orientation_applied:
            exif = _exif_upright(exif)
    xmp = info.get("xmp", info.get("XML:com.adobe.xmp"))
    xmp = xmp.encode("utf-8", "surrogatepass") if isinstance(xmp, str) else _as_bytes(xmp)
    if xmp is not None and orientation_applied:
        xmp = _XMP_ORIENTATION.sub(lambda m: b"1".join(g for g in m.groups() if g is not None), xmp)
    return Metadata(icc or None, exif, xmp or None), notes


def save_options(fmt: str, metadata: Metadata) -> tuple[dict, list[str]]:
    """Keyword arguments for Pillow's ``Image.save`` in format `fmt` that write `metadata`, and
    what `fmt` cannot hold (names, for a warning)."""
    options: dict = {}
    dropped: list[str] = []
    if metadata.icc_profile is not None:
        if fmt in _ICC_FORMATS:
            options["icc_profile"] = metadata.icc_profile
        else:
            dropped.append("the ICC profile")
    exif = None if metadata.exif is None else EXIF_PREFIX + metadata.exif
    xmp = metadata.xmp
    if exif is not None and fmt in ("JPEG", "MPO") and len(exif) > _JPEG_MARKER_BYTES:
        dropped.append(f"EXIF ({len(exif):,} bytes; JPEG holds at most {_JPEG_MARKER_BYTES:,})")
        exif = None
    if xmp is not None and fmt in ("JPEG", "MPO") and len(xmp) > _JPEG_MARKER_BYTES - 29:
        dropped.append(f"XMP ({len(xmp):,} bytes; JPEG holds at most {_JPEG_MARKER_BYTES - 29:,})")
        xmp = None
    if exif is not None and fmt not in _EXIF_FORMATS:
        dropped.append("EXIF")
        exif = None
    if xmp is not None and fmt not in _XMP_FORMATS:
        dropped.append("XMP")
        xmp = None
    if fmt == "PNG" and xmp is not None:
        try:
            text = xmp.decode("utf-8")
        except UnicodeDecodeError:
            dropped.append("XMP (not UTF-8, which PNG's iTXt chunk needs)")
        else:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_itxt("XML:com.adobe.xmp", text)
            options["pnginfo"] = info
        xmp = None
    if fmt == "TIFF" and (exif is not None or xmp is not None):
        # Pillow's TIFF writer takes EXIF as tags (of IFD0 and the EXIF IFD) and XMP as tag 700.
        from PIL import Image

        tags = Image.Exif()
        if exif is not None:
            tags.load(exif)
        if xmp is not None:
            tags[700] = xmp
        options["exif"] = tags
        exif = xmp = None
    if exif is not None:
        options["exif"] = exif
    if xmp is not None:
        options["xmp"] = xmp
    return options, dropped


def describe_icc(icc: bytes) -> str | None:
    """The profile's description (its ``desc`` tag, ICC v2 or v4), or None if it has none that reads."""
    try:
        (count,) = struct.unpack_from(">I", icc, ICC_HEADER_BYTES)
        for i in range(min(count, 1000)):
            sig, offset, size = struct.unpack_from(">4sII", icc, ICC_HEADER_BYTES + 4 + 12 * i)
            if sig != b"desc":
                continue
            tag = icc[offset:offset + size]
            if tag[:4] == b"desc":  # v2 textDescriptionType: a counted ASCII string
                (n,) = struct.unpack_from(">I", tag, 8)
                text = tag[12:12 + n].split(b"\x00", 1)[0].decode("latin-1")
            elif tag[:4] == b"mluc":  # v4 multiLocalizedUnicodeType: the first record's UTF-16BE string
                n, start = struct.unpack_from(">II", tag, 20)
                text = tag[start:start + n].decode("utf-16-be")
            else:
                return None
            text = "".join(ch for ch in text if ch.isprintable()).strip()
            return text[:80] or None
    except (struct.error, UnicodeDecodeError):
        return None
    return None


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    return None


def _icc_problem(icc: bytes) -> str | None:
    """Why `icc` cannot be an ICC profile (ICC.1 header: size, then 'acsp' at byte 36), or None."""
    if len(icc) < ICC_HEADER_BYTES:
        return f"{len(icc)} bytes, shorter than the 128-byte ICC header"
    if icc[36:40] != b"acsp":
        return "no 'acsp' signature"
    return None


def _exif_upright(tiff: bytes) -> bytes:
    """`tiff` (EXIF's TIFF structure) with the IFD0 Orientation set to 1 in place; unchanged where it has none."""
    order = {b"II": "<", b"MM": ">"}[tiff[:2]]
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (entries,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(entries):
            at = ifd + 2 + 12 * i
            tag, kind, count = struct.unpack_from(order + "HHI", tiff, at)
            if tag == _ORIENTATION_TAG and kind == 3 and count == 1:  # one SHORT, stored in the entry itself
                return tiff[:at + 8] + struct.pack(order + "H", 1) + tiff[at + 10:]
    except struct.error:
        pass
    return tiff
