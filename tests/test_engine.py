"""The codec engine: golden files, exact table selection, rate consistency, rate control."""

import hashlib
import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lcodec.models
from conftest import kodak_photo
from lcodec import engine, ratecontrol
from lcodec.bitstream import container
from lcodec.errors import ModelMismatchError, RateError
from lcodec.models.integer_hyper import ACT_BITS, scale_thresholds, table_index
from lcodec.models.registry import MODELS

GOLDEN = Path(__file__).resolve().parent / "golden"
RUNTIME_MODULES = sorted(m.name for m in pkgutil.iter_modules(lcodec.models.__path__, "lcodec.models.") if not m.ispkg)
MANIFEST = json.loads((GOLDEN / "golden.json").read_text())
TINY = 0


def _natural(h=96, w=128, seed=0):
    """A smooth, textured stand-in for a photo (no data files needed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(4 * (xx + yy))], 2)
    img = 127 + 80 * base + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_golden_file_decodes_to_known_pixels(name, archived_weights):
    """Every golden file, those of the models the package no longer ships included (their weights
    are in models/archive/): old files decode forever."""
    pixels, mode = engine.decode_array((GOLDEN / name).read_bytes())
    expected = MANIFEST[name]
    assert mode == expected["mode"]
    assert list(pixels.shape) == expected["shape"]
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == expected["pixels_sha256"]


@pytest.mark.parametrize("name", ["v1_rgb_64x48.lc", "v2_sample_256x176_m15_q9.lc"])
def test_golden_file_decodes_identically_with_one_and_two_threads(name):
    code = ("import sys, hashlib, torch; torch.set_num_threads(int(sys.argv[1])); from lcodec import engine;"
            "p, _ = engine.decode_array(open(sys.argv[2], 'rb').read()); print(hashlib.sha256(p.tobytes()).hexdigest())")
    path = str(GOLDEN / name)
    hashes = {subprocess.run([sys.executable, "-c", code, n, path], capture_output=True, text=True,
                             check=True).stdout.strip() for n in ("1", "2")}
    assert hashes == {MANIFEST[name]["pixels_sha256"]}


def _reference_hyper_synthesis(layers, z: np.ndarray) -> np.ndarray:
    """The integer h_s again, in numpy int64 with explicit loops over taps: another
    summation order and no floating point at all."""
    a = z.astype(np.int64)[0]
    for layer in layers:
        w = layer["weight"].numpy().astype(np.int64)
        b = layer["bias"].numpy().astype(np.int64)
        s, p = layer["stride"], layer["padding"]
        cin, h, wd = a.shape
        k = w.shape[2]
        if layer["transposed"]:
            op = layer["output_padding"]
            H, W = (h - 1) * s - 2 * p + k + op, (wd - 1) * s - 2 * p + k + op
            acc = np.zeros((w.shape[1], H + 2 * p + k, W + 2 * p + k), np.int64)
            for i in range(k):
                for j in range(k):
                    contrib = np.einsum("io,ihw->ohw", w[:, :, i, j], a)
                    acc[:, i:i + (h - 1) * s + 1:s, j:j + (wd - 1) * s + 1:s] += contrib
            acc = acc[:, p:p + H, p:p + W] + b[:, None, None]
        else:
            ap = np.pad(a, ((0, 0), (p, p), (p, p)))
            H, W = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
            acc = np.zeros((w.shape[0], H, W), np.int64) + b[:, None, None]
            for i in range(k):
                for j in range(k):
                    acc += np.einsum("oi,ihw->ohw", w[:, :, i, j], ap[:, i:i + s * H:s, j:j + s * W:s])
        shift = layer["shift"].numpy().astype(np.int64)[:, None, None]
        # floor(acc / 2^shift) for either sign of shift, in integers
        a = np.where(shift >= 0, acc >> np.maximum(shift, 0), acc << np.maximum(-shift, 0))
        if layer["relu"]:
            a = np.clip(a, 0, 2**24)
    return a


def test_integer_hyper_synthesis_is_exact_against_an_int64_reference():
    model = engine.load_model(TINY)
    state = torch.load(engine.MODELS[TINY].path, weights_only=True)
    rng = np.random.default_rng(1)
    z = rng.integers(-40, 41, (1, model.config.N, 3, 5))
    mean_int, scale_int = model.hyper_synthesis(torch.from_numpy(z)).chunk(2, dim=1)
    ref = _reference_hyper_synthesis(state["hyper_synthesis"], z)
    M = model.config.M
    np.testing.assert_array_equal(mean_int[0].numpy(), ref[:M])
    np.testing.assert_array_equal(scale_int[0].numpy(), ref[M:])
    assert ACT_BITS == 8


def _whole_latent(entropy_parameters, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The means and table indices of every latent, put together from h_s's tiles."""
    from lcodec.models import frozen

    parts = [(frozen.latent_region(tile), entropy_parameters(z, tile)) for tile in frozen.hyper_tiles(z)]
    shape = (1, parts[0][1][0].shape[1], 4 * z.shape[2], 4 * z.shape[3])
    mean, idx = torch.empty(shape), torch.empty(shape, dtype=torch.int32)
    for (rows, cols), (tile_mean, tile_idx) in parts:
        mean[:, :, rows, cols], idx[:, :, rows, cols] = tile_mean, tile_idx
    return mean, idx


