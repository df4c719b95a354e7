"""Claims about `lcodec.imageio`: what users hand the encoder becomes 8-bit RGB or L and an alpha plane, or a
clear refusal.

No torch here: these tests only read images.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_claiming, save, smooth_rgb
from lcodec.errors import ImageTooLargeError, UnsupportedImageError
from lcodec.imageio import Picture, load_image, load_picture, picture_from_array, picture_from_image


def colour(picture: Picture) -> tuple[np.ndarray, str]:
    """The colour the learned codec codes, with its mode; the picture must have no alpha."""
    assert picture.alpha is None
    return picture.pixels, picture.mode


def pixels_from_image(image):
    return colour(picture_from_image(image))


def pixels_from_array(array):
    return colour(picture_from_array(array))


def test_rgb_png_is_read_exactly(tmp_path):
    pixels = smooth_rgb(37, 65)
    got, mode = colour(load_picture(save(tmp_path / "a.png", pixels)))
    assert mode == "RGB" and got.dtype == np.uint8
    np.testing.assert_array_equal(got, pixels)


def test_grayscale_stays_grayscale(tmp_path):
    gray = smooth_rgb(20, 30)[:, :, 0]
    got, mode = colour(load_picture(save(tmp_path / "g.png", gray)))
    assert mode == "L" and got.shape == (20, 30)
    np.testing.assert_array_equal(got, gray)


def test_one_by_one_image_is_allowed(tmp_path):
    got, mode = colour(load_picture(save(tmp_path / "dot.png", np.array([[[1, 2, 3]]], np.uint8))))
    assert mode == "RGB" and got.shape == (1, 1, 3)


def test_16_bit_png_is_scaled_to_8_bits_with_rounding(tmp_path):
    # round(v * 255 / 65535): 257 is exactly 1; 128 is 0.498 -> 0; 129 is 0.502 -> 1; 32896 is 128.
    samples = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    path = save(tmp_path / "deep.png", Image.fromarray(samples))
    assert Image.open(path).mode.startswith("I")
    got, mode = colour(load_picture(path))
    assert mode == "L"
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 128, 255]])


def test_32_bit_integer_mode_is_read_as_16_bit_samples_clipped():
    samples = np.array([[-5, 257, 65535, 70000]], np.int32)
    image = Image.fromarray(samples)
    assert image.mode == "I"
    got, mode = pixels_from_image(image)
    assert mode == "L"
    np.testing.assert_array_equal(got, [[0, 1, 255, 255]])


def test_bilevel_image_becomes_black_and_white_grayscale(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    got, mode = colour(load_picture(save(tmp_path / "bits.png", bits)))
    assert mode == "L"
    np.testing.assert_array_equal(got, [[0, 255], [255, 0]])


def test_palette_image_becomes_its_colours(tmp_path):
    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30, 200, 100, 0])
    pal.putdata([0, 1, 0, 1, 1, 0])
    got, mode = colour(load_picture(save(tmp_path / "pal.png", pal)))
    assert mode == "RGB"
    np.testing.assert_array_equal(got[0], [[10, 20, 30], [200, 100, 0], [10, 20, 30]])


def test_palette_with_used_transparent_index_becomes_an_alpha_plane(tmp_path):
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.putdata([0, 1, 1, 1])
    picture = load_picture(save(tmp_path / "pal.png", pal, transparency=0))
    assert picture.image_mode == "RGBA" and picture.alpha.tolist() == [[0, 255], [255, 255]]
    assert picture.pixels[0, 1].tolist() == [255, 0, 0]


def test_palette_with_unused_transparent_index_is_accepted(tmp_path):
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.putdata([1, 1, 1, 1])
    got, mode = colour(load_picture(save(tmp_path / "pal.png", pal, transparency=0)))
    assert mode == "RGB"
    assert (got == [255, 0, 0]).all()


def test_rgb_with_a_used_transparency_key_becomes_an_alpha_plane(tmp_path):
    pixels = smooth_rgb(4, 4)
    key = tuple(int(v) for v in pixels[0, 0])
    picture = load_picture(save(tmp_path / "key.png", pixels, transparency=key))
    assert picture.mode == "RGB" and picture.image_mode == "RGBA"
    np.testing.assert_array_equal(picture.alpha, np.where((pixels == key).all(axis=2), 0, 255))
    np.testing.assert_array_equal(picture.pixels, pixels)


def test_cmyk_becomes_rgb_by_pillows_conversion(tmp_path):
    cmyk = Image.fromarray(smooth_rgb(8, 8)).convert("CMYK")
    path = save(tmp_path / "print.tif", cmyk)
    got, mode = colour(load_picture(path))
    assert mode == "RGB"
    np.testing.assert_array_equal(got, np.asarray(Image.open(path).convert("RGB")))


def test_ycbcr_becomes_rgb():
    ycc = Image.fromarray(smooth_rgb(8, 8)).convert("YCbCr")
    got, mode = pixels_from_image(ycc)
    assert mode == "RGB"
    np.testing.assert_array_equal(got, np.asarray(ycc.convert("RGB")))


def test_opaque_rgba_drops_alpha_losslessly(tmp_path):
    pixels = smooth_rgb(9, 7)
    rgba = np.concatenate([pixels, np.full((9, 7, 1), 255, np.uint8)], axis=2)
    got, mode = colour(load_picture(save(tmp_path / "rgba.png", rgba)))
    assert mode == "RGB"
    np.testing.assert_array_equal(got, pixels)


def test_transparent_rgba_keeps_colour_and_alpha_exactly(tmp_path):
    rgba = np.concatenate([smooth_rgb(9, 7), np.full((9, 7, 1), 255, np.uint8)], axis=2)
    rgba[3, 4, 3] = 254
    rgba[0, :, 3] = 0
    picture = load_picture(save(tmp_path / "rgba.png", rgba))
    assert picture.mode == "RGB" and picture.image_mode == "RGBA"
    np.testing.assert_array_equal(picture.pixels, rgba[:, :, :3])
    np.testing.assert_array_equal(picture.alpha, rgba[:, :, 3])
    got, mode = load_image(tmp_path / "rgba.png")  # the whole picture in one array
    assert mode == "RGBA"
    np.testing.assert_array_equal(got, rgba)


def test_grayscale_with_alpha(tmp_path):
    opaque = Image.fromarray(np.stack([np.arange(12, dtype=np.uint8).reshape(3, 4), np.full((3, 4), 255, np.uint8)], 2))
    got, mode = colour(load_picture(save(tmp_path / "la.png", opaque)))
    assert mode == "L"
    np.testing.assert_array_equal(got, np.arange(12).reshape(3, 4))
    opaque.putpixel((0, 0), (7, 0))
    picture = load_picture(save(tmp_path / "la2.png", opaque))
    assert picture.image_mode == "LA" and picture.alpha[0, 0] == 0 and (picture.alpha.ravel()[1:] == 255).all()


def test_exif_orientation_is_applied_to_the_pixels(tmp_path):
    pixels = smooth_rgb(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(tmp_path / "phone.png", pixels, exif=exif)
    got, mode = colour(load_picture(path))
    assert got.shape == (40, 24, 3)
    np.testing.assert_array_equal(got, np.rot90(pixels, k=-1))


def test_float_images_are_refused_with_the_mode_named():
    with pytest.raises(UnsupportedImageError, match="'F'"):
        pixels_from_image(Image.new("F", (2, 2)))


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"hello, not an image", "not an image file")])
def test_non_images_are_refused(tmp_path, content, message):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(UnsupportedImageError, match=message):
        load_image(path)


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(UnsupportedImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UnsupportedImageError, match="directory"):
        load_image(tmp_path)


def test_truncated_image_is_refused(tmp_path):
    data = (save(tmp_path / "a.png", smooth_rgb(64, 64))).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedImageError, match="damaged or truncated"):
        load_image(cut)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # 60000 x 60000 RGB would be 10 GB: refusing it must not try to decode (or allocate) anything.
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(io.BytesIO(png_claiming(60000, 60000)))
    with pytest.raises(ImageTooLargeError, match="over the limit of 100; pass max_pixels=110 "):
        load_image(io.BytesIO(png_claiming(11, 10)), max_pixels=100)


def test_streams_are_read_like_files(tmp_path):
    data = save(tmp_path / "a.png", smooth_rgb(5, 6)).read_bytes()
    got, mode = colour(load_picture(io.BytesIO(data)))
    assert mode == "RGB" and got.shape == (5, 6, 3)


class TestArrays:
    def test_shapes(self):
        gray = np.zeros((3, 4), np.uint8)
        assert pixels_from_array(gray)[1] == "L"
        assert pixels_from_array(gray[:, :, None])[1] == "L"
        assert pixels_from_array(np.zeros((3, 4, 3), np.uint8))[1] == "RGB"

    def test_opaque_alpha_is_dropped_and_transparency_kept(self):
        rgba = np.full((2, 2, 4), 255, np.uint8)
        got, mode = pixels_from_array(rgba)
        assert mode == "RGB" and got.shape == (2, 2, 3) and got.flags.c_contiguous
        rgba[0, 0, 3] = 0
        picture = picture_from_array(rgba)
        assert picture.image_mode == "RGBA" and picture.alpha.tolist() == [[0, 255], [255, 255]]
        la = picture_from_array(rgba[:, :, 2:])
        assert la.image_mode == "LA" and la.pixels.shape == (2, 2) and la.alpha.tolist() == [[0, 255], [255, 255]]

    @pytest.mark.parametrize("array", [np.zeros((3, 4), np.float32), np.zeros((3, 4, 5), np.uint8),
                                       np.zeros((0, 4), np.uint8), [[1, 2]]])
    def test_refused(self, array):
        with pytest.raises(UnsupportedImageError):
            pixels_from_array(array)
