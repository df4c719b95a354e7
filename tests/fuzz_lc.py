#!/usr/bin/env python
"""Fuzzing harness for the .lc decoder: hostile bytes must fail cleanly, fast and small.

The claim under test (bitstream/SPEC.md, "Reading a file: checks, order and errors"):
decoding any byte string ends either in a `LcodecError` subclass -- the one the
spec's ordered checks 1-9 name, or `CorruptFileError` from the payload or the alpha
chunk (checks 10-12) -- or, where every check passes, in a valid image of the declared
size and mode (with an alpha channel where the file has an alpha chunk).
Never another exception, never a hang (> `--timeout` s per case), never a memory
blow-up (> `--max-rss-mb` peak RSS in the decoding process).

Every case is decoded three times, with `lcodec.engine.decode_array`, with
`lcodec.api.decode` and through Pillow's .lc plugin (`Image.open(...).load()`),
which must agree (same error class, or the same pixels). The engine decodes the
colour only; the API and the plugin add the alpha and the metadata of the chunks, so
they alone may fail where the engine decoded, with CorruptFileError for an alpha
chunk that does not decode, and their metadata must be the chunks' bytes.
The expected outcome is computed by `spec_outcome`, an independent re-reading of
the SPEC.md check table with `struct` and `zlib` (not with lcodec's container), so
a wrong error class or a wrong check order is a failure too.

Cases are mutations of a corpus of valid files: the golden files (those of the models the package
does not ship decode with the weights of models/archive/, on LCODEC_WEIGHTS_PATH) plus fresh encodes
with model 0 (the tiny test model, fast) and the default model (`--models` to choose), made with
an explicit rate parameter so the corpus does not depend on rate control, some with chunks (an ICC
profile, EXIF, XMP, an alpha plane). The mutation classes (see `CLASSES`) come in four families:

* ``raw-*``: bit flips, inserted/deleted bytes, truncations, splices of two files
  and random bytes, CRC left as is -- almost all of these stop at the container;
* ``payload-*``: the same on the payload only, then the CRC re-computed, so that
  the range decoder and the integer hyper-synthesis see the damage;
* ``header-*``: header fields rewritten with the CRC re-computed: huge, zero and
  odd dimensions, odd modes, other versions, unknown or swapped model ids and
  digests, rate_q extremes;
* ``chunks-*``: version 2's chunk block damaged with the CRC re-computed: counts,
  lengths and tags rewritten, the flag toggled, chunks added, bytes flipped, and the
  alpha chunk's WebP damaged inside a well-framed block.

Declared sizes are capped with ``max_pixels`` = `FUZZ_MAX_PIXELS` (512 x 512) for the
cases, so the 5 s budget measures robustness, not the legitimate cost of decoding a
large image on a slow machine; a few cases use the default cap with sizes beyond it.
What a tiny file declaring a large (allowed) size costs is measured by ``--bombs``.

Case i of seed s is a pure function of (s, i) and the corpus, so any case can be
replayed: ``--seed s --only-case i``, or ``--replay FILE`` for a saved input.

    nice -n 19 python tests/fuzz_lc.py --cases 10000 --json /tmp/fuzz.json --save-failures /tmp/fuzz-failures
    nice -n 19 python tests/fuzz_lc.py --bombs
    python tests/fuzz_lc.py --replay /tmp/fuzz-failures/payload-flip-123.lc
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import multiprocessing
import os
import resource
import struct
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lcodec.models.registry import DEFAULT_MODEL_ID  # no torch: the table only

GOLDEN = Path(__file__).resolve().parent / "golden"
ARCHIVE = Path(__file__).resolve().parents[1] / "models" / "archive"  # weights the package does not ship
MAGIC = b"lcod"
HEADER = struct.Struct(">4sBB4sHHBh")  # SPEC.md: magic, version, model_id, digest, width, height, mode, rate_q
HEADER_SIZE, CRC_SIZE = 17, 4
OVERHEAD = HEADER_SIZE + CRC_SIZE
CHUNKS_FLAG = 0x80  # SPEC.md: in version 2, set in the mode byte when a chunk block follows the header
CHUNK_TAGS = (b"ICCP", b"EXIF", b"XMP ", b"ALPH")
DEFAULT_MAX_PIXELS = 8192 * 8192  # SPEC.md, check 8
FUZZ_MAX_PIXELS = 512 * 512
IMAGE = "image"  # the outcome "decoded to a valid image"


@dataclass(frozen=True)
class Seed:
    """One valid .lc file of the corpus."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Case:
    index: int
    cls: str  # the mutation class, a key of CLASSES
    data: bytes
    max_pixels: int


# -- the corpus ----------------------------------------------------------------------------------


