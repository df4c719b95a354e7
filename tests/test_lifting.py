"""The lifting model: an exactly invertible g_a, the 9/7 wavelet at step 0, gains balanced
across subbands, tiles without seams, and a transform that stays invertible while it trains."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcodec.models import lifting
from lcodec.models.frozen import FrozenModel, lifting_halo, run_tiled
from lcodec.models.networks import LiftingHyperprior, ModelConfig
from lcodec.models.training import fit_levels, freeze, train

# CDF 9/7 analysis low-pass taps (JPEG 2000 Part 1, Table F.4), normalised to a DC gain of 1.
CDF97_LOW = (0.602949018236358, 0.266864118442872, -0.078223266528988, -0.016864118442875, 0.026748757410810)


def _perturbed(seed=0, std=0.1, coarse_levels=0) -> lifting.LiftingTransform:
    """A transform whose learned steps are far from zero, as after training."""
    torch.manual_seed(seed)
    t = lifting.LiftingTransform(coarse_levels=coarse_levels).double()
    with torch.no_grad():
        for step in [*t.predict, *t.update]:
            for p in step.parameters():
                p.normal_(0, std)
        t.colour.add_(torch.randn(3, 3, dtype=torch.double) * 0.05)
    return t


@pytest.mark.parametrize("coarse_levels", [0, 2])
def test_the_transform_is_exactly_invertible_with_learned_steps(coarse_levels):
    t = _perturbed(std=0.05, coarse_levels=coarse_levels).float()
    x = torch.rand(2, 3, 128, 192) if coarse_levels else torch.rand(2, 3, 96, 160)
    y = t(x)
    assert y.shape == (2, lifting.LATENT_CHANNELS, *(x.shape[2:] // np.array(16)))
    assert (t.inverse(y) - x).abs().max().item() * 255 < 1e-3


def test_an_untrained_transform_is_the_97_wavelet():
    t = lifting.LiftingTransform().double()
    # One level along rows on a 1-D impulse: the low band's response is the 9/7 low-pass filter.
    signal = torch.zeros(1, 1, 1, 64, dtype=torch.double)
    signal[..., 32] = 1.0
    low, _ = lifting.dwt97_1d(signal, 3)
    taps = low[0, 0, 0, 14:19] / np.sqrt(2)  # samples 28, 30, 32, 34, 36 of the input grid
    expected = [CDF97_LOW[2 * abs(k)] for k in (-2, -1, 0, 1, 2)]
    assert torch.allclose(taps, torch.tensor(expected, dtype=torch.double), atol=1e-9)
    # A constant picture leaves every detail band at zero: all its energy is in LL4.
    y = t(torch.full((1, 3, 64, 64), 0.8, dtype=torch.double))
    assert y[:, 3:].abs().max().item() < 1e-9
    assert y[:, :3].abs().max().item() > 1


def test_coarse_levels_split_ll4_in_place():
    x = torch.rand(1, 3, 128, 128, dtype=torch.double)
    plain = lifting.LiftingTransform().double()(x)
    coarse = lifting.LiftingTransform(coarse_levels=2).double()(x)
    assert torch.equal(plain[:, 3:], coarse[:, 3:])  # the detail channels are untouched
    # Two more levels of the same 9/7 on LL4: LL6 at every fourth latent, its details around it.
    ll5, d5 = lifting.dwt97_2d(plain[:, :3])
    ll6, d6 = lifting.dwt97_2d(ll5)
    assert torch.allclose(coarse[:, :3, ::4, ::4], ll6)
    assert torch.allclose(coarse[:, :3, ::4, 2::4], d6[:, :3])  # HL6 right of LL6
    assert torch.allclose(coarse[:, :3, 1::2, 1::2], d5[:, 6:])  # HH5 at odd rows and columns
    # A constant picture puts all its energy at the LL6 positions.
    flat = lifting.LiftingTransform(coarse_levels=2).double()(torch.full((1, 3, 128, 128), 0.8, dtype=torch.double))
    ll6_mask = torch.zeros(8, 8, dtype=torch.bool)
    ll6_mask[::4, ::4] = True
    assert flat[0, :3][:, ~ll6_mask].abs().max() < 1e-9 and flat[0, 0][ll6_mask].abs().min() > 1  # grey: luma only


def test_initial_gains_balance_the_rounding_error_across_subbands():
    model = LiftingHyperprior(ModelConfig(arch="lifting", N=16, M=lifting.LATENT_CHANNELS, levels=(0.1, 1.0)))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((4, 3, 64, 64))).float()
    steps = model.init_gains(x)
    assert steps[0] < steps[1]
    norms = model.analysis.synthesis_norms().log()
    offsets = model.gains.log_gain.detach() - norms
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-5)
    assert torch.equal(model.gains.log_inv_gain, -model.gains.log_gain)


@pytest.mark.parametrize("coarse_levels", [0, 2])
@pytest.mark.parametrize("side", ["analysis", "synthesis"])
def test_tiles_give_the_whole_image_transform(side, coarse_levels):
    t = _perturbed(seed=1, std=0.05, coarse_levels=coarse_levels).float()
    halo = lifting_halo(coarse_levels)
    x = torch.rand(1, 3, 1024, 192)  # taller than a tile of 8 latents and two halos: rows have inner tile edges
    if side == "analysis":
        whole = t(x)
        tiled = run_tiled(t, x, 16, 8 * 16, halo * 16, inverse=False)
    else:
        y = t(x)
        whole = t.inverse(y)
        tiled = run_tiled(lifting.InverseLifting(t), y, 16, 8, halo, inverse=True)
    # float rounding only: the halo covers the transform's reach
    assert (tiled - whole).abs().max().item() < 1e-5


def _train_lifting(tmp_path, steps: int, *extra: str) -> Path:
    """A few real training steps of a small lifting model on random 64x64 pictures; the run folder."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "run"
    train.main(["--arch", "lifting", "--data", str(data), "--kodak", str(data / "none"), "--out", str(out),
                "--N", "8", "--steps", str(steps), "--batch", "2", "--crop", "64", "--lr", "1e-2", "--log-every", "2",
                "--levels", "0.25", "1", "--no-progress", "--threads", "1", *extra])
    return out


