"""Frozen entropy tables: the integer frequencies that define the .lc bitstream.

A `CdfTables` holds T discrete distributions over integers, each with an escape
symbol for values outside its range (see `bitstream/SPEC.md`, "Entropy coding").
They are built once, when a model is frozen (`gaussian_tables` for the
latents y, `pmf_tables` for the hyper-latents z), stored with the weights, and
never recomputed at coding time: the stored integers are what both encoder and
decoder use, so the floating-point maths that produced them does not have to be
reproducible across machines.

This module is pure numpy. `lcodec.bitstream.range_coder` is the only module
that turns these tables into coded bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import numpy as np

# Escaped values are coded as: bit length n of |v| (uniform over ESCAPE_LENGTH_ALPHABET
# values, of which 0..ESCAPE_MAX_BITS are valid), a sign bit when v != 0, and the n-1
# bits of |v| below its leading one. |v| must be below 2**ESCAPE_MAX_BITS.
ESCAPE_MAX_BITS = 24
ESCAPE_LENGTH_ALPHABET = 32
_ESCAPE_LENGTH_BITS = 5  # log2(ESCAPE_LENGTH_ALPHABET)

MAX_PRECISION = 24  # constriction's categorical models have 24 bits of precision
LOOKUP_CELLS = 1 << 23  # tables of at most this many (table, value) cells are looked up (`CdfTables.placed`)


@dataclass(frozen=True, eq=False)
class CdfTables:
    """T discrete distributions over integers, plus one escape symbol each.

    Table t covers the integers offsets[t] .. offsets[t] + lengths[t] - 1 (column
    k of its row is the value offsets[t] + k), and column lengths[t] is the escape
    symbol: "the value is outside this range and is coded separately".

    Invariants (checked on construction, so a `CdfTables` is always codable):
    * freqs is (T, S) uint32; row t uses columns 0..lengths[t], every used entry
      is >= 1, the used entries sum to exactly 2**precision, the rest are 0;
    * 1 <= precision <= 24 and 1 <= lengths[t] < S;
    * every value a table covers has |value| < 2**24 (the escape bound).

    The arrays are read-only copies. Equality is identity (arrays make value
    equality ambiguous); compare `to_arrays()` to compare contents.
    """

    freqs: np.ndarray  # (T, S) uint32
    offsets: np.ndarray  # (T,) int32
    lengths: np.ndarray  # (T,) int32
    precision: int

    def __post_init__(self) -> None:
        freqs = _int_array("freqs", self.freqs, ndim=2)
        offsets = _int_array("offsets", self.offsets, ndim=1)
        lengths = _int_array("lengths", self.lengths, ndim=1)
        precision = self.precision
        if isinstance(precision, np.ndarray):
            if precision.shape != () or not np.issubdtype(precision.dtype, np.integer):
                raise ValueError(f"precision must be an integer, got {precision!r}")
            precision = int(precision)
        if isinstance(precision, bool) or not isinstance(precision, (int, np.integer)):
            raise ValueError(f"precision must be an integer, got {precision!r}")
        precision = int(precision)
        if not 1 <= precision <= MAX_PRECISION:
            raise ValueError(f"precision must be in 1..{MAX_PRECISION}, got {precision}")
        T, S = freqs.shape
        if T == 0 or S < 2:
            raise ValueError(f"freqs must have at least one table and two columns, got shape {freqs.shape}")
        if offsets.shape != (T,) or lengths.shape != (T,):
            raise ValueError(f"offsets {offsets.shape} and lengths {lengths.shape} must both have shape ({T},)")
        if lengths.min() < 1 or lengths.max() >= S:
            raise ValueError(f"lengths must be in 1..{S - 1} (S - 1 = the widest table), got {lengths.min()}..{lengths.max()}")
        if lengths.max() + 1 >= (1 << MAX_PRECISION) - 1:
            raise ValueError(f"a table may have at most 2**{MAX_PRECISION} - 3 values")
        bound = 1 << ESCAPE_MAX_BITS
        if offsets.min() <= -bound or (offsets + lengths - 1).max() >= bound:
            raise ValueError(f"every tabulated value must have |value| < 2**{ESCAPE_MAX_BITS}")
        if freqs.min() < 0 or freqs.max() > 1 << precision:
            raise ValueError(f"frequencies must be in 0..2**precision")
        used = np.arange(S)[None, :] <= lengths[:, None]
        if np.any(freqs[used] < 1):
            raise ValueError("every used frequency (values and escape) must be >= 1")
        if np.any(freqs[~used] != 0):
            raise ValueError("frequencies beyond a table's escape column must be 0")
        sums = freqs.sum(axis=1)
        if np.any(sums != 1 << precision):
            bad = int(np.flatnonzero(sums != 1 << precision)[0])
            raise ValueError(f"table {bad} sums to {int(sums[bad])}, not 2**{precision}")
        for name, value, dtype in (("freqs", freqs, np.uint32), ("offsets", offsets, np.int32),
                                   ("lengths", lengths, np.int32)):
            value = np.array(value, dtype=dtype)  # a private copy
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "precision", precision)

    @property
    def num_tables(self) -> int:
        return int(self.freqs.shape[0])

    @cached_property
    def _bits(self) -> np.ndarray:
        """(T, S) float64: -log2(freq / 2**precision); +inf in unused columns."""
        with np.errstate(divide="ignore"):
            bits = self.precision - np.log2(self.freqs.astype(np.float64))
        bits.setflags(write=False)
        return bits

    def columns(self, symbols: np.ndarray, table_idx: np.ndarray) -> np.ndarray:
        """Column of every symbol in its table (int64): value - offset, or the escape column.

        Raises ValueError like `check_symbols`.
        """
        return self._columns(*self.check_symbols(symbols, table_idx))

    def _columns(self, symbols: np.ndarray, table_idx: np.ndarray) -> np.ndarray:
        return self.placed(symbols, table_idx)[0]

    def placed(self, symbols: np.ndarray, table_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(column of every symbol (int32), whether it is inside its table rather than escaped,
        and its flat cell of `_lookup`'s arrays, or None for tables too wide for a lookup), for
        symbols and indices that `check_symbols` passed."""
        lookup = self._lookup
        if lookup is None:
            offsets, lengths = self.offsets.astype(np.int64), self.lengths.astype(np.int64)
            length = lengths[table_idx]
            col = symbols - offsets[table_idx]
            inside = (col >= 0) & (col < length)
            return np.where(inside, col, length).astype(np.int32), inside, None
        low, width, columns, inside = lookup
        cell = symbols.astype(np.int64 if symbols.dtype.itemsize > 4 else np.int32)
        np.clip(cell, low, low + width - 1, out=cell)
        cell -= low
        cell += table_idx.astype(cell.dtype) * width
        return columns[cell], inside[cell], cell

    @cached_property
    def _lookup(self) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """(low, width, columns, inside): for every table t and every value v from low to
        low + width - 1, at flat cell t * width + v - low, v's column in table t (int32; the escape
        column where v is outside it) and whether v is inside. Every value below low or above
        low + width - 1 is outside every table, so it is looked up at the nearest end. None when
        that is more than `LOOKUP_CELLS` cells."""
        low = int(self.offsets.min()) - 1
        width = int((self.offsets + self.lengths).max()) - low + 1
        if self.num_tables * width > LOOKUP_CELLS:
            return None
        col = np.arange(low, low + width)[None, :] - self.offsets[:, None].astype(np.int64)
        inside = (col >= 0) & (col < self.lengths[:, None])
        columns = np.where(inside, col, self.lengths[:, None]).astype(np.int32)
        return low, width, columns.ravel(), inside.ravel()

    @cached_property
    def _cell_bits(self) -> np.ndarray:
        """`_bits` of every cell of `_lookup` (flat float64)."""
        _, width, columns, _ = self._lookup
        return self._bits[np.arange(self.num_tables).repeat(width), columns]

    def cost_bits(self, symbols: np.ndarray, table_idx: np.ndarray) -> float:
        """Ideal code length in bits of `symbols` coded with their tables, escapes included.

        This is -sum log2 p under the stored frequencies plus the exact payload of
        every escaped value; the range coder's output is within a few bytes of it
        (plus the tiny loss of mapping 2**precision to constriction's 24 bits).
        Raises ValueError for a value with |value| >= 2**24, like `encode`.
        """
        symbols, table_idx = self.check_symbols(symbols, table_idx)
        col, inside, cell = self.placed(symbols, table_idx)
        total = float((self._bits[table_idx, col] if cell is None else self._cell_bits[cell]).sum())
        if not inside.all():
            total += float(escape_payload_bits(symbols[~inside]).sum())
        return total

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The tables as plain arrays, for storing with the weights; `from_arrays` inverts it."""
        return {"freqs": self.freqs.copy(), "offsets": self.offsets.copy(), "lengths": self.lengths.copy(),
                "precision": np.array(self.precision, dtype=np.int32)}

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray | int]) -> "CdfTables":
        """Rebuild tables stored by `to_arrays`; raises ValueError if they are not valid tables."""
        missing = {"freqs", "offsets", "lengths", "precision"} - set(d)
        if missing:
            raise ValueError(f"entropy tables are missing {sorted(missing)}")
        precision = np.asarray(d["precision"])
        if precision.shape != () or not np.issubdtype(precision.dtype, np.integer):
            raise ValueError(f"precision must be an integer, got {d['precision']!r}")
        return cls(freqs=np.asarray(d["freqs"]), offsets=np.asarray(d["offsets"]),
                   lengths=np.asarray(d["lengths"]), precision=int(precision))

    def check_table_idx(self, table_idx: np.ndarray) -> np.ndarray:
        """table_idx, as int64 only if its own integer type does not fit in it (no copy of an
        int32 index array of a large image); ValueError unless it is a 1-D integer array with
        values in 0..T-1."""
        table_idx = np.asarray(table_idx)
        if table_idx.ndim != 1:
            raise ValueError(f"table_idx must be 1-D, got shape {table_idx.shape}")
        if table_idx.size and not np.issubdtype(table_idx.dtype, np.integer):
            raise ValueError(f"table_idx must be integers, got {table_idx.dtype}")
        if not np.can_cast(table_idx.dtype, np.int64):  # uint64: huge values turn negative and fail below
            table_idx = table_idx.astype(np.int64)
        if table_idx.size and (table_idx.min() < 0 or table_idx.max() >= self.num_tables):
            raise ValueError(f"table indices must be in 0..{self.num_tables - 1}, "
                             f"got {table_idx.min()}..{table_idx.max()}")
        return table_idx

    def check_symbols(self, symbols: np.ndarray, table_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(symbols, table_idx), each as int64 only if its own integer type does not fit in it (no
        copy of a large image's int32 symbols); ValueError unless they are 1-D integer arrays of equal
        length, every index is in 0..T-1 and every value has |value| < 2**24 (the escape bound)."""
        table_idx = self.check_table_idx(table_idx)
        symbols = np.asarray(symbols)
        if symbols.shape != table_idx.shape:
            raise ValueError(f"symbols {symbols.shape} and table_idx {table_idx.shape} must have the same shape")
        if symbols.size and not np.issubdtype(symbols.dtype, np.integer):
            raise ValueError(f"symbols must be integers, got {symbols.dtype}")
        if not np.can_cast(symbols.dtype, np.int64):  # uint64: huge values turn negative and fail below
            symbols = symbols.astype(np.int64)
        bound = 1 << ESCAPE_MAX_BITS
        if symbols.size and (symbols.min() <= -bound or symbols.max() >= bound):
            raise ValueError(f"cannot code a value with |value| >= 2**{ESCAPE_MAX_BITS}")
        return symbols, table_idx