def test_hyper_synthesis_in_tiles_gives_the_same_tables_and_means(monkeypatch):
    """The codec runs h_s tile by tile to bound memory; with a halo wider than its receptive
    field the integer path must not change a single table index or mean (nor may the
    float32 estimate path change by more than its rounding)."""
    from lcodec.models import frozen

    model = engine.load_model(TINY)
    z = torch.from_numpy(np.random.default_rng(2).integers(-40, 41, (1, model.config.N, 11, 13)))
    assert len(frozen.hyper_tiles(z)) == 1
    whole = _whole_latent(model.entropy_parameters, z)
    approx_whole = _whole_latent(model.approximate_entropy_parameters, z)
    monkeypatch.setattr(frozen, "HYPER_TILE", 3)  # 4 x 5 tiles of 3 x 3, with the shipped halo
    assert len(frozen.hyper_tiles(z)) == 20
    tiled = _whole_latent(model.entropy_parameters, z)
    assert model.entropy_parameters(z, frozen.hyper_tiles(z)[0])[1].dtype == torch.int32
    assert torch.equal(whole[0], tiled[0]) and torch.equal(whole[1], tiled[1])
    approx_tiled = _whole_latent(model.approximate_entropy_parameters, z)
    torch.testing.assert_close(approx_whole[0], approx_tiled[0])


def test_table_index_picks_the_smallest_table_scale_not_below_the_prediction():
    thresholds = torch.tensor([10, 20, 40, 80])
    scale_int = torch.tensor([0, 10, 11, 20, 21, 79, 80, 81, 10**9])
    assert table_index(scale_int, thresholds).tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 3]


def test_nearest_thresholds_pick_the_table_scale_nearest_in_log():
    scales = torch.tensor([1.0, 4.0, 16.0])
    thresholds = scale_thresholds(scales, nearest=True)  # midpoints 2 and 8
    predicted = torch.tensor([0.5, 1.9, 2.1, 7.9, 8.1, 100.0])
    index = table_index(torch.floor(predicted * 2**16).long(), thresholds)
    assert index.tolist() == [0, 0, 1, 1, 2, 2]
    assert table_index(torch.floor(predicted * 2**16).long(), scale_thresholds(scales)).tolist() == [0, 1, 1, 2, 2, 2]


