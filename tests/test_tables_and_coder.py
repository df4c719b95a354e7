"""Claims about the frozen tables and the range coder (bitstream/SPEC.md, "Entropy coding")."""

from __future__ import annotations

import hashlib
import math

import constriction
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcodec.bitstream import range_coder
from lcodec.bitstream.range_coder import Decoder, encode
from lcodec.bitstream.tables import (CdfTables, escape_payload_bits, gaussian_tables, pmf_tables,
                                     quantize_pmf)
from lcodec.errors import CorruptFileError

SCALES = np.exp(np.linspace(math.log(0.11), math.log(256.0), 64))  # as in lcodec.models.training.freeze


@pytest.fixture(scope="module")
def y_tables() -> CdfTables:
    return gaussian_tables(SCALES)


def upper_tail(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def laplace_pmf(T: int, lo: int, hi: int) -> np.ndarray:
    """Discretised Laplace pmfs (T scales) over lo..hi; the mass beyond lo..hi is left out."""
    k = np.arange(lo, hi + 1, dtype=np.float64)
    r = np.exp(-1 / np.linspace(0.3, 6.0, T))[:, None]
    return (1 - r) / (1 + r) * r ** np.abs(k)


# Fully integer tables, so the golden bytes depend only on the coder, not on erfc or numpy.
GOLDEN_TABLES = CdfTables(
    freqs=np.array([[10, 100, 120, 25, 1, 0, 0],
                    [200, 30, 15, 6, 3, 1, 1]], dtype=np.uint32),
    offsets=np.array([-2, 1], dtype=np.int32), lengths=np.array([4, 6], dtype=np.int32), precision=8)
GOLDEN_WIDE = CdfTables(freqs=np.array([[1, 400, 64000, 1134, 1]], dtype=np.uint32),
                        offsets=np.array([-1], dtype=np.int32), lengths=np.array([4], dtype=np.int32), precision=16)
GOLDEN_SYMBOLS = np.array([0, -1, 1, -2, 2, 7, 0, -5, 1, 3, 6, 5, 2**24 - 1, -(2**24 - 1), 123456, 1, 1, 2])
GOLDEN_INDEX = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1])
GOLDEN_PAYLOAD = "9cfb049392222cc55606730853d93fdfc209ffffffffff7a97070aa8765d661dc37a0991"


def golden_payload() -> bytes:
    return encode([(GOLDEN_SYMBOLS, GOLDEN_INDEX, GOLDEN_TABLES),
                   (np.array([1, 0, 0, -1, 2, 40]), np.zeros(6, dtype=np.int64), GOLDEN_WIDE)])


# --- tables -------------------------------------------------------------------------------------


def test_gaussian_tables_invariants(y_tables):
    t = y_tables
    assert t.num_tables == 64 and t.precision == 16
    for i, s in enumerate(SCALES):
        n = int(t.lengths[i])
        row = t.freqs[i]
        assert row[: n + 1].sum() == 2**16 and row[: n + 1].min() >= 1 and not row[n + 1:].any()
        K = -int(t.offsets[i])
        assert n == 2 * K + 1
        # K is the smallest half-width whose outside mass is below tail_mass.
        assert 2 * upper_tail((K + 0.5) / s) < 1e-6
        assert K == 0 or 2 * upper_tail((K - 0.5) / s) >= 1e-6
        # Quantising to 16 bits costs little: KL(discretised Gaussian || table) is small.
        k = np.abs(np.arange(-K, K + 1))
        p = np.array([upper_tail((v - 0.5) / s) - upper_tail((v + 0.5) / s) if v else 1 - 2 * upper_tail(0.5 / s)
                      for v in k])
        assert (p * np.log2(p / (row[: 2 * K + 1] / 2**16))).sum() < 0.02


def test_tables_are_deterministic(y_tables):
    again = gaussian_tables(SCALES)
    for key, value in y_tables.to_arrays().items():
        np.testing.assert_array_equal(value, again.to_arrays()[key])


@settings(max_examples=100, deadline=None)
@given(p=st.lists(st.floats(0, 1e3), min_size=2, max_size=300).filter(lambda v: sum(v) > 0),
       precision=st.integers(9, 24))
def test_quantize_pmf_is_one_each_then_largest_remainder(p, precision):
    f = quantize_pmf(np.array(p), precision)
    assert f.sum() == 2**precision and f.min() >= 1
    share = np.array(p) / sum(p) * (2**precision - len(p))
    assert np.all(np.abs(f - 1 - share) < 1 + 1e-6)


