"""An encode to a target chooses, per image, between models (`CHOICE_MODEL_IDS`, or the ids it is
given) the one whose file decodes closer to the image."""

import numpy as np
import pytest

import lcodec
from conftest import smooth_rgb
from lcodec import engine
from lcodec.bitstream import container
from lcodec.errors import RateError
from lcodec.models.registry import CHOICE_MODEL_IDS, DEFAULT_MODEL_ID

PAIR = (0, DEFAULT_MODEL_ID)  # the installed models, of different architectures (GDN, lifting); the better second


def _mse(data: bytes, pixels: np.ndarray) -> float:
    decoded, _ = engine.decode_array(data)
    return float(np.mean((decoded.astype(np.float64) - pixels) ** 2))


@pytest.mark.parametrize("bpp", [1.5, 2.0])  # the test model reaches no less than 1.13 bpp here
def test_the_chosen_file_is_the_better_of_the_models(bpp):
    pixels = smooth_rgb(128, 192, seed=11)
    chosen = engine.encode_best(pixels, "RGB", bpp=bpp, model_ids=PAIR)
    each = {m: engine.encode_array(pixels, "RGB", bpp=bpp, model_id=m).data for m in PAIR}
    best = min(each, key=lambda m: (_mse(each[m], pixels), PAIR.index(m)))
    assert chosen.data == each[best]
    assert container.read_header(chosen.data).model_id == best


def test_an_encode_to_a_target_chooses_between_the_choice_models():
    pixels = smooth_rgb(64, 96, seed=5)
    data = lcodec.encode(pixels, bpp=0.5)
    assert data == engine.encode_best(pixels, "RGB", bpp=0.5).data
    assert container.read_header(data).model_id in CHOICE_MODEL_IDS


@pytest.mark.parametrize("effort", [0, 1])
def test_a_model_that_cannot_reach_the_target_is_skipped(monkeypatch, effort):
    pixels = smooth_rgb(64, 64, seed=2)
    real = engine._Job.fit

    def first_fails(job, *args, **kwargs):
        if job.model_id == PAIR[0]:
            raise RateError("cannot reach")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(engine._Job, "fit", first_fails)
    data = engine.encode_best(pixels, "RGB", bpp=1.0, effort=effort, model_ids=PAIR).data
    assert container.read_header(data).model_id == PAIR[1]

    def every_fails(job, *args, **kwargs):
        raise RateError(f"model {job.model_id} cannot")

    monkeypatch.setattr(engine._Job, "fit", every_fails)
    with pytest.raises(RateError, match=f"model {PAIR[-1]} cannot"):
        engine.encode_best(pixels, "RGB", bpp=1.0, effort=effort, model_ids=PAIR)


def test_one_pass_encodes_use_the_default_model():
    data = lcodec.encode(smooth_rgb(64, 64), rate=3.0)
    assert container.read_header(data).model_id == DEFAULT_MODEL_ID


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_squared_error_is_summed_exactly_a_band_at_a_time(mode):
    pixels = smooth_rgb(engine.ERROR_ROWS + 40, 48, seed=3)
    if mode == "L":
        pixels = pixels[:, :, 1].copy()
    result = engine.encode_array(pixels, mode, bpp=0.5)
    assert engine._squared_error(pixels, result, engine.installed_weights(DEFAULT_MODEL_ID)) == _mse(result.data, pixels)