def test_decoding_survives_perturbed_hyper_synthesis_means(monkeypatch):
    """The h_s output feeds table selection only through integers; its float mean only
    shifts the reconstruction. Perturbing the mean by ±1e-6 relative must not derail decoding."""
    data = (GOLDEN / "v1_rgb_64x48.lc").read_bytes()
    clean, _ = engine.decode_array(data)
    model = engine.load_model(TINY)
    original = model.entropy_parameters
    sign = {"v": 1.0}

    def perturbed(z, tile, channels=None, out=None):
        mean, idx = original(z, tile, channels, out=out)
        mean.mul_(1 + sign["v"] * 1e-6)
        return mean, idx

    monkeypatch.setattr(model, "entropy_parameters", perturbed)
    for s in (1.0, -1.0):
        sign["v"] = s
        pixels, _ = engine.decode_array(data)
        assert np.abs(pixels.astype(int) - clean.astype(int)).max() <= 1


@pytest.mark.parametrize("q", [2.5, 4.0, 7.0])
def test_coded_bits_match_the_model_estimate(q):
    """Rate consistency on the shipped model: the real payload vs the ideal code length of the
    same symbols under the model's continuous conditional (unbucketed scales, its scale bound) and
    the z prior -- within a few per cent. (Measured at freezing time: the float training model's own
    estimate and the coded size agree within 1% as well; see the model card.)"""
    from lcodec.bitstream import range_coder
    from lcodec.models.entropy_models import LIKELIHOODS

    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    img = _natural(128, 192)
    enc = engine.Encoder(model, img, "RGB")
    z, sym, idx = enc._symbols(round(q * engine.RATE_SCALE))
    mean_int, scale_int = model.hyper_synthesis(torch.from_numpy(z).view(1, model.config.N, 2, 3)).chunk(2, dim=1)
    scale = scale_int.double().ravel() / 2**16
    likelihood = LIKELIHOODS[model.config.likelihood]
    ideal_y = -torch.log2(likelihood(torch.from_numpy(sym).double(), torch.zeros(1), scale,
                                     bound=model.config.scale_bound)).sum().item()
    rq = round(q * engine.RATE_SCALE)
    ideal = ideal_y + model.z_tables.cost_bits(z, enc.z_index(rq))
    real = 8 * len(range_coder.encode([(z, enc.z_index(rq), model.z_tables), (sym, idx, model.y_tables)]))
    assert ideal > 1000
    assert abs(real - ideal) / ideal < 0.05


def test_one_pass_rates_rise_with_the_rate_parameter():
    img = _natural()
    sizes = [len(engine.encode_array(img, "RGB", rate=q, model_id=TINY).data) for q in (0.0, 3.0, 7.0)]
    assert sizes[0] < sizes[1] < sizes[2]


def _photo(name: str, h: int, w: int) -> np.ndarray:
    """A crop of a Kodak image, or the synthetic stand-in where ../shared is absent."""
    return kodak_photo(name, h, w, _natural)


@pytest.mark.parametrize("name,bpp", [("kodim23.png", 0.12), ("kodim05.png", 0.25), ("kodim23.png", 0.5),
                                      ("kodim13.png", 1.0), ("kodim05.png", 2.0)])
def test_rate_control_hits_the_target_from_below_with_the_shipped_model(name, bpp):
    img = _photo(name, 192, 256)
    r = engine.encode_array(img, "RGB", bpp=bpp)
    target = int(bpp * img.shape[0] * img.shape[1] / 8)
    assert r.target_bytes == target
    assert 0.97 * target <= len(r.data) <= target, r.warning
    pixels, mode = engine.decode_array(r.data)
    assert pixels.shape == img.shape and mode == "RGB"


def test_size_target_is_a_byte_budget():
    img = _photo("kodim19.png", 128, 192)
    r = engine.encode_array(img, "RGB", size=1500)
    assert 0.97 * 1500 <= len(r.data) <= 1500