def test_training_the_whole_model_keeps_it_invertible(tmp_path):
    out = _train_lifting(tmp_path, 6)
    rng = np.random.default_rng(1)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    model = LiftingHyperprior(ModelConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    learned = [p for step in model.analysis.predict for p in step.parameters()]
    assert any(p.abs().max() > 0 for p in learned[-2:]), "the learned steps moved off zero"
    x = torch.from_numpy(rng.random((1, 3, 64, 128))).float()
    with torch.no_grad():
        assert (model.synthesis(model.analysis(x)) - x).abs().max().item() * 255 < 1e-3
    # h_s predicts a mean for LL4 only: the detail channels' mean weights are still exactly zero.
    last = model.hyper_synthesis[-1]
    M = lifting.LATENT_CHANNELS
    assert last.weight[lifting.MEAN_CHANNELS:M].abs().max() == 0 and last.bias[lifting.MEAN_CHANNELS:M].abs().max() == 0
    assert last.weight[:lifting.MEAN_CHANNELS].abs().max() > 0
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 6


def test_the_frozen_transform_can_train_only_the_entropy_model(tmp_path):
    out = _train_lifting(tmp_path, 2, "--freeze-transform")
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert all(state[k].abs().max() == 0 for k in state if k.startswith("analysis.predict") and k.endswith("2.weight"))
    assert torch.allclose(state["analysis.colour"], torch.tensor(lifting.YCBCR))


def test_fitted_positions_find_each_target_on_the_measured_curve():
    qs = np.arange(-2.0, 4.01, 0.25)
    rates = 0.1 * np.exp(0.9 * qs)  # exponential in q, as the codec's rate nearly is
    positions = fit_levels.fitted_positions((0.1, 0.5), qs, rates)
    assert positions == pytest.approx([0.0, np.log(5) / 0.9], abs=1e-9)
    # Below level 0 the rate may grow again; that part of the grid does not count.
    bent = rates.copy()
    bent[:4] = bent[4] * 2
    assert fit_levels.fitted_positions((0.1, 0.01), qs, bent) == pytest.approx([0.0, -1.0])
    with pytest.raises(SystemExit, match="does not rise"):
        fit_levels.fitted_positions((0.1,), qs, rates[::-1])


def test_refitting_the_levels_relabels_the_gains_and_lands_on_the_targets(tmp_path):
    out = _train_lifting(tmp_path, 2, "--freeze-transform", "--gain-lr-scale", "0")  # the gains of `init_gains`
    model, _ = freeze.load_checkpoint(out / "checkpoint.pt")
    before = [g.clone() for g in model.gains(torch.tensor([0.4, 1.7]))]
    fit_levels.relabel_levels(model.gains, [0.4, 1.7])
    after = model.gains(torch.tensor([0.0, 1.0]))
    assert all(torch.allclose(a, b) for a, b in zip(after, before))  # level i has the gains q_i had

    fit_levels.main([str(out / "checkpoint.pt"), str(tmp_path / "fitted.pt"), "--data", str(tmp_path / "data"),
                     "--images", "4", "--no-progress"])
    refitted, _ = freeze.load_checkpoint(tmp_path / "fitted.pt")
    freeze.freeze(refitted, tmp_path / "frozen.pt")
    images = fit_levels.training_images(tmp_path / "data", 4)
    rates = fit_levels.measured_rates(FrozenModel(tmp_path / "frozen.pt"), images, np.array([0.0, 1.0]), progress=False)
    assert rates == pytest.approx([0.25, 1.0], rel=0.05)


def test_only_the_named_lifting_levels_train(tmp_path):
    out = _train_lifting(tmp_path, 2, "--lifting-levels", "4")
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    last = {level: state[f"analysis.predict.{level - 1}.2.weight"] for level in (1, 2, 3, 4)}
    assert last[4].abs().max() > 0  # level 4 (the coarsest) learned
    assert all(last[level].abs().max() == 0 for level in (1, 2, 3))
    assert torch.allclose(state["analysis.colour"], torch.tensor(lifting.YCBCR))
    (tmp_path / "again").mkdir()
    with pytest.raises(SystemExit, match="among 1..4"):
        _train_lifting(tmp_path / "again", 1, "--lifting-levels", "5")


def test_noisy_synthesis_reconstructs_from_noisy_latents():
    model = LiftingHyperprior(ModelConfig(arch="lifting", N=8, M=lifting.LATENT_CHANNELS, levels=(0.1, 1.0)))
    x, q = torch.rand(1, 3, 64, 64), torch.tensor([1.0])
    with torch.no_grad():
        rounded = [model(x, q)["x_hat"] for _ in range(2)]
        model.noisy_synthesis = True
        noisy = [model(x, q)["x_hat"] for _ in range(2)]
    assert torch.equal(rounded[0], rounded[1])  # rounding: the same picture every pass
    assert not torch.equal(noisy[0], noisy[1])  # noise: a new draw every pass
    assert (noisy[0] - x).abs().max() > 0
