"""Drive a peer codec to a byte budget by searching its quality knob.

Peers have no rate control, so "the same target" means: the highest quality
whose real file is no larger than the budget. Assuming file size grows with
quality, that quality is the unique index `i` with size(i) <= budget <
size(i+1), which is what bisection finds. To spend fewer encodes on a 2-core
machine the search reaches the same answer faster: it starts from a hint (the
index chosen for the previous image), gallops outwards to a bracket, then
narrows it by false position on log(size) -- size is close to exponential in
quality -- falling back to a bisection step whenever an interpolation step
fails to halve the bracket. Probes are memoised per (image, codec), so the
targets of one image share their encodes and brackets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    data: bytes
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class SearchResult:
    index: int  # into the codec's quality list
    probe: Probe
    status: str  # "ok" | "overshoot" (lowest quality too big) | "undershoot" (highest quality fits)
    encodes: int  # new encodes this search ran (memo hits are free)


class Prober:
    """Memoised, timed encodes of one image at quality indices."""

    def __init__(self, encode_at: Callable[[int], bytes], n: int) -> None:
        if n < 1:
            raise ValueError("empty quality range")
        self._encode_at = encode_at
        self.n = n
        self.memo: dict[int, Probe] = {}

    def __call__(self, index: int) -> Probe:
        if index not in self.memo:
            w0, c0 = time.perf_counter(), time.process_time()
            data = self._encode_at(index)
            self.memo[index] = Probe(data, time.perf_counter() - w0, time.process_time() - c0)
        return self.memo[index]

    def size(self, index: int) -> int:
        return len(self(index).data)


def _interpolate(lo: int, hi: int, s_lo: int, s_hi: int, budget: int) -> int:
    """Index between lo and hi where log(size) reaches log(budget) on the chord."""
    if s_hi <= s_lo or s_lo <= 0:
        return (lo + hi) // 2
    f = (math.log(budget) - math.log(s_lo)) / (math.log(s_hi) - math.log(s_lo))
    return min(hi - 1, max(lo + 1, lo + math.floor(f * (hi - lo))))


def search(prober: Prober, budget: int, hint: int | None = None) -> SearchResult:
    """Highest quality index whose file is at most `budget` bytes (see the module doc)."""
    before = len(prober.memo)
    n = prober.n

    def result(index: int, status: str) -> SearchResult:
        return SearchResult(index, prober(index), status, len(prober.memo) - before)

    fits = [i for i, p in prober.memo.items() if len(p.data) <= budget]
    lo = max(fits) if fits else None
    over = [i for i, p in prober.memo.items() if len(p.data) > budget and (lo is None or i > lo)]
    hi = min(over) if over else None
    if lo is None and hi is None:
        start = n // 2 if hint is None else min(n - 1, max(0, hint))
        if prober.size(start) <= budget:
            lo = start
        else:
            hi = start
    step = max(1, n // 16)
    while lo is None:  # gallop down to a quality that fits
        assert hi is not None
        if hi == 0:
            return result(0, "overshoot")
        g = max(0, hi - step)
        if prober.size(g) <= budget:
            lo = g
        else:
            hi = g
        step *= 2
    while hi is None:  # gallop up to a quality that does not fit
        if lo == n - 1:
            return result(n - 1, "undershoot")
        g = min(n - 1, lo + step)
        if prober.size(g) > budget:
            hi = g
        else:
            lo = g
        step *= 2
    # Invariant: size(lo) <= budget < size(hi), lo < hi.
    slow = 0
    while hi - lo > 1:
        width = hi - lo
        g = (lo + hi) // 2 if slow >= 1 else _interpolate(lo, hi, prober.size(lo), prober.size(hi), budget)
        if prober.size(g) <= budget:
            lo = g
        else:
            hi = g
        slow = slow + 1 if hi - lo > width // 2 else 0
    return result(lo, "ok")
