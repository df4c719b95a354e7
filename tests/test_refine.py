"""Encode effort: latent refinement buys quality at the same exact size, in the same format."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import lcodec
from lcodec import api, engine, refine, rounding
from lcodec.bitstream import container
from lcodec.models import context

from conftest import ANY_SIZE, smooth_rgb


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2))


def model_lambda(model) -> float:
    return rounding.rdo_lambda(model) or refine.HYPER_LAMBDA


def decoded(data: bytes) -> np.ndarray:
    return engine.decode_array(data)[0]


class Steps:
    """A tqdm stand-in that counts."""

    def __init__(self, stop_after: int | None = None):
        self.total, self.n, self.stop_after = None, 0, stop_after

    def reset(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self) -> None:
        self.n += 1
        if self.stop_after is not None and self.n >= self.stop_after:
            raise KeyboardInterrupt


def test_every_effort_level_has_its_iterations():
    assert len(refine.HYPER_ITERATIONS) == len(refine.LATENT_ITERATIONS) == api.MAX_EFFORT + 1
    for model_id in (engine.DEFAULT_MODEL_ID, 0):  # with RDO rounding (lifting), and without (GDN)
        steps = [refine.iterations(e, engine.load_model(model_id)) for e in range(api.MAX_EFFORT + 1)]
        assert steps[0] == 0 and steps == sorted(set(steps))


@pytest.mark.parametrize("bpp", [0.25, 1.0])
def test_refinement_improves_the_picture_at_the_same_exact_size(kodak_crop, bpp, archived_weights):
    """Plain rounding's path (Adam moves the latents through the synthesis), with the GDN model id 6
    from the archive: the only shipped model with that path is the test model, too small to gain."""
    budget = int(bpp * kodak_crop.shape[0] * kodak_crop.shape[1] / 8)
    plain = engine.encode_array(kodak_crop, "RGB", bpp=bpp, model_id=6)
    steps = Steps()
    refined = engine.encode_array(kodak_crop, "RGB", bpp=bpp, model_id=6, effort=7, progress=steps)
    assert steps.total == steps.n == refine.iterations(7, engine.load_model(6))
    assert 0.97 * budget <= len(refined.data) <= budget
    assert refined.data != plain.data
    # Measured on this crop at effort 7: +0.75 dB at 0.25 bpp, +0.57 dB at 1 bpp.
    assert psnr(kodak_crop, decoded(refined.data)) > psnr(kodak_crop, decoded(plain.data)) + 0.1


def test_the_lifting_model_refines_within_the_budget_and_is_never_worse(kodak_crop):
    budget = int(0.5 * kodak_crop.shape[0] * kodak_crop.shape[1] / 8)
    plain = engine.encode_array(kodak_crop, "RGB", bpp=0.5, model_id=engine.DEFAULT_MODEL_ID)
    refined = engine.encode_array(kodak_crop, "RGB", bpp=0.5, model_id=engine.DEFAULT_MODEL_ID, effort=2)
    assert container.read_header(refined.data).model_id == engine.DEFAULT_MODEL_ID
    assert 0.97 * budget <= len(refined.data) <= budget
    assert psnr(kodak_crop, decoded(refined.data)) >= psnr(kodak_crop, decoded(plain.data))


def test_the_default_model_refines_its_hyper_latent_within_the_budget(kodak_crop, monkeypatch):
    """Effort 3 with ẑ refined only (no y steps): the file names another ẑ, a finer rate
    parameter, and decodes closer to the image at the same exact size."""
    monkeypatch.setattr(refine, "SYMBOL_ITERATIONS", (0,) * len(refine.SYMBOL_ITERATIONS))
    budget = int(0.25 * kodak_crop.shape[0] * kodak_crop.shape[1] / 8)
    plain = engine.encode_array(kodak_crop, "RGB", bpp=0.25)
    refined = engine.encode_array(kodak_crop, "RGB", bpp=0.25, effort=3)
    assert 0.97 * budget <= len(refined.data) <= budget
    assert refined.rate > plain.rate
    gain = psnr(kodak_crop, decoded(refined.data)) - psnr(kodak_crop, decoded(plain.data))
    assert gain > 0.05  # measured: +0.12 dB


def test_a_refined_hyper_latent_costs_less_than_h_a_s():
    """`refine_hyper` keeps the ẑ with the least exact cost Σ (u - s - mean)² + λ·bits; h_a's is a candidate."""
    from lcodec.bitstream.container import RATE_SCALE

    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    enc = engine.Encoder(model, smooth_rgb(128, 128), "RGB")
    rq = 3 * RATE_SCALE
    z0 = model.hyper_latent(enc.y * model.gains(rq / RATE_SCALE)[0])
    ticks = Steps()
    z, _ = refine.refine_hyper(model, enc.y, rq, 20, ticks.update)
    assert ticks.n == 40 and z.dtype == z0.dtype and z.shape == z0.shape

    def cost(z_int):
        ref = refine.Refiner(model, torch.zeros(1, 3, 128, 128), 128, 128, enc.y, rq, z_int)
        s = torch.from_numpy(ref.symbols(ref.u0)).view(ref.u0.shape).float()
        return float((ref.u0 - s - ref.mean).square().sum()) + model_lambda(model) * 8 * (ref.file_bytes(s.int().numpy().ravel()) - container.OVERHEAD_BYTES)

    assert cost(z) <= cost(z0)



