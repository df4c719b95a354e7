"""The Laplacian likelihood, its frozen tables, and the training flags that came with it:
--likelihood laplace, --entropy-rate and --init (tiny models and data, a few steps each)."""

import math

import numpy as np
import pytest
import torch

import test_train
from conftest import smooth_rgb
from lcodec import engine
from lcodec.bitstream.container import RATE_SCALE, read_header
from lcodec.bitstream.tables import laplace_tables
from lcodec.errors import RateError
from lcodec.models import lifting
from lcodec.models.entropy_models import LIKELIHOODS, gaussian_likelihood, laplace_likelihood
from lcodec.models.frozen import FrozenModel
from lcodec.models.networks import LiftingHyperprior, MeanScaleHyperprior, ModelConfig
from lcodec.models.training import freeze, train
from test_lifting import _train_lifting
from test_train import _args

SCALES = freeze.scale_table(0.11)
tiny_data = test_train.tiny_data  # the fixture of test_train: six 64x64 training pictures


def laplace_bin(k: np.ndarray, b: float) -> np.ndarray:
    """P(k - 1/2 < X < k + 1/2) for X ~ Laplace(0, b), from the CDF itself."""
    def cdf(x):
        return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0) / b), 1 - 0.5 * np.exp(-np.maximum(x, 0) / b))

    return cdf(k + 0.5) - cdf(k - 0.5)


# --- the tables ---------------------------------------------------------------------------------


def test_laplace_tables_are_the_discretised_laplacian():
    """As freeze builds them (64 scales, 20 bits): every row sums to 2**20, covers -K..K for the smallest K
    whose outside mass is below tail_mass, and codes every value of probability >= 1e-3 within 0.02 bits
    of -log2 of the Laplacian's mass on its unit bin; the escape gets about the tail mass."""
    t = laplace_tables(SCALES, precision=20)
    assert t.num_tables == 64 and t.precision == 20
    for i, b in enumerate(SCALES):
        n = int(t.lengths[i])
        row = t.freqs[i].astype(np.int64)
        assert row[: n + 1].sum() == 2**20 and row[: n + 1].min() >= 1 and not row[n + 1:].any()
        K = -int(t.offsets[i])
        assert n == 2 * K + 1
        assert math.exp(-(K + 0.5) / b) < 1e-6  # the two tails beyond +-(K + 1/2)
        assert K == 0 or math.exp(-(K - 0.5) / b) >= 1e-6
        p = laplace_bin(np.arange(-K, K + 1, dtype=np.float64), b)
        moderate = p >= 1e-3
        assert moderate.sum() >= 3
        code_bits = 20 - np.log2(row[:n][moderate])
        np.testing.assert_allclose(code_bits, -np.log2(p[moderate]), atol=0.02)
        assert 1 <= row[n] <= 3  # the escape: at most a count or two above its 1e-6 * 2**20
    # Wider Laplacians need more columns; the narrowest covers -2..2.
    assert np.all(np.diff(t.lengths) >= 0) and t.lengths[0] == 5 and t.lengths[-1] > 7000


def test_laplace_tables_refuse_what_gaussian_tables_refuse():
    for bad in ([], [[1.0]], [0.5, 0.0], [1.0, np.nan], [-1.0]):
        with pytest.raises(ValueError):
            laplace_tables(np.array(bad))
    with pytest.raises(ValueError):
        laplace_tables(SCALES[:2], tail_mass=0.0)
    again = laplace_tables(SCALES, precision=20).to_arrays()  # deterministic: stored, but rebuildable
    for key, value in laplace_tables(SCALES, precision=20).to_arrays().items():
        np.testing.assert_array_equal(value, again[key])


# --- the likelihood ----------------------------------------------------------------------------