def test_pmf_tables_trim_tails_into_the_escape():
    pmf = laplace_pmf(5, -40, 40)
    t = pmf_tables(pmf, -40)
    for i, row in enumerate(pmf):
        lo = int(t.offsets[i]) + 40
        hi = lo + int(t.lengths[i])
        assert row[:lo].sum() < 0.5e-6 and row[hi:].sum() < 0.5e-6  # trimmed mass below tail_mass
        assert row[:lo + 1].sum() >= 0.5e-6 and row[hi - 1:].sum() >= 0.5e-6  # and no more than that
        assert t.freqs[i, : t.lengths[i] + 1].sum() == 2**16
        outside = 1 - row[lo:hi].sum()  # trimmed tails and the mass beyond -40..40
        assert abs(int(t.freqs[i, t.lengths[i]]) - outside * 2**16) <= 2
    # A row that is all in one value keeps just that value.
    one = pmf_tables(np.array([[0.0, 0.0, 1.0, 0.0]]), 10)
    assert (int(one.offsets[0]), int(one.lengths[0])) == (12, 1)


def test_tables_survive_storage(y_tables):
    arrays = y_tables.to_arrays()
    again = CdfTables.from_arrays({k: v for k, v in arrays.items() if k != "precision"} | {"precision": 16})
    assert again.cost_bits(np.arange(-50, 50), np.arange(100) % 64) == y_tables.cost_bits(
        np.arange(-50, 50), np.arange(100) % 64)
    assert CdfTables.from_arrays(arrays).precision == 16
    with pytest.raises(ValueError):
        y_tables.freqs[0, 0] = 5  # read-only


def _golden_arrays(**change):
    d = GOLDEN_TABLES.to_arrays()
    d.update(change)
    return d


@pytest.mark.parametrize("change", [
    dict(freqs=np.array([[10, 100, 120, 25, 2, 0, 0], [200, 30, 15, 6, 3, 1, 1]])),  # row sums to 257
    dict(freqs=np.array([[10, 100, 121, 25, 0, 0, 0], [200, 30, 15, 6, 3, 1, 1]])),  # a used zero
    dict(freqs=np.array([[10, 100, 120, 24, 1, 1, 0], [200, 30, 15, 6, 3, 1, 1]])),  # counts past the escape
    dict(freqs=np.array([[10.0, 100, 120, 25, 1, 0, 0], [200, 30, 15, 6, 3, 1, 1]])),  # floats
    dict(lengths=np.array([4, 7])),  # no room for the escape
    dict(lengths=np.array([4])),  # shape mismatch
    dict(offsets=np.array([-2, 2**24 - 3])),  # values past the escape bound
    dict(precision=25),
    dict(precision=np.array(8.0)),
])
def test_from_arrays_rejects_invalid_tables(change):
    with pytest.raises(ValueError):
        CdfTables.from_arrays(_golden_arrays(**change))


# --- range coder --------------------------------------------------------------------------------


def test_round_trip_several_items_with_escapes(y_tables):
    rng = np.random.default_rng(1)
    z_tables = pmf_tables(laplace_pmf(8, -60, 60), -60)
    z = np.round(rng.laplace(0, 2, 8 * 30)).astype(np.int64)
    z_idx = np.repeat(np.arange(8), 30)
    z[[0, 5, 77]] = [2**24 - 1, -(2**24 - 1), -70]  # far outside the tables, both signs

    def y_index(z_decoded):  # the second item's tables follow from the first item's symbols
        return (np.abs(np.resize(z_decoded, 500)) * 7) % 64

    y_idx = y_index(z)
    y = np.round(rng.normal(0, SCALES[y_idx])).astype(np.int64)
    y[[1, 2, 3, 4]] = [1000, -1000, 2**23, -(2**23) - 5]
    y_small = np.flatnonzero(SCALES[y_idx] < 0.2)[:2]
    y[y_small] = [3, -2]  # just outside the narrowest tables (which cover -1..1)
    data = encode([(z, z_idx, z_tables), (np.array([], dtype=np.int64), np.array([], dtype=np.int64), y_tables),
                   (y, y_idx, y_tables)])
    dec = Decoder(data)
    z_hat = dec.decode(z_idx, z_tables)
    np.testing.assert_array_equal(z_hat, z)
    assert dec.decode(np.array([], dtype=np.int64), y_tables).shape == (0,)
    y_hat = dec.decode(y_index(z_hat), y_tables)
    dec.finish()
    assert y_hat.dtype == np.int32
    np.testing.assert_array_equal(y_hat, y)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**24) + 1, 2**24 - 1), st.integers(0, 1)), max_size=60),
       st.lists(st.integers(-3, 3), max_size=20))