def escape_payload_bits(values: np.ndarray) -> np.ndarray:
    """Bits the escape scheme spends on each value (after its escape symbol): 5 + sign + n-1."""
    m = np.abs(np.asarray(values, dtype=np.int64))
    n = bit_length(m)
    return _ESCAPE_LENGTH_BITS + (m > 0) + np.maximum(n - 1, 0)


def bit_length(m: np.ndarray) -> np.ndarray:
    """int.bit_length of every element of a non-negative int64 array below 2**53, exactly."""
    m = np.asarray(m, dtype=np.int64)
    n = np.zeros(m.shape, dtype=np.int64)
    nz = m > 0
    # frexp is exact for integers below 2**53: m = f * 2**e with 0.5 <= f < 1.
    n[nz] = np.frexp(m[nz].astype(np.float64))[1]
    return n


def quantize_pmf(pmf: np.ndarray, precision: int) -> np.ndarray:
    """Integer frequencies (int64, each >= 1, summing to 2**precision) for a float64 pmf row.

    Deterministic "one each, then largest remainder": every entry first gets 1,
    the other 2**precision - n counts are shared in proportion to pmf
    (floor of pmf * free), and the few counts left by the floors go one each to
    the entries with the largest fractional parts, ties to the lower index (a
    stable sort). Only float64 multiplications, floors and a stable argsort are
    involved, so the same pmf gives the same integers on every IEEE machine.
    """
    p = np.asarray(pmf, dtype=np.float64)
    n = p.size
    if p.ndim != 1 or n < 2 or not np.all(np.isfinite(p)) or p.min() < 0 or p.sum() <= 0:
        raise ValueError("a pmf row must be 1-D, finite, non-negative, with a positive sum and >= 2 entries")
    total = 1 << precision
    if n > total:
        raise ValueError(f"{n} entries cannot each get a count at precision {precision}")
    free = total - n
    share = p / p.sum() * free
    base = np.floor(share)
    freqs = 1 + base.astype(np.int64)
    left = total - int(freqs.sum())
    if left < 0:  # only if rounding in p / p.sum() pushed the floors over `free`: take the excess back
        order = np.argsort(share - base, kind="stable")  # smallest fractional parts first
        freqs[order[freqs[order] > 1][:-left]] -= 1
        left = total - int(freqs.sum())
    if left > 0:
        order = np.argsort(-(share - base), kind="stable")
        freqs[order[:left]] += 1
    assert int(freqs.sum()) == total and freqs.min() >= 1
    return freqs