def smooth_image(height: int, width: int, seed: int, gray: bool = False) -> np.ndarray:
    """A deterministic photo-like uint8 image (gradients and a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [128 + 90 * np.sin(x / (7 + 3 * c) + y / (11 + 2 * c) + c + seed) for c in range(3)]
    img = np.clip(np.round(np.stack(planes, axis=2) + rng.normal(0, 6, (height, width, 3))), 0, 255)
    img = img.astype(np.uint8)
    return img[:, :, 1].copy() if gray else img


# (tiny, height, width, gray, rate q): small images, odd sizes, both modes, low and high rates. Tiny specs
# are coded with model 0, the others with each other model asked for.
CORPUS_SPECS = (
    (True, 1, 1, False, 4.0), (True, 16, 16, True, 0.0), (True, 37, 65, False, 2.0), (True, 64, 64, False, 8.0),
    (True, 70, 130, True, 6.0), (True, 48, 64, False, -2.0),
    (False, 1, 1, False, 4.0), (False, 48, 64, False, 2.0), (False, 37, 65, True, 5.0), (False, 64, 64, False, 8.0),
)
DEFAULT_CORPUS_MODELS = (0, DEFAULT_MODEL_ID)


# Corpus specs that also get chunks (indices into CORPUS_SPECS): metadata and an alpha plane.
CHUNKED_SPECS = (2, 4, 7)


def build_corpus(models: tuple[int, ...] = DEFAULT_CORPUS_MODELS) -> list[Seed]:
    """The golden files, then fresh one-pass encodes (explicit rate: no rate search), some with chunks."""
    from lcodec import engine

    seeds = [Seed(p.name, p.read_bytes()) for p in sorted(GOLDEN.glob("*.lc"))]
    for k, (tiny, h, w, gray, q) in enumerate(CORPUS_SPECS):
        pixels = smooth_image(h, w, seed=k, gray=gray)
        for model_id in [m for m in models if (m == 0) == tiny]:
            data = engine.encode_array(pixels, "L" if gray else "RGB", rate=q, model_id=model_id).data
            name = f"m{model_id}-{'L' if gray else 'RGB'}-{w}x{h}-q{q:g}"
            seeds.append(Seed(name, data))
            if k in CHUNKED_SPECS:
                seeds.append(Seed(name + "-chunks", with_chunks(data, corpus_chunks(h, w, seed=k))))
    return seeds


def corpus_chunks(height: int, width: int, seed: int) -> list[tuple[bytes, bytes]]:
    """(tag, data) of an ICC profile, EXIF, XMP and an alpha plane (a disc, soft-edged) for a corpus file."""
    from PIL import Image, ImageCms

    from lcodec import alpha

    y, x = np.mgrid[0:height, 0:width]
    disc = np.clip(255 * (0.45 * min(height, width) - np.hypot(y - height / 2, x - width / 2)), 0, 255)
    exif = Image.Exif()
    exif[0x010F] = f"fuzz camera {seed}"
    return [(b"ICCP", ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()),
            (b"EXIF", exif.tobytes()[6:]),
            (b"XMP ", b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'),
            (b"ALPH", alpha.encode(disc.astype(np.uint8)))]


def with_chunks(data: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A valid file without chunks, given `chunks` as SPEC.md lays them out (version 2, flag, count, chunks)."""
    header, payload = split(data)
    header = replace_header(header + b"", version=2, mode=header[14] | CHUNKS_FLAG)
    block = bytes([len(chunks)]) + b"".join(tag + struct.pack(">I", len(body)) + body for tag, body in chunks)
    return with_crc(header + block + payload)


def parse_chunks(data: bytes) -> tuple[dict[bytes, bytes], int] | None:
    """The chunks of a file whose first 17 bytes are a header, as SPEC.md check 7 reads them, and where the
    payload starts; None where the block is malformed. A file without the flag has none."""
    version, mode = data[4], data[14]
    if not (version >= 2 and mode & CHUNKS_FLAG):
        return {}, HEADER_SIZE
    end, pos = len(data) - CRC_SIZE, HEADER_SIZE
    if pos >= end or data[pos] == 0:
        return None
    count, pos, chunks = data[pos], pos + 1, {}
    for _ in range(count):
        if pos + 8 > end:
            return None
        tag, length = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        pos += 8
        if tag not in CHUNK_TAGS or tag in chunks or length > end - pos:
            return None
        chunks[tag] = data[pos:pos + length]
        pos += length
    return chunks, pos


# -- byte-level helpers --------------------------------------------------------------------------


def with_crc(body: bytes) -> bytes:
    """`body` (header + payload) completed with its CRC32, as SPEC.md defines it."""
    return body + struct.pack(">I", zlib.crc32(body))


def split(data: bytes) -> tuple[bytes, bytes]:
    """(header, payload) of a valid file; the header with its chunk block, if any."""
    _, start = parse_chunks(data)
    return data[:start], data[start:-CRC_SIZE]


def flip_bits(rng: np.random.Generator, b: bytes, max_flips: int = 8) -> bytes:
    if not b:
        return b
    out = bytearray(b)
    for _ in range(int(rng.integers(1, max_flips + 1))):
        i = int(rng.integers(len(out)))
        out[i] ^= 1 << int(rng.integers(8))
    return bytes(out)


