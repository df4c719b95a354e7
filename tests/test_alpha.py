"""Claims about alpha (issue 33, part 2): RGBA and LA pictures keep their alpha exactly.

The alpha plane is coded losslessly (`lcodec.alpha`) inside the size target, the colour gets
what it leaves; an opaque alpha costs nothing; a damaged alpha chunk is a CorruptFileError.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

import lcodec
from conftest import ANY_SIZE, save, smooth_rgb
from lcodec import alpha
from lcodec.bitstream import container
from lcodec.errors import CorruptFileError, RateError


def logo_alpha(height: int, width: int) -> np.ndarray:
    """An antialiased logo's alpha: a disc and a bar drawn at 4x and reduced (0, 255 and soft edges)."""
    big = Image.new("L", (4 * width, 4 * height), 0)
    draw = ImageDraw.Draw(big)
    draw.ellipse((4, 4, 4 * height - 4, 4 * height - 4), fill=255)
    draw.rectangle((2 * width, height, 4 * width - 8, 3 * height), fill=160)
    return np.asarray(big.resize((width, height), Image.LANCZOS))


def rgba(height: int = 40, width: int = 72) -> np.ndarray:
    return np.dstack([smooth_rgb(height, width), logo_alpha(height, width)])


def test_rgba_alpha_is_exact_and_the_visible_colour_close():
    pixels = rgba()
    data = lcodec.encode(pixels, size=ANY_SIZE)
    image = lcodec.decode(data)
    assert image.mode == "RGBA" and image.size == (72, 40)
    out = np.asarray(image)
    np.testing.assert_array_equal(out[:, :, 3], pixels[:, :, 3])
    visible = pixels[:, :, 3] == 255
    error = np.abs(out[:, :, :3].astype(int) - pixels[:, :, :3])[visible]
    assert error.mean() < 12  # the colour is the learned codec's at its top rate here
    assert [c.tag for c in lcodec.read_header(data).chunks] == [b"ALPH"]


def test_la_alpha_is_exact():
    la = np.dstack([smooth_rgb(33, 47)[:, :, 1], logo_alpha(33, 47)])
    image = lcodec.decode(lcodec.encode(la, size=ANY_SIZE))
    assert image.mode == "LA"
    np.testing.assert_array_equal(np.asarray(image)[:, :, 1], la[:, :, 1])


@pytest.mark.parametrize("ext, options", [(".png", {}), (".webp", {"lossless": True}), (".tif", {})])
def test_files_in_and_out_keep_the_alpha(tmp_path, ext, options):
    pixels = rgba()
    src = save(tmp_path / f"logo{ext}", pixels, **options)
    result = lcodec.encode_file(src, tmp_path / "logo.lc", size=ANY_SIZE)
    assert result.mode == "RGBA" and result.kept == ("alpha",) and result.kept_bytes > 0
    out = tmp_path / f"back{ext}"
    assert lcodec.decode_file(tmp_path / "logo.lc", out).mode == "RGBA"
    with Image.open(out) as im:
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(im)[:, :, 3], pixels[:, :, 3])
    with Image.open(tmp_path / "logo.lc") as im:  # the plugin
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(im)[:, :, 3], pixels[:, :, 3])


def test_opaque_alpha_costs_nothing():
    pixels = smooth_rgb(24, 32)
    opaque = np.dstack([pixels, np.full((24, 32), 255, np.uint8)])
    assert lcodec.encode(opaque, size=2000) == lcodec.encode(pixels, size=2000)


def test_the_budget_includes_the_alpha(kodak_crop):
    yy, xx = np.mgrid[:256, :256]
    mask = np.where((xx - 128) ** 2 + (yy - 128) ** 2 < 100 ** 2, 255, 0).astype(np.uint8)
    cut_out = np.dstack([kodak_crop, mask])
    budget = 4096  # 0.5 bpp of 256 x 256
    data = lcodec.encode(cut_out, bpp=0.5)
    chunk = lcodec.read_header(data).chunk(b"ALPH")
    assert len(data) <= budget and 0.95 * budget <= len(data)
    np.testing.assert_array_equal(np.asarray(lcodec.decode(data))[:, :, 3], mask)
    assert len(chunk) < 600  # a disc's edge: a few hundred bytes, far below PNG's or AVIF's


def test_alpha_that_does_not_fit_is_a_clear_error(tmp_path, cli):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    pixels = np.dstack([smooth_rgb(64, 64), noise])
    with pytest.raises(RateError, match=r"its alpha alone takes|alpha alone take"):
        lcodec.encode(pixels, size=2000)
    src = save(tmp_path / "noise.png", pixels)
    result = cli("encode", src, "--size", 2000)
    assert result.exit_code == 1 and "Traceback" not in result.output and "alpha alone" in result.stderr
    assert not (tmp_path / "noise.lc").exists()


def test_hidden_colour_is_filled_smoothly_and_the_visible_colour_kept():
    pixels = smooth_rgb(20, 30)
    plane = np.zeros((20, 30), np.uint8)
    plane[5:15, 10:20] = 200
    pixels_with_junk = pixels.copy()
    pixels_with_junk[plane == 0] = np.random.default_rng(2).integers(0, 256, ((plane == 0).sum(), 3))
    filled = alpha.fill_hidden(pixels_with_junk, plane)
    np.testing.assert_array_equal(filled[plane > 0], pixels[plane > 0])
    # hidden pixels next to the visible block take about its colour, not the junk
    assert np.abs(filled[5:15, 9].astype(int) - pixels[5:15, 10]).mean() < 20
    for nothing_to_fill in (np.full((20, 30), 255, np.uint8), np.zeros((20, 30), np.uint8)):
        np.testing.assert_array_equal(alpha.fill_hidden(pixels_with_junk, nothing_to_fill), pixels_with_junk)
    gray = alpha.fill_hidden(pixels_with_junk[:, :, 0], plane)
    assert gray.shape == (20, 30) and (gray[plane > 0] == pixels[:, :, 0][plane > 0]).all()


def with_alpha_chunk(data: bytes, chunk: bytes) -> bytes:
    header, payload = container.unpack(data)
    from dataclasses import replace

    return container.pack(replace(header, chunks=(container.Chunk(b"ALPH", chunk),)), payload)


def test_a_damaged_alpha_chunk_is_a_corrupt_file():
    data = lcodec.encode(rgba(), size=ANY_SIZE)
    good = lcodec.read_header(data).chunk(b"ALPH")
    other_size = alpha.encode(logo_alpha(8, 8))
    cases = {
        "not a WebP picture": b"PNG is not WebP",
        "alpha plane is 8x8": other_size,
        "does not decode": good[:len(good) // 2],
        "does not decode ": good[:30] + bytes(len(good) - 30),
    }
    for fragment, chunk in cases.items():
        damaged = with_alpha_chunk(data, chunk)
        with pytest.raises(CorruptFileError, match=fragment.strip()):
            lcodec.decode(damaged)
        with pytest.raises(CorruptFileError):
            with Image.open(io.BytesIO(damaged)) as im:
                im.load()


def test_alpha_coding_is_lossless_on_hard_cases():
    rng = np.random.default_rng(3)
    for plane in (rng.integers(0, 256, (17, 23), dtype=np.uint8), np.zeros((1, 1), np.uint8),
                  np.full((5, 300), 7, np.uint8), logo_alpha(64, 64)):
        np.testing.assert_array_equal(alpha.decode(alpha.encode(plane), plane.shape[1], plane.shape[0]), plane)