@pytest.mark.parametrize("b", [0.2, 1.0, 7.5])
def test_laplace_likelihood_is_the_laplacian_bin_mass(b):
    """In float64, against torch.distributions.Laplace: the mass of the unit bin around y, lower-bounded
    at 1e-9 like the Gaussian, and over all bins y = mean + k it sums to 1."""
    mean, scale = torch.tensor(0.37, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    y = torch.linspace(-30, 30, 601, dtype=torch.float64)
    d = torch.distributions.Laplace(mean, scale)
    expected = (d.cdf(y + 0.5) - d.cdf(y - 0.5)).clamp(min=1e-9)
    torch.testing.assert_close(laplace_likelihood(y, mean, scale), expected, rtol=1e-6, atol=0)
    k = torch.arange(-400, 401, dtype=torch.float64)  # the bound adds at most 1e-9 for each of these bins
    assert laplace_likelihood(mean + k, mean, scale).sum().item() == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("index", [0, 10, 30, 50])
@pytest.mark.parametrize("mean", [0.0, 0.3, -1.7])
def test_training_likelihood_agrees_with_the_frozen_tables(index, mean):
    """What training counts (float32, as in the model) is what the coder spends: at a scale of the table
    and any mean, -log2 of the likelihood of mean + k is the table's code length of k within 0.01 bits
    (values of probability >= 1e-3)."""
    t = laplace_tables(SCALES, precision=20)
    K, n = -int(t.offsets[index]), int(t.lengths[index])
    k = torch.arange(-K, K + 1, dtype=torch.float32)
    lik = laplace_likelihood(mean + k, torch.tensor(mean), torch.tensor(float(SCALES[index]))).double()
    table = torch.from_numpy(t.freqs[index, :n] / 2**20)
    moderate = table >= 1e-3
    torch.testing.assert_close(torch.log2(lik[moderate]), torch.log2(table[moderate]), atol=0.01, rtol=0)


def test_laplace_likelihood_gradients_stay_finite():
    """Each branch of the CDF is clamped, so the branch torch.where does not take adds no inf or NaN
    gradient: at the mean, at the bin edge, far out in either tail, below the scale bound and for wide scales."""
    y = torch.tensor([0.0, 0.5, -0.5, 3.0, 1e3, -1e4], requires_grad=True)
    mean = torch.zeros(6, requires_grad=True)
    scale = torch.tensor([0.11, 0.05, 1.0, 0.2, 0.11, 300.0], requires_grad=True)
    lik = laplace_likelihood(y, mean, scale)
    assert torch.all(lik >= 1e-9) and torch.all(lik < 1)
    (-torch.log2(lik)).sum().backward()
    for g in (y.grad, mean.grad, scale.grad):
        assert torch.all(torch.isfinite(g))
    assert y.grad[3] > 0  # further from the mean costs more bits


# --- the configuration ----------------------------------------------------------------------------


def test_model_config_names_the_likelihood():
    assert ModelConfig().likelihood == "gaussian"
    with pytest.raises(ValueError, match="unknown likelihood 'cauchy'"):
        ModelConfig(likelihood="cauchy")
    old = {"arch": "hyperprior", "N": 8, "M": 12, "levels": [0.5, 1.0]}  # a checkpoint from before the field
    assert ModelConfig.from_dict(old).likelihood == "gaussian"
    laplace = ModelConfig(N=8, M=12, likelihood="laplace")
    assert ModelConfig.from_dict(laplace.to_dict()) == laplace
    assert MeanScaleHyperprior(laplace).likelihood.func is laplace_likelihood
    assert MeanScaleHyperprior(laplace).likelihood.keywords == {"bound": 0.11}
    assert MeanScaleHyperprior(ModelConfig(N=8, M=12)).likelihood.func is gaussian_likelihood
    # Every likelihood a model can be trained with has y tables to freeze it with.
    assert set(freeze.Y_TABLES) == set(LIKELIHOODS)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--likelihood", "cauchy"])


def _constant_scale_model(likelihood: str, scale: float) -> MeanScaleHyperprior:
    """An untrained tiny model whose h_s predicts the same scale everywhere (the means still vary),
    with gains high enough that at the top levels most residuals of a smooth image are nonzero."""
    torch.manual_seed(0)
    model = MeanScaleHyperprior(ModelConfig(N=8, M=12, likelihood=likelihood)).eval()
    with torch.no_grad():
        model.hyper_synthesis[4].weight[12:] = 0
        model.hyper_synthesis[4].bias[12:] = scale
        model.gains.log_gain += 2.0
    return model


def test_forward_returns_the_rate_of_rounded_latents_for_training():
    """bits_rounded is per image, differentiable, and reaches every part of the entropy model (given
    nonzero residuals and scales above the bound: at a zero residual the bin mass is flat in the mean)."""
    model = _constant_scale_model("laplace", 1.0)
    with torch.no_grad():  # an untrained h_a's outputs all round to 0, where h_s's first weights get no gradient
        model.hyper_analysis[4].weight *= 100
    out = model(torch.from_numpy(smooth_rgb(64, 64)).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1) / 255,
                torch.tensor([5.0, 7.0]))
    assert out["bits_rounded"].shape == (2,) and torch.all(out["bits_rounded"] > 0)
    entropy = [*model.hyper_analysis.parameters(), *model.hyper_synthesis.parameters(), *model.hyper_prior.parameters()]
    grads = torch.autograd.grad(out["bits_rounded"].sum(), entropy)
    assert all(torch.all(torch.isfinite(g)) for g in grads)
    assert all(g.abs().max() > 0 for g in grads)


# --- freezing -----------------------------------------------------------------------------------


