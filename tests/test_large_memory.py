"""What keeps a large picture's encode and decode in bounded memory gives the same bytes and
pixels: the picture padded in place, the kept symbols narrowed to int16, g_s's tiles written
straight into the decoded pixels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import smooth_rgb
from lcodec import engine, rounding
from lcodec.models.frozen import PAD


def _padded_whole(pixels: np.ndarray, mode: str) -> torch.Tensor:
    """The picture converted whole and padded by F.pad, as a reference."""
    if mode == "L":
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    h, w = pixels.shape[:2]
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float().div_(255.0)
    return F.pad(x, (0, math.ceil(w / PAD) * PAD - w, 0, math.ceil(h / PAD) * PAD - h), mode="replicate")


@pytest.mark.parametrize("shape", [(100, 150, 3), (65, 64, 3), (1, 200, 3), (77, 200), (130, 64)])
def test_a_picture_padded_in_place_is_the_one_padded_whole(shape):
    pixels = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    pixels.setflags(write=False)
    mode = "L" if len(shape) == 2 else "RGB"
    x = engine._to_tensor(pixels, mode)
    assert torch.equal(x, _padded_whole(pixels, mode)) and x.is_contiguous()


def test_narrowed_symbols_keep_their_values():
    small = np.array([-32767, 0, 32767], dtype=np.int32)
    assert rounding.narrowed(small).dtype == np.int16 and np.array_equal(rounding.narrowed(small), small)
    tiny = np.array([-127, 5, 127], dtype=np.int32)
    assert rounding.narrowed(tiny).dtype == np.int8 and np.array_equal(rounding.narrowed(tiny), tiny)
    for wide in (np.array([-32768, 1], dtype=np.int32), np.array([40000], dtype=np.int32)):
        assert rounding.narrowed(wide) is wide


def test_a_payload_from_int16_symbols_is_the_same_stream():
    """The coder codes a measure's items, kept as int8 and int16, exactly as the symbols made
    again (escaped values included)."""
    pixels = smooth_rgb(128, 192, seed=5)
    enc = engine.Encoder(engine.load_model(engine.DEFAULT_MODEL_ID), pixels, "RGB")
    rq = 6 * 1024
    enc.measure_bytes(rq)
    assert {values.dtype for item in enc._kept[2] for values in item[0]} == {np.dtype(np.int8), np.dtype(np.int16)}
    assert enc.payload(rq) == engine.Encoder(engine.load_model(engine.DEFAULT_MODEL_ID), pixels, "RGB").payload(rq)


def test_a_decode_into_the_pixels_is_the_decode_of_the_whole_picture(monkeypatch):
    """A picture large enough to run g_s by levels (40 x 37 latents, padded), decoded tile by
    tile into its pixels, has the pixels of the float picture's decode."""
    pixels = smooth_rgb(590, 630, seed=7)
    data = engine.encode_array(pixels, "RGB", rate=5.0).data
    monkeypatch.setattr(engine, "DIRECT_PIXELS", 10**9)
    whole, _ = engine.decode_array(data)
    monkeypatch.setattr(engine, "DIRECT_PIXELS", 0)
    direct, _ = engine.decode_array(data)
    assert np.array_equal(direct, whole) and direct.flags.c_contiguous
    grey, _ = engine.decode_array(engine.encode_array(pixels[:, :, 1], "L", rate=5.0).data)
    monkeypatch.setattr(engine, "DIRECT_PIXELS", 10**9)
    assert np.array_equal(engine.decode_array(engine.encode_array(pixels[:, :, 1], "L", rate=5.0).data)[0], grey)


@pytest.mark.parametrize("model_id, size", [(engine.DEFAULT_MODEL_ID, (200, 330)), (0, (130, 200))])
def test_a_decode_into_the_pixels_of_a_picture_drawn_whole(model_id, size, monkeypatch):
    """Pictures that do not run by levels (small, or a model without levels) decode into their
    pixels as the float picture does."""
    data = engine.encode_array(smooth_rgb(*size, seed=2), "RGB", rate=3.0, model_id=model_id).data
    monkeypatch.setattr(engine, "DIRECT_PIXELS", 10**9)
    whole, _ = engine.decode_array(data)
    monkeypatch.setattr(engine, "DIRECT_PIXELS", 0)
    assert np.array_equal(engine.decode_array(data)[0], whole)
