"""Claims about metadata (issue 33, part 1): an input's ICC profile, EXIF and XMP come back out.

They are kept by default and byte for byte (EXIF orientation reset to 1 where the encoder turned
the pixels), count in the size target, come back through `decode`, `decode_file` (PNG, JPEG,
WebP, TIFF) and Pillow's plugin, and malformed or oversized metadata is dropped with a warning
or refused with a clear error, never a crash.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageCms

import lcodec
from conftest import ANY_SIZE, save, smooth_rgb
from lcodec import metadata
from lcodec.bitstream import container
from lcodec.errors import LcodecWarning, RateError

ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
       b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
       b'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
       b'tiff:Orientation="{o}"><dc:creator>A. Photographer \xc3\xa9</dc:creator></rdf:Description></rdf:RDF>'
       b'</x:xmpmeta><?xpacket end="w"?>')


def exif(orientation: int = 1, make: str = "lcodec camera") -> bytes:
    tags = Image.Exif()
    tags[0x010F] = make  # Make
    tags[0x0112] = orientation
    tags.get_ifd(0x8769)[0x9003] = "2024:06:01 12:00:00"  # DateTimeOriginal, in the EXIF IFD
    return tags.tobytes()


def xmp(orientation: int = 1) -> bytes:
    return XMP.replace(b"{o}", str(orientation).encode())


def photo(tmp_path, fmt: str, orientation: int = 1, height: int = 48, width: int = 64):
    """A picture saved as `fmt` with an ICC profile, EXIF and XMP."""
    path = tmp_path / f"photo.{fmt.lower()}"
    options = dict(icc_profile=ICC, exif=exif(orientation))
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        options["pnginfo"] = PngInfo()
        options["pnginfo"].add_itxt("XML:com.adobe.xmp", xmp(orientation).decode())
    else:
        options["xmp"] = xmp(orientation)
    if fmt == "WEBP":
        options["lossless"] = True
    save(path, smooth_rgb(height, width), format=fmt, **options)
    return path


def assert_carries_all(info: dict, orientation: int = 1) -> None:
    assert info["icc_profile"] == ICC
    assert info["exif"] == exif(orientation)
    xmp_value = info["xmp"].encode() if isinstance(info["xmp"], str) else info["xmp"]
    assert xmp_value == xmp(orientation)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_icc_exif_and_xmp_survive_the_api_byte_for_byte(tmp_path, fmt):
    with Image.open(photo(tmp_path, fmt)) as im:
        data = lcodec.encode(im, size=ANY_SIZE)
    header = lcodec.read_header(data)
    assert [c.tag for c in header.chunks] == [b"ICCP", b"EXIF", b"XMP "]
    assert header.chunk(b"EXIF") == exif()[len(b"Exif\0\0"):]  # the TIFF structure, without JPEG's prefix
    assert_carries_all(lcodec.decode(data).info)
    with Image.open(io.BytesIO(data)) as im:  # the plugin: in info before any pixel is decoded
        assert_carries_all(im.info)
        assert im.getexif()[0x010F] == "lcodec camera"


@pytest.mark.parametrize("src_fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("out_ext", [".png", ".jpg", ".webp", ".tif"])
def test_decode_file_writes_the_metadata_into_each_format(tmp_path, src_fmt, out_ext):
    lc = tmp_path / "photo.lc"
    lcodec.encode_file(photo(tmp_path, src_fmt), lc, size=ANY_SIZE)
    out = tmp_path / f"back{out_ext}"
    result = lcodec.decode_file(lc, out)
    assert result.warning is None or "left out" not in result.warning
    with Image.open(out) as im:
        assert im.info["icc_profile"] == ICC
        assert im.getexif()[0x010F] == "lcodec camera"
        assert im.getexif().get_ifd(0x8769)[0x9003] == "2024:06:01 12:00:00"
        xmp_value = im.info["xmp"]
        assert (xmp_value.encode() if isinstance(xmp_value, str) else xmp_value) == xmp()


def test_cli_keeps_metadata_lists_it_and_strips_exif_and_xmp_on_request(cli, tmp_path):
    src = photo(tmp_path, "JPEG")
    assert cli("encode", src, "--size", ANY_SIZE, "-o", tmp_path / "all.lc").exit_code == 0
    info = cli("info", tmp_path / "all.lc").stdout
    assert f"ICC profile:     {len(ICC):,} bytes (sRGB built-in)" in info
    assert f"EXIF:            {len(exif()) - 6:,} bytes" in info and f"XMP:             {len(xmp()):,} bytes" in info
    result = cli("encode", src, "--size", ANY_SIZE, "-o", tmp_path / "private.lc", "--strip-metadata")
    assert result.exit_code == 0 and "ICC profile: " in result.stdout
    header = lcodec.read_header(tmp_path / "private.lc")
    assert [c.tag for c in header.chunks] == [b"ICCP"]  # the colours' meaning is never dropped silently
    assert cli("decode", tmp_path / "private.lc", "-o", tmp_path / "private.jpg").exit_code == 0
    with Image.open(tmp_path / "private.jpg") as im:
        assert im.info["icc_profile"] == ICC and "exif" not in im.info and "xmp" not in im.info
    plain = save(tmp_path / "plain.png", smooth_rgb(16, 16))
    assert cli("encode", plain, "--size", ANY_SIZE).exit_code == 0
    assert "metadata:        none" in cli("info", tmp_path / "plain.lc").stdout


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_applied_orientation_is_reset_to_1_in_exif_and_xmp(tmp_path, fmt):
    with Image.open(photo(tmp_path, fmt, orientation=6)) as im:
        image = lcodec.decode(lcodec.encode(im, size=ANY_SIZE))
    assert image.size == (48, 64)  # turned upright
    assert_carries_all(image.info, orientation=1)  # every other byte as it was
    assert image.getexif()[0x0112] == 1


def test_the_size_target_includes_the_metadata(kodak_crop):
    with_metadata = Image.fromarray(kodak_crop)
    with_metadata.info.update(icc_profile=ICC, exif=exif(), xmp=xmp())
    budget = 4096  # 0.5 bpp of 256 x 256
    data = lcodec.encode(with_metadata, bpp=0.5)
    plain = lcodec.encode(kodak_crop, bpp=0.5)
    extra = container.chunks_size(lcodec.read_header(data).chunks)
    assert len(data) <= budget and len(plain) <= budget
    assert 0.95 * (budget - extra) <= len(data) - extra < len(plain)  # the colour got what the metadata left


def test_metadata_that_leaves_no_room_is_a_clear_rate_error(cli, tmp_path):
    src = photo(tmp_path, "PNG", height=32, width=32)
    with pytest.raises(RateError, match=r"ICC profile, EXIF and XMP alone take .* strip_metadata=True"):
        lcodec.encode_file(src, size=600)
    result = cli("encode", src, "--size", 600)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "alone take" in result.stderr and "give --strip-metadata" in result.stderr
    assert not (tmp_path / "photo.lc").exists()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, writing the unreadable EXIF into TIFF
@pytest.mark.parametrize("info, kept, fragment", [
    (dict(icc_profile=b"not an icc profile"), [], "ICC profile is malformed"),
    (dict(icc_profile=bytes(200)), [], "no 'acsp' signature"),
    (dict(exif=b"Exif\0\0garbage that is no TIFF"), [], "EXIF data is malformed"),
    (dict(exif=b"Exif\0\0II*\0\xff\xff\xff\xff"), ["EXIF"], None),  # unreadable offsets: kept as it is
    (dict(icc_profile=ICC, exif=b"\0\0\0"), ["ICC profile"], "EXIF data is malformed"),
])
def test_malformed_metadata_is_dropped_with_a_warning(info, kept, fragment, tmp_path):
    image = Image.fromarray(smooth_rgb(16, 16))
    image.info.update(info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = lcodec.encode(image, size=ANY_SIZE)
    notes = [str(w.message) for w in caught if issubclass(w.category, LcodecWarning)]
    assert (fragment is None and not notes) or (len(notes) == 1 and fragment in notes[0])
    assert metadata.Metadata.from_header(lcodec.read_header(data)).names() == kept
    decoded = lcodec.decode(data)  # and whatever was kept is written out without a crash
    for ext in (".png", ".jpg", ".webp", ".tif"):
        result = lcodec.decode_file(io.BytesIO(data), tmp_path / f"out{ext}", force=True)
        assert result.width == 16
    assert decoded.size == (16, 16)


def test_encode_file_names_malformed_metadata_in_its_warning(tmp_path, cli):
    src = save(tmp_path / "bad.png", smooth_rgb(16, 16), icc_profile=b"not an icc profile")
    result = lcodec.encode_file(src, size=ANY_SIZE)
    assert "bad.png: the ICC profile is malformed" in result.warning and result.kept == ()
    result = cli("encode", src, "--size", ANY_SIZE, "--force")
    assert result.exit_code == 0 and "Warning: " in result.stderr and "ICC profile is malformed" in result.stderr


def test_formats_that_cannot_hold_metadata_say_what_they_left_out(tmp_path):
    lc = tmp_path / "photo.lc"
    lcodec.encode_file(photo(tmp_path, "PNG"), lc, size=ANY_SIZE)
    result = lcodec.decode_file(lc, tmp_path / "photo.bmp")
    assert "cannot hold the ICC profile, EXIF and XMP" in result.warning


def test_exif_too_long_for_jpeg_is_left_out_of_it_with_a_warning(tmp_path):
    image = Image.fromarray(smooth_rgb(16, 16))
    big = Image.Exif()
    big[0x010E] = "x" * 70_000  # ImageDescription: more than a JPEG marker holds
    image.info["exif"] = big.tobytes()
    lc = tmp_path / "big.lc"
    lcodec.encode_file(save(tmp_path / "big.png", image, exif=big.tobytes()), lc, size=ANY_SIZE)
    assert len(lcodec.read_header(lc).chunk(b"EXIF")) > 70_000
    result = lcodec.decode_file(lc, tmp_path / "big.jpg")
    assert "EXIF (" in result.warning and "JPEG holds at most 65,533" in result.warning
    lcodec.decode_file(lc, tmp_path / "back.png")
    with Image.open(tmp_path / "back.png") as im:
        assert im.getexif()[0x010E] == "x" * 70_000


def test_files_without_metadata_are_unchanged_and_old_files_decode(tmp_path):
    data = lcodec.encode(smooth_rgb(16, 16), size=ANY_SIZE)
    assert lcodec.read_header(data).chunks == ()
    assert not {"icc_profile", "exif", "xmp"} & set(lcodec.decode(data).info)


def test_icc_description_is_read_from_v2_and_v4_profiles():
    assert metadata.describe_icc(ICC) == "sRGB built-in"
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert metadata.describe_icc(lab)  # whatever lcms names it, it reads
    assert metadata.describe_icc(b"\0" * 131) is None and metadata.describe_icc(ICC[:140]) is None


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif", ".bmp"])
def test_junk_in_a_files_metadata_chunks_is_written_out_or_left_out_never_a_crash(tmp_path, ext):
    """Another encoder may store anything in ICCP, EXIF and XMP: a decoder hands it on, or leaves it out."""
    from dataclasses import replace

    data = lcodec.encode(smooth_rgb(16, 16), size=ANY_SIZE)
    header, payload = container.unpack(data)
    junk = (container.Chunk(b"ICCP", b"junk"), container.Chunk(b"EXIF", b"MM\0*\xff\xff\xff\xff junk"),
            container.Chunk(b"XMP ", b"\xff\xfe not UTF-8"))
    lc = tmp_path / "junk.lc"
    lc.write_bytes(container.pack(replace(header, chunks=junk), payload))
    assert lcodec.decode(lc.read_bytes()).info["icc_profile"] == b"junk"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the EXIF it cannot parse
        result = lcodec.decode_file(lc, tmp_path / f"out{ext}")
        with Image.open(tmp_path / f"out{ext}") as im:
            assert im.size == (16, 16)
    if ext in (".png", ".bmp"):
        assert "left out" in result.warning
