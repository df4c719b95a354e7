"""Claims about the ``lcodec`` command line, run in-process through click's CliRunner (real engine)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import lcodec
from conftest import ANY_SIZE, png_claiming, quick_lc, save, smooth_rgb
from lcodec import engine
from lcodec.bitstream.container import DEFAULT_MAX_PIXELS

LINE = re.compile(r"^(?P<src>\S+) -> (?P<dst>\S+): (?P<bytes>[\d,]+) bytes, (?P<bpp>\d+\.\d{4}) bpp \(target (?P<target>[^)]+)\)$")


def assert_clean_error(result, exit_code: int, *fragments: str) -> None:
    """The failure is one `Error: ...` line on stderr, with no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert error_lines, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_encode_decode_round_trip(cli, rgb_png, tmp_path):
    result = cli("encode", rgb_png, "--bpp", "200")  # a bpp any model reaches for this small image
    assert result.exit_code == 0, result.output
    lc = tmp_path / "photo.lc"
    match = LINE.match(result.stdout.strip())
    assert match, result.stdout
    assert match["src"] == str(rgb_png) and match["dst"] == str(lc) and match["target"] == "200"
    size = lc.stat().st_size
    assert int(match["bytes"].replace(",", "")) == size
    assert float(match["bpp"]) == pytest.approx(8 * size / (64 * 48), abs=1e-4)

    rgb_png.rename(tmp_path / "original.png")
    result = cli("decode", lc)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{lc} -> {tmp_path / 'photo.png'}: 64x48 RGB, PNG"
    with Image.open(tmp_path / "photo.png") as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 48))


@pytest.mark.parametrize("option", ["--bpp", "--size"])
def test_rate_targets_are_met_on_a_natural_image(cli, tmp_path, kodak_crop, option):
    """The file is at most the target, and within 3% of it, for a 256x256 photo crop."""
    src = save(tmp_path / "parrots.png", kodak_crop)
    target_bytes = 256 * 256 // 16  # 0.5 bpp
    value = "0.5" if option == "--bpp" else str(target_bytes)
    result = cli("encode", src, option, value)
    assert result.exit_code == 0, result.output
    size = (tmp_path / "parrots.lc").stat().st_size
    assert 0.97 * target_bytes <= size <= target_bytes
    target = LINE.match(result.stdout.strip())["target"]
    assert target == ("0.5" if option == "--bpp" else f"{target_bytes:,} bytes")


@pytest.mark.parametrize("args", [[], ["--bpp", "1", "--size", "100"]])
def test_exactly_one_of_bpp_and_size(cli, rgb_png, args):
    result = cli("encode", rgb_png, *args)
    assert result.exit_code == 2
    assert "exactly one of --bpp and --size" in result.stderr


def test_unreachable_target_is_a_clean_error(cli, rgb_png, no_leftovers):
    result = cli("encode", rgb_png, "--size", "22")
    assert_clean_error(result, 1, str(rgb_png))
    no_leftovers(rgb_png.parent, "photo.png")


@pytest.mark.parametrize("content, fragment", [(None, "no such file"), (b"", "empty"),
                                               (b"%PDF-1.4 not an image", "not an image file")])
def test_bad_inputs_are_clean_errors(cli, tmp_path, content, fragment, no_leftovers):
    src = tmp_path / "in.png"
    if content is not None:
        src.write_bytes(content)
    result = cli("encode", src, "--bpp", "1")
    assert_clean_error(result, 1, fragment, str(src))
    no_leftovers(tmp_path, *(["in.png"] if content is not None else []))


def test_existing_output_needs_force(cli, rgb_png, tmp_path):
    out = tmp_path / "photo.lc"
    out.write_bytes(b"keep me")
    result = cli("encode", rgb_png, "--size", ANY_SIZE)
    assert_clean_error(result, 1, "already exists", "--force")
    assert "force=True" not in result.stderr  # the library's words are translated
    assert out.read_bytes() == b"keep me"
    assert cli("encode", rgb_png, "--size", ANY_SIZE, "--force").exit_code == 0
    assert out.read_bytes()[:4] == b"lcod"


def test_failed_decode_leaves_no_output(cli, rgb_png, tmp_path, no_leftovers):
    data = quick_lc(smooth_rgb(16, 16))
    rgb_png.unlink()
    (tmp_path / "cut.lc").write_bytes(data[:-10])
    assert_clean_error(cli("decode", tmp_path / "cut.lc"), 1, "cut.lc", "corrupt")
    assert_clean_error(cli("decode", tmp_path / "cut.lc", "-o", tmp_path / "out.png"), 1)
    no_leftovers(tmp_path, "cut.lc")