def _assemble(rows: list[tuple[int, np.ndarray]], precision: int) -> CdfTables:
    """CdfTables from (offset, frequencies incl. escape) rows."""
    S = max(len(f) for _, f in rows)
    freqs = np.zeros((len(rows), S), dtype=np.uint32)
    for t, (_, f) in enumerate(rows):
        freqs[t, :len(f)] = f
    offsets = np.array([o for o, _ in rows], dtype=np.int32)
    lengths = np.array([len(f) - 1 for _, f in rows], dtype=np.int32)
    return CdfTables(freqs=freqs, offsets=offsets, lengths=lengths, precision=precision)


def _upper_tail(x: np.ndarray) -> np.ndarray:
    """Q(x) = P(N(0, 1) > x), accurate far into the tail (erfc, not 1 - Phi)."""
    return np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in np.asarray(x, dtype=np.float64).ravel()],
                    dtype=np.float64).reshape(np.shape(x))


def gaussian_tables(scales: np.ndarray, precision: int = 16, tail_mass: float = 1e-6) -> CdfTables:
    """One zero-mean discretised Gaussian table per scale (the y tables).

    p(k) = Phi((k + 1/2) / s) - Phi((k - 1/2) / s) for |k| <= K_s, where K_s is the
    smallest K >= 0 with 2 Q((K + 1/2) / s) < tail_mass (the mass outside the
    table); the escape symbol gets that outside mass (and at least one count).
    Then `quantize_pmf`. Q comes from `math.erfc`, so tables rebuilt on another
    platform could differ in a last bit; that is why they are stored, not rebuilt.
    """
    scales = np.asarray(scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales)) or scales.min() <= 0:
        raise ValueError("scales must be a non-empty 1-D array of positive numbers")
    if not 0 < tail_mass < 1:
        raise ValueError(f"tail_mass must be in (0, 1), got {tail_mass}")
    rows = []
    for s in scales:
        # Upper tail beyond k + 1/2 for k = 0, 1, ...; 40 standard deviations is far past any tail_mass.
        k = np.arange(int(math.ceil(40 * s)) + 2)
        tail = 2.0 * _upper_tail((k + 0.5) / s)
        if not np.any(tail < tail_mass):
            raise ValueError(f"tail_mass {tail_mass} is too small to reach")
        K = int(np.flatnonzero(tail < tail_mass)[0])
        # p(|k|) for k = 0..K from differences of the upper tail (accurate in the tails).
        q = _upper_tail((np.arange(K + 1) - 0.5) / s) - _upper_tail((np.arange(K + 1) + 0.5) / s)
        q[0] = 1.0 - 2.0 * _upper_tail(np.array([0.5 / s]))[0]
        pmf = np.concatenate([q[:0:-1], q, [tail[K]]])  # values -K..K, then the escape
        rows.append((-K, quantize_pmf(pmf, precision)))
    return _assemble(rows, precision)