def test_unreachable_rate_is_a_clear_error():
    img = _natural(64, 64)
    with pytest.raises(RateError, match="header alone"):
        engine.encode_array(img, "RGB", bpp=0.01, model_id=TINY)
    with pytest.raises(RateError, match="smallest file"):
        engine.encode_array(img, "RGB", size=40, model_id=TINY)


def test_rate_outside_the_model_range_is_refused():
    with pytest.raises(RateError, match="outside"):
        engine.encode_array(_natural(64, 64), "RGB", rate=99.0, model_id=TINY)


def test_the_model_table_is_read_only():
    """Files name weights by id and digest; an entry re-pointed at other weights in a running
    process would make files that name the wrong ones. Other weights are an argument instead."""
    with pytest.raises(TypeError):
        MODELS[1] = MODELS[0]  # type: ignore[index]
    with pytest.raises(TypeError):
        del MODELS[1]  # type: ignore[attr-defined]
    assert all(entry.model_id == model_id for model_id, entry in MODELS.items())


def test_weights_that_are_not_installed_are_an_argument(tmp_path):
    """`Weights.load` codes with any frozen file: the file carries the id asked for and that
    file's digest, decodes with those weights, and is refused by the installed ones."""
    copy = tmp_path / "interim.pt"
    copy.write_bytes(MODELS[TINY].path.read_bytes())
    weights = engine.Weights.load(copy)
    assert weights.sha256 == MODELS[TINY].sha256 and weights.name == "interim.pt"
    img = _natural(64, 64)
    data = engine.encode_array(img, "RGB", rate=6.0, model_id=engine.DEFAULT_MODEL_ID, weights=weights).data
    header = container.read_header(data)
    assert header.model_id == engine.DEFAULT_MODEL_ID and header.weights_digest == MODELS[TINY].digest4
    with pytest.raises(ModelMismatchError, match="other weights"):
        engine.decode_array(data)
    pixels, _ = engine.decode_array(data, weights=weights)
    installed = engine.encode_array(img, "RGB", rate=6.0, model_id=TINY).data
    payload = slice(container.HEADER_SIZE, -container.CRC_SIZE)
    assert data[payload] == installed[payload]
    assert np.array_equal(pixels, engine.decode_array(installed)[0])
    with pytest.raises(ModelMismatchError, match="other weights"):
        engine.decode_array(engine.encode_array(img, "RGB", rate=6.0).data, weights=weights)
    with pytest.raises(ModelMismatchError):
        engine.Weights.load(copy, sha256=MODELS[engine.DEFAULT_MODEL_ID].sha256)


def test_file_from_other_weights_is_refused():
    data = bytearray((GOLDEN / "v1_rgb_64x48.lc").read_bytes())
    data[6:10] = b"\x00\x00\x00\x00"  # the weights digest
    import zlib

    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "big")
    with pytest.raises(ModelMismatchError, match="other weights"):
        engine.decode_array(bytes(data))


@pytest.mark.parametrize("shape,mode", [((1, 1, 3), "RGB"), ((37, 65, 3), "RGB"), ((65, 37), "L")])
def test_odd_sizes_round_trip(shape, mode):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, shape).astype(np.uint8)
    r = engine.encode_array(img, mode, rate=6.0, model_id=TINY)
    pixels, out_mode = engine.decode_array(r.data)
    assert pixels.shape == img.shape and out_mode == mode


