"""Reduced-size decoding (SPEC "Reduced-size decoding"): sizes, what is read, what comes out."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import lcodec
from conftest import smooth_rgb
from lcodec import api, engine
from lcodec.bitstream import range_coder
from lcodec.models import context
from lcodec.models.frozen import half_block_shift
from lcodec.models.lifting import reduced_channels

GOLDEN = Path(__file__).resolve().parent / "golden"
SAMPLE = GOLDEN / "v2_sample_256x176_m15.lc"  # model 15: every pass codes symbols
FACTORS = (2, 4, 8, 16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.mark.parametrize("scale, factor", [(1, 1), ("1/2", 2), (0.25, 4), (Fraction(1, 8), 8), (" 1/16 ", 16)])
def test_a_scale_is_a_power_of_two_reduction(scale, factor):
    assert api.reduction(scale) == factor


@pytest.mark.parametrize("scale", [2, "1/3", 0.3, "1/32", 0, "", "half", None, True])
def test_other_scales_are_refused(scale):
    with pytest.raises(ValueError, match="scale must be one of"):
        api.reduction(scale)


@pytest.mark.parametrize("factor", FACTORS)
def test_the_reduced_latent_is_the_full_latents_coarse_channels(factor):
    """A reduced decode of a context-coded file computes only the coarse channels' tables and
    symbols, and they are the full decode's, exactly."""
    data = SAMPLE.read_bytes()
    _, _, full = engine.decode_latent(data)
    _, _, reduced = engine.decode_latent(data, reduce=factor)
    channels = reduced_channels(factor.bit_length() - 1)
    assert reduced.shape[1] == channels
    assert torch.equal(reduced, full[:, :channels])


@pytest.mark.parametrize("factor", FACTORS)
def test_a_reduced_decode_stops_reading_after_the_coarse_passes(factor, monkeypatch):
    """z, the LL block's passes and those of levels 4 .. k+1 are read; the finer passes are not."""
    items = []
    decode = range_coder.Decoder.decode
    monkeypatch.setattr(range_coder.Decoder, "decode", lambda self, t, tables: items.append(t.size) or
                        decode(self, t, tables))
    engine.decode_array(SAMPLE.read_bytes(), reduce=factor)
    k = factor.bit_length() - 1
    ctx = engine.load_model(engine.DEFAULT_MODEL_ID).context
    assert len(items) == 1 + context.coarse_passes(ctx, k)  # z, then the passes
    assert len(items) == 1 + 6 + 18 * (4 - k)  # the LL block's 6 passes, then 18 per level


