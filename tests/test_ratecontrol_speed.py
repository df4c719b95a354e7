"""What rate control costs: a few estimates, one real encode's symbols (reused by the file), and
on a large image estimates on a sample of the latent -- with the same guarantees on the file."""

import pytest
import torch

from conftest import kodak_photo
from lcodec import engine

_photo = kodak_photo  # a Kodak crop, or a smooth synthetic stand-in where ../shared is absent


@pytest.fixture
def counted(monkeypatch):
    """Counts of the encoder's estimates, measures, range-coded payloads and symbols made again
    for a payload (not kept from a measure)."""
    calls = {"estimate": 0, "measure": 0, "payload": 0, "remade": 0}
    for name, key in (("_estimate", "estimate"), ("measure_bytes", "measure"), ("payload", "payload"),
                      ("_symbols", "remade")):
        original = getattr(engine.Encoder, name)

        def counting(self, *args, original=original, key=key, **kwargs):
            calls[key] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(engine.Encoder, name, counting)
    return calls


@pytest.mark.parametrize("name,bpp", [("kodim05.png", 0.25), ("kodim13.png", 1.0), ("kodim23.png", 0.5)])
def test_a_search_makes_a_few_estimates_and_computes_the_file_s_symbols_once(counted, name, bpp):
    """On Kodak crops: at most 5 estimates and 2 measures (a second where a step predicted from
    the estimates lands over the target: kodim13 at 1 bpp here, 2 of the 120 crops of the 24 at
    0.12-2 bpp), and the file range-codes the last measure's symbols instead of computing them
    again; the file is in [0.97, 1] of the target."""
    img = _photo(name, 256, 384)
    r = engine.encode_array(img, "RGB", bpp=bpp)
    assert 0.97 * r.target_bytes <= len(r.data) <= r.target_bytes
    assert r.probes <= 5 and r.encodes <= 2
    assert counted == {"estimate": r.probes, "measure": r.encodes, "payload": 1, "remade": 0}


def test_a_measure_is_the_real_file_s_size_within_a_few_bytes():
    img = _photo("kodim19.png", 192, 256)
    enc = engine.Encoder(engine.load_model(), img, "RGB")
    for rq in (2048, 4096, 6144):
        measured = enc.measure_bytes(rq)
        real = len(enc.file(rq, engine.DEFAULT_MODEL_ID, b"\0" * 4))
        assert abs(real - measured) <= 8 + 1e-4 * real


def test_the_sample_of_a_large_latent_is_spread_and_fixed():
    """A latent of more than 2 x SAMPLE_POSITIONS positions gets a sample of SAMPLE_POSITIONS,
    whose blocks come from every part of it (every block row, columns spread over the width,
    no block twice), the same every time; a smaller one, or one thinner than a block, none."""
    B = engine.SAMPLE_BLOCK
    y = torch.arange(192 * 252, dtype=torch.float32).view(1, 1, 192, 252)  # a 12 MP photo's latent grid
    sample, scale = engine.sample_latent(y)
    assert sample.shape[2] * sample.shape[3] == engine.SAMPLE_POSITIONS
    assert scale == pytest.approx(192 * 252 / engine.SAMPLE_POSITIONS)
    corners = sample[0, 0, ::B, ::B].ravel().long()  # each block's top-left position in y
    rows, cols = (corners // 252).tolist(), (corners % 252).tolist()
    assert sorted(set(rows)) == list(range(0, 192, B)) and len(set(zip(rows, cols))) == len(rows)
    assert max(cols) - min(cols) > 252 - 3 * B and len({c // (252 // 4) for c in cols}) == 4
    assert torch.equal(engine.sample_latent(y)[0], sample)
    assert engine.sample_latent(y[:, :, :96, :128]) is None  # 12288 positions: all of it
    assert engine.sample_latent(torch.zeros(1, 1, 8, 4096)) is None  # thinner than a block


@pytest.fixture
def small_samples(monkeypatch):
    """Samples small enough that a Kodak crop counts as a large image (4 blocks of 8x8 latents)."""
    monkeypatch.setattr(engine, "SAMPLE_POSITIONS", 256)
    monkeypatch.setattr(engine, "SAMPLE_BLOCK", 8)


@pytest.mark.parametrize("bpp", [0.25, 1.0])
def test_a_large_image_estimated_on_a_sample_still_meets_the_target(small_samples, counted, bpp):
    """Estimates on a sample are off by tens of per cent; the measures correct them: the file
    is in [0.97, 1] of the target after at most 3 measures, and only the chosen one is coded."""
    img = _photo("kodim08.png", 512, 768)
    enc = engine.Encoder(engine.load_model(), img, "RGB")
    assert enc._sample is not None
    r = engine.encode_array(img, "RGB", bpp=bpp)
    assert 0.97 * r.target_bytes <= len(r.data) <= r.target_bytes, r.warning
    assert r.encodes <= 3 and counted["payload"] == 1 and counted["measure"] == r.encodes and not counted["remade"]


def test_the_bytes_do_not_depend_on_the_thread_count(small_samples):
    """Same image and target, 1 or 2 torch threads: the same file (on a sample's estimates too)."""
    img = _photo("kodim21.png", 256, 768)
    assert engine.sample_latent(torch.zeros(1, 1, 16, 48)) is not None
    threads = torch.get_num_threads()
    files = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            files.append(engine.encode_array(img, "RGB", bpp=0.5).data)
    finally:
        torch.set_num_threads(threads)
    assert files[0] == files[1]