@pytest.mark.parametrize("module", [*RUNTIME_MODULES, "lcodec.engine"])
def test_the_runtime_does_not_import_the_codec_or_the_training_tools(module):
    """One direction: the codec imports the model runtime (the modules of `lcodec.models`), and
    the training tools (`lcodec.models.training`) may import the codec. A runtime module that
    imported either would make a cycle; the engine must not need the training tools."""
    forbidden = ["lcodec.models.training"] + (["lcodec.engine"] if module != "lcodec.engine" else [])
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({tuple(forbidden)!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


def test_rate_search_starts_where_the_size_stops_falling():
    """Extrapolated gains can make files grow again below level 0: walking
    down from level 0, the search starts at the first size under the target, else at the
    smallest size; a target above level 0's size needs no walk at all."""
    lo = -2 * engine.RATE_SCALE
    calls = []

    def u_shaped(rq):  # smallest at q = -0.5
        calls.append(rq)
        return 1000 + (rq + 512) ** 2

    assert ratecontrol.start(u_shaped, lo, 0) == -512
    assert ratecontrol.start(u_shaped, lo, 1000 + 256**2) == -256
    calls.clear()
    assert ratecontrol.start(u_shaped, lo, 1000 + 512**2) == 0
    assert calls == [0]
    rising = lambda rq: 2000 + rq  # noqa: E731
    assert ratecontrol.start(rising, lo, 0) == lo
    falling = lambda rq: 2000 - rq  # noqa: E731 - never rises below level 0: stop at level 0
    assert ratecontrol.start(falling, lo, 0) == 0


@pytest.mark.parametrize("real_over_estimate", [1.02, 3.0])
def test_rate_control_makes_each_estimate_measure_and_encode_once(real_over_estimate):
    """The start's walk, every round of the search, the second search from the smallest file and
    the error message share one memo: no rq is estimated, measured or encoded twice, and the
    counts say so. With real files 3x the estimates, nothing reaches the target and every step runs."""
    estimated, measured, encoded = [], [], []

    def estimate(rq):
        estimated.append(rq)
        return 5000 + rq

    def measure(rq):
        measured.append(rq)
        return real_over_estimate * (5000 + rq)

    def encode(rq):
        encoded.append(rq)
        return bytes(int(real_over_estimate * (5000 + rq)))

    goal = ratecontrol.target(100, 100, size=4000)
    levels = (0.06, 0.12, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    if real_over_estimate > 2:
        with pytest.raises(RateError, match="smallest file lcodec can make for it is 8856 bytes"):
            ratecontrol.fit(goal, estimate, measure, encode, -2048, 4096, levels)
        assert min(measured) == -2048  # the bottom of the range was tried
    else:
        fit = ratecontrol.fit(goal, estimate, measure, encode, -2048, 4096, levels)
        assert (1 - ratecontrol.TOLERANCE) * 4000 <= len(fit.data) <= 4000 and fit.warning is None
        assert (fit.probes, fit.measures, fit.encodes) == (len(estimated), len(measured), len(encoded))
        assert encoded == [fit.rq]  # only the chosen file is range-coded
    for calls in (estimated, measured, encoded):
        assert len(set(calls)) == len(calls)


LEVELS = (0.06, 0.12, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _model_sizes(shift: float, tilt: float = 0.0, pixels: int = 768 * 512):
    """Sizes shaped like a model's: the cubic through the levels' log rates (which double at the
    bottom and grow by a third at the top; it rises on the whole range), shifted per image and
    tilted by `tilt` per level about level 4 (an image whose size rises faster or slower than the levels')."""
    shape = np.polyfit(np.arange(len(LEVELS)), np.log(LEVELS), 3)

    def size(rq: int, calls: list) -> float:
        calls.append(rq)
        x = rq / 1024
        return 100 + pixels / 8 * np.exp(np.polyval(shape, x) + shift + tilt * (x - 4))

    return size


def test_whole_latent_estimates_aim_closer_than_sampled_ones_and_never_further():
    """`WHOLE` aims 0.25% and 16 bytes under a target, where that is closer than `SAMPLED`'s 0.75%
    (from about 3200 bytes up), and never further under than it."""
    assert ratecontrol.WHOLE.of(98304) == pytest.approx(0.9975 * 98304 - 16)  # Kodak at 2 bpp
    assert ratecontrol.WHOLE.of(1000) == ratecontrol.SAMPLED.of(1000) == pytest.approx(992.5)
    for target in (50, 500, 3000, 3300, 10**4, 10**6):
        assert ratecontrol.SAMPLED.of(target) <= ratecontrol.WHOLE.of(target) < target


def test_solve_lands_in_the_window_in_a_few_probes():
    """Over many budgets and images that code from 55% smaller to 30% bigger than the levels, and
    whose size rises 15% faster or slower a level, `solve` returns an rq whose cost is within
    the slack under the aim (probed) or, predicted within 1%, within 2% of it, from the levels'
    guess in 2-3 probes on average, never probing the top of the range."""
    curve = ratecontrol.LevelCurve(LEVELS)
    probes = []
    for shift in (-0.8, -0.2, 0.0, 0.25):
        for tilt in (-0.15, 0.0, 0.15):
            size = _model_sizes(shift, tilt)
            for bpp in np.geomspace(0.1, 2.5, 12):
                aim = bpp * 768 * 512 / 8
                calls = []
                found = ratecontrol.solve(lambda r: size(r, calls), aim, 0, 12288, {}, round(curve.rq(math.log(bpp))),
                                          curve)
                if size(0, []) > aim:
                    assert found is None
                    continue
                rq, predicted = found
                real = size(rq, [])
                if size(12288, []) <= aim:  # the top of the range is under the aim
                    assert rq == 12288
                    continue
                assert 0.98 * aim <= real <= 1.002 * aim and abs(predicted / real - 1) < 0.01, (shift, tilt, bpp)
                assert len(set(calls)) == len(calls) and 12288 not in calls
                probes.append(len(calls))
    assert len(probes) > 100 and max(probes) <= 5 and sum(probes) / len(probes) <= 3


def test_rate_control_gives_the_largest_file_under_the_target_where_steps_are_coarse():
    """Where one rq step moves the size past the whole window (10% steps), the largest file under
    the target, with a warning that says why; `solve` gives None when even lo is over the aim and
    hi when even hi is under it."""
    sizes = lambda rq: 1000 * 1.1 ** (rq // 100)  # noqa: E731
    goal = ratecontrol.target(100, 100, size=5000)
    fit = ratecontrol.fit(goal, sizes, sizes, lambda rq: bytes(int(sizes(rq))), -2048, 4096, LEVELS)
    assert len(fit.data) == int(1000 * 1.1**16) and sizes(fit.rq + 1) > 5000
    assert "coarser" in fit.warning and fit.measures <= ratecontrol.MAX_MEASURES
    curve = ratecontrol.LevelCurve(LEVELS)
    assert ratecontrol.solve(sizes, 900, 0, 4096, {}, 3000, curve) is None
    assert ratecontrol.solve(sizes, 1e9, 0, 4096, {}, 3000, curve)[0] == 4096


def test_solve_gives_up_on_a_cost_that_does_not_rise():
    """A flat cost (the model's sizes stop rising) costs at most MAX_PROBES probes."""
    curve = ratecontrol.LevelCurve(LEVELS)
    calls = []
    ratecontrol.solve(lambda rq: calls.append(rq) or 1000.0, 5000, 0, 1 << 30, {}, 3000, curve)
    assert len(calls) <= ratecontrol.MAX_PROBES + 1

def test_a_large_picture_s_latent_goes_while_the_coder_runs_and_comes_back_the_same():
    """A picture estimated on a sample lets go of g_a's latent in `payload` (it is as big as the
    picture in float32 times M/256); whatever needs it later gets the same latent again."""
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    enc = engine.Encoder(model, _natural(1600, 2048), "RGB")
    assert enc._sample is not None  # noqa: SLF001 -- estimated on a sample
    y, rq = enc.y.clone(), 3 * container.RATE_SCALE
    enc.measure_bytes(rq)
    data = enc.payload(rq)
    assert enc._y is None  # noqa: SLF001 -- let go
    assert torch.equal(enc.y, y)
    assert enc.payload(rq) == data