def laplace_tables(scales: np.ndarray, precision: int = 16, tail_mass: float = 1e-6) -> CdfTables:
    """One zero-mean discretised Laplacian table per scale (diversity b; the y tables of a model
    trained with `likelihood="laplace"`).

    p(k) = F(k + 1/2) - F(k - 1/2) with F the Laplace(0, b) CDF, for |k| <= K_b, the smallest
    K >= 0 with exp(-(K + 1/2) / b) < tail_mass (the mass outside the table, which the escape
    symbol gets, at least one count). Then `quantize_pmf`. Stored with the weights, like the
    Gaussian tables.
    """
    scales = np.asarray(scales, dtype=np.float64)
    if scales.ndim != 1 or scales.size == 0 or not np.all(np.isfinite(scales)) or scales.min() <= 0:
        raise ValueError("scales must be a non-empty 1-D array of positive numbers")
    if not 0 < tail_mass < 1:
        raise ValueError(f"tail_mass must be in (0, 1), got {tail_mass}")
    rows = []
    for b in scales:
        K = max(0, int(math.floor(b * math.log(1 / tail_mass) - 0.5)) + 1)
        k = np.arange(1, K + 1)
        # For k >= 1: (e^{-(k-1/2)/b} - e^{-(k+1/2)/b}) / 2 = e^{-k/b} sinh(1/(2b)).
        q = np.exp(-k / b) * math.sinh(0.5 / b)
        centre = -math.expm1(-0.5 / b)
        tail = math.exp(-(K + 0.5) / b)
        pmf = np.concatenate([q[::-1], [centre], q, [tail]])  # values -K..K, then the escape
        rows.append((-K, quantize_pmf(pmf, precision)))
    return _assemble(rows, precision)