def test_a_move_s_expected_saving_counts_the_hyper_latent_s_own_bits_exactly():
    """`move_gains`: the y terms to first order plus the exact change of ẑ's code length, in
    the direction of the step it names (both directions are looked at)."""
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    enc = engine.Encoder(model, smooth_rgb(128, 128), "RGB")
    rq = 3 * engine.RATE_SCALE
    cost = refine.HyperCost(model, enc.y, model.gains(3.0)[0], rq)
    z = model.hyper_latent(cost.u)
    flat = z.flatten()
    assert float(refine._hyper_bits_each(model, z, rq).sum()) == pytest.approx(refine._hyper_bits(model, z, rq), rel=1e-5)

    zf = z.float().requires_grad_(True)
    cost.latent_surrogate(zf).backward()
    grad = zf.grad.flatten()
    gains, steps = cost.move_gains(z)
    for e in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:20].tolist():
        expected = []
        for step in (1, -1):
            moved = flat.clone()
            moved[e] += step
            z_bits = refine._hyper_bits(model, moved.view_as(z), rq) - refine._hyper_bits(model, z, rq)
            expected.append(-step * float(grad[e]) - cost.lam * z_bits)
        named = expected[0] if int(steps[e]) == 1 else expected[1]
        assert float(gains[e]) == pytest.approx(max(expected), rel=1e-4, abs=1e-3) == named


def test_moving_symbols_lowers_the_distortion_within_the_budget(kodak_crop):
    """`refine_symbols` from the one-pass symbols at h_a's ẑ: a file within [floor, budget] that
    decodes closer to the image than the one it started from."""
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    enc = engine.Encoder(model, kodak_crop, "RGB")
    x = engine._to_tensor(kodak_crop, "RGB")
    ref = refine.Refiner(model, x, 256, 256, enc.y, 3 * container.RATE_SCALE)
    start, size, d = ref.one_pass()
    budget = int(size) + 8
    ticks = Steps()
    moved = refine.refine_symbols(ref, start, budget, 0.97 * budget, 10, ticks.update, d)
    assert ticks.n == 10 and moved is not None and moved.dtype == np.int32
    assert 0.97 * budget <= ref.file_bytes(moved) <= budget - 4
    assert ref.distortion_of(moved) < d  # measured: 1.4% less squared error (+0.06 dB)


def test_code_length_changes_are_those_of_the_whole_latent_s_coded_tables(kodak_crop):
    """`_bit_changes`, computed pass by pass, gives every symbol's ±1 change of its own code
    length exactly as the tables and predictions the context makes of the whole latent
    (`context.coded_indices`), an escape's payload included, plus its effect on the labels of
    the symbols after it (`context.label_dependents`); the same values rounded in float16."""
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    enc = engine.Encoder(model, kodak_crop, "RGB")
    ref = refine.Refiner(model, engine._to_tensor(kodak_crop, "RGB"), 256, 256, enc.y, 3 * container.RATE_SCALE)
    symbols = ref.one_pass_symbols()
    up, down = refine._bit_changes(ref, symbols)
    sym = symbols.reshape(ref.shape[1:])
    idx, mean = context.coded_indices(model.context, sym, ref.idx_np.reshape(sym.shape))
    tables = rounding.bits_table(model)
    code_length = refine._escaped_code_lengths(torch.from_numpy(idx.astype(np.int64)), tables)

    def lengths(t, v):
        return refine._escaped_code_lengths(torch.from_numpy(t.astype(np.int64)), tables)(torch.from_numpy(v)).numpy()

    rise, fall = (torch.from_numpy(a) for a in context.label_dependents(model.context, sym, ref.idx_np.reshape(sym.shape), lengths))
    s = torch.from_numpy(sym)
    v = torch.from_numpy(sym.astype(np.int64) - mean)
    torch.testing.assert_close(up[0], code_length(v + 1) - code_length(v) + torch.where(s >= 0, rise, fall))
    torch.testing.assert_close(down[0], code_length(v - 1) - code_length(v) + torch.where(s <= 0, rise, fall))
    half = refine._bit_changes(ref, symbols, torch.float16)
    assert half[0].dtype == torch.float16
    torch.testing.assert_close(half[0].float(), up, atol=0.06, rtol=2e-3)


