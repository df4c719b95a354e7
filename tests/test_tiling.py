"""Large pictures: a lifting model's g_a and g_s run one level at a time in tiles, each with the halo
of its own level's reach, and h_s in tiles side by side. The same transform as the whole-picture one
(within float rounding), the same integers for h_s, whatever the tiles and the thread count."""

import numpy as np
import pytest
import torch

from conftest import smooth_rgb
from lcodec import engine
from lcodec.models import frozen
from lcodec.models.lifting import LATENT_CHANNELS

LIFTING = engine.DEFAULT_MODEL_ID  # the shipped lifting model, with coarse levels and a post-filter


@pytest.fixture(scope="module")
def model() -> frozen.FrozenModel:
    return engine.load_model(LIFTING)


@pytest.fixture(scope="module")
def picture() -> torch.Tensor:
    """A 320 x 896 picture (20 x 56 latents): wider than a tile of 4 latents and the halo of the
    whole transform, so it runs by levels, and every level has inner tile edges."""
    return torch.from_numpy(smooth_rgb(320, 896, seed=3)).permute(2, 0, 1)[None].float() / 255


def test_a_small_picture_runs_the_whole_transform_at_once(model, picture):
    """Pictures of up to 32 latents a side (the golden files) decode as they always have; larger
    ones (Kodak) and those of more than one tile go level by level."""
    assert not model._by_levels(20, 32, frozen.TILE_LATENTS)
    assert model._by_levels(32, 48, frozen.TILE_LATENTS)
    assert not model._by_levels(32, 48, 10**6)
    assert model._by_levels(20, 56, 4)
    with torch.no_grad():
        assert torch.equal(model.analyze(picture), model.analysis(picture))


@pytest.mark.parametrize("tile", [4, 8])
def test_the_analysis_by_levels_is_the_whole_transform(model, picture, tile):
    with torch.no_grad():
        whole = model.analysis(picture)
    assert (model.analyze(picture, tile_latents=tile) - whole).abs().max().item() < 1e-4


@pytest.mark.parametrize("tile", [4, 8])
def test_the_synthesis_by_levels_is_the_whole_transform_and_post_filter(model, picture, tile):
    q = 3.0
    gain, inv_gain = model.gains(q)
    with torch.no_grad():
        y = torch.round(model.analysis(picture) * gain)
        whole = model.draw(y * inv_gain, q).clamp(0, 1)
    tiled = model.synthesize(y.clone(), q, tile_latents=tile)
    assert (tiled - whole).abs().max().item() * 255 < 1e-3
    assert torch.equal(tiled, model.synthesize(y.clone(), q, tile_latents=tile))


@pytest.mark.parametrize("stop", [1, 2, 4])
def test_a_reduced_synthesis_by_levels_is_the_whole_one(model, picture, stop):
    gain, _ = model.gains(2.0)
    with torch.no_grad():
        y = torch.round(model.analysis(picture) * gain)
    whole = model.synthesize_reduced(y.clone(), 2.0, stop)
    tiled = model.synthesize_reduced(y.clone(), 2.0, stop, tile_latents=4)
    assert (tiled - whole).abs().max().item() * 255 < 1e-3


def test_the_synthesis_by_levels_does_not_depend_on_the_thread_count(model, picture):
    gain, _ = model.gains(3.0)
    with torch.no_grad():
        y = torch.round(model.analysis(picture) * gain)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(model.synthesize(y.clone(), 3.0, tile_latents=4))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("model_id, hidden_rows", [(0, 32), (LIFTING, 32), (LIFTING, 5)])
def test_the_codecs_h_s_gives_the_integers_of_the_whole_h_s(model_id, hidden_rows, monkeypatch):
    """The codec's h_s (cropped before a pointwise last layer, which skips the channels of zero
    weights: a lifting model's detail means; the layer before it run a few rows at a time)
    computes the same means and table indices as the plain integer network, in tiles run side
    by side or not."""
    from lcodec.models import integer_hyper

    monkeypatch.setattr(integer_hyper, "HIDDEN_ROWS", hidden_rows)
    model = engine.load_model(model_id)
    z = torch.from_numpy(np.random.default_rng(4).integers(-20, 21, (1, model.config.N, 8, 10)))
    mean_int, scale_int = model.hyper_synthesis(z).chunk(2, dim=1)
    expected_mean = mean_int.double().div(2**16).float()
    expected_idx = frozen.table_index(scale_int, model.scale_thresholds)[0].numpy().astype(np.uint8)
    monkeypatch.setattr(frozen, "HYPER_TILE", 3)
    assert len(frozen.hyper_tiles(z)) == 12
    for workers in (None, 1, 2):
        mean, idx = model.latent_entropy_parameters(z, np.dtype(np.uint8), workers=workers)
        assert torch.equal(mean, expected_mean) and np.array_equal(idx, expected_idx)


def test_a_transposed_convolution_by_phases_gives_the_same_integers():
    from torch.nn import functional as F

    from lcodec.models.integer_hyper import _transposed_by_phases

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 2, 1, (6, 7)), (2, 5, 2, 1, (1, 1)), (2, 3, 1, 1, (4, 5)), (2, 4, 1, 0, (3, 5)),
              (3, 5, 1, 2, (4, 3)), (1, 3, 1, 0, (5, 4)), (2, 1, 0, 1, (3, 3))]
    for stride, kernel, padding, output_padding, (h, w) in shapes:
        a = torch.randint(-2**20, 2**20, (2, 3, h, w), generator=g).double()
        weight = torch.randint(-2**13, 2**13, (3, 4, kernel, kernel), generator=g).double()
        bias = torch.randint(-2**30, 2**30, (4,), generator=g).double()
        layer = {"stride": stride, "padding": padding, "output_padding": output_padding, "weight": weight, "bias": bias}
        expected = F.conv_transpose2d(a, weight, bias, stride=stride, padding=padding, output_padding=output_padding)
        assert torch.equal(_transposed_by_phases(layer, a), expected)


def test_a_nested_one_thread_block_gives_its_tiles_the_outer_thread_count():
    """The synthesis inside an encode (itself one thread per operation) still computes tiles side by side."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with frozen.one_thread_per_operation() as outer:
            with frozen.one_thread_per_operation() as inner:
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert (outer, inner, torch.get_num_threads()) == (2, 2, 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [4, 32, 96, 200, 272])
def test_hyper_latent_bands(model, rows):
    """h_a on bands of rows side by side gives the floats, and so the ẑ, of h_a on the whole
    latent, gained band by band or gained before, whatever the thread count."""
    bands = frozen.hyper_analysis_bands(rows, 24)
    assert [b.rows.start for b in bands] == sorted({b.rows.start for b in bands})
    assert sum(b.rows.stop - b.rows.start for b in bands) == rows and len(bands) in (1, 2, 4)
    y = torch.from_numpy(np.random.default_rng(rows).laplace(0, 2, (1, LATENT_CHANNELS, rows, 24)).astype(np.float32))
    gain = model.gains(4.3)[0]
    expected = torch.round(model.hyper_analysis(y * gain)).to(torch.int64)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(model.hyper_latent(y, gain), expected)
            assert torch.equal(model.hyper_latent(y * gain), expected)
    finally:
        torch.set_num_threads(before)