def insert_bytes(rng: np.random.Generator, b: bytes) -> bytes:
    i = int(rng.integers(len(b) + 1))
    n = int(rng.choice([1, 1, 2, 3, 4, 8, 16, 64]))
    new = rng.integers(0, 256, n, dtype=np.uint8).tobytes() if rng.random() < 0.7 else bytes([b[i - 1] if i else 0]) * n
    return b[:i] + new + b[i:]


def delete_bytes(rng: np.random.Generator, b: bytes) -> bytes:
    if not b:
        return b
    i = int(rng.integers(len(b)))
    n = int(rng.choice([1, 1, 2, 3, 4, 8, 16, 64]))
    return b[:i] + b[i + n:]


def truncate(rng: np.random.Generator, b: bytes) -> bytes:
    return b[:int(rng.integers(len(b)))] if b else b


def random_bytes(rng: np.random.Generator, max_len: int) -> bytes:
    n = int(rng.choice([int(rng.integers(0, 32)), int(rng.integers(0, max_len + 1))]))
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def replace_header(data: bytes, **fields) -> bytes:
    """`data` with header fields replaced (the CRC is not touched; the chunk flag is part of `mode`)."""
    names = ("magic", "version", "model_id", "digest", "width", "height", "mode", "rate_q")
    values = dict(zip(names, HEADER.unpack_from(data)))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + data[HEADER_SIZE:]


# -- mutation classes: (rng, corpus) -> (data, max_pixels) -------------------------------------------


def _pick(rng: np.random.Generator, corpus: list[Seed]) -> bytes:
    return corpus[int(rng.integers(len(corpus)))].data