def test_a_move_s_code_length_change_is_the_file_s(kodak_crop):
    """For a symbol of a parity-1 pass (which no prediction reads) the change `_bit_changes` gives
    is the change of the whole file's ideal size, escapes and other symbols' labels included."""
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    enc = engine.Encoder(model, kodak_crop, "RGB")
    ref = refine.Refiner(model, engine._to_tensor(kodak_crop, "RGB"), 256, 256, enc.y, 3 * container.RATE_SCALE)
    symbols = ref.one_pass_symbols()
    up, down = (a.flatten().numpy() for a in refine._bit_changes(ref, symbols))
    parity = np.zeros(ref.shape[1:], dtype=np.int8)
    for p in context.passes(model.context):
        if p.parity == 1 and p.level != context.LL_LEVEL:
            context.put_pass(parity, p, np.ones(context.pass_values(parity, p).size, dtype=np.int8))
    candidates = np.flatnonzero(parity.ravel())
    base = 8 * ref.file_bytes(symbols)
    rng = np.random.default_rng(2)
    for i in rng.choice(candidates, 40, replace=False):
        for step, expected in ((1, up), (-1, down)):
            symbols[i] += step
            assert 8 * ref.file_bytes(symbols) - base == pytest.approx(float(expected[i]), abs=2e-3)
            symbols[i] -= step


def test_on_several_tiles_the_distortion_is_exact_and_the_gradient_close():
    """An image wider than one synthesis tile with its halo: the distortion, summed over the
    decoder's tiles, is the whole image's; the gradient, taken on smaller tiles with less context,
    is close to the whole image's (it only ranks the moves)."""
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    pixels = smooth_rgb(250, 1900)
    enc = engine.Encoder(model, pixels, "RGB")
    ref = refine.Refiner(model, engine._to_tensor(pixels, "RGB"), 250, 1900, enc.y, 3 * container.RATE_SCALE)
    assert len(ref.tiles) == 2
    symbols = ref.symbols(ref.u0)
    s = torch.from_numpy(symbols).view(ref.shape).float()
    with torch.no_grad():
        whole = float(ref.distortion(s))
    assert ref.distortion_of(symbols) == pytest.approx(whole, rel=1e-5)
    tiled = ref._tiled_gradient(s)
    exact = s.clone().requires_grad_(True)
    ref.distortion(exact).backward()
    cosine = float((tiled * exact.grad).sum() / (tiled.norm() * exact.grad.norm()))
    assert cosine > 0.999  # measured: 0.99995


def test_the_progress_bar_counts_synthesis_tiles_times_steps():
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    steps = refine.iterations(1, model)
    assert refine.iterations(1, model, 256, 256) == steps
    # 4032 x 3024: 252 x 192 latents on tiles of 64: 4 x 3.
    assert refine.tile_count(3024, 4032, model) == 12
    assert refine.iterations(1, model, 3024, 4032) == 12 * steps


def test_moved_symbols_are_one_per_position_and_never_neighbours():
    saving = torch.randn(1, 6, 12, 10, generator=torch.Generator().manual_seed(1))
    chosen = refine._spread(saving, 40)
    assert 0 < len(chosen) <= 40
    channel, position = chosen // (12 * 10), chosen % (12 * 10)
    rows, cols = position // 10, position % 10
    for i in range(len(chosen)):
        assert float(saving.flatten()[chosen[i]]) == float(saving[0, :, rows[i], cols[i]].max()) > 0
        for j in range(i):
            assert max(abs(rows[i] - rows[j]), abs(cols[i] - cols[j])) >= 2
    assert float(saving.flatten()[chosen[0]]) == float(saving.max())