@pytest.mark.parametrize("factor", FACTORS)
def test_reduced_pictures_have_pillows_reduced_size_and_look_like_the_full_one(factor):
    data = SAMPLE.read_bytes()
    full = lcodec.decode(data)
    small = lcodec.decode(data, scale=Fraction(1, factor))
    assert small.size == full.reduce(factor).size == (-(-256 // factor), -(-176 // factor))
    assert small.mode == "RGB"
    # Against the full decode box-reduced: the low band is not a box filter, so not identical,
    # but the same picture (measured 43.5 / 41.1 / 35.7 / 31.5 dB at 1/2 .. 1/16).
    assert _psnr(np.asarray(small), np.asarray(full.reduce(factor))) > {2: 42, 4: 39, 8: 34, 16: 30}[factor]


@pytest.mark.parametrize("factor", FACTORS)
def test_the_transform_reduces_a_flat_picture_to_itself(factor):
    """LL_k is 2^k times the picture's DC (the scaled 9/7 low band): divided by it, a flat colour
    comes out as that colour, shifted or not."""
    model = engine.installed_weights().model
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 64, 128)
    with torch.no_grad():
        small = model.analysis.inverse(model.analysis(x), factor.bit_length() - 1)
    assert small.shape == (1, 3, 64 // factor, 128 // factor)
    assert torch.allclose(small, x[:, :, :64 // factor, :128 // factor], atol=1e-4)
    assert torch.allclose(half_block_shift(small, factor), small, atol=1e-6)


def test_the_shift_puts_samples_at_their_block_centres():
    """A ramp sampled at f·i comes out sampled at f·i + (f − 1)/2, as a box reduce samples it."""
    f = 8
    ramp = torch.arange(0, 40, dtype=torch.float32)
    x = (ramp.view(1, 1, 1, -1) * f).expand(1, 1, 6, 40)
    shifted = half_block_shift(x, f)[0, 0, 0, 1:-2]  # the edge samples repeat
    assert torch.allclose(shifted, ramp[1:-2] * f + (f - 1) / 2, atol=1e-4)


def test_a_model_without_a_reduced_synthesis_box_reduces_its_full_picture():
    """Model 0 (a hyperprior, no wavelet): the whole picture is decoded, then averaged per block
    (within one 8-bit step of Pillow's reduce of the 8-bit picture)."""
    data = (GOLDEN / "v1_gray_65x37.lc").read_bytes()
    full, mode = engine.decode_array(data)
    small, small_mode = engine.decode_array(data, reduce=4)
    assert mode == small_mode == "L"
    expected = np.asarray(Image.fromarray(full).reduce(4))
    assert small.shape == expected.shape == (10, 17)
    assert np.abs(small.astype(int) - expected).max() <= 1


def test_a_lifting_model_without_a_context_reduces_from_its_whole_latent(archived_weights):
    """Ids 7-11 code y as one item: it is decoded whole, and the inverse still stops early."""
    data = (GOLDEN / "v1_rgb_64x48_m11.lc").read_bytes()
    header, model, y_hat = engine.decode_latent(data)
    small, _ = engine.decode_array(data, reduce=2)
    expected = model.synthesize_reduced(y_hat, header.rate_q / 1024, 1)[0, :, :24, :32]
    assert small.shape == (24, 32, 3)
    assert np.array_equal(small, expected.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_draft_picks_the_largest_reduction_still_at_least_the_size_asked_for():
    """As Pillow's JPEG plugin: f = the largest of 16, 8, 4, 2, 1 not above min(W // w, H // h)."""
    image = Image.open(SAMPLE)  # 256 x 176
    assert image.draft(None, (40, 40)) == ("RGB", (0, 0, 64.0, 44.0))  # min(6, 4) -> 4
    assert image.size == (64, 44)
    assert image.draft(None, (16, 11)) == ("RGB", (0, 0, 16.0, 11.0))  # again, before load: 16
    assert image.draft(None, (300, 300)) == ("RGB", (0, 0, 256.0, 176.0))  # larger than the picture: 1
    assert image.size == (256, 176)
    image.draft(None, (32, 22))
    image.load()
    assert image.size == (32, 22)
    assert np.array_equal(np.asarray(image), np.asarray(lcodec.decode(SAMPLE.read_bytes(), scale="1/8")))
    assert image.draft(None, (16, 11)) is None  # loaded: no effect


def test_thumbnail_decodes_a_reduced_picture():
    image = Image.open(SAMPLE)
    image.thumbnail((32, 32))  # Pillow drafts at twice the size: 64 x 64 -> f = 2, then resizes
    assert image.size == (32, 22)
    assert image.mode == "RGB"


def test_alpha_and_metadata_come_out_at_the_reduced_size():
    rgba = np.dstack([smooth_rgb(40, 72), np.tile(np.linspace(0, 255, 72).astype(np.uint8), (40, 1))])
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = Image.fromarray(rgba)
    source.info["icc_profile"] = icc
    data = lcodec.encode(source, size=100_000)
    full = lcodec.decode(data)
    small = lcodec.decode(data, scale="1/4")
    assert small.mode == "RGBA" and small.size == (18, 10)
    assert np.array_equal(np.asarray(small)[:, :, 3], np.asarray(full.getchannel("A").reduce(4)))
    assert small.info["icc_profile"] == icc
    drafted = Image.open(io.BytesIO(data))
    drafted.draft(None, (18, 10))
    assert np.array_equal(np.asarray(drafted), np.asarray(small))
    assert drafted.info["icc_profile"] == icc


def test_cli_decodes_at_a_scale(cli, tmp_path):
    src = tmp_path / "sample.lc"
    src.write_bytes(SAMPLE.read_bytes())
    result = cli("decode", src, "--scale", "1/8", "-o", tmp_path / "thumb.png")
    assert result.exit_code == 0, result.output
    assert "32x22 RGB" in result.output
    assert Image.open(tmp_path / "thumb.png").size == (32, 22)
    assert cli("decode", src, "--scale", "1/3", "-o", tmp_path / "x.png").exit_code == 2


def test_coarse_tables_in_tiles_side_by_side_are_the_whole_h_s_ones():
    """h_s restricted to y's first channels, its tiles computed in two threads, gives exactly the
    means and table indices of the whole h_s on those channels (a latent of two h_s tiles)."""
    model = engine.installed_weights().model
    z = torch.from_numpy(np.random.default_rng(1).integers(-4, 5, (1, model.config.N, 2, 40)))
    mean, idx = model.latent_entropy_parameters(z, np.dtype(np.uint8))
    for channels in (3, 12, 48):
        part_mean, part_idx = model.latent_entropy_parameters(z, np.dtype(np.uint8), channels, workers=2)
        assert torch.equal(part_mean, mean[:, :channels])
        assert np.array_equal(part_idx, idx[:channels])
