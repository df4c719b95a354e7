"""The decoder's post-filter: the identity before training, conditioned on the rate, part of every
decode and refinement of a model that has one, seamless on tiles, and trained by its own stage."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import test_train
from conftest import smooth_rgb
from lcodec import engine
from lcodec.bitstream import container
from lcodec.bitstream.container import RATE_SCALE
from lcodec.models import postfilter
from lcodec.models.frozen import FrozenModel
from lcodec.models.postfilter import PostFilter
from lcodec.models.training import postfilter as training
from lcodec.models.training.freeze import write_frozen


def with_filter(tmp_path, width: int = 8) -> engine.Weights:
    """Model 0's frozen file with a post-filter of random weights (its last layer not zero)."""
    state = torch.load(engine.MODELS[0].path, weights_only=True)
    torch.manual_seed(0)
    net = PostFilter(width, len(state["config"]["levels"]))
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    state["config"] = dict(state["config"], postfilter=width)
    state["postfilter"] = {k: v.half() for k, v in net.state_dict().items()}
    path = tmp_path / "filtered.pt"
    write_frozen(state, path)
    return engine.Weights.load(path)


def test_an_untrained_filter_is_the_identity():
    x = torch.rand(2, 3, 32, 48)
    assert torch.equal(PostFilter(16, 9)(x, torch.tensor([0.0, 5.0])), x)


def test_the_filter_sees_the_rate(tmp_path):
    net = with_filter(tmp_path).model.postfilter
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(net(x, 0.0), net(x, 4.0))


def test_a_file_decodes_through_the_filter_and_codes_the_same_symbols(tmp_path):
    weights = with_filter(tmp_path)
    pixels = smooth_rgb(64, 96)
    data = engine.encode_array(pixels, "RGB", rate=4.0, model_id=0, weights=weights).data
    plain = engine.encode_array(pixels, "RGB", rate=4.0, model_id=0).data
    assert container.unpack(data)[1] == container.unpack(plain)[1]  # the encoder does not see the filter

    header, model, y_hat = engine.decode_latent(data, weights=weights)
    q = header.rate_q / RATE_SCALE
    _, inv_gain = model.gains(q)
    unfiltered = model.synthesis(y_hat * inv_gain).clamp(0, 1)
    expected = model.postfilter(unfiltered, q).clamp(0, 1)[0, :, :64, :96].mul(255).round().permute(1, 2, 0)
    decoded, _ = engine.decode_array(data, weights=weights)
    assert np.abs(decoded.astype(np.int16) - expected.numpy().astype(np.int16)).max() <= 1
    assert not np.array_equal(decoded, engine.decode_array(plain)[0])


def test_the_filter_decodes_the_same_pixels_on_small_tiles(tmp_path):
    """The synthesis tiles' halo (4 latents, 64 pixels) covers the filter's reach of 8 pixels."""
    weights = with_filter(tmp_path)
    pixels = smooth_rgb(192, 256, seed=5)
    data = engine.encode_array(pixels, "RGB", rate=4.0, model_id=0, weights=weights).data
    whole, _ = engine.decode_array(data, weights=weights)
    tiled, _ = engine.decode_array(data, weights=weights, tile_latents=4)
    assert np.abs(whole.astype(np.int16) - tiled.astype(np.int16)).max() <= 1


def test_refinement_optimises_through_the_filter(tmp_path):
    weights = with_filter(tmp_path)
    result = engine.encode_array(smooth_rgb(64, 64), "RGB", size=3000, model_id=0, weights=weights, effort=1)
    assert len(result.data) <= 3000
    engine.decode_array(result.data, weights=weights)


images = test_train.tiny_data  # the fixture of test_train: six 64x64 training pictures


def _train(images, out, steps):
    training.main([str(engine.MODELS[0].path), "--out", str(out), "--data", str(images), "--width", "4",
                   "--steps", str(steps), "--batch", "2", "--crop", "32", "--val-images", "2", "--val-every", "2",
                   "--no-progress", "--threads", "1"])


def test_the_training_stage_writes_a_frozen_model_with_the_filter_and_resumes(images, tmp_path):
    out = tmp_path / "run"
    _train(images, out, 2)
    _train(images, out, 4)  # resumes at step 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]
    calibration = [r for r in rows if r["kind"] == "calibration"][-1]
    assert all(0 <= s <= 1 for s in calibration["strength"])
    model = FrozenModel(out / "frozen.pt")
    assert model.postfilter.strength.tolist() == pytest.approx(calibration["strength"], abs=1e-3)  # fp16
    assert model.config.postfilter == 4 and model.info["postfilter"]["step"] == 4
    pixels = smooth_rgb(64, 64)
    weights = engine.Weights.load(out / "frozen.pt")
    engine.decode_array(engine.encode_array(pixels, "RGB", rate=2.0, model_id=0, weights=weights).data, weights=weights)

    with pytest.raises(SystemExit, match="already has a post-filter"):
        training.main([str(out / "frozen.pt"), "--out", str(tmp_path / "again"), "--data", str(images)])


def test_fine_tuning_starts_from_the_model_s_filter_and_replaces_it(images, tmp_path):
    weights = with_filter(tmp_path)
    start = {k: v.clone() for k, v in weights.model.postfilter.state_dict().items()}
    out = tmp_path / "fine"
    training.main([str(tmp_path / "filtered.pt"), "--out", str(out), "--data", str(images), "--fine-tune",
                   "--loss", "relative", "--focus", "1", "3", "--steps", "1", "--lr", "1e-9", "--batch", "2", "--crop", "32",
                   "--val-images", "2", "--no-progress", "--threads", "1"])
    model = FrozenModel(out / "frozen.pt")
    assert model.config.postfilter == 8  # the filter's own width, not --width's default
    tuned = model.postfilter.state_dict()
    for name, value in start.items():  # one step at a negligible learning rate: the weights it started from
        if name != "strength":
            assert torch.allclose(tuned[name].float(), value.float(), atol=1e-3), name
    assert model.info["postfilter"]["loss"] == "relative" and model.info["postfilter"]["focus"] == [1.0, 3.0]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["val", "calibration"]

    with pytest.raises(SystemExit, match="no post-filter to fine-tune"):
        training.main([str(engine.MODELS[0].path), "--out", str(tmp_path / "none"), "--data", str(images),
                       "--fine-tune"])


def test_tall_inputs_are_filtered_in_strips_with_the_same_result(tmp_path):
    net = with_filter(tmp_path).model.postfilter
    x = torch.rand(1, 3, postfilter.STRIP * 2 + 2 * postfilter.STRIP_CONTEXT + 34, 40)
    whole = net.filter_whole(x, 3.0)
    assert torch.allclose(net(x, 3.0), whole, atol=1e-6)


def test_the_strength_is_linear_between_levels_and_held_beyond_them():
    net = PostFilter(4, 3)
    net.strength.copy_(torch.tensor([0.0, 1.0, 0.5]))
    q = torch.tensor([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 5.0])
    assert net.strength_at(q).tolist() == [0.0, 0.0, 0.5, 1.0, 0.75, 0.5, 0.5]


def test_calibration_turns_down_a_filter_that_does_not_help(tmp_path, images):
    weights = with_filter(tmp_path)  # random weights: its residual is noise to these pictures
    net = weights.model.postfilter
    pictures = training.load_images(images)
    levels = training.calibrate(net, weights, pictures, progress=False)
    assert len(levels) == len(weights.model.levels)
    assert all(0 <= s < 0.5 and g > -0.01 for s, g in levels)
    assert net.strength.tolist() == pytest.approx([s for s, _ in levels])