def test_a_frozen_laplace_model_codes_at_the_rate_its_likelihood_estimates(tmp_path):
    """Freezing picks the y tables by the model's likelihood: the real payload of an image is within 2%
    (and the coder's few bytes) of the model's own estimate. At this scale (b = 0.37) the same network
    with a Gaussian estimates 23% less at q = 0 (all residuals 0) and twice as much at q = 7 (most are
    not), so Gaussian tables would miss by far more."""
    scale = 0.99 * float(SCALES[10])  # just below a table scale: the table used is that scale's
    model = _constant_scale_model("laplace", scale)
    path = tmp_path / "laplace.pt"
    freeze.freeze(model, path)
    state = torch.load(path, weights_only=False)
    expected = laplace_tables(SCALES, precision=20).to_arrays()
    for key in ("freqs", "offsets", "lengths"):
        np.testing.assert_array_equal(state["y_tables"][key].numpy(), expected[key])
    assert state["y_tables"]["precision"] == 20 and state["config"]["likelihood"] == "laplace"

    frozen = FrozenModel(path)
    img = smooth_rgb(128, 192)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    rates = [0.0, 7.0]
    coded = engine.coded_sizes(frozen, img, "RGB", rates)
    gaussian = _constant_scale_model("gaussian", scale)
    for q, size in zip(rates, coded):
        estimate = model.evaluate(x, torch.tensor([q]))["bits"].item()
        assert 8 * (size - engine.OVERHEAD) == pytest.approx(estimate, rel=0.02, abs=48)
        assert abs(estimate - gaussian.evaluate(x, torch.tensor([q]))["bits"].item()) > 0.2 * estimate


def test_a_smaller_scale_bound_gives_tables_down_to_it_and_nearly_free_zeros(tmp_path):
    """A model trained with scales down to 0.01 is frozen with tables from 0.01 (83 of them, same
    log spacing): a latent predicted that small costs about nothing when it is 0, where the 0.11
    table charges 0.015 bits."""
    assert len(freeze.scale_table(0.01)) == 83 and freeze.scale_table(0.01)[0] == pytest.approx(0.01)
    model = _constant_scale_model("laplace", 0.005)
    model.config = ModelConfig(N=8, M=12, likelihood="laplace", scale_bound=0.01)
    path = tmp_path / "small.pt"
    freeze.freeze(model, path)
    frozen = FrozenModel(path)
    assert frozen.y_tables.num_tables == 83 and len(frozen.scale_thresholds) == 83
    assert frozen.y_tables.cost_bits(np.zeros(1000, np.int32), np.zeros(1000, np.int64)) < 1000 * 1e-4
    zero_at_011 = laplace_tables(SCALES[:1], precision=20).cost_bits(np.zeros(1000, np.int32), np.zeros(1000, np.int64))
    assert zero_at_011 == pytest.approx(1000 * 0.0154, rel=0.02)
    assert model.likelihood.keywords == {"bound": 0.01}
    coded = engine.coded_sizes(frozen, smooth_rgb(64, 64), "RGB", [0.0])
    assert coded[0] < 200


# --- training -----------------------------------------------------------------------------------


def test_a_laplace_run_with_entropy_rate_freezes_to_a_working_codec(tiny_data, tmp_path):
    """Two steps of --likelihood laplace --entropy-rate; the frozen file codes an image at both ends of
    its rate range (RATE_MARGIN below level 0 and above the top level) and decodes to the network's own
    reconstruction, give or take fp16 and integer h_s rounding."""
    out = tmp_path / "run"
    assert train.main(_args(tiny_data, out, 2, ["--likelihood", "laplace", "--entropy-rate"]))["step"] == 2
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["config"]["likelihood"] == "laplace" and ck["args"]["entropy_rate"] is True

    path = tmp_path / "frozen.pt"
    freeze.main([str(out / "checkpoint.pt"), str(path)])
    weights = engine.Weights.load(path)
    L = len(ck["config"]["levels"])
    assert weights.model.config.likelihood == "laplace"
    assert weights.model.rate_range == (-freeze.RATE_MARGIN[0], L - 1 + freeze.RATE_MARGIN[1]) == (-2.0, 11.0)

    model, _ = freeze.load_checkpoint(out / "checkpoint.pt")
    model.eval()
    img = smooth_rgb(64, 64)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    lo, hi = weights.model.rate_range
    for rate in (lo, 0.0, hi):
        data = engine.encode_array(img, "RGB", rate=rate, weights=weights).data
        assert read_header(data).rate_q == round(rate * RATE_SCALE)
        pixels, mode = engine.decode_array(data, weights=weights)
        assert mode == "RGB" and pixels.shape == img.shape and pixels.dtype == np.uint8
        with torch.no_grad():
            x_hat = model.evaluate(x, torch.tensor([rate]))["x_hat"]
        own = (x_hat.clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
        diff = np.abs(pixels - own)
        assert diff.mean() < 0.5 and diff.max() <= 3
    with pytest.raises(RateError):
        engine.encode_array(img, "RGB", rate=hi + 1 / RATE_SCALE, weights=weights)


def test_init_starts_a_new_run_from_another_runs_weights(tiny_data, tmp_path):
    """--init: step 0 with the checkpoint's weights and gains (no gain initialisation), under this run's
    likelihood; another shape is refused; the new run trains."""
    first = tmp_path / "first"
    train.main(_args(tiny_data, first, 2))
    ck = torch.load(first / "checkpoint.pt", weights_only=False)
    assert ck["config"]["likelihood"] == "gaussian"

    second = tmp_path / "second"
    args = _args(tiny_data, second, 1, ["--likelihood", "laplace", "--init", str(first / "checkpoint.pt")])
    trainer = train.Trainer(train.parse_args(args))
    assert trainer.step == 0 and trainer.config.likelihood == "laplace"
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, ck["model"][name]), name
    with pytest.raises(SystemExit, match="trained with"):
        train.Trainer(train.parse_args(_args(tiny_data, tmp_path / "third", 1,
                                             ["--M", "16", "--init", str(first / "checkpoint.pt")])))
    assert trainer.run()["step"] == 1
    assert torch.load(second / "checkpoint.pt", weights_only=False)["config"]["likelihood"] == "laplace"


