"""Tables place symbols by a lookup of (table, value) cells where it is small enough, else by
arithmetic on their offsets and lengths: the same columns, escapes, code lengths and streams."""

import numpy as np
import pytest

from lcodec import engine
from lcodec.bitstream import range_coder, tables


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_a_lookup_places_symbols_as_arithmetic_does(dtype, monkeypatch):
    looked_up = engine.load_model(12).y_tables
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