def test_the_synthesis_energy_per_symbol_matches_its_impulse_responses():
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    energy = refine._symbol_energy(model)
    n, M = 24, model.config.M
    channels = torch.tensor([0, 1, 100, M - 1])
    impulses = torch.zeros(len(channels), M, n, n)
    impulses[torch.arange(len(channels)), channels, n // 2, n // 2] = 1.0
    with torch.no_grad():
        response = model.synthesis(impulses) - model.synthesis(torch.zeros(1, M, n, n))
    exact = response.square().sum(dim=(1, 2, 3)) * 255**2
    assert torch.allclose(energy[channels], exact, rtol=0.08)  # measured: within 7.2%


def test_a_fixed_rate_parameter_stays_fixed_when_refined(kodak_crop):
    q = 3.0
    plain = engine.encode_array(kodak_crop, "RGB", rate=q)
    refined = engine.encode_array(kodak_crop, "RGB", rate=q, effort=3)
    assert container.read_header(refined.data).rate_q == container.read_header(plain.data).rate_q
    assert len(refined.data) <= len(plain.data)
    assert psnr(kodak_crop, decoded(refined.data)) >= psnr(kodak_crop, decoded(plain.data))


def test_a_refined_one_pass_file_is_no_larger_than_the_unrefined_one():
    pixels = smooth_rgb(64, 96)
    lo, hi = engine.load_model(0).rate_range
    plain = engine.encode_array(pixels, "RGB", rate=(lo + hi) / 2, model_id=0)
    refined = engine.encode_array(pixels, "RGB", rate=(lo + hi) / 2, model_id=0, effort=1)
    assert len(refined.data) <= len(plain.data)
    assert psnr(pixels, decoded(refined.data)) >= psnr(pixels, decoded(plain.data))


def test_the_same_bytes_whatever_the_thread_count(kodak_crop, tmp_path):
    np.save(tmp_path / "crop.npy", kodak_crop)
    code = ("import sys, hashlib, numpy as np, torch; torch.set_num_threads(int(sys.argv[1])); import lcodec\n"
            "px = np.load(sys.argv[2]); print(hashlib.sha256(lcodec.encode(px, bpp=0.3, effort=1)).hexdigest())")
    children = [subprocess.Popen([sys.executable, "-c", code, threads, str(tmp_path / "crop.npy")],
                                 stdout=subprocess.PIPE) for threads in ("1", "2")]
    digests = [child.communicate(timeout=300)[0] for child in children]
    assert all(child.returncode == 0 for child in children)
    assert digests[0] == digests[1]


def test_images_over_the_pixel_limit_are_coded_at_effort_0_with_a_warning(monkeypatch):
    pixels = smooth_rgb(64, 64)
    monkeypatch.setattr(refine, "MAX_PIXELS", 64 * 64 - 1)
    plain = engine.encode_best(pixels, "RGB", size=ANY_SIZE)
    asked = engine.encode_best(pixels, "RGB", size=ANY_SIZE, effort=3)
    assert asked.data == plain.data
    assert "effort 3 does not apply" in asked.warning


@pytest.mark.parametrize("effort", [-1, 10, 2.0, True])
def test_an_effort_outside_0_to_9_is_refused(effort):
    with pytest.raises(ValueError, match="effort must be an integer from 0 to 9"):
        lcodec.encode(smooth_rgb(16, 16), size=ANY_SIZE, effort=effort)


def test_interrupted_refinement_leaves_no_file(tmp_path, no_leftovers):
    src = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(smooth_rgb(64, 64)).save(src)
    with pytest.raises(KeyboardInterrupt):
        lcodec.encode_file(src, tmp_path / "out.lc", size=2000, effort=9, progress=Steps(stop_after=3))
    no_leftovers(tmp_path, "in.png")


def test_the_cli_takes_an_effort(cli, rgb_png):
    result = cli("encode", rgb_png, "--size", "2000", "--effort", "2")
    assert result.exit_code == 0, result.output
    assert rgb_png.with_suffix(".lc").stat().st_size <= 2000
    refused = cli("encode", rgb_png, "--size", "2000", "--effort", "10", "-f")
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_weights_that_are_not_installed_refine_and_decode_with_themselves(tmp_path):
    """The encoder compares candidates by decoding them with the weights that made them."""
    copy = tmp_path / "interim.pt"
    copy.write_bytes(engine.MODELS[0].path.read_bytes())
    weights = engine.Weights.load(copy)
    pixels = smooth_rgb(64, 64)
    result = engine.encode_array(pixels, "RGB", size=3000, model_id=engine.DEFAULT_MODEL_ID, weights=weights,
                                 effort=1)
    assert len(result.data) <= 3000
    assert container.read_header(result.data).weights_digest == weights.digest4
    engine.decode_array(result.data, weights=weights)


def test_moved_symbols_are_one_per_position_in_each_block_of_channels():
    """With blocks (a lifting model's levels), each block moves at most one symbol per position
    and none at neighbouring positions, but two blocks may move symbols at the same place."""
    saving = torch.randn(1, 6, 12, 10, generator=torch.Generator().manual_seed(1)).abs()
    blocks = ((0, 2), (2, 6))
    chosen = refine._spread(saving, 1000, blocks)
    channel, position = chosen // (12 * 10), chosen % (12 * 10)
    rows, cols = position // 10, position % 10
    block = (channel >= 2).long()
    assert len(set(block.tolist())) == 2 and len(set(position.tolist())) < len(chosen)
    for i in range(len(chosen)):
        first, end = blocks[block[i]]
        assert float(saving.flatten()[chosen[i]]) == float(saving[0, first:end, rows[i], cols[i]].max())
        for j in range(i):
            if block[i] == block[j]:
                assert max(abs(rows[i] - rows[j]), abs(cols[i] - cols[j])) >= 2
    model = engine.load_model(engine.DEFAULT_MODEL_ID)
    assert refine._move_blocks(model) == ((0, 3), (3, 12), (12, 48), (48, 192), (192, 768))
