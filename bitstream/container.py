"""The .lc container, versions 1 and 2: header, extension chunks, payload, CRC32. Mirrors `bitstream/SPEC.md`.

    offset  size  type      field
         0     4  bytes     magic b"lcod"
         4     1  u8        format version (1 or 2)
         5     1  u8        model id (append-only model table)
         6     4  bytes     weights digest (first 4 bytes of the weights' SHA-256)
        10     2  u16 BE    width in pixels (>= 1)
        12     2  u16 BE    height in pixels (>= 1)
        14     1  u8        mode: 0 = L, 1 = RGB; in version 2, + 0x80 if extension chunks follow
        15     2  i16 BE    rate_q: the rate parameter q times 1024
        17     e  bytes     version 2 with the 0x80 flag only: u8 chunk count k >= 1, then k chunks,
                            each a 4-byte ASCII tag, a u32 BE length and that many bytes
    17 + e     n  bytes     payload: one range-coder stream (z, then y)
 17 + e + n    4  u32 BE    CRC32 of every byte before it

A file without chunks (e = 0) is laid out exactly as in version 1 and costs the same 21 bytes of
overhead. Chunks carry what the learned codec does not code: the ICC profile, EXIF, XMP
(`lcodec.metadata`) and the alpha plane (`lcodec.alpha`); the container only checks their framing.

Parsing checks, in this order, before anything is allocated from a size field:
length, magic, version, CRC, dimensions, mode, chunks, pixel cap. This module imports
neither torch nor constriction, so reading a header (`lcodec info`) is cheap.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..errors import CorruptFileError, ImageTooLargeError, NotAnLcFileError, UnsupportedVersionError

__all__ = ["MAGIC", "FORMAT_VERSION", "VERSIONS", "HEADER_SIZE", "CRC_SIZE", "OVERHEAD_BYTES", "DEFAULT_MAX_PIXELS",
           "MODES", "CHUNK_TAGS", "Chunk", "Header", "chunks_size", "pack", "unpack", "read_header"]

MAGIC = b"lcod"
FORMAT_VERSION = 2  # the version new files are written in
VERSIONS = (1, 2)  # every version this lcodec reads and writes (SPEC.md, "Version policy")
_FIELDS = struct.Struct(">4sBB4sHHBh")  # magic, version, model_id, digest, width, height, mode, rate_q
HEADER_SIZE = _FIELDS.size  # 17
CRC_SIZE = 4
OVERHEAD_BYTES = HEADER_SIZE + CRC_SIZE  # 21: every byte of a file without chunks that is not payload
DEFAULT_MAX_PIXELS = 8192 * 8192  # decompression-bomb limit; callers may raise it
RATE_SCALE = 1024  # rate_q holds the rate parameter q in units of 1/1024
MODES = ("L", "RGB")  # mode byte -> mode; the index is what the file stores
CHUNKS_FLAG = 0x80  # version 2: set in the mode byte when a chunk block follows the header
_CHUNK_HEAD = struct.Struct(">4sI")  # tag, length
MAX_CHUNKS = 255  # the count is one byte
# Every tag version 2 defines (SPEC.md, "Metadata and alpha"), in the order the encoder writes them.
# A reader refuses others: a new kind of chunk is a new format version.
CHUNK_TAGS = (b"ICCP", b"EXIF", b"XMP ", b"ALPH")

assert HEADER_SIZE == 17


@dataclass(frozen=True)
class Chunk:
    """One extension chunk: a tag of `CHUNK_TAGS` and its bytes (less than 4 GiB)."""

    tag: bytes
    data: bytes

    def __post_init__(self) -> None:
        if self.tag not in CHUNK_TAGS:
            raise ValueError(f"unknown chunk tag {self.tag!r}; version 2 defines {CHUNK_TAGS}")
        if not isinstance(self.data, bytes) or len(self.data) > 0xFFFFFFFF:
            raise ValueError(f"chunk {self.tag!r}: data must be bytes shorter than 4 GiB")

    def __repr__(self) -> str:  # the bytes can be megabytes
        return f"Chunk({self.tag!r}, {len(self.data)} bytes)"


def chunks_size(chunks: tuple[Chunk, ...] | list[Chunk]) -> int:
    """Bytes that `chunks` add to a file: 0 for none, else the count byte and each chunk's 8-byte head and data."""
    return 1 + sum(_CHUNK_HEAD.size + len(c.data) for c in chunks) if chunks else 0