def test_ctrl_c_exits_130_and_leaves_no_partial_file(cli, tmp_path, monkeypatch, no_leftovers):
    (tmp_path / "x.lc").write_bytes(quick_lc(smooth_rgb(16, 16)))

    def save_then_interrupt(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    result = cli("decode", tmp_path / "x.lc")
    assert result.exit_code == 130 and "Traceback" not in result.output
    no_leftovers(tmp_path, "x.lc")


def test_transparency_is_kept_exactly_and_refused_only_where_it_cannot_go(cli, tmp_path, no_leftovers):
    rgba = np.concatenate([smooth_rgb(16, 16), np.full((16, 16, 1), 255, np.uint8)], axis=2)
    assert cli("encode", save(tmp_path / "opaque.png", rgba), "--size", ANY_SIZE).exit_code == 0
    assert lcodec.read_header(tmp_path / "opaque.lc").chunks == ()  # an opaque alpha costs nothing
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 99
    result = cli("encode", save(tmp_path / "glass.png", rgba), "--size", ANY_SIZE)
    assert result.exit_code == 0 and "alpha: " in result.stdout
    assert cli("decode", tmp_path / "glass.lc", "-o", tmp_path / "back.png").exit_code == 0
    back = Image.open(tmp_path / "back.png")
    assert back.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(back)[:, :, 3], rgba[:, :, 3])
    assert "mode:            RGBA" in cli("info", tmp_path / "glass.lc").stdout
    result = cli("decode", tmp_path / "glass.lc", "-o", tmp_path / "back.jpg")
    assert_clean_error(result, 1, "back.jpg", "alpha", ".png")
    no_leftovers(tmp_path, "opaque.png", "opaque.lc", "glass.png", "glass.lc", "back.png")


def test_grayscale_round_trip_stays_grayscale(cli, tmp_path):
    src = save(tmp_path / "g.png", smooth_rgb(24, 32)[:, :, 0])
    assert cli("encode", src, "--size", ANY_SIZE).exit_code == 0
    assert cli("decode", tmp_path / "g.lc", "-o", tmp_path / "back.png").exit_code == 0
    assert Image.open(tmp_path / "back.png").mode == "L"


@pytest.mark.parametrize("name, make", [
    ("deep.png", lambda: Image.fromarray((smooth_rgb(16, 16)[:, :, 0].astype(np.uint16) * 257))),
    ("palette.png", lambda: Image.fromarray(smooth_rgb(16, 16)).convert("P")),
    ("print.tif", lambda: Image.fromarray(smooth_rgb(16, 16)).convert("CMYK")),
])
def test_other_input_modes_encode(cli, tmp_path, name, make):
    src = save(tmp_path / name, make())
    result = cli("encode", src, "--size", ANY_SIZE)
    assert result.exit_code == 0, result.output
    expected = "L" if name == "deep.png" else "RGB"
    assert lcodec.read_header(src.with_suffix(".lc")).mode == expected


