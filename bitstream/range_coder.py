"""The entropy coder: integer symbols + frozen tables <-> one range-coder stream.

This is the only module of lcodec that imports `constriction` (STYLE: one
module owns the entropy coder). It takes numpy integers and `CdfTables` and
returns bytes; the layout of the stream is specified in `bitstream/SPEC.md`,
"Entropy coding", and this code follows it step by step:

* one `constriction.stream.queue.RangeEncoder` (32-bit words, 64-bit state)
  codes all items in order;
* within an item, the symbols are grouped by table index (ascending), each group
  in increasing position order, one vectorised call per group; values outside a
  table's range are coded as its escape symbol;
* after an item's groups come its escaped values: their bit lengths, then the
  signs of the non-zero ones, then their low bits (all in position order);
* the words are written big-endian and trailing zero bytes are dropped (the
  decoder reads missing bytes as zeros, exactly as constriction reads missing words).

An item as big as a large image's latent (10^8 symbols for an 8K image with 768
latent channels) is worked through in runs of at most `CHUNK` positions: beyond
its input, only the coding order (int32) and, when decoding, the symbols are as
long as the item. Coding a group in several calls with the same model gives the
same stream as one call.

Everything that changes the bits is pinned: `perfect=False` and `lazy=False`
for `Categorical`, probabilities passed as float64 (so constriction's 24-bit
CDF is an exact integer function of the stored frequencies), and
constriction >=0.5,<0.6 in pyproject.toml, with a golden-bytes test.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import NoReturn

import constriction
import numpy as np

from ..errors import CorruptFileError
from .tables import ESCAPE_LENGTH_ALPHABET, ESCAPE_MAX_BITS, CdfTables, bit_length

__all__ = ["encode", "Decoder"]

_WORD = np.dtype(">u4")  # the payload is a sequence of big-endian 32-bit words

# Per-table constriction models, built on first use and kept as long as the tables live.
_MODELS: "weakref.WeakKeyDictionary[CdfTables, list]" = weakref.WeakKeyDictionary()
_ESCAPE_LENGTH_MODEL = constriction.stream.model.Uniform(ESCAPE_LENGTH_ALPHABET)
_SIGN_MODEL = constriction.stream.model.Uniform(2)
_LOW_BITS_FAMILY = constriction.stream.model.Uniform()  # size = 2**(n - 1), given per symbol
CHUNK = 1 << 22  # positions per run: bounds the 64-bit temporaries to a few tens of MB


def _model(tables: CdfTables, t: int):
    """The constriction model of table t: categorical over columns 0..lengths[t] (the last is the escape)."""
    models = _MODELS.get(tables)
    if models is None:
        models = [None] * tables.num_tables
        _MODELS[tables] = models
    if models[t] is None:
        n = int(tables.lengths[t]) + 1
        # float64 holds the integer frequencies and constriction's scaling of them exactly (SPEC.md).
        probabilities = tables.freqs[t, :n].astype(np.float64)
        models[t] = constriction.stream.model.Categorical(probabilities, lazy=False, perfect=False)
    return models[t]


def _grouping(table_idx: np.ndarray, num_tables: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The coding order of an item: positions sorted by (table, position), and its groups.

    Returns (order, groups) where groups lists (t, start, end) for every table in
    use, ascending t; order[start:end] are the positions coded with table t.
    A stable sort of each run of CHUNK positions, merged run by run into order.
    """
    n = table_idx.size
    order = np.empty(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
    runs = [(a, table_idx[a:a + CHUNK]) for a in range(0, n, CHUNK)]
    run_counts = [np.bincount(key, minlength=num_tables) for _, key in runs]
    counts = np.sum(run_counts, axis=0) if runs else np.zeros(num_tables, dtype=np.int64)
    ends = np.cumsum(counts)
    filled = ends - counts  # where each table's next positions go
    for (a, key), c in zip(runs, run_counts):
        # uint16 sorts in linear time; stable: positions stay in increasing order within a group
        local = np.argsort(key.astype(np.uint16 if num_tables <= 1 << 16 else np.int64), kind="stable")
        local_ends = np.cumsum(c)
        for t in np.flatnonzero(c):
            order[filled[t]:filled[t] + c[t]] = local[local_ends[t] - c[t]:local_ends[t]] + a
            filled[t] += c[t]
    groups = [(int(t), int(ends[t] - counts[t]), int(ends[t])) for t in np.flatnonzero(counts)]
    return order, groups


def encode(items: Iterable[tuple[np.ndarray, np.ndarray, CdfTables]]) -> bytes:
    """Code every (symbols, table_idx, tables) item, in order, into one stream. Items are taken
    one at a time, so a generator keeps only the item being coded alive.

    symbols and table_idx are 1-D integer arrays of equal length; table_idx[i]
    selects the table of symbols[i]. Raises ValueError for malformed input or a
    value with |value| >= 2**24, which the format cannot represent.
    """
    encoder = constriction.stream.queue.RangeEncoder()
    for symbols, table_idx, tables in items:
        symbols, table_idx = tables.check_symbols(symbols, table_idx)
        if symbols.size == 0:
            continue
        order, groups = _grouping(table_idx, tables.num_tables)
        # An item of at most CHUNK positions is placed in its tables at once, a larger one run by run.
        whole = tables.placed(symbols, table_idx) if symbols.size <= CHUNK else None
        escaped = []
        for t, start, end in groups:
            for a in range(start, end, CHUNK):
                positions = order[a:min(a + CHUNK, end)]
                if whole is not None:
                    columns = whole[0][positions]
                else:
                    columns = tables.placed(symbols[positions], table_idx[positions])[0]
                    escaped.append(positions[columns == tables.lengths[t]])
                encoder.encode(columns.astype(np.int32, copy=False), _model(tables, t))
        del order
        # In position order.
        escaped = symbols[~whole[1]] if whole is not None else symbols[np.sort(np.concatenate(escaped))]
        escaped = escaped.astype(np.int64)
        if escaped.size:
            _encode_escapes(encoder, escaped)
    words = encoder.get_compressed().astype(_WORD)
    return words.tobytes().rstrip(b"\0")


def _encode_escapes(encoder, values: np.ndarray) -> None:
    magnitude = np.abs(values)
    n = bit_length(magnitude)
    encoder.encode(n.astype(np.int32), _ESCAPE_LENGTH_MODEL)
    nonzero = magnitude > 0
    if nonzero.any():
        encoder.encode((values[nonzero] < 0).astype(np.int32), _SIGN_MODEL)
    wide = n >= 2
    if wide.any():
        sizes = (1 << (n[wide] - 1)).astype(np.int32)
        low_bits = (magnitude[wide] - sizes).astype(np.int32)
        encoder.encode(low_bits, _LOW_BITS_FAMILY, sizes)


class Decoder:
    """Decodes a stream made by `encode`, one item at a time.

    The caller decodes item k, uses its symbols (e.g. to compute the table
    indices of item k + 1 from the hyper-latents), then decodes item k + 1 with
    the same indices and tables the encoder used, and calls `finish()` after the
    last item. Any failure that damaged data can cause raises CorruptFileError;
    a decode never allocates more than its table_idx array implies.
    """

    def __init__(self, data: bytes):
        data = bytes(data)
        padded = data + b"\0" * (-len(data) % _WORD.itemsize)
        words = np.frombuffer(padded, dtype=_WORD).astype(np.uint32)
        self._decoder = constriction.stream.queue.RangeDecoder(words)
        self._failed = False

    def decode(self, table_idx: np.ndarray, tables: CdfTables) -> np.ndarray:
        """The item's symbols (int32, in position order) for the given table indices.

        Raises ValueError if table_idx is malformed (a caller bug) and
        CorruptFileError if the stream does not decode.
        """
        table_idx = tables.check_table_idx(table_idx)
        self._check_usable()
        order, groups = _grouping(table_idx, tables.num_tables)
        # Group by group, straight into the output: a large image has a latent as big as its
        # pixel count, so every full-size temporary here costs several bytes per pixel.
        symbols = np.empty(table_idx.size, dtype=np.int32)
        escaped = []
        for t, start, end in groups:
            for a in range(start, end, CHUNK):
                b = min(a + CHUNK, end)
                coded = self._decode(_model(tables, t), b - a)
                positions = order[a:b]
                symbols[positions] = coded + tables.offsets[t]
                escaped.append(positions[coded == tables.lengths[t]])
        del order
        escaped = np.sort(np.concatenate(escaped)) if escaped else np.empty(0, dtype=np.int64)  # position order
        if escaped.size:
            values = self._decode_escapes(escaped.size)
            t = table_idx[escaped]
            lo, n = tables.offsets[t].astype(np.int64), tables.lengths[t].astype(np.int64)
            if np.any((values >= lo) & (values < lo + n)):
                self._fail("an escaped value lies inside its table's range")
            symbols[escaped] = values  # |value| < 2**ESCAPE_MAX_BITS: fits in int32
        return symbols

    def _decode(self, model, *args) -> np.ndarray:
        """One vectorised constriction decode; CorruptFileError if the stream does not decode."""
        try:
            return self._decoder.decode(model, *args)
        except BaseException as e:
            self._raise_corrupt(e)

    def _decode_escapes(self, count: int) -> np.ndarray:
        n = self._decode(_ESCAPE_LENGTH_MODEL, count).astype(np.int64)
        if n.max() > ESCAPE_MAX_BITS:
            self._fail(f"an escaped value has {int(n.max())} bits (at most {ESCAPE_MAX_BITS} are allowed)")
        magnitude = np.zeros(count, dtype=np.int64)
        magnitude[n > 0] = 1 << (n[n > 0] - 1)
        negative = np.zeros(count, dtype=bool)
        nonzero = n > 0
        if nonzero.any():
            negative[nonzero] = self._decode(_SIGN_MODEL, int(nonzero.sum())) == 1
        wide = n >= 2
        if wide.any():
            sizes = (1 << (n[wide] - 1)).astype(np.int32)
            magnitude[wide] += self._decode(_LOW_BITS_FAMILY, sizes)
        return np.where(negative, -magnitude, magnitude)

    def finish(self) -> None:
        """Check that the stream ended where the last item did; CorruptFileError if data is left over.

        constriction cannot always tell (a range coder has no end marker), so this
        catches most but not all trailing garbage; the container's CRC catches the rest.
        """
        self._check_usable()
        try:
            exhausted = self._decoder.maybe_exhausted()
        except BaseException as e:
            self._raise_corrupt(e)
        if not exhausted:
            self._fail("data is left over after the last symbol")

    def _check_usable(self) -> None:
        if self._failed:
            raise CorruptFileError("the compressed data is corrupt (an earlier part failed to decode).")

    def _fail(self, why: str) -> NoReturn:
        self._failed = True
        raise CorruptFileError(f"the compressed data is corrupt: {why}.")

    def _raise_corrupt(self, e: BaseException) -> NoReturn:
        # constriction reports invalid data as AssertionError, ValueError, KeyError or a
        # pyo3 PanicException (a BaseException); all of them mean the same thing here.
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError)):
            raise e
        self._failed = True
        raise CorruptFileError("the compressed data is corrupt: the entropy decoder rejected it.") from e