@dataclass(frozen=True)
class Header:
    """The fixed fields of a .lc file (see the table above) and its chunks; payload_size is derived
    from the length.

    A Header always describes a file this lcodec can write: fields out of range
    raise ValueError on construction (a programming error, not a user one).
    """

    version: int
    model_id: int  # 0..255, an id of the model table in SPEC.md
    weights_digest: bytes  # 4 bytes: the first 4 bytes of the SHA-256 of the weights file
    width: int  # 1..65535
    height: int  # 1..65535
    mode: str  # "L" or "RGB": what the payload codes (an alpha plane is the ALPH chunk)
    rate_q: int  # round(q * 1024), signed 16-bit
    payload_size: int  # bytes of range-coder stream
    chunks: tuple[Chunk, ...] = ()  # version 2 only; each tag at most once

    def __post_init__(self) -> None:
        tags = [c.tag for c in self.chunks]
        checks = (
            (self.version in VERSIONS, f"this lcodec writes format versions {VERSIONS} only"),
            (0 <= self.model_id <= 255, "model_id must fit in a byte"),
            (isinstance(self.weights_digest, bytes) and len(self.weights_digest) == 4,
             "weights_digest must be 4 bytes"),
            (1 <= self.width <= 0xFFFF and 1 <= self.height <= 0xFFFF, "width and height must be in 1..65535"),
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (-0x8000 <= self.rate_q <= 0x7FFF, "rate_q must fit in a signed 16-bit integer"),
            (self.payload_size >= 0, "payload_size must be non-negative"),
            (isinstance(self.chunks, tuple) and all(isinstance(c, Chunk) for c in self.chunks),
             "chunks must be a tuple of Chunk"),
            (not self.chunks or self.version >= 2, "chunks need format version 2"),
            (len(set(tags)) == len(tags), "each chunk tag may appear once"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (header {self!r})")

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def chunk(self, tag: bytes) -> bytes | None:
        """The data of the chunk tagged `tag`, or None if the file has none."""
        return next((c.data for c in self.chunks if c.tag == tag), None)


def pack(header: Header, payload: bytes) -> bytes:
    """The complete .lc file for `header` (its chunks included) and `payload`
    (header.payload_size must equal len(payload))."""
    if header.payload_size != len(payload):
        raise ValueError(f"header.payload_size is {header.payload_size} but the payload has {len(payload)} bytes")
    mode = MODES.index(header.mode) | (CHUNKS_FLAG if header.chunks else 0)
    parts = [_FIELDS.pack(MAGIC, header.version, header.model_id, header.weights_digest, header.width,
                          header.height, mode, header.rate_q)]
    if header.chunks:
        parts.append(bytes([len(header.chunks)]))
        for c in header.chunks:
            parts += [_CHUNK_HEAD.pack(c.tag, len(c.data)), c.data]
    parts.append(bytes(payload))
    body = b"".join(parts)
    return body + struct.pack(">I", zlib.crc32(body))


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Validate a whole .lc file and return its header (with its chunks), without decoding the payload.

    Needs the whole file (the CRC covers it; CRC32 runs at GB/s). Raises
    NotAnLcFileError, UnsupportedVersionError, CorruptFileError or
    ImageTooLargeError (if width * height > max_pixels), in the order of SPEC.md.
    """
    return _parse(data, max_pixels)[0]


def unpack(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, bytes]:
    """Validate a .lc file (see `read_header`) and return its header and payload (the chunks are in the header)."""
    header, start = _parse(data, max_pixels)
    return header, bytes(memoryview(data).cast("B")[start:start + header.payload_size])


def _parse(data: bytes, max_pixels: int) -> tuple[Header, int]:
    """The checked header and the offset of the payload."""
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
    end = len(data) - CRC_SIZE
    (stored_crc,) = struct.unpack_from(">I", data, end)
    if zlib.crc32(data[:end]) != stored_crc:
        raise CorruptFileError("the .lc file is corrupt: its CRC32 checksum does not match "
                               "(it was damaged or truncated).")
    if width == 0 or height == 0:
        raise CorruptFileError(f"the .lc file is corrupt: it declares an empty image ({width}x{height}).")
    has_chunks = version >= 2 and mode & CHUNKS_FLAG
    if has_chunks:
        mode &= ~CHUNKS_FLAG
    if mode >= len(MODES):
        raise CorruptFileError(f"the .lc file is corrupt: it declares an unknown image mode (byte {mode}).")
    chunks, start = _chunks(data, end) if has_chunks else ((), HEADER_SIZE)
    if width * height > max_pixels:
        raise ImageTooLargeError(f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{max_pixels} pixels; pass a larger max_pixels to decode it if you trust this file.")
    return Header(version=version, model_id=model_id, weights_digest=bytes(digest), width=width, height=height,
                  mode=MODES[mode], rate_q=rate_q, payload_size=end - start, chunks=chunks), start


def _chunks(data: memoryview, end: int) -> tuple[tuple[Chunk, ...], int]:
    """The chunk block that starts at HEADER_SIZE and must end by `end` (the CRC): its chunks and where it ends."""
    def corrupt(why: str) -> CorruptFileError:
        return CorruptFileError(f"the .lc file is corrupt: its extension chunks are malformed ({why}).")

    pos = HEADER_SIZE
    if pos + 1 > end:
        raise corrupt("the chunk count is missing")
    count = data[pos]
    pos += 1
    if count == 0:
        raise corrupt("the chunk block is flagged but empty")
    chunks: list[Chunk] = []
    for i in range(count):
        if pos + _CHUNK_HEAD.size > end:
            raise corrupt(f"chunk {i + 1} of {count} runs past the end of the file")
        tag, length = _CHUNK_HEAD.unpack_from(data, pos)
        pos += _CHUNK_HEAD.size
        if tag not in CHUNK_TAGS:
            raise corrupt(f"unknown chunk tag {bytes(tag)!r}")
        if any(c.tag == tag for c in chunks):
            raise corrupt(f"chunk {tag.decode()!r} appears twice")
        if length > end - pos:
            raise corrupt(f"chunk {tag.decode()!r} declares {length} bytes, more than the file holds")
        chunks.append(Chunk(tag, bytes(data[pos:pos + length])))
        pos += length
    return tuple(chunks), pos