def _payload_mutation(mutate: Callable[[np.random.Generator, bytes, list[Seed]], bytes]):
    """A class that mutates the payload of a corpus file and re-computes the CRC."""

    def make(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
        header, payload = split(_pick(rng, corpus))
        return with_crc(header + mutate(rng, payload, corpus)), FUZZ_MAX_PIXELS

    return make


def _raw(mutate: Callable[[np.random.Generator, bytes], bytes]):
    def make(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
        return mutate(rng, _pick(rng, corpus)), FUZZ_MAX_PIXELS

    return make


def _splice(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    a, b = _pick(rng, corpus), _pick(rng, corpus)
    return a[:int(rng.integers(len(a) + 1))] + b[int(rng.integers(len(b) + 1)):], FUZZ_MAX_PIXELS


def _random(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    return random_bytes(rng, 4096), FUZZ_MAX_PIXELS


def _random_after_magic(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    prefix = MAGIC + bytes([1]) if rng.random() < 0.8 else MAGIC
    return prefix + random_bytes(rng, 4096), FUZZ_MAX_PIXELS


def _random_payload(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    """A valid header of the corpus with random payload bytes and a correct CRC."""
    header, _ = split(_pick(rng, corpus))
    return with_crc(header + random_bytes(rng, 4096)), FUZZ_MAX_PIXELS


def _p_splice(rng: np.random.Generator, p: bytes, corpus: list[Seed]) -> bytes:
    _, q = split(_pick(rng, corpus))
    return p[:int(rng.integers(len(p) + 1))] + q[int(rng.integers(len(q) + 1)):]


def _p_swap(rng: np.random.Generator, p: bytes, corpus: list[Seed]) -> bytes:
    return split(_pick(rng, corpus))[1]  # another file's payload (often another model's) under this header


def _p_extend(rng: np.random.Generator, p: bytes, corpus: list[Seed]) -> bytes:
    n = int(rng.choice([1, 3, 4, 16, 1024]))
    return p + (bytes(n) if rng.random() < 0.5 else rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def _p_fill(rng: np.random.Generator, p: bytes, corpus: list[Seed]) -> bytes:
    """A run of one byte value (0x00, 0xff or random) over part of the payload."""
    if not p:
        return p
    i = int(rng.integers(len(p)))
    n = int(rng.integers(1, len(p) - i + 1))
    return p[:i] + bytes([int(rng.choice([0, 255, int(rng.integers(256))]))]) * n + p[i + n:]


def _header_fields(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    """Rewrite 1-3 header fields of a corpus file, then fix the CRC (most of the time)."""
    from lcodec.models.registry import MODELS

    data = _pick(rng, corpus)
    _, version, model_id, digest, width, height, mode, rate_q = HEADER.unpack_from(data)
    max_pixels = FUZZ_MAX_PIXELS
    fields: dict = {}
    for field in rng.choice(["dims", "mode", "version", "model", "rate_q"], size=int(rng.integers(1, 4)),
                            replace=False, p=[0.35, 0.1, 0.05, 0.2, 0.3]):
        if field == "dims":
            kind = rng.choice(["zero", "small", "near", "cap", "over-cap", "over-default", "max"])
            if kind == "zero":
                width, height = [(0, height), (width, 0), (0, 0)][int(rng.integers(3))]
            elif kind == "small":
                width, height = int(rng.integers(1, 300)), int(rng.integers(1, 300))
            elif kind == "near":
                width = max(1, min(0xFFFF, width + int(rng.integers(-70, 71))))
                height = max(1, min(0xFFFF, height + int(rng.integers(-70, 71))))
            elif kind == "cap":  # exactly at and just over the cap
                width, height = 512, 512 + int(rng.integers(0, 2))
            elif kind == "over-cap":
                width = int(rng.integers(1, 0x10000))
                height = int(rng.integers(max_pixels // width + 1, 0x10000)) if max_pixels // width < 0xFFFF else 0xFFFF
            elif kind == "over-default":  # the library's default cap
                max_pixels = DEFAULT_MAX_PIXELS
                width = int(rng.integers(8193, 0x10000))
                height = int(rng.integers(DEFAULT_MAX_PIXELS // width + 1, 0x10000))
            else:
                max_pixels = DEFAULT_MAX_PIXELS
                width, height = 0xFFFF, 0xFFFF
        elif field == "mode":
            flag = mode & CHUNKS_FLAG
            mode = int(rng.choice([(1 - min(mode & 0x7F, 1)) | flag, int(rng.integers(2, 256))]))
        elif field == "version":
            version = int(rng.choice([0, 1, 2, 3, 255, int(rng.integers(0, 256))]))
        elif field == "model":
            kind = rng.choice(["other-known", "unknown", "random-digest"])
            if kind == "other-known":
                model_id = 1 - min(model_id, 1)
                digest = MODELS[model_id].digest4
            elif kind == "unknown":
                model_id = int(rng.integers(2, 256))
            else:
                digest = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        else:
            rate_q = int(rng.choice([-0x8000, 0x7FFF, 0, -2049, 8193, int(rng.integers(-0x8000, 0x8000))]))
    body = replace_header(data, version=version, model_id=model_id, digest=digest, width=width, height=height,
                          mode=mode, rate_q=rate_q)[:-CRC_SIZE]
    return (with_crc(body) if rng.random() < 0.9 else body + data[-CRC_SIZE:]), max_pixels


def _chunks(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    """Damage the chunk block of a file that has one (or give one to a file that has none), then fix the CRC."""
    with_block = [s.data for s in corpus if s.data[4] >= 2 and s.data[14] & CHUNKS_FLAG]
    data = with_block[int(rng.integers(len(with_block)))] if with_block and rng.random() < 0.85 else _pick(rng, corpus)
    chunks, start = parse_chunks(data)
    header, payload = data[:HEADER_SIZE], data[start:-CRC_SIZE]
    block = bytearray(data[HEADER_SIZE:start])
    kind = rng.choice(["alpha", "flip", "count", "length", "tag", "flag", "add"], p=[0.3, 0.15, 0.1, 0.15, 0.1, 0.1, 0.1])
    if kind == "alpha" and b"ALPH" in chunks:  # a well-framed block whose alpha WebP is damaged
        webp = chunks[b"ALPH"]
        webp = rng.choice([flip_bits, truncate, insert_bytes, delete_bytes])(rng, webp) if rng.random() < 0.8 \
            else random_bytes(rng, 256)
        chunks = {**chunks, b"ALPH": webp}
        return with_chunks(with_crc(header[:14] + bytes([header[14] & 0x7F]) + header[15:] + payload),
                           list(chunks.items())), FUZZ_MAX_PIXELS
    if kind == "add" or not block:
        tags = rng.choice(len(CHUNK_TAGS), size=int(rng.integers(1, 4)))
        added = [(CHUNK_TAGS[int(t)], random_bytes(rng, 64)) for t in tags]  # duplicates now and then
        base = with_crc(header[:4] + b"\x02" + header[5:14] + bytes([header[14] & 0x7F]) + header[15:] + payload)
        return with_chunks(base, added), FUZZ_MAX_PIXELS
    if kind == "flip":
        block = bytearray(flip_bits(rng, bytes(block)))
    elif kind == "count":
        block[0] = int(rng.choice([0, 1, 255, int(rng.integers(256)), max(block[0] - 1, 0), min(block[0] + 1, 255)]))
    elif kind in ("length", "tag"):
        heads, pos = [], 1
        for _ in range(block[0]):
            heads.append(pos)
            pos += 8 + struct.unpack(">I", bytes(block[pos + 4:pos + 8]))[0]
        at = heads[int(rng.integers(len(heads)))]
        if kind == "length":
            old = struct.unpack(">I", bytes(block[at + 4:at + 8]))[0]
            new = int(rng.choice([0, 0xFFFFFFFF, old + 1, max(old - 1, 0), int(rng.integers(0, 1 << 32))]))
            block[at + 4:at + 8] = struct.pack(">I", new)
        else:
            others = [t for t in CHUNK_TAGS if t != bytes(block[at:at + 4])]
            block[at:at + 4] = rng.choice([b"JUNK", b"iccp", b"\0\0\0\0", others[int(rng.integers(len(others)))]])
    else:  # the flag off (the block becomes payload) or a version-1 header with it on
        header = header[:14] + bytes([header[14] ^ CHUNKS_FLAG]) + header[15:] if rng.random() < 0.5 \
            else header[:4] + b"\x01" + header[5:]
    return with_crc(header + bytes(block) + payload), FUZZ_MAX_PIXELS


def _max_pixels(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    """An intact file decoded with a pixel cap just below, at or above its size."""
    data = _pick(rng, corpus)
    _, _, _, _, width, height, _, _ = HEADER.unpack_from(data)
    return data, max(1, width * height + int(rng.choice([-1, 0, 1, -width * height // 2])))


def _clean(rng: np.random.Generator, corpus: list[Seed]) -> tuple[bytes, int]:
    return _pick(rng, corpus), FUZZ_MAX_PIXELS


# name -> (generator, weight). The weights favour the classes that reach the payload decoder.
CLASSES: dict[str, tuple[Callable[[np.random.Generator, list[Seed]], tuple[bytes, int]], int]] = {
    "raw-flip": (_raw(flip_bits), 8),
    "raw-insert": (_raw(insert_bytes), 3),
    "raw-delete": (_raw(delete_bytes), 3),
    "raw-truncate": (_raw(truncate), 5),
    "raw-splice": (_splice, 3),
    "random-bytes": (_random, 3),
    "random-after-magic": (_random_after_magic, 3),
    "random-payload-crc": (_random_payload, 6),
    "payload-flip-crc": (_payload_mutation(lambda r, p, c: flip_bits(r, p)), 14),
    "payload-insert-crc": (_payload_mutation(lambda r, p, c: insert_bytes(r, p)), 5),
    "payload-delete-crc": (_payload_mutation(lambda r, p, c: delete_bytes(r, p)), 5),
    "payload-truncate-crc": (_payload_mutation(lambda r, p, c: truncate(r, p)), 6),
    "payload-splice-crc": (_payload_mutation(_p_splice), 5),
    "payload-swap-crc": (_payload_mutation(_p_swap), 3),
    "payload-extend-crc": (_payload_mutation(_p_extend), 3),
    "payload-fill-crc": (_payload_mutation(_p_fill), 4),
    "header-fields-crc": (_header_fields, 16),
    "chunks-crc": (_chunks, 10),
    "max-pixels": (_max_pixels, 2),
    "clean": (_clean, 2),
}


def make_case(seed: int, index: int, corpus: list[Seed], only: str | None = None) -> Case:
    """Case `index` of run `seed`: the same bytes every time for the same corpus."""
    rng = np.random.default_rng([seed, index])
    names = [only] if only else list(CLASSES)
    weights = np.array([CLASSES[n][1] for n in names], dtype=np.float64)
    cls = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    data, max_pixels = CLASSES[cls][0](rng, corpus)
    return Case(index, cls, data, max_pixels)


# -- the oracle ------------------------------------------------------------------------------------


def spec_outcome(data: bytes, max_pixels: int) -> frozenset[str]:
    """The outcomes SPEC.md allows for `data`: its ordered checks 1-9, re-implemented here.

    Past check 9 the payload and the alpha chunk either decode (an image) or are a CorruptFileError.
    """
    from lcodec.models.registry import MODELS

    if data[:len(MAGIC)] != MAGIC[:len(data)]:
        return frozenset({"NotAnLcFileError"})
    if len(data) < OVERHEAD:
        return frozenset({"CorruptFileError"})
    _, version, model_id, digest, width, height, mode, _ = HEADER.unpack_from(data)
    if version not in (1, 2):
        return frozenset({"UnsupportedVersionError"})
    if zlib.crc32(data[:-CRC_SIZE]) != struct.unpack(">I", data[-CRC_SIZE:])[0]:
        return frozenset({"CorruptFileError"})
    if version >= 2:
        mode &= ~CHUNKS_FLAG
    if width == 0 or height == 0 or mode > 1 or parse_chunks(data) is None:
        return frozenset({"CorruptFileError"})
    if width * height > max_pixels:
        return frozenset({"ImageTooLargeError"})
    entry = MODELS.get(model_id)
    if entry is None or entry.digest4 != digest or not entry.installed:
        return frozenset({"ModelMismatchError"})
    from lcodec import engine

    if version < 2 and engine.load_model(model_id).context is not None:
        return frozenset({"CorruptFileError"})  # a subband context needs version 2
    return frozenset({"CorruptFileError", IMAGE})


def decode_once(data: bytes, max_pixels: int) -> dict:
    """Decode with the engine, the API and Pillow's .lc plugin; the outcome and any inconsistency.

    Pillow's `Image.open` may answer UnidentifiedImageError where lcodec says "not an
    .lc file" (it tries its other formats first), and it decodes with the default
    pixel cap, so it is skipped where only a lower cap refused the file.

    Returns {"outcome": "image" | error class name | "crash:<type>", "detail": str,
    "problem": None or what is wrong}. Runs in the current process.
    """
    from PIL import Image, UnidentifiedImageError

    from lcodec import api, engine
    from lcodec.errors import LcodecError

    def attempt(fn):
        try:
            return fn(), None
        except LcodecError as e:
            return None, e
        except MemoryError as e:
            return None, e
        except Exception as e:  # noqa: BLE001 -- any other exception is the bug we look for
            return None, e

    (result, err) = attempt(lambda: engine.decode_array(data, max_pixels=max_pixels))
    (image, api_err) = attempt(lambda: api.decode(data, max_pixels=max_pixels))

    def through_pillow():
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.mode, np.asarray(im)

    pillow, pillow_err = None, None
    if not (type(err).__name__ == "ImageTooLargeError" and max_pixels < DEFAULT_MAX_PIXELS):
        (pillow, pillow_err) = attempt(through_pillow)
    out: dict = {"problem": None, "detail": ""}
    if err is not None:
        out["outcome"] = type(err).__name__ if isinstance(err, LcodecError) else f"crash:{type(err).__name__}"
        out["detail"] = "".join(traceback.format_exception(err)) if not isinstance(err, LcodecError) else str(err)[:200]
        if type(api_err) is not type(err):
            out["problem"] = f"api.decode raised {type(api_err).__name__}, engine {type(err).__name__}"
        elif pillow_err is not None and type(pillow_err) is not type(err) and not (
                isinstance(pillow_err, UnidentifiedImageError) and data[:4] != MAGIC):
            out["problem"] = f"Image.open raised {type(pillow_err).__name__}, engine {type(err).__name__}"
            out["detail"] += "".join(traceback.format_exception(pillow_err))
        elif pillow_err is None and pillow is not None and data[:4] == MAGIC:
            out["problem"] = f"Image.open decoded a file the engine refused ({type(err).__name__})"
        return out
    pixels, mode = result
    out["outcome"] = IMAGE
    _, _, _, _, width, height, mode_byte, _ = HEADER.unpack_from(data)
    want_mode = ("L", "RGB")[mode_byte & 0x7F]
    want_shape = (height, width) if want_mode == "L" else (height, width, 3)
    chunks, _ = parse_chunks(data)
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.shape == want_shape
            and mode == want_mode):
        out["problem"] = (f"invalid image: {type(pixels).__name__} {getattr(pixels, 'dtype', '?')} "
                          f"{getattr(pixels, 'shape', '?')} {mode}, header says {want_shape} {want_mode}")
    elif api_err is not None:
        if b"ALPH" in chunks and isinstance(api_err, LcodecError) and type(api_err).__name__ == "CorruptFileError":
            # The alpha chunk does not decode (SPEC.md check 12): the API and the plugin both refuse the file.
            out["outcome"], out["detail"] = "CorruptFileError", str(api_err)[:200]
            if type(pillow_err) is not type(api_err):
                out["problem"] = f"Image.open gave {type(pillow_err).__name__}, api.decode CorruptFileError"
            return out
        out["problem"] = f"api.decode raised {type(api_err).__name__} but the engine decoded"
        out["detail"] = "".join(traceback.format_exception(api_err))
    else:
        with_alpha = mode + "A" if b"ALPH" in chunks else mode
        metadata = {key: value for key, value in (("icc_profile", chunks.get(b"ICCP")), ("xmp", chunks.get(b"XMP ")),
                                                  ("exif", None if b"EXIF" not in chunks else b"Exif\0\0" + chunks[b"EXIF"]))
                    if value is not None}
        colour = lambda array: array[..., :-1].squeeze() if b"ALPH" in chunks else array  # noqa: E731
        if not (isinstance(image, Image.Image) and image.mode == with_alpha
                and np.array_equal(colour(np.asarray(image)).reshape(pixels.shape), pixels)):
            out["problem"] = "api.decode returned other pixels than the engine"
        elif {k: image.info.get(k) for k in ("icc_profile", "exif", "xmp") if k in image.info} != metadata:
            out["problem"] = "api.decode's info is not the file's metadata"
        elif pillow is None or pillow[0] != with_alpha or not np.array_equal(pillow[1], np.asarray(image)):
            out["problem"] = f"Image.open gave {type(pillow_err).__name__ if pillow_err else 'other pixels'}"
    out["pixels_crc"] = zlib.crc32(pixels.tobytes()) if out["problem"] is None else None
    return out


# What each error message says went wrong, to show which stage of the decoder stopped a case.
REASONS = (("not an .lc file", "magic"), ("CRC32", "crc"), ("is truncated", "truncated"),
           ("format version", "version"), ("empty image", "zero-size"), ("unknown image mode", "mode"),
           ("extension chunks are malformed", "chunks"), ("alpha", "alpha"),
           ("over the limit", "pixel-cap"), ("model id", "model-id"), ("other weights", "digest"),
           ("entropy decoder rejected", "payload:entropy-decoder"), ("left over", "payload:trailing-data"),
           ("escaped value", "payload:escape"), ("earlier part", "payload:earlier-failure"))


def reason(outcome: str, detail: str) -> str:
    """`outcome` with the check that produced it, e.g. "CorruptFileError/crc"."""
    if outcome == IMAGE or outcome.startswith(("crash:", "hang", "died")):
        return outcome
    return outcome + "/" + next((key for text, key in REASONS if text in detail), "other")


def judge(case: Case, result: dict, reference: dict[bytes, int]) -> str:
    """The verdict of one case: "ok" or what failed."""
    if result.get("hang"):
        return "hang"
    if result.get("died"):
        return "worker-died"
    if result.get("memory"):
        return "memory"
    outcome = result["outcome"]
    if outcome.startswith("crash:"):
        return "memory" if outcome == "crash:MemoryError" else outcome
    if result["problem"]:
        return "inconsistent"
    if outcome not in spec_outcome(case.data, case.max_pixels):
        return f"wrong-error:{outcome}"
    if case.data in reference and outcome == IMAGE and result["pixels_crc"] != reference[case.data]:
        return "clean-file-decodes-differently"
    return "ok"


# -- a watched worker process ---------------------------------------------------------------------


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _watch_synthesis() -> list:
    """Note (in the returned list) every g_s output with NaNs: they become arbitrary uint8 pixels."""
    import torch

    from lcodec.models.frozen import FrozenModel

    seen: list = []
    synthesize = FrozenModel.synthesize

    def watched(self, y_hat, q):
        x = synthesize(self, y_hat, q)
        if torch.isnan(x).any():
            seen.append(q)
        return x

    FrozenModel.synthesize = watched
    return seen


def _worker(conn, address_space_mb: int, threads: int) -> None:
    if address_space_mb:
        limit = address_space_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from lcodec import engine

    torch.set_num_threads(threads)
    nan_seen = _watch_synthesis()
    for model_id in (0, 1):
        try:
            engine.load_model(model_id)
        except Exception:  # noqa: BLE001 -- a missing model is the decoder's ModelMismatchError to report
            pass
    conn.send(("ready", _max_rss_mb()))
    while True:
        message = conn.recv()
        if message is None:
            return
        data, max_pixels = message
        start = time.perf_counter()
        nan_seen.clear()
        result = decode_once(data, max_pixels)
        result["nan_synthesis"] = bool(nan_seen)
        result["seconds"] = time.perf_counter() - start
        result["rss_mb"] = _max_rss_mb()
        conn.send(result)


class Watchdog:
    """Runs cases in a child process; kills and restarts it on a hang or a memory blow-up."""

    def __init__(self, timeout: float, max_rss_mb: float, address_space_mb: int, threads: int = 1):
        self.timeout, self.max_rss_mb = timeout, max_rss_mb
        self.address_space_mb, self.threads = address_space_mb, threads
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        self.process = None
        self.baseline_mb = 0.0
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, args=(child, self.address_space_mb, self.threads),
                                            daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        if not self.conn.poll(120):
            raise RuntimeError("the fuzz worker did not start within 120 s")
        _, self.baseline_mb = self.conn.recv()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.process = None
            self.restarts += 1

    def run(self, data: bytes, max_pixels: int) -> dict:
        if self.process is None:
            self._start()
        start = time.perf_counter()
        try:
            self.conn.send((data, max_pixels))
            if not self.conn.poll(self.timeout):
                self._stop()
                return {"hang": True, "outcome": "hang", "seconds": time.perf_counter() - start}
            result = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = self.process.exitcode if self.process is not None else None
            self._stop()
            return {"died": True, "outcome": f"died:{code}", "seconds": time.perf_counter() - start}
        if result["rss_mb"] > self.max_rss_mb:
            result["memory"] = True
            self._stop()  # ru_maxrss never falls: a fresh process for the next case
        return result

    def close(self) -> None:
        if self.process is not None:
            self.conn.send(None)
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
            self.process = None


# -- decompression bombs within the cap ---------------------------------------------------------------


def bombs(timeout: float, model_ids: tuple[int, ...]) -> list[dict]:
    """What tiny, CRC-valid files that declare large (allowed) sizes cost to decode, one child each.

    A payload of zero bytes decodes: the range decoder reads missing words as zeros,
    so decode time and memory follow the declared size, not the file size.
    """
    import subprocess

    from lcodec.models.registry import MODELS

    rows = []
    code = ("import resource, sys, time, torch; torch.set_num_threads(1); from lcodec import engine;"
            "data = sys.stdin.buffer.read(); engine.load_model(data[5]); t = time.perf_counter();\n"
            "try:\n    p, m = engine.decode_array(data); out = 'image'\n"
            "except Exception as e:\n    out = type(e).__name__\n"
            "print(out, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    for model_id in model_ids:
        for side in (512, 1024, 2048, 4096, 8192):
            data = with_crc(HEADER.pack(MAGIC, 2, model_id, MODELS[model_id].digest4, side, side, 1, 0))
            try:
                p = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=timeout)
                out, seconds, rss = p.stdout.decode().split() if p.returncode == 0 else (f"rc={p.returncode}", "nan", "nan")
            except subprocess.TimeoutExpired:
                out, seconds, rss = f"timeout>{timeout:g}s", "nan", "nan"
            rows.append({"model_id": model_id, "declared": f"{side}x{side}", "file_bytes": len(data),
                         "outcome": out, "seconds": float(seconds), "peak_rss_mb": float(rss)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(CLASSES), help="run one mutation class")
    parser.add_argument("--only-case", type=int, help="run just this case index (with --seed) and print it")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per case (default 5)")
    parser.add_argument("--max-rss-mb", type=float, default=2048, help="peak RSS per decoding process")
    parser.add_argument("--address-space-mb", type=int, default=8192,
                        help="RLIMIT_AS of the decoding process (0: none), so a blow-up fails instead of swapping")
    parser.add_argument("--models", default=",".join(map(str, DEFAULT_CORPUS_MODELS)),
                        help="model ids of the fresh corpus files and of --bombs (default: the tiny test model and the default model)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--save-failures", type=Path, help="write every failing input here")
    parser.add_argument("--replay", type=Path, help="decode one saved input in this process and print the result")
    parser.add_argument("--max-pixels", type=int, default=FUZZ_MAX_PIXELS, help="cap for --replay")
    parser.add_argument("--bombs", action="store_true", help="measure tiny files declaring large sizes")
    args = parser.parse_args(argv)

    if args.replay:
        data = args.replay.read_bytes()
        result = decode_once(data, args.max_pixels)
        print(f"spec allows: {sorted(spec_outcome(data, args.max_pixels))}")
        print(f"outcome: {result['outcome']}  problem: {result['problem']}\n{result['detail']}")
        return 0
    if args.bombs:
        rows = bombs(timeout=300, model_ids=tuple(int(m) for m in args.models.split(",")))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0

    os.environ.setdefault("LCODEC_WEIGHTS_PATH", str(ARCHIVE))  # the golden files of archived models decode
    corpus = build_corpus(tuple(int(m) for m in args.models.split(",")))
    reference = {s.data: decode_once(s.data, DEFAULT_MAX_PIXELS)["pixels_crc"] for s in corpus}
    indices = [args.only_case] if args.only_case is not None else range(args.cases)
    watchdog = Watchdog(args.timeout, args.max_rss_mb, args.address_space_mb)
    by_outcome: collections.Counter = collections.Counter()
    by_reason: collections.Counter = collections.Counter()
    nan_images: collections.Counter = collections.Counter()
    by_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    seconds = []
    started = time.time()
    try:
        for i in indices:
            case = make_case(args.seed, i, corpus, args.only)
            result = watchdog.run(case.data, case.max_pixels)
            verdict = judge(case, result, reference)
            seconds.append(result.get("seconds", 0.0))
            by_outcome[result["outcome"]] += 1
            by_reason[reason(result["outcome"], result.get("detail", ""))] += 1
            by_class[case.cls][result["outcome"]] += 1
            if result.get("nan_synthesis"):
                nan_images[case.cls] += 1
            if verdict != "ok":
                failures.append({"index": i, "class": case.cls, "verdict": verdict, "outcome": result["outcome"],
                                 "problem": result.get("problem"), "detail": result.get("detail", "")[-2000:],
                                 "seconds": result.get("seconds")})
                if args.save_failures:
                    args.save_failures.mkdir(parents=True, exist_ok=True)
                    (args.save_failures / f"{case.cls}-{i}.lc").write_bytes(case.data)
                print(f"FAIL case {i} ({case.cls}): {verdict} {result.get('problem') or ''}", file=sys.stderr)
            if args.only_case is not None:
                print(json.dumps({k: v for k, v in result.items() if k != "detail"}), result.get("detail", ""))
            if (i + 1) % 500 == 0:
                print(f"{i + 1} cases, {len(failures)} failures, {time.time() - started:.0f} s", file=sys.stderr)
    finally:
        watchdog.close()
    summary = {
        "seed": args.seed, "cases": len(seconds), "failures": len(failures), "corpus": [s.name for s in corpus],
        "timeout_s": args.timeout, "max_rss_mb": args.max_rss_mb, "fuzz_max_pixels": FUZZ_MAX_PIXELS,
        "wall_s": round(time.time() - started, 1), "worker_restarts": watchdog.restarts,
        "case_seconds": {"median": float(np.median(seconds)), "p99": float(np.percentile(seconds, 99)),
                         "max": float(np.max(seconds))},
        "by_outcome": dict(by_outcome.most_common()),
        "by_reason": dict(by_reason.most_common()),
        "images_from_nan_synthesis": dict(nan_images.most_common()),
        "by_class": {c: dict(v.most_common()) for c, v in sorted(by_class.items())},
        "failure_list": failures,
    }
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.write_text(text)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("by_class", "failure_list", "corpus")}, indent=1))
    for cls, counts in summary["by_class"].items():
        print(f"  {cls:22s} {dict(counts)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
