"""Tables place symbols by a lookup of (table, value) cells where it is small enough, else by
arithmetic on their offsets and lengths: the same columns, escapes, code lengths and streams."""

import numpy as np
import pytest

from lcodec import engine
from lcodec.bitstream import range_coder, tables


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_a_lookup_places_symbols_as_arithmetic_does(dtype, monkeypatch):
    looked_up = engine.load_model(engine.DEFAULT_MODEL_ID).y_tables
    rng = np.random.default_rng(1)
    idx = rng.integers(0, looked_up.num_tables, 20000).astype(np.uint8)
    sym = np.round(rng.laplace(0, 3, idx.size)).astype(np.int64)
    sym[::50] = rng.integers(-32767, 32768, sym[::50].size)  # escapes on both sides
    sym = sym.astype(dtype)
    assert looked_up._lookup is not None
    monkeypatch.setattr(tables, "LOOKUP_CELLS", 0)
    computed = tables.CdfTables(looked_up.freqs, looked_up.offsets, looked_up.lengths, looked_up.precision)
    assert computed._lookup is None
    assert np.array_equal(looked_up.columns(sym, idx), computed.columns(sym, idx))
    assert looked_up.cost_bits(sym, idx) == computed.cost_bits(sym, idx)
    assert (range_coder.encode([(sym, idx, looked_up)]) == range_coder.encode([(sym, idx, computed)])
            == range_coder.encode([(sym.astype(np.int64), idx, computed)]))
    monkeypatch.setattr(range_coder, "CHUNK", 999)  # run by run
    assert range_coder.encode([(sym, idx, looked_up)]) == range_coder.encode([(sym, idx, computed)])


@pytest.mark.parametrize("model_id", [0, engine.DEFAULT_MODEL_ID])
def test_a_scale_s_table_index_by_lookup_is_the_searched_one(model_id):
    """Every integer scale from below 0 to past 2^24, and far outside, gets the index a search
    of the thresholds gives."""
    import torch

    from lcodec.models.integer_hyper import _cell_counts, table_index

    thresholds = engine.load_model(model_id).scale_thresholds
    assert _cell_counts(thresholds.numpy().tobytes()) is not None
    scales = torch.cat([torch.arange(-5, (1 << 24) + 6), torch.tensor([-2**40, 2**40, 2**53])])
    expected = torch.searchsorted(thresholds[:-1].contiguous(), scales, out_int32=True)
    assert torch.equal(table_index(scales, thresholds), expected)


def test_thresholds_a_lookup_does_not_fit_are_searched():
    import torch

    from lcodec.models.integer_hyper import _cell_counts, table_index

    scales = torch.arange(-50, 3000)
    for thresholds in ([-10, 5, 100, 2000], [3, 3, 9, 20], [1, 2, 3, 2**25], [5, 100, 100], [1000, 1001, 5000]):
        thresholds = torch.tensor(thresholds)
        expected = torch.searchsorted(thresholds[:-1].contiguous(), scales, out_int32=True)
        assert torch.equal(table_index(scales, thresholds), expected)
    assert _cell_counts(torch.tensor([1000, 1001, 5000]).numpy().tobytes()) is None  # one cell, two thresholds