def _one_step_grads(data, out, extra) -> tuple[train.Trainer, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One train_step (no optimizer step, no clipping) with fixed noise: the gradients it leaves, and the
    gradient of the batch's rate of rounded y per pixel with respect to the entropy parameters."""
    trainer = train.Trainer(train.parse_args(_args(data, out, 1, ["--clip", "0", "--likelihood", "laplace", *extra])))
    trainer.optimizer.step = lambda: None
    gen = trainer.gen.get_state()
    torch.manual_seed(123)
    trainer.train_step()
    left = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    # The same batch, level and noise again, by hand.
    trainer.gen.set_state(gen)
    torch.manual_seed(123)
    a = trainer.args
    x = train.random_batch(trainer.images, a.batch, a.crop, trainer.gen)
    q = torch.randint(len(trainer.config.levels), (1,), generator=trainer.gen).expand(a.batch)
    rate = trainer.model(x, q.float())["bits_rounded"].mean() / (a.crop * a.crop)
    entropy = trainer.entropy_parameters()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rate_grads = dict(zip((names[id(p)] for p in entropy), torch.autograd.grad(rate, entropy)))
    return trainer, left, rate_grads


def test_entropy_rate_trains_the_entropy_model_on_the_rate_and_the_rest_on_the_loss(tiny_data, tmp_path):
    """With --entropy-rate, one step leaves on h_a, h_s and the z prior exactly the gradient of the rate of
    rounded y (per pixel, batch mean), not J's; every other parameter gets J's gradient, bit for bit."""
    trainer, with_flag, rate_grads = _one_step_grads(tiny_data, tmp_path / "a", ["--entropy-rate"])
    _, without, _ = _one_step_grads(tiny_data, tmp_path / "b", [])
    names = [n for n, _ in trainer.model.named_parameters()]
    entropy = set(rate_grads)
    # h_a, h_s and the z prior, and nothing else.
    assert entropy == {n for n in names if n.split(".")[0] in ("hyper_analysis", "hyper_synthesis", "hyper_prior")}
    assert any(n.startswith("gains.") for n in names) and any(n.startswith("analysis.") for n in names)
    for name in names:
        if name in entropy:
            torch.testing.assert_close(with_flag[name], rate_grads[name], rtol=1e-4, atol=1e-7)
            assert not torch.allclose(with_flag[name], without[name]), name
        else:  # the transform and the gains: the loss J's gradient, as without the flag
            torch.testing.assert_close(with_flag[name], without[name], rtol=0, atol=0)


def test_entropy_rate_keeps_the_lifting_models_masked_means_at_zero(tmp_path):
    """h_s of the lifting model predicts means for LL4 only, by a gradient mask; the rate gradient
    that --entropy-rate puts in place of the loss's goes through the same mask. (--init from a fresh
    model skips the slow gain initialisation.)"""
    config = ModelConfig(arch="lifting", N=8, M=lifting.LATENT_CHANNELS, levels=(0.25, 1.0))
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    torch.save({"config": config.to_dict(), "model": LiftingHyperprior(config).state_dict()}, init)
    out = _train_lifting(tmp_path, 2, "--entropy-rate", "--likelihood", "laplace", "--init", str(init))
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    M, C = lifting.LATENT_CHANNELS, lifting.MEAN_CHANNELS
    weight, bias = state["hyper_synthesis.4.weight"], state["hyper_synthesis.4.bias"]
    assert weight[C:M].abs().max() == 0 and bias[C:M].abs().max() == 0
    assert weight[:C].abs().max() > 0
