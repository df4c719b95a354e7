"""Rate control: find the rate parameter that makes the file exactly as big as asked.

The file size is a step function of the integer rate parameter rq (q x 1024)
that rises with rq. The search works on a cheap estimate first -- g_a runs once;
each probe only re-runs what depends on q (the gain, h_a, the integer h_s and
the table costs, all at 1/16 resolution or less) -- then confirms with the real
coder, corrects the estimate by the measured ratio and probes again if the
real file is too big or more than `tolerance` too small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class SearchResult:
    rq: int
    data: bytes
    probes: int  # estimate evaluations
    encodes: int  # real encodes


def largest_below(cost: Callable[[int], float], budget: float, lo: int, hi: int,
                  guess: int | None = None, spread: int = 256) -> int | None:
    """Largest rq in [lo, hi] with cost(rq) <= budget, assuming cost rises with rq.

    False position on the bracket (the cost is close to exponential in q, so
    interpolating log-costs converges in a few probes), falling back to
    bisection whenever interpolation stalls. With a `guess`, the bracket is
    first narrowed to guess +- spread where those probes allow: the cost is
    far from exponential across the whole range, close to it across a
    quarter of a level. Returns None if cost(lo) > budget.
    """
    if guess is not None:
        for edge in (max(lo, guess - spread), min(hi, guess + spread)):
            if lo < edge < hi:
                if cost(edge) <= budget:
                    lo = edge
                else:
                    hi = edge
                    break
    c_lo = cost(lo)
    if c_lo > budget:
        return None
    c_hi = cost(hi)
    if c_hi <= budget:
        return hi
    # Invariant: cost(lo) <= budget < cost(hi).
    log_b = math.log(max(budget, 1e-9))
    bisect = False
    while hi - lo > 1:
        if bisect:
            mid = (lo + hi) // 2
        else:
            a, b = math.log(max(c_lo, 1e-9)), math.log(max(c_hi, 1e-9))
            frac = (log_b - a) / (b - a) if b > a else 0.5
            mid = lo + int(round(frac * (hi - lo)))
            mid = min(max(mid, lo + 1), hi - 1)
        c = cost(mid)
        if c <= budget:
            bisect = (mid - lo) < (hi - lo) // 8  # small step: interpolation is stalling
            lo, c_lo = mid, c
        else:
            bisect = (hi - mid) < (hi - lo) // 8
            hi, c_hi = mid, c
    return lo


def search(estimate_bytes: Callable[[int], float], encode: Callable[[int], bytes], target_bytes: int,
           lo: int, hi: int, tolerance: float = 0.03, max_encodes: int = 5, guess: int | None = None
           ) -> SearchResult | None:
    """Largest file <= target_bytes (and, where the model can, >= (1 - tolerance) * target).

    `estimate_bytes(rq)` predicts the file size, `encode(rq)` makes the real file.
    `guess` is where the answer probably lies (it saves probes, not changes the
    answer); later rounds guess the rq encoded last. Returns None when even
    rq = lo gives a file over the target.
    """
    cache: dict[int, float] = {}

    def est(rq: int) -> float:
        if rq not in cache:
            cache[rq] = estimate_bytes(rq)
        return cache[rq]

    ratio = 1.0  # real size / estimated size, learned from real encodes
    best: tuple[int, bytes] | None = None
    too_big_at: int | None = None
    encodes = 0
    aim = target_bytes * (1 - tolerance / 4)  # aim a little below: estimates are within ~1%
    while encodes < max_encodes:
        top = hi if too_big_at is None else too_big_at - 1
        low = lo if best is None else best[0]
        if top < low:
            break
        rq = largest_below(lambda r: est(r) * ratio, aim, low, top, guess)
        if rq is None:
            rq = low
        if best is not None and rq == best[0]:
            break
        data = encode(rq)
        encodes += 1
        guess = rq
        size = len(data)
        ratio = size / max(est(rq), 1.0)
        if size > target_bytes:
            too_big_at = rq if too_big_at is None else min(too_big_at, rq)
            if rq == lo:
                return None if best is None else SearchResult(best[0], best[1], len(cache), encodes)
            continue
        if best is None or size > len(best[1]):
            best = (rq, data)
        if size >= (1 - tolerance) * target_bytes or rq == hi:
            break
    if best is None:
        # Could not get under the target within max_encodes: fall back to the lowest rate.
        data = encode(lo)
        encodes += 1
        if len(data) > target_bytes:
            return None
        best = (lo, data)
    return SearchResult(best[0], best[1], len(cache), encodes)
