"""The .lc container, versions 1 and 2: header, payload, CRC32. Mirrors `bitstream/SPEC.md`.

    offset  size  type      field
         0     4  bytes     magic b"lcod"
         4     1  u8        format version (1 or 2)
         5     1  u8        model id (append-only model table)
         6     4  bytes     weights digest (first 4 bytes of the weights' SHA-256)
        10     2  u16 BE    width in pixels (>= 1)
        12     2  u16 BE    height in pixels (>= 1)
        14     1  u8        mode: 0 = L, 1 = RGB
        15     2  i16 BE    rate_q: the rate parameter q times 1024
        17     n  bytes     payload: one range-coder stream (z, then y)
    17 + n     4  u32 BE    CRC32 of bytes 0 .. 16 + n

Parsing checks, in this order, before anything is allocated from a size field:
length, magic, version, CRC, dimensions, mode, pixel cap. This module imports
neither torch nor constriction, so reading a header (`lcodec info`) is cheap.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..errors import CorruptFileError, ImageTooLargeError, NotAnLcFileError, UnsupportedVersionError

__all__ = ["MAGIC", "FORMAT_VERSION", "VERSIONS", "HEADER_SIZE", "CRC_SIZE", "OVERHEAD_BYTES", "DEFAULT_MAX_PIXELS",
           "MODES", "Header", "pack", "unpack", "read_header"]

MAGIC = b"lcod"
FORMAT_VERSION = 2  # the version new files are written in
VERSIONS = (1, 2)  # every version this lcodec reads and writes (SPEC.md, "Version policy")
_FIELDS = struct.Struct(">4sBB4sHHBh")  # magic, version, model_id, digest, width, height, mode, rate_q
HEADER_SIZE = _FIELDS.size  # 17
CRC_SIZE = 4
OVERHEAD_BYTES = HEADER_SIZE + CRC_SIZE  # 21: every byte of a file that is not payload
DEFAULT_MAX_PIXELS = 8192 * 8192  # decompression-bomb limit; callers may raise it
RATE_SCALE = 1024  # rate_q holds the rate parameter q in units of 1/1024
MODES = ("L", "RGB")  # mode byte -> mode; the index is what the file stores

assert HEADER_SIZE == 17


@dataclass(frozen=True)
class Header:
    """The fixed fields of a .lc file (see the table above); payload_size is derived from the length.

    A Header always describes a file this lcodec can write: fields out of range
    raise ValueError on construction (a programming error, not a user one).
    """

    version: int
    model_id: int  # 0..255, an id of the model table in SPEC.md
    weights_digest: bytes  # 4 bytes: the first 4 bytes of the SHA-256 of the weights file
    width: int  # 1..65535
    height: int  # 1..65535
    mode: str  # "L" or "RGB"
    rate_q: int  # round(q * 1024), signed 16-bit
    payload_size: int  # bytes of range-coder stream

    def __post_init__(self) -> None:
        checks = (
            (self.version in VERSIONS, f"this lcodec writes format versions {VERSIONS} only"),
            (0 <= self.model_id <= 255, "model_id must fit in a byte"),
            (isinstance(self.weights_digest, bytes) and len(self.weights_digest) == 4,
             "weights_digest must be 4 bytes"),
            (1 <= self.width <= 0xFFFF and 1 <= self.height <= 0xFFFF, "width and height must be in 1..65535"),
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (-0x8000 <= self.rate_q <= 0x7FFF, "rate_q must fit in a signed 16-bit integer"),
            (self.payload_size >= 0, "payload_size must be non-negative"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (header {self!r})")

    @property
    def pixels(self) -> int:
        return self.width * self.height


def pack(header: Header, payload: bytes) -> bytes:
    """The complete .lc file for `header` and `payload` (header.payload_size must equal len(payload))."""
    if header.payload_size != len(payload):
        raise ValueError(f"header.payload_size is {header.payload_size} but the payload has {len(payload)} bytes")
    body = _FIELDS.pack(MAGIC, header.version, header.model_id, header.weights_digest, header.width,
                        header.height, MODES.index(header.mode), header.rate_q) + bytes(payload)
    return body + struct.pack(">I", zlib.crc32(body))


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Validate a whole .lc file and return its header, without decoding the payload.

    Needs the whole file (the CRC covers it; CRC32 runs at GB/s). Raises
    NotAnLcFileError, UnsupportedVersionError, CorruptFileError or
    ImageTooLargeError (if width * height > max_pixels), in the order of SPEC.md.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    data = memoryview(data).cast("B")
    # A file shorter than the magic is checked against the part of the magic it has, so
    # that an empty or cut file reads as truncated and anything else as not-an-lc-file.
    if bytes(data[:len(MAGIC)]) != MAGIC[:len(data)]:
        raise NotAnLcFileError("this is not an .lc file (it does not start with the lcodec magic bytes 'lcod').")
    if len(data) < OVERHEAD_BYTES:
        raise CorruptFileError(f"the .lc file is truncated: it has {len(data)} bytes, "
                               f"fewer than the {OVERHEAD_BYTES} of an empty file.")
    _, version, model_id, digest, width, height, mode, rate_q = _FIELDS.unpack_from(data)
    if version not in VERSIONS:
        # Before the CRC: a later version may lay out (or checksum) the file differently.
        raise UnsupportedVersionError(f"this .lc file uses format version {version}, but this lcodec only reads "
                                      f"versions {VERSIONS[0]} to {VERSIONS[-1]}; upgrade lcodec to decode it.")
    (stored_crc,) = struct.unpack_from(">I", data, len(data) - CRC_SIZE)
    if zlib.crc32(data[:len(data) - CRC_SIZE]) != stored_crc:
        raise CorruptFileError("the .lc file is corrupt: its CRC32 checksum does not match "
                               "(it was damaged or truncated).")
    if width == 0 or height == 0:
        raise CorruptFileError(f"the .lc file is corrupt: it declares an empty image ({width}x{height}).")
    if mode >= len(MODES):
        raise CorruptFileError(f"the .lc file is corrupt: it declares an unknown image mode (byte {mode}).")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{max_pixels} pixels; pass a larger max_pixels to decode it if you trust this file.")
    return Header(version=version, model_id=model_id, weights_digest=bytes(digest), width=width, height=height,
                  mode=MODES[mode], rate_q=rate_q, payload_size=len(data) - OVERHEAD_BYTES)


def unpack(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, bytes]:
    """Validate a .lc file (see `read_header`) and return its header and payload."""
    header = read_header(data, max_pixels)
    return header, bytes(memoryview(data)[HEADER_SIZE:HEADER_SIZE + header.payload_size])
