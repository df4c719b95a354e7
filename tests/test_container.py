"""Claims about the .lc container (bitstream/SPEC.md, "Container").

Files are crafted with `struct` directly, not with `pack`, so these tests check
the byte layout of the spec rather than the code against itself.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcodec.bitstream import container
from lcodec.bitstream.container import DEFAULT_MAX_PIXELS, OVERHEAD_BYTES, Header, pack, read_header, unpack
from lcodec.errors import (CorruptFileError, ImageTooLargeError, LcodecError, NotAnLcFileError,
                           UnsupportedVersionError)

DIGEST = bytes.fromhex("a1b2c3d4")


def raw_file(version=1, model_id=1, digest=DIGEST, width=3, height=2, mode=1, rate_q=-1536,
             payload=b"\x12\x34\x56", magic=b"lcod", crc=None) -> bytes:
    """A file laid out by hand from the SPEC.md table, with a correct CRC unless given one."""
    body = magic + struct.pack(">BB", version, model_id) + digest + struct.pack(">HHBh", width, height, mode, rate_q)
    body += payload
    return body + struct.pack(">I", zlib.crc32(body) if crc is None else crc)


def header(**fields) -> Header:
    values = dict(version=1, model_id=1, weights_digest=DIGEST, width=3, height=2, mode="RGB", rate_q=-1536,
                  payload_size=3)
    values.update(fields)
    return Header(**values)


VALID = raw_file()


def test_golden_header():
    data = pack(header(), b"\x12\x34\x56")
    assert data == VALID
    assert data.hex() == "6c636f640101a1b2c3d40003000201fa00123456" + f"{zlib.crc32(data[:-4]):08x}"
    assert len(data) == OVERHEAD_BYTES + 3 == 24


def test_unpack_reads_every_field():
    h, payload = unpack(VALID)
    assert h == header()
    assert payload == b"\x12\x34\x56"
    assert read_header(VALID) == h
    assert read_header(bytearray(VALID)) == h and unpack(memoryview(VALID))[1] == payload


@settings(max_examples=150, deadline=None)
@given(model_id=st.integers(0, 255), digest=st.binary(min_size=4, max_size=4), width=st.integers(1, 0xFFFF),
       height=st.integers(1, 0xFFFF), mode=st.sampled_from(["L", "RGB"]), rate_q=st.integers(-0x8000, 0x7FFF),
       payload=st.binary(max_size=64))
def test_round_trip(model_id, digest, width, height, mode, rate_q, payload):
    h = header(model_id=model_id, weights_digest=digest, width=width, height=height, mode=mode, rate_q=rate_q,
               payload_size=len(payload))
    data = pack(h, payload)
    assert len(data) == OVERHEAD_BYTES + len(payload)
    assert unpack(data, max_pixels=0xFFFF * 0xFFFF) == (h, payload)


def test_any_truncation_is_detected():
    data = pack(header(payload_size=40), bytes(range(1, 41)))
    for n in range(len(data)):
        with pytest.raises(CorruptFileError):
            unpack(data[:n])


def test_any_flipped_byte_is_detected():
    for position in range(len(VALID)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(VALID)
            damaged[position] ^= mask
            with pytest.raises(LcodecError):
                unpack(bytes(damaged))


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=200), data=st.data())
def test_any_flipped_byte_is_detected_in_any_file(payload, data):
    good = pack(header(payload_size=len(payload)), payload)
    position = data.draw(st.integers(0, len(good) - 1))
    damaged = bytearray(good)
    damaged[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(LcodecError):
        unpack(bytes(damaged))


@pytest.mark.parametrize("version", [3, 7, 255, 0])
def test_decoder_rejects_future_version(version):
    # A later version may have another layout: the version is checked before CRC and fields.
    for data in (raw_file(version=version), raw_file(version=version, crc=0, width=0, mode=9),
                 b"lcod" + bytes([version]) + b"\xff" * 16):
        with pytest.raises(UnsupportedVersionError, match=rf"version {version}\b.*upgrade lcodec"):
            unpack(data)


@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n" + bytes(40),  # another format
    raw_file(magic=b"LCOD"),
    b"lcoX" + VALID[4:],
    b"hello",
    b"x",
])
def test_bad_magic(data):
    with pytest.raises(NotAnLcFileError, match="not an .lc file"):
        unpack(data)


def test_magic_is_checked_before_anything():
    assert raw_file(magic=b"lcox", version=9).startswith(b"lcox")
    with pytest.raises(NotAnLcFileError):
        unpack(raw_file(magic=b"lcox", version=9))


def test_empty_file_is_truncated():
    with pytest.raises(CorruptFileError, match="truncated"):
        unpack(b"")


def test_bad_crc_is_corrupt():
    with pytest.raises(CorruptFileError, match="CRC32"):
        unpack(raw_file(crc=zlib.crc32(VALID[:-4]) ^ 1))


@pytest.mark.parametrize("fields", [dict(width=0), dict(height=0), dict(width=0, height=0)])
def test_empty_image_is_corrupt(fields):
    with pytest.raises(CorruptFileError, match="empty image"):
        unpack(raw_file(**fields))


@pytest.mark.parametrize("mode", [2, 3, 255])
def test_unknown_mode_is_corrupt(mode):
    with pytest.raises(CorruptFileError, match="unknown image mode"):
        unpack(raw_file(mode=mode))


def test_huge_dimensions_refused_without_allocation():
    bomb = raw_file(width=0xFFFF, height=0xFFFF, payload=b"\x01" * 8)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="max_pixels"):
            read_header(bomb)
        with pytest.raises(ImageTooLargeError):
            unpack(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    # The limit is the caller's to raise; the same checks then pass.
    assert read_header(bomb, max_pixels=0xFFFF * 0xFFFF).width == 0xFFFF


def test_pixel_limit_is_inclusive_and_adjustable():
    data = raw_file(width=100, height=50)
    assert read_header(data, max_pixels=5000).height == 50
    with pytest.raises(ImageTooLargeError):
        read_header(data, max_pixels=4999)
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


@pytest.mark.parametrize("fields", [
    dict(version=3), dict(model_id=256), dict(weights_digest=b"abc"), dict(width=0), dict(height=65536),
    dict(mode="RGBA"), dict(rate_q=0x8000), dict(rate_q=-0x8001), dict(payload_size=-1),
])
def test_header_rejects_fields_the_format_cannot_hold(fields):
    with pytest.raises(ValueError):
        header(**fields)


def test_pack_checks_payload_size():
    with pytest.raises(ValueError, match="payload_size"):
        pack(header(payload_size=2), b"abc")


def test_reading_a_header_imports_neither_torch_nor_constriction():
    code = ("import sys; from lcodec.bitstream import container; "
            "print(sorted(m for m in ('torch', 'constriction') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert container.OVERHEAD_BYTES == 21


# -- version 2's extension chunks ---------------------------------------------------------------


def raw_chunks(*chunks: tuple[bytes, bytes], count: int | None = None) -> bytes:
    """A chunk block laid out by hand from SPEC.md: u8 count, then per chunk tag, u32 BE length, bytes."""
    block = bytes([len(chunks) if count is None else count])
    for tag, data in chunks:
        block += tag + struct.pack(">I", len(data)) + data
    return block


def test_golden_header_with_chunks():
    chunks = (container.Chunk(b"ICCP", b"icc!"), container.Chunk(b"ALPH", b""))
    data = pack(header(version=2, chunks=chunks), b"\x12\x34\x56")
    assert data == raw_file(version=2, mode=0x81, payload=raw_chunks((b"ICCP", b"icc!"), (b"ALPH", b"")) + b"\x12\x34\x56")
    assert data.hex().startswith("6c636f640201a1b2c3d40003000281fa00" "02" "49434350" "00000004" "69636321"
                                 "414c5048" "00000000" "123456")
    assert len(data) == OVERHEAD_BYTES + container.chunks_size(chunks) + 3 == 21 + 1 + 12 + 8 + 3
    h, payload = unpack(data)
    assert (h.chunks, payload, h.payload_size) == (chunks, b"\x12\x34\x56", 3)
    assert h.chunk(b"ICCP") == b"icc!" and h.chunk(b"ALPH") == b"" and h.chunk(b"EXIF") is None


def test_a_version_2_file_without_chunks_costs_what_version_1_does():
    v2 = pack(header(version=2), b"\x12\x34\x56")
    assert len(v2) == len(VALID) and v2[4] == 2 and v2[14] == 1 and unpack(v2) == (header(version=2), b"\x12\x34\x56")
    assert container.chunks_size(()) == 0


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=64), tags=st.lists(st.sampled_from(container.CHUNK_TAGS), unique=True),
       data=st.data())
def test_round_trip_with_chunks_and_any_damage_is_caught(payload, tags, data):
    chunks = tuple(container.Chunk(t, data.draw(st.binary(max_size=40))) for t in tags)
    h = header(version=2, chunks=chunks, payload_size=len(payload))
    good = pack(h, payload)
    assert unpack(good) == (h, payload)
    position = data.draw(st.integers(0, len(good) - 1))
    damaged = bytearray(good)
    damaged[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(LcodecError):
        unpack(bytes(damaged))
    for n in range(len(good)):
        with pytest.raises(CorruptFileError):
            unpack(good[:n])


@pytest.mark.parametrize("block, fragment", [
    (b"", "count is missing"),
    (raw_chunks(count=0), "flagged but empty"),
    (raw_chunks((b"ICCP", b"abc"), count=2), "chunk 2 of 2 runs past"),
    (raw_chunks((b"ICCP", b"abc"))[:-2], "declares 3 bytes"),
    (raw_chunks((b"JUNK", b"abc")), "unknown chunk tag"),
    (raw_chunks((b"iccp", b"abc")), "unknown chunk tag"),
    (raw_chunks((b"EXIF", b"a"), (b"EXIF", b"b")), "appears twice"),
])
def test_malformed_chunk_blocks_are_corrupt(block, fragment):
    with pytest.raises(CorruptFileError, match=fragment):
        unpack(raw_file(version=2, mode=0x81, payload=block))


def test_the_chunk_flag_is_an_unknown_mode_in_version_1():
    with pytest.raises(CorruptFileError, match="unknown image mode"):
        unpack(raw_file(version=1, mode=0x81, payload=raw_chunks((b"ICCP", b"abc"))))
    with pytest.raises(CorruptFileError, match="unknown image mode"):
        unpack(raw_file(version=2, mode=0x82, payload=raw_chunks((b"ICCP", b"abc"))))


def test_chunks_are_checked_before_the_pixel_cap_and_allocate_nothing_from_their_length():
    lying = raw_file(version=2, mode=0x81, width=0xFFFF, height=0xFFFF,
                     payload=b"\x01ICCP" + struct.pack(">I", 0xFFFFFFFF) + b"abc")
    with pytest.raises(CorruptFileError, match="declares 4294967295 bytes"):
        read_header(lying)


@pytest.mark.parametrize("fields", [
    dict(version=1, chunks=(container.Chunk(b"ICCP", b"x"),)),  # chunks need version 2
    dict(version=2, chunks=(container.Chunk(b"ICCP", b"x"), container.Chunk(b"ICCP", b"y"))),
    dict(version=2, chunks=[container.Chunk(b"ICCP", b"x")]),
])
def test_header_rejects_chunks_the_format_cannot_hold(fields):
    with pytest.raises(ValueError):
        header(**fields)
    with pytest.raises(ValueError, match="unknown chunk tag"):
        container.Chunk(b"JUNK", b"")