def test_exif_orientation_is_applied(cli, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    src = save(tmp_path / "phone.png", smooth_rgb(16, 40), exif=exif)
    assert cli("encode", src, "--size", ANY_SIZE).exit_code == 0
    header = lcodec.read_header(tmp_path / "phone.lc")
    assert (header.width, header.height) == (16, 40)


@pytest.mark.parametrize("height, width", [(1, 1), (37, 65)])
def test_tiny_and_odd_sizes(cli, tmp_path, height, width):
    src = save(tmp_path / "odd.png", smooth_rgb(height, width))
    assert cli("encode", src, "--size", ANY_SIZE).exit_code == 0
    src.unlink()
    assert cli("decode", tmp_path / "odd.lc").exit_code == 0
    assert Image.open(tmp_path / "odd.png").size == (width, height)


def test_info_reads_the_header_without_importing_torch(tmp_path):
    lc = tmp_path / "x.lc"
    lc.write_bytes(quick_lc(smooth_rgb(30, 40)))
    code = ("import sys\nfrom lcodec.cli import main\n"
            "try:\n    main(['info', sys.argv[1]])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'info imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code, str(lc)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    header = lcodec.read_header(lc)
    size = lc.stat().st_size
    for text in (f"{size:,} bytes", "40x30", "RGB", f"{8 * size / 1200:.4f}", f"id {header.model_id}",
                 header.weights_digest.hex(), f"format version:  {header.version}", f"{header.rate_q / 1024:.4f}"):
        assert text in out.stdout, (text, out.stdout)


def test_info_says_whether_the_installed_model_can_decode(cli, tmp_path):
    data = bytearray(quick_lc(smooth_rgb(8, 8)))
    name = lcodec.model_info().name
    data[5] = 250  # a model id no lcodec has used yet (the CRC is then made right again)
    data[-4:] = struct.pack(">I", zlib.crc32(bytes(data[:-4])))
    (tmp_path / "future.lc").write_bytes(data)
    result = cli("info", tmp_path / "future.lc")
    assert result.exit_code == 0 and "id 250" in result.stdout and "does not know" in result.stdout
    data[5] = lcodec.model_info().model_id
    data[6] ^= 0xFF  # other weights for the same model id
    data[-4:] = struct.pack(">I", zlib.crc32(bytes(data[:-4])))
    (tmp_path / "other.lc").write_bytes(data)
    result = cli("info", tmp_path / "other.lc")
    assert result.exit_code == 0 and name in result.stdout and "cannot decode" in result.stdout
    assert_clean_error(cli("decode", tmp_path / "other.lc"), 1, "other weights")


def test_info_on_a_non_lc_file(cli, rgb_png):
    assert_clean_error(cli("info", rgb_png), 1, "not an .lc file", str(rgb_png))


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "lcodec", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "encode" in out.stdout and "decode" in out.stdout and "info" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lcodec", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"lcodec, version {lcodec.__version__}"


@pytest.mark.parametrize("command", ["encode", "decode", "info"])
def test_every_command_has_help_with_an_example(cli, command):
    result = cli(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and f"lcodec {command} " in result.stdout


def test_stdin_to_stdout_pipe(cli, rgb_png):
    result = cli("encode", "-", "--size", ANY_SIZE, "-o", "-", input=rgb_png.read_bytes())
    assert result.exit_code == 0, result.stderr
    data = result.stdout_bytes
    assert data[:4] == b"lcod" and lcodec.read_header(data).width == 64
    assert "<stdin> -> <stdout>" in result.stderr  # the report keeps out of the pipe
    result = cli("decode", "-", "-o", "-", input=data)
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_inputs_into_a_directory(cli, tmp_path):
    a = save(tmp_path / "a.png", smooth_rgb(16, 16, seed=1))
    b = save(tmp_path / "b.png", smooth_rgb(16, 24, seed=2))
    out = tmp_path / "out"
    out.mkdir()
    result = cli("encode", a, b, "--size", ANY_SIZE, "-o", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.lc", "b.lc"]
    assert len(result.stdout.splitlines()) == 2
    result = cli("encode", a, b, "--size", ANY_SIZE, "-o", tmp_path / "single.lc")
    assert result.exit_code == 2 and "must be a directory" in result.stderr and "end it with /" in result.stderr
    assert not (tmp_path / "single.lc").exists()


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_an_output_directory_ending_in_slash_is_created(cli, tmp_path, command):
    src = save(tmp_path / "a.png", smooth_rgb(16, 16))
    if command == "decode":
        src.with_suffix(".lc").write_bytes(quick_lc(smooth_rgb(16, 16)))
        src = src.with_suffix(".lc")
    options = ["--size", ANY_SIZE] if command == "encode" else []
    result = cli(command, src, *options, "-o", f"{tmp_path}/new/deeper/")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["a.lc" if command == "encode" else "a.png"]
    (tmp_path / "file").write_text("in the way")
    assert_clean_error(cli(command, src, *options, "-o", f"{tmp_path}/file/"), 1, "cannot create the directory")


@pytest.mark.parametrize("command", ["encode", "decode"])
@pytest.mark.parametrize("case", ["no such directory", "a directory in the way", "a file for a directory",
                                  "no permission"])
def test_an_unwritable_output_is_reported_before_coding(cli, tmp_path, monkeypatch, no_leftovers, command, case):
    """The output is checked first (as an existing one is): no time is spent on an encode or decode that
    cannot be saved."""
    src = save(tmp_path / "in.png", smooth_rgb(16, 16))
    if command == "decode":
        src.unlink()
        src = tmp_path / "in.lc"
        src.write_bytes(quick_lc(smooth_rgb(16, 16)))
    suffix = ".lc" if command == "encode" else ".png"
    left = {src.name}
    if case == "no such directory":
        out, fragment = tmp_path / "missing" / f"out{suffix}", "no directory"
    elif case == "a directory in the way":
        out, fragment = tmp_path / f"in{suffix}", "is a directory"  # the default output name
        out.mkdir()
        left.add(out.name)
    elif case == "a file for a directory":
        (tmp_path / "notes").write_text("a file")
        out, fragment = tmp_path / "notes" / f"out{suffix}", "not a directory"
        left.add("notes")
    else:
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere: a read-only directory does not stop it")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out, fragment = locked / f"out{suffix}", "ermission denied"
        left.add("locked")

    def too_late(*args, **kwargs):
        raise AssertionError("coded before the output was checked")

    monkeypatch.setattr(engine, "encode_array", too_late)
    monkeypatch.setattr(engine, "decode_array", too_late)
    options = ["--size", ANY_SIZE] if command == "encode" else []
    args = [] if case == "a directory in the way" else ["-o", out]
    for force in ([], ["--force"]):
        assert_clean_error(cli(command, src, *options, *args, *force), 1, "cannot write", str(out), fragment)
    no_leftovers(tmp_path, *left)


def test_encode_max_pixels(cli, tmp_path, rgb_png):
    """encode refuses an image over --max-pixels (from its header, before reading its pixels) and says
    which value would accept it; the default is the decoder's."""
    result = cli("encode", rgb_png, "--size", ANY_SIZE, "--max-pixels", 64 * 48 - 1)
    assert_clean_error(result, 1, str(rgb_png), "over the limit of 3,071", "--max-pixels 3072")
    assert "max_pixels=" not in result.stderr  # the library's words are translated
    assert cli("encode", rgb_png, "--size", ANY_SIZE, "--max-pixels", 64 * 48).exit_code == 0

    big = tmp_path / "big.png"
    big.write_bytes(png_claiming(10392, 6928))  # a 72-megapixel camera's picture (its header only)
    result = cli("encode", big, "--bpp", "0.5")
    assert_clean_error(result, 1, "over the limit of 67,108,864", "--max-pixels 71995776")
    assert f"[default: {DEFAULT_MAX_PIXELS};" in " ".join(cli("encode", "--help").stdout.split())


def test_decode_max_pixels_message_names_the_option(cli, tmp_path):
    (tmp_path / "x.lc").write_bytes(quick_lc(smooth_rgb(16, 16)))
    result = cli("decode", tmp_path / "x.lc", "--max-pixels", 255)
    assert_clean_error(result, 1, "over the limit", "a larger --max-pixels")
    assert " max_pixels" not in result.stderr  # the library's words are translated


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bpp_must_be_a_positive_finite_number(cli, rgb_png, value):
    result = cli("encode", rgb_png, "--bpp", value)
    assert result.exit_code == 2 and "--bpp" in result.stderr and "Traceback" not in result.output


def test_decoding_to_a_lossy_format_warns(cli, tmp_path):
    (tmp_path / "x.lc").write_bytes(quick_lc(smooth_rgb(16, 16)))
    for name in ("x.jpg", "x.webp"):
        result = cli("decode", tmp_path / "x.lc", "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        warning = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
        assert len(warning) == 1 and "changes the decoded pixels" in warning[0] and ".png" in warning[0]
    result = cli("decode", tmp_path / "x.lc", "-o", tmp_path / "x.tif")
    assert result.exit_code == 0 and "Warning" not in result.stderr


def test_decode_output_without_an_extension_is_a_clean_error(cli, tmp_path, no_leftovers):
    (tmp_path / "x.lc").write_bytes(quick_lc(smooth_rgb(16, 16)))
    result = cli("decode", tmp_path / "x.lc", "-o", tmp_path / "noext")
    assert_clean_error(result, 1, "noext", "no extension", ".png")
    no_leftovers(tmp_path, "x.lc")


def test_real_pipes(rgb_png):
    """`cat photo.png | lcodec encode - --bpp B -o - > photo.lc`, in a real process with real pipes."""
    proc = subprocess.run([sys.executable, "-m", "lcodec", "encode", "-", "--size", str(ANY_SIZE), "-o", "-"],
                          input=rgb_png.read_bytes(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert lcodec.decode(proc.stdout).size == (64, 48)
    assert b"<stdin> -> <stdout>" in proc.stderr


def test_one_failed_input_does_not_stop_the_others(cli, tmp_path):
    good = save(tmp_path / "good.png", smooth_rgb(16, 16))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = cli("encode", bad, good, "--size", ANY_SIZE)
    assert_clean_error(result, 1, "bad.png")
    assert (tmp_path / "good.lc").exists() and not (tmp_path / "bad.lc").exists()


def test_worker_processes(cli, tmp_path):
    """-j 2: spawned workers (each imports torch once) give the same bytes as one process.

    As in the README's `lcodec encode *.png --bpp 0.5 -o out/ -j 2`, out/ need not exist yet.
    """
    srcs = [save(tmp_path / f"{i}.png", smooth_rgb(16, 16, seed=i)) for i in range(3)]
    out = tmp_path / "out"
    result = cli("encode", *srcs, "--size", ANY_SIZE, "-o", f"{out}/", "-j", "2")
    assert result.exit_code == 0, result.output
    for src in srcs:
        assert (out / f"{src.stem}.lc").read_bytes() == lcodec.encode(Image.open(src), size=ANY_SIZE)
