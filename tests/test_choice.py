"""An encode to a target chooses, per image, the installed model whose file decodes closer to it."""

import numpy as np
import pytest

import lcodec
from conftest import smooth_rgb
from lcodec import engine
from lcodec.bitstream import container
from lcodec.errors import RateError
from lcodec.models.registry import CHOICE_MODEL_IDS, DEFAULT_MODEL_ID


def _mse(data: bytes, pixels: np.ndarray) -> float:
    decoded, _ = engine.decode_array(data)
    return float(np.mean((decoded.astype(np.float64) - pixels) ** 2))


@pytest.mark.parametrize("bpp", [0.5, 2.0])
def test_the_chosen_file_is_the_better_of_the_models(bpp):
    pixels = smooth_rgb(128, 192, seed=11)
    chosen = engine.encode_best(pixels, "RGB", bpp=bpp)
    each = {m: engine.encode_array(pixels, "RGB", bpp=bpp, model_id=m).data for m in CHOICE_MODEL_IDS}
    best = min(each, key=lambda m: (_mse(each[m], pixels), CHOICE_MODEL_IDS.index(m)))
    assert chosen.data == each[best]
    assert container.read_header(chosen.data).model_id == best
    assert lcodec.encode(pixels, bpp=bpp) == chosen.data  # what the API does for a target


def test_a_model_that_cannot_reach_the_target_is_skipped(monkeypatch):
    pixels = smooth_rgb(64, 64, seed=2)
    real = engine.encode_array

    def first_fails(*args, model_id, **kwargs):
        if model_id == CHOICE_MODEL_IDS[0]:
            raise RateError("cannot reach")
        return real(*args, model_id=model_id, **kwargs)

    monkeypatch.setattr(engine, "encode_array", first_fails)
    data = engine.encode_best(pixels, "RGB", bpp=1.0).data
    assert container.read_header(data).model_id == CHOICE_MODEL_IDS[1]
    monkeypatch.setattr(engine, "encode_array", lambda *a, **k: (_ for _ in ()).throw(RateError("no")))
    with pytest.raises(RateError):
        engine.encode_best(pixels, "RGB", bpp=1.0)


def test_one_pass_encodes_use_the_default_model():
    data = lcodec.encode(smooth_rgb(64, 64), rate=3.0)
    assert container.read_header(data).model_id == DEFAULT_MODEL_ID
