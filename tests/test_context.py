"""The subband context model: its labels follow SPEC.md, its indices are integer-exact, and a
context-coded file round-trips."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcodec import engine
from lcodec.models import context
from lcodec.models.context import LEVELS, ORDER, PASSES, SubbandContext


def reference_labels(ctx: SubbandContext, symbols: np.ndarray, hyper: np.ndarray, p) -> np.ndarray:
    """The three labels of every position of pass p, position by position, as SPEC.md words them
    (a second implementation: loops over the band grid, nothing shared with `Passes`)."""
    sym_bands, idx_bands = context.to_bands(symbols), context.to_bands(hyper)
    band = sym_bands[p.level]
    _, H, W = band.shape
    done_before = ORDER[:ORDER.index(p.channel)]

    def mag(level, k, i, j):
        return min(abs(int(sym_bands[level][k, i, j])), context.MAGNITUDE_CAP)

    def expected(level, k, i, j):
        return int(ctx.magnitude[idx_bands[level][k, i, j]])

    def label(pairs):
        if not pairs:
            return 0
        a = sum(x for x, _ in pairs)
        e = sum(y for _, y in pairs)
        return 1 + sum(1 for theta in ctx.thresholds if a * 65536 >= int(theta) * e)

    out = []
    for i in range(H):
        for j in range(W):
            if (i + j) % 2 != p.parity:
                continue
            same = []
            if p.parity == 1:
                for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    if 0 <= i + di < H and 0 <= j + dj < W:
                        same.append((mag(p.level, p.channel, i + di, j + dj), expected(p.level, p.channel, i + di, j + dj)))
            parent = []
            if p.level < LEVELS:
                ph, pw = sym_bands[p.level + 1].shape[1:]
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i // 2 + di, j // 2 + dj
                        if 0 <= a < ph and 0 <= b < pw:
                            parent.append((mag(p.level + 1, p.channel, a, b), expected(p.level + 1, p.channel, a, b)))
            cross = [(mag(p.level, k, i, j), expected(p.level, k, i, j)) for k in done_before]
            mu = 0
            if p.parity == 1:
                def n(a, b):
                    inside = 0 <= a < H and 0 <= b < W
                    return max(-32767, min(32767, int(band[p.channel, a, b]))) if inside else 0
                w = [int(x) for x in ctx.weights[p.level - 1, p.channel]]
                acc = w[0] * n(i - 1, j) + w[1] * n(i + 1, j) + w[2] * n(i, j - 1) + w[3] * n(i, j + 1)
                mu = (acc + 128) // 256
            out.append((label(same), label(parent), label(cross), mu))
    return np.array(out, dtype=np.int64).reshape(-1, 4)


@pytest.fixture(scope="module")
def random_context():
    rng = np.random.default_rng(3)
    T = 20
    magnitude = np.sort(rng.integers(1, 4000, T))
    thresholds = np.array([64, 160, 256, 410, 640, 1024], dtype=np.int64)
    ctx = SubbandContext.identity(magnitude, thresholds)
    remap = rng.integers(0, T, ctx.remap.shape).astype(np.uint8)
    weights = rng.integers(-300, 300, (4, 9, 4))
    return SubbandContext(magnitude, thresholds, remap, weights)


def random_latent(rng, T, h=4, w=4):  # y is (768, Hp/16, Wp/16): multiples of 4
    symbols = (rng.laplace(size=(768, h, w)) * rng.choice([0.2, 1, 5], size=(768, 1, 1))).round().astype(np.int32)
    symbols[rng.random(symbols.shape) < 0.002] = 300  # beyond the magnitude cap
    symbols[rng.random(symbols.shape) < 0.001] = -40000  # beyond the prediction's clip
    hyper = rng.integers(0, T, (768, h, w)).astype(np.uint8)
    return symbols, hyper


def test_labels_follow_the_spec_position_by_position(random_context):
    rng = np.random.default_rng(5)
    symbols, hyper = random_latent(rng, len(random_context.magnitude))
    state = context.Passes(random_context, hyper)
    seen = set()
    for p in PASSES:
        got = np.stack([a.astype(np.int64) for a in state.labels(p)[1:]] + [state.mean(p)], axis=1)
        np.testing.assert_array_equal(got, reference_labels(random_context, symbols, hyper, p), err_msg=str(p))
        seen.update(map(tuple, got[:, :3]))
        state.put(p, context.pass_values(symbols, p))
    assert len(seen) > 40  # the labels are exercised, not all zero


def reference_ll_labels(ctx: SubbandContext, symbols: np.ndarray, hyper: np.ndarray, p) -> np.ndarray:
    """The `same` and `cross` labels of every position of an LL pass, position by position, as
    SPEC.md words them (on channel p.channel's plane of the LL block)."""
    _, H, W = symbols.shape

    def pair(c, i, j):
        return min(abs(int(symbols[c, i, j])), context.MAGNITUDE_CAP), int(ctx.magnitude[hyper[c, i, j]])

    def label(pairs):
        if not pairs:
            return 0
        a, e = sum(x for x, _ in pairs), sum(y for _, y in pairs)
        return 1 + sum(1 for theta in ctx.thresholds if a * 65536 >= int(theta) * e)

    out = []
    for i in range(H):
        for j in range(W):
            if (i + j) % 2 == p.parity:
                same = [pair(p.channel, i + di, j + dj) for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                        if p.parity == 1 and 0 <= i + di < H and 0 <= j + dj < W]
                out.append((label(same), 0, label([pair(c, i, j) for c in range(p.channel)]), 0))
    return np.array(out, dtype=np.int64).reshape(-1, 4)


@pytest.fixture(scope="module")
def ll_context(random_context):
    rng = np.random.default_rng(4)
    T, B = len(random_context.magnitude), random_context.labels
    ll_remap = rng.integers(0, T, (3, 2, T, B, B)).astype(np.uint8)
    return SubbandContext(random_context.magnitude, random_context.thresholds, random_context.remap,
                          random_context.weights, ll_remap)


def test_ll_labels_follow_the_spec_position_by_position(ll_context):
    rng = np.random.default_rng(9)
    symbols, hyper = random_latent(rng, len(ll_context.magnitude), h=6, w=8)
    state = context.Passes(ll_context, hyper)
    seen = set()
    for p in context.passes(ll_context):
        got = np.stack([a.astype(np.int64) for a in state.labels(p)[1:]] + [state.mean(p)], axis=1)
        if p.level == context.LL_LEVEL:
            np.testing.assert_array_equal(got, reference_ll_labels(ll_context, symbols, hyper, p), err_msg=str(p))
            seen.update(map(tuple, got[:, :3]))
            t = ll_context.pass_indices(p, context.pass_values(hyper, p), state.labels(p)[1:])
            np.testing.assert_array_equal(
                t, ll_context.ll_remap[p.channel, p.parity][context.pass_values(hyper, p), got[:, 0], got[:, 2]])
        else:  # the details' labels do not depend on how the LL block is coded
            np.testing.assert_array_equal(got, reference_labels(ll_context, symbols, hyper, p), err_msg=str(p))
        state.put(p, context.pass_values(symbols, p))
    assert len(seen) > 20


def test_an_ll_context_codes_the_ll_block_in_six_passes_first(ll_context):
    rng = np.random.default_rng(10)
    symbols, hyper = random_latent(rng, len(ll_context.magnitude))
    items = list(context.pass_items(ll_context, symbols, hyper))
    assert [p for p, _, _ in items[:6]] == list(context.LL_PASSES)
    assert len(items) == 6 + len(PASSES)
    assert sorted(np.concatenate([s for _, s, _ in items[:6]]).tolist()) == sorted(symbols[:3].ravel().tolist())
    coded, mean = context.coded_indices(ll_context, symbols, hyper)
    assert not mean[:3].any()
    assert not np.array_equal(coded[:3], hyper[:3])  # the LL block's tables come from its own lookup
    state = SubbandContext.from_state(ll_context.state())
    np.testing.assert_array_equal(state.ll_remap, ll_context.ll_remap)
    assert context.coarse_passes(ll_context, 3) == 6 + 18 and context.coarse_passes(state, 0) == 6 + len(PASSES)


def test_pass_items_cover_every_symbol_once_in_order(random_context):
    rng = np.random.default_rng(6)
    symbols, hyper = random_latent(rng, len(random_context.magnitude))
    no_prediction = SubbandContext(random_context.magnitude, random_context.thresholds, random_context.remap,
                                   np.zeros_like(random_context.weights))
    items = list(context.pass_items(no_prediction, symbols, hyper))
    assert len(items) == 1 + len(PASSES) == 1 + 4 * 9 * 2
    assert sum(s.size for _, s, _ in items) == symbols.size
    assert sorted(np.concatenate([s for _, s, _ in items]).tolist()) == sorted(symbols.ravel().tolist())
    levels = [p.level for p, _, _ in items[1:]]
    assert levels == sorted(levels, reverse=True)  # coarse to fine


@pytest.mark.parametrize("with_ll", [False, True])
def test_a_tall_latent_s_items_are_the_same_in_row_parts(random_context, ll_context, with_ll):
    """With workers, `pass_items` computes a tall latent's passes in `row_parts` side by side and
    joins them: the same items, in the same order, as in one part."""
    ctx = ll_context if with_ll else random_context
    rng = np.random.default_rng(11)
    h = 2 * context.PART_MIN_ROWS + 8
    symbols, hyper = random_latent(rng, len(ctx.magnitude), h=h, w=8)
    assert len(context.row_parts(h)) == 2
    whole = list(context.pass_items(ctx, symbols, hyper))
    parts = list(context.pass_items(ctx, symbols, hyper, workers=2))
    assert len(parts) == len(whole)
    for (p, s, t), (q, s2, t2) in zip(whole, parts):
        assert p == q
        np.testing.assert_array_equal(s, s2)
        np.testing.assert_array_equal(t, t2)


def test_identity_context_codes_the_hyperprior_s_bits(random_context):
    rng = np.random.default_rng(8)
    symbols, hyper = random_latent(rng, len(random_context.magnitude))
    identity = SubbandContext.identity(random_context.magnitude, random_context.thresholds)
    coded, mean = context.coded_indices(identity, symbols, hyper)
    np.testing.assert_array_equal(coded, hyper)
    assert not mean.any()


def test_a_parity_s_positions_are_taken_row_major():
    plane = np.arange(6 * 8).reshape(6, 8)
    i, j = np.indices(plane.shape)
    for parity in (0, 1):
        np.testing.assert_array_equal(context.take(plane, parity), plane[(i + j) % 2 == parity])
        back = np.zeros_like(plane)
        context.place(back, parity, context.take(plane, parity))
        np.testing.assert_array_equal(back, np.where((i + j) % 2 == parity, plane, 0))


def test_bands_layout():
    y = np.arange(768 * 3 * 2).reshape(768, 3, 2)
    # Level 1's band of a 3x2 latent is 24x16; channel 192 + k*64 + 8i + j holds band k at (8r + i, 8c + j).
    bands = context.to_bands(y)
    assert bands[1].shape == (9, 24, 16)
    assert bands[1][4, 8 * 2 + 3, 8 * 1 + 5] == y[192 + 4 * 64 + 8 * 3 + 5, 2, 1]


@pytest.fixture(scope="module")
def context_weights():
    weights = engine.installed_weights()
    if weights.model.context is None:
        pytest.skip("the default model has no subband context")
    return weights


@pytest.fixture(scope="module")
def sample_pixels():
    """The README's sample picture (256x176, photo-like)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "sample.png"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_a_context_file_round_trips_its_symbols(context_weights, sample_pixels):
    model = context_weights.model
    enc = engine.Encoder(model, sample_pixels, "RGB")
    rq = 4 * 1024
    z, sym, idx = enc._symbols(rq)
    data = enc.file(rq, engine.DEFAULT_MODEL_ID, context_weights.digest4)
    assert data[4] == 2  # format version 2: a subband context
    _, _, y_hat = engine.decode_latent(data, weights=context_weights)
    gain, _ = model.gains(rq / 1024)
    z = torch.from_numpy(z.astype(np.int64)).view(1, model.config.N, enc.y.shape[2] // 4, enc.y.shape[3] // 4)
    mean, _ = model.latent_entropy_parameters(z, np.dtype(np.uint8))
    np.testing.assert_array_equal(np.rint((y_hat - mean).numpy()).astype(np.int32).ravel(), sym)


def test_context_saves_bits_over_the_hyperprior(context_weights, sample_pixels):
    model = context_weights.model
    enc = engine.Encoder(model, sample_pixels, "RGB")
    _, sym, idx = enc._symbols(4 * 1024)
    shape = (model.config.M,) + tuple(enc.y.shape[2:])
    hyper_bits = model.y_tables.cost_bits(sym, idx)
    context_bits = sum(model.y_tables.cost_bits(c, t)
                       for _, c, t in context.pass_items(model.context, sym.reshape(shape), idx.reshape(shape)))
    assert context_bits < 0.95 * hyper_bits


def test_context_indices_ignore_threads_and_float_noise(context_weights, sample_pixels, monkeypatch):
    """The decoder's table indices depend on integers only: the same with 1 and 2 threads, and
    with the means (the only float the decoder adds to the symbols) perturbed."""
    data = engine.encode_array(sample_pixels, "RGB", rate=3.0, weights=context_weights).data
    decoded = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        decoded.append(engine.decode_latent(data, weights=context_weights)[2].clone())
    real = context_weights.model.__class__.entropy_parameters

    def noisy(self, z_int, tile, channels=None, out=None):
        mean, idx = real(self, z_int, tile, channels, out=out)
        mean.add_(1e-4)
        return mean, idx

    monkeypatch.setattr(context_weights.model.__class__, "entropy_parameters", noisy)
    perturbed = engine.decode_latent(data, weights=context_weights)[2]
    torch.set_num_threads(2)
    assert torch.equal(decoded[0], decoded[1])
    np.testing.assert_allclose(perturbed.numpy(), decoded[0].numpy() + 1e-4, atol=1e-5)


def test_a_pass_is_its_band_s_checkerboard_half():
    y = np.arange(768 * 4 * 4).reshape(768, 4, 4)
    bands = context.to_bands(y)
    for p in PASSES:
        np.testing.assert_array_equal(context.pass_values(y, p), context.take(bands[p.level][p.channel], p.parity))
    passed = np.zeros_like(y)
    passed[:3] = y[:3]
    for p in PASSES:
        context.put_pass(passed, p, context.pass_values(y, p))
    np.testing.assert_array_equal(passed, y)


def test_a_context_model_s_detail_means_are_zero_whatever_z_is():
    """Checked when a context model is loaded, so that h_s need not compute the details' means."""
    synthesis = engine.load_model(engine.DEFAULT_MODEL_ID).hyper_synthesis
    assert synthesis.zero_means_from(context.LL_CHANNELS)
    assert not synthesis.zero_means_from(0)  # the LL block's are computed


def test_label_dependents_are_the_other_symbols_code_length_changes(random_context):
    """A detail symbol's (rise, fall) are what the code lengths of all the other symbols change by
    when its magnitude rises or falls by one, recounted pass by pass (predictions held at zero:
    `label_dependents` does not follow them)."""
    from dataclasses import replace
    ctx = replace(random_context, weights=np.zeros_like(random_context.weights))
    rng = np.random.default_rng(8)
    symbols, hyper = random_latent(rng, len(ctx.magnitude), h=8, w=8)
    symbols = np.clip(symbols, -context.MAGNITUDE_CAP + 1, context.MAGNITUDE_CAP - 1)

    def code_length(t, v):
        return np.log2(2.0 + np.abs(v)) * (1 + t.astype(np.float64)) / 7 + 0.03 * t

    def each_length(s):
        t, _ = context.coded_indices(ctx, s, hyper)
        return code_length(t, s)

    rise, fall = context.label_dependents(ctx, symbols, hyper, code_length)
    before = each_length(symbols)
    M, h, w = symbols.shape
    picked = rng.choice(np.arange(context.LL_CHANNELS * h * w, M * h * w), 120, replace=False)
    for i in picked:
        c, rest = divmod(int(i), h * w)
        a, b = divmod(rest, w)
        for change, expected in ((1, rise), (-1, fall)):
            s = symbols[c, a, b]
            if s == 0 and change == -1:
                continue
            moved = symbols.copy()
            moved[c, a, b] = s + change * (1 if s >= 0 else -1)  # the magnitude changes by `change`
            after = each_length(moved)
            others = (after.sum() - after[c, a, b]) - (before.sum() - before[c, a, b])
            assert abs(others - expected[c, a, b]) < 1e-3, (c, a, b, change)
    assert np.abs(rise[context.LL_CHANNELS:]).sum() > 0 and not rise[:context.LL_CHANNELS].any()