def test_round_trip_any_values(pairs, wide):
    symbols = np.array([v for v, _ in pairs], dtype=np.int64)
    index = np.array([t for _, t in pairs], dtype=np.int64)
    items = [(symbols, index, GOLDEN_TABLES), (np.array(wide, dtype=np.int64), np.zeros(len(wide), np.int64),
                                               GOLDEN_WIDE)]
    data = encode(items)
    assert not data.endswith(b"\0")
    dec = Decoder(data)
    np.testing.assert_array_equal(dec.decode(index, GOLDEN_TABLES), symbols)
    np.testing.assert_array_equal(dec.decode(np.zeros(len(wide), np.int64), GOLDEN_WIDE), wide)
    dec.finish()


def test_nothing_codes_to_nothing():
    assert encode([]) == b""
    dec = Decoder(b"")
    assert dec.decode(np.zeros(0, np.int64), GOLDEN_TABLES).size == 0
    dec.finish()


@pytest.mark.parametrize("symbols, index", [
    ([2**24], [0]), ([-(2**24)], [1]),  # beyond the escape bound
    ([0, 1], [0]),  # lengths differ
    ([0], [2]), ([0], [-1]),  # no such table
    ([0.5], [0]),  # not integers
])
def test_encode_rejects_what_the_format_cannot_hold(symbols, index):
    with pytest.raises(ValueError):
        encode([(np.array(symbols), np.array(index), GOLDEN_TABLES)])


def test_cost_bits_matches_coded_size(y_tables):
    rng = np.random.default_rng(2)
    index = rng.integers(0, 64, 100_000)
    symbols = np.round(rng.normal(0, SCALES[index]) * 1.05).astype(np.int64)  # slightly off-model
    symbols[:50] = rng.integers(-5000, 5000, 50)  # and some escapes
    bits = y_tables.cost_bits(symbols, index)
    coded = 8 * len(encode([(symbols, index, y_tables)]))
    assert abs(coded - bits) <= 0.01 * bits + 8 * 8
    assert escape_payload_bits(np.array([0, 1, -1, 2, 7, -(2**24 - 1)])).tolist() == [5, 6, 6, 7, 8, 29]


def test_golden_bytes():
    """The exact payload of a fixed input. If this fails after a dependency update, the
    update changed the bitstream: do not adopt it (see SPEC.md, "Pinned")."""
    payload = golden_payload()
    assert payload.hex() == GOLDEN_PAYLOAD
    assert hashlib.sha256(payload).hexdigest() == "e6a8927d5ff4f02b1de496d248ca73b6293490d11aaa260e2dabc846b612271b"


def test_constriction_cdf_matches_spec_formula():
    """SPEC.md: CDF24_k = floor(C_k (2^24 - n) / 2^P) + k. Probe each boundary through a
    fresh decoder, whose first symbol is the one whose interval holds point // (2^40 - 1)."""
    for tables in (GOLDEN_TABLES, GOLDEN_WIDE):
        for t in range(tables.num_tables):
            n = int(tables.lengths[t]) + 1
            f = tables.freqs[t, :n].astype(np.int64)
            C = np.concatenate([[0], np.cumsum(f)])
            cdf24 = (C * (2**24 - n)) // 2**tables.precision + np.arange(n + 1)
            assert cdf24[-1] == 2**24
            model = range_coder._model(tables, t)
            for k in range(1, n):
                for quantile, expected in ((cdf24[k], k), (cdf24[k] - 1, k - 1)):
                    point = int(quantile) * (2**40 - 1)
                    words = np.array([point >> 32, point & 0xFFFFFFFF], dtype=np.uint32)
                    assert constriction.stream.queue.RangeDecoder(words).decode(model) == expected


def test_finish_detects_leftover_data():
    payload = golden_payload()
    dec = Decoder(payload + b"\x5a" * 12)
    dec.decode(GOLDEN_INDEX, GOLDEN_TABLES)
    dec.decode(np.zeros(6, np.int64), GOLDEN_WIDE)
    with pytest.raises(CorruptFileError):
        dec.finish()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_payload_raises_corrupt_or_decodes(garbage):
    dec = Decoder(garbage)
    try:
        out = dec.decode(GOLDEN_INDEX, GOLDEN_TABLES)
        assert out.dtype == np.int32 and out.shape == GOLDEN_INDEX.shape
        assert np.abs(out.astype(np.int64)).max() < 2**24
        dec.decode(np.zeros(50, np.int64), GOLDEN_WIDE)
        dec.finish()
    except CorruptFileError:
        pass


def test_decoder_stays_failed_after_corruption():
    dec = Decoder(b"\xff" * 64)  # decodes escapes whose bit length is out of range
    with pytest.raises(CorruptFileError):
        for _ in range(20):
            dec.decode(np.ones(30, np.int64), GOLDEN_TABLES)
    with pytest.raises(CorruptFileError):
        dec.decode(GOLDEN_INDEX, GOLDEN_TABLES)
