"""Claims about the library API (`lcodec.encode`, `decode`, `encode_file`, ...), with the real engine."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import lcodec
from conftest import ANY_SIZE, quick_lc, save, smooth_rgb
from lcodec.bitstream.container import OVERHEAD_BYTES
from lcodec import engine
from lcodec.errors import (CorruptFileError, ImageTooLargeError, LcodecError, NotAnLcFileError, OutputExistsError,
                           RateError, UnsupportedImageError)


def test_import_does_not_import_torch():
    code = "import sys, lcodec; from PIL import Image; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    for name in ("encode", "decode", "encode_file", "decode_file", "read_header", "model_info", "errors",
                 "__version__"):
        assert hasattr(lcodec, name), name
    assert lcodec.errors.LcodecError is LcodecError


def test_rgb_round_trip_keeps_size_and_mode():
    data = lcodec.encode(Image.fromarray(smooth_rgb(48, 64)), size=ANY_SIZE)
    assert data[:4] == b"lcod" and len(data) <= ANY_SIZE
    image = lcodec.decode(data)
    assert (image.mode, image.size) == ("RGB", (64, 48))


def test_bpp_target_bounds_the_whole_file(kodak_crop):
    data = lcodec.encode(kodak_crop, bpp=0.5)
    assert 0.97 * 4096 <= len(data) <= 4096  # 0.5 bpp of 256 x 256 pixels, header included


def test_grayscale_stays_grayscale():
    image = lcodec.decode(lcodec.encode(smooth_rgb(32, 40)[:, :, 1], size=ANY_SIZE))
    assert (image.mode, image.size) == ("L", (40, 32))


@pytest.mark.parametrize("height, width", [(1, 1), (37, 65)])
def test_odd_sizes_round_trip(height, width):
    image = lcodec.decode(lcodec.encode(smooth_rgb(height, width), size=ANY_SIZE))
    assert image.size == (width, height)


def test_explicit_rate_is_stored_in_the_header():
    lo, hi = lcodec.model_info().rate_range
    q = (lo + hi) / 2
    header = lcodec.read_header(lcodec.encode(smooth_rgb(16, 16), rate=q))
    assert header.rate_q == round(q * 1024)


def test_exactly_one_target():
    with pytest.raises(TypeError, match="exactly one"):
        lcodec.encode(smooth_rgb(8, 8))
    with pytest.raises(TypeError, match="exactly one"):
        lcodec.encode(smooth_rgb(8, 8), bpp=1, size=100)


@pytest.mark.parametrize("target, fragment", [
    ({"bpp": 0}, "bpp must be a positive number"), ({"bpp": -1.0}, "bpp must be a positive number"),
    ({"bpp": float("nan")}, "bpp must be a positive number"), ({"bpp": float("inf")}, "bpp must be a positive"),
    ({"size": 0}, "size must be a positive whole number"), ({"size": 100.5}, "size must be a positive whole"),
    ({"rate": float("nan")}, "rate must be a finite number"),
])
def test_bad_target_values_are_rate_errors_in_the_apis_words(target, fragment, tmp_path):
    src = save(tmp_path / "a.png", smooth_rgb(8, 8))
    for call in (lambda: lcodec.encode(smooth_rgb(8, 8), **target), lambda: lcodec.encode_file(src, **target)):
        with pytest.raises(RateError, match=fragment) as caught:
            call()
        assert "--" not in str(caught.value)  # no command-line flags in the library's errors
    assert not (tmp_path / "a.lc").exists()


def test_transparent_image_keeps_its_alpha():  # more in test_alpha.py
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    image = lcodec.decode(lcodec.encode(rgba, size=ANY_SIZE))
    assert image.mode == "RGBA" and image.getchannel("A").getextrema() == (128, 128)


def test_decode_errors_are_lcodec_errors():
    with pytest.raises(NotAnLcFileError):
        lcodec.decode(b"\x89PNG\r\n\x1a\n not an lc file")
    data = quick_lc(smooth_rgb(16, 16))
    with pytest.raises(CorruptFileError):
        lcodec.decode(data[:-7])
    with pytest.raises(ImageTooLargeError):
        lcodec.decode(data, max_pixels=255)


def test_encode_file_writes_input_name_with_lc(tmp_path):
    src = save(tmp_path / "photo.png", smooth_rgb(48, 64))
    result = lcodec.encode_file(src, bpp=200.0)  # a bpp any model reaches here: 76,800 bytes
    assert result.path == tmp_path / "photo.lc"
    assert result.size == result.path.stat().st_size <= 200 * 64 * 48 / 8
    assert result.bpp == pytest.approx(8 * result.size / (64 * 48))
    assert (result.width, result.height, result.mode) == (64, 48, "RGB")
    assert result.target_bytes == 200 * 64 * 48 // 8


def test_encode_file_never_overwrites_without_force(tmp_path, no_leftovers):
    src = save(tmp_path / "photo.png", smooth_rgb(16, 16))
    (tmp_path / "photo.lc").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="force=True") as caught:
        lcodec.encode_file(src, size=ANY_SIZE)
    assert "--" not in str(caught.value)
    assert (tmp_path / "photo.lc").read_bytes() == b"precious"
    lcodec.encode_file(src, size=ANY_SIZE, force=True)
    assert (tmp_path / "photo.lc").read_bytes()[:4] == b"lcod"
    no_leftovers(tmp_path, "photo.png", "photo.lc")


def test_encode_file_refuses_to_overwrite_its_input(tmp_path):
    src = save(tmp_path / "photo.png", smooth_rgb(16, 16))
    with pytest.raises(OutputExistsError, match="input"):
        lcodec.encode_file(src, src, size=ANY_SIZE, force=True)


def test_decode_file_png_by_default_and_format_by_extension(tmp_path):
    lc = lcodec.encode_file(save(tmp_path / "photo.png", smooth_rgb(16, 24)), size=ANY_SIZE).path
    (tmp_path / "photo.png").unlink()
    result = lcodec.decode_file(lc)
    assert (result.path, result.format) == (tmp_path / "photo.png", "PNG")
    assert Image.open(result.path).format == "PNG"
    bmp = lcodec.decode_file(lc, tmp_path / "out.bmp")
    assert Image.open(bmp.path).format == "BMP"
    np.testing.assert_array_equal(np.asarray(Image.open(bmp.path)), np.asarray(Image.open(result.path)))


def test_encode_file_max_pixels(tmp_path):
    src = save(tmp_path / "photo.png", smooth_rgb(48, 64))
    with pytest.raises(ImageTooLargeError, match="over the limit of 3,071; pass max_pixels=3072") as caught:
        lcodec.encode_file(src, size=ANY_SIZE, max_pixels=64 * 48 - 1)
    assert "--" not in str(caught.value)
    assert lcodec.encode_file(src, size=ANY_SIZE, max_pixels=64 * 48).size > 0


@pytest.mark.parametrize("function", ["encode_file", "decode_file"])
def test_an_unwritable_output_fails_before_any_coding(tmp_path, monkeypatch, no_leftovers, function):
    src = save(tmp_path / "photo.png", smooth_rgb(16, 16))
    if function == "decode_file":
        src.unlink()
        src = tmp_path / "photo.lc"
        src.write_bytes(quick_lc(smooth_rgb(16, 16)))

    def too_late(*args, **kwargs):
        raise AssertionError("coded before the output was checked")

    monkeypatch.setattr(engine, "encode_array", too_late)
    monkeypatch.setattr(engine, "decode_array", too_late)
    run = (lambda dst, **kw: lcodec.encode_file(src, dst, size=ANY_SIZE, **kw)) if function == "encode_file" else \
        (lambda dst, **kw: lcodec.decode_file(src, dst, **kw))
    with pytest.raises(LcodecError, match="cannot write .*: there is no directory"):
        run(tmp_path / "missing" / "out.bmp")
    (tmp_path / "dir.bmp").mkdir()
    with pytest.raises(LcodecError, match="cannot write .*dir.bmp: it is a directory"):
        run(tmp_path / "dir.bmp", force=True)
    no_leftovers(tmp_path, src.name, "dir.bmp")


def test_decode_file_warns_when_the_format_changes_the_pixels(tmp_path):
    pixels = smooth_rgb(24, 40)
    lc = tmp_path / "x.lc"
    lc.write_bytes(quick_lc(pixels))
    exact = np.asarray(lcodec.decode(lc.read_bytes()))
    for name in ("x.jpg", "x.webp"):
        result = lcodec.decode_file(lc, tmp_path / name)
        assert result.warning and "changes the decoded pixels" in result.warning and ".png" in result.warning
        assert not np.array_equal(np.asarray(Image.open(result.path).convert("RGB")), exact)  # the warning is true


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("ext", [".png", ".bmp", ".dib", ".tif", ".ppm", ".tga", ".sgi", ".pcx", ".dds", ".jp2",
                                 ".qoi", ".gif"])
def test_formats_written_without_a_warning_keep_the_pixels_exactly(tmp_path, mode, ext):
    pixels = smooth_rgb(24, 40) if mode == "RGB" else smooth_rgb(24, 40)[:, :, 0]
    lc = tmp_path / "x.lc"
    lc.write_bytes(quick_lc(pixels))
    decoded = lcodec.decode(lc.read_bytes())
    try:
        result = lcodec.decode_file(lc, tmp_path / f"x{ext}")
    except UnsupportedImageError as e:  # Pillow cannot store this mode in this format
        assert (ext, mode) == (".qoi", "L"), e
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lc"]
        return
    if result.warning is not None:
        assert (ext, mode) == (".gif", "RGB"), result.warning
        return
    with Image.open(result.path) as im:
        np.testing.assert_array_equal(np.asarray(im.convert(mode)), np.asarray(decoded))


def test_decode_file_needs_an_extension_or_a_format(tmp_path, no_leftovers):
    lc = tmp_path / "x.lc"
    lc.write_bytes(quick_lc(smooth_rgb(8, 8)))
    with pytest.raises(UnsupportedImageError, match="noext has no extension"):
        lcodec.decode_file(lc, tmp_path / "noext")
    no_leftovers(tmp_path, "x.lc")
    assert lcodec.decode_file(lc, tmp_path / "noext", format="png").format == "PNG"
    assert Image.open(tmp_path / "noext").format == "PNG"


def test_outputs_get_the_usual_permissions(tmp_path):
    """Written through a temporary file, but with the mode any new file gets (0o666 less the umask)."""
    mask = os.umask(0o022)
    try:
        result = lcodec.encode_file(save(tmp_path / "a.png", smooth_rgb(8, 8)), size=ANY_SIZE)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o644


def test_decode_file_refuses_unknown_output_format_before_decoding(tmp_path, no_leftovers):
    lc = tmp_path / "x.lc"
    lc.write_bytes(b"not even an lc file")  # the output name is refused first
    with pytest.raises(UnsupportedImageError, match="'.xyz'"):
        lcodec.decode_file(lc, tmp_path / "out.xyz")
    no_leftovers(tmp_path, "x.lc")


def test_failed_decode_leaves_nothing(tmp_path, no_leftovers):
    data = quick_lc(smooth_rgb(16, 16))
    (tmp_path / "cut.lc").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.lc"):
        lcodec.decode_file(tmp_path / "cut.lc")
    no_leftovers(tmp_path, "cut.lc")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, no_leftovers):
    lc = tmp_path / "x.lc"
    lc.write_bytes(quick_lc(smooth_rgb(16, 16)))

    def save_then_interrupt(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        lcodec.decode_file(lc)
    no_leftovers(tmp_path, "x.lc")


def test_streams(tmp_path):
    png = io.BytesIO()
    Image.fromarray(smooth_rgb(16, 16)).save(png, "PNG")
    png.seek(0)
    out = io.BytesIO()
    result = lcodec.encode_file(png, out, size=ANY_SIZE)
    assert result.path is None and out.getvalue()[:4] == b"lcod" and result.size == len(out.getvalue())
    decoded = io.BytesIO()
    lcodec.decode_file(io.BytesIO(out.getvalue()), decoded)
    assert Image.open(decoded).size == (16, 16)


def test_read_header_from_path_and_bytes(tmp_path):
    data = quick_lc(smooth_rgb(12, 20)[:, :, 0])
    (tmp_path / "g.lc").write_bytes(data)
    header = lcodec.read_header(tmp_path / "g.lc")
    assert header == lcodec.read_header(data)
    assert (header.width, header.height, header.mode) == (20, 12, "L")
    assert header.payload_size == len(data) - OVERHEAD_BYTES
    assert header.model_id == lcodec.model_info().model_id
    assert header.weights_digest == bytes.fromhex(lcodec.model_info().digest)[:4]
    (tmp_path / "not.lc").write_bytes(b"GIF89a...")
    with pytest.raises(NotAnLcFileError, match="not.lc"):
        lcodec.read_header(tmp_path / "not.lc")
    with pytest.raises(LcodecError, match="no such file"):
        lcodec.read_header(tmp_path / "missing.lc")


def test_model_info():
    info = lcodec.model_info()
    assert info.name and len(info.digest) == 64
    lo, hi = info.rate_range
    assert lo < hi and info.levels == tuple(sorted(info.levels))


def test_pillow_opens_lc_files(tmp_path):
    pixels = smooth_rgb(20, 30)
    data = quick_lc(pixels)
    path = tmp_path / "x.lc"
    path.write_bytes(data)
    with Image.open(path) as im:
        assert (im.format, im.size, im.mode) == ("LC", (30, 20), "RGB")
        im.load()
        np.testing.assert_array_equal(np.asarray(im), np.asarray(lcodec.decode(data)))
    with Image.open(io.BytesIO(data)) as im:
        assert im.convert("L").size == (30, 20)
    assert Image.registered_extensions()[".lc"] == "LC"
    with Image.open(save(tmp_path / "a.png", pixels)) as im:
        assert im.format == "PNG"