def pmf_tables(pmf: np.ndarray, support_start: int, precision: int = 16, tail_mass: float = 1e-6) -> CdfTables:
    """One table per row of `pmf` (T, S) over support_start .. support_start + S - 1 (the z tables).

    Each row's tails are trimmed: the longest prefix and the longest suffix each
    holding less than tail_mass / 2 are cut (at least one value is kept). The
    escape symbol gets the trimmed mass plus whatever the row is short of 1
    (mass outside the tabulated support), and at least one count. Then `quantize_pmf`.
    """
    pmf = np.asarray(pmf, dtype=np.float64)
    if pmf.ndim != 2 or pmf.shape[0] == 0 or pmf.shape[1] == 0:
        raise ValueError(f"pmf must be (T, S) with T, S >= 1, got shape {pmf.shape}")
    if not np.all(np.isfinite(pmf)) or pmf.min() < 0:
        raise ValueError("pmf must be finite and non-negative")
    if not 0 < tail_mass < 1:
        raise ValueError(f"tail_mass must be in (0, 1), got {tail_mass}")
    rows = []
    for t, row in enumerate(pmf):
        if row.sum() <= 0:
            raise ValueError(f"pmf row {t} has no mass")
        head = np.cumsum(row)
        tail = np.cumsum(row[::-1])
        lo = int(np.count_nonzero(head < tail_mass / 2))  # leading entries to cut
        hi = row.size - int(np.count_nonzero(tail < tail_mass / 2))  # one past the last kept
        if lo >= hi:  # all the mass is below the cut: keep the most likely value
            lo = int(np.argmax(row))
            hi = lo + 1
        kept = row[lo:hi]
        escape = max(0.0, row.sum() - kept.sum()) + max(0.0, 1.0 - row.sum())
        rows.append((int(support_start) + lo, quantize_pmf(np.concatenate([kept, [escape]]), precision)))
    return _assemble(rows, precision)


def _int_array(name: str, value, ndim: int) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got {a.dtype}")
    return a.astype(np.int64)
