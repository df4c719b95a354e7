"""Rate control: the rate parameter whose file is as big as asked, and no bigger.

The whole policy lives here; `lcodec.engine` supplies one image's estimate and
encode functions, and `lcodec.api` checks the arguments (exactly one target, a
positive bpp or size) before any of this runs.

The file size is a step function of the integer rate parameter rq (q x 1024)
that rises with rq, within the part of the range where the search runs (see
`start`). The search works on a cheap estimate first -- g_a runs once; each
probe only re-runs what depends on q (the gain, h_a, the integer h_s and the
table costs, all at 1/16 resolution or less) -- then confirms with the real
coder, corrects the estimate by the measured ratio and probes again if the real
file is too big or more than `TOLERANCE` too small. `fit` runs the policy:

1. `target`: the byte budget from a bpp or a size, refused (before any work on
   the image) if this image's file could not even hold the header;
2. the first guess: where the levels' nominal rates put the target, log-linear
   between them (images differ from the levels' training crops by +-15% or so);
3. `start`: walking down from level 0 to where the estimate is under the target;
4. `search` from there up to the top of the range;
5. if no file from the start up is under the target, a second search from the
   smallest file; if that fails too, a `RateError` that names the smallest file;
6. a warning when the file is more than `TOLERANCE` under the target.

Each estimate and each real encode is made once per image: the walk, both
searches and the error message share them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .bitstream.container import OVERHEAD_BYTES, RATE_SCALE
from .errors import RateError

TOLERANCE = 0.03  # a file this much under the target gets a warning
MAX_ENCODES = 5  # real encodes per search
# The search takes the first estimate within this fraction under its aim, rather than probing on to
# the largest rq under it: at 0.25 bpp on Kodak that saved a third of the probes for ~0.4% of rate.
SLACK = 0.004


@dataclass(frozen=True)
class Target:
    """A byte budget for one image's whole file, header included."""

    bytes: int
    asked: str  # how messages name it, e.g. "0.25 bpp (12288 bytes)"
    width: int
    height: int


@dataclass(frozen=True)
class Fit:
    """The file rate control chose, and what choosing it cost."""

    rq: int
    data: bytes
    probes: int  # estimates made, the start's walk included
    encodes: int  # real encodes made
    warning: str | None  # the file is more than TOLERANCE under the target, and why


def target(width: int, height: int, *, bpp: float | None = None, size: int | None = None) -> Target:
    """The budget for a `width` x `height` image: floor(bpp * W * H / 8) bytes for a positive
    finite `bpp`, else `size` (a positive number of) bytes. Cheap: called before g_a runs, so
    that a budget below the header costs nothing."""
    pixels = width * height
    if bpp is not None:
        budget = math.floor(bpp * pixels / 8)
        asked = f"{bpp:g} bpp ({budget} bytes)"
    else:
        budget = int(size)
        asked = f"{budget} bytes ({8 * budget / pixels:.4g} bpp)"
    if budget <= OVERHEAD_BYTES:
        raise RateError(f"{asked} is too small for a {width}x{height} image: "
                        f"the .lc header alone takes {OVERHEAD_BYTES} bytes")
    return Target(budget, asked, width, height)


def fit(goal: Target, estimate_bytes: Callable[[int], float], encode: Callable[[int], bytes],
        lo: int, hi: int, levels: Sequence[float]) -> Fit:
    """The largest file <= goal.bytes that rq in [lo, hi] makes (and, where the model can, at least
    (1 - TOLERANCE) of it), by the policy in the module docstring.

    `estimate_bytes(rq)` predicts the file size, `encode(rq)` makes the real file; `levels` are the
    bpp the model's rate levels were trained for (level i at rq = i * RATE_SCALE). Raises
    `RateError` when no rq in the range makes a file that small.
    """
    memo = _Memo(estimate_bytes, encode)
    log_levels = np.log(levels)
    bpp = 8 * goal.bytes / (goal.width * goal.height)
    guess = round(RATE_SCALE * np.interp(math.log(bpp), log_levels, np.arange(len(log_levels))))
    first = start(memo.estimate, lo, goal.bytes)
    found = search(memo.estimate, memo.encode, goal.bytes, first, hi, guess=guess)
    if found is None:  # under the target nowhere from the start up: go on down to the smallest file
        bottom = start(memo.estimate, lo, 0)
        found = search(memo.estimate, memo.encode, goal.bytes, bottom, hi) if bottom < first else None
        if found is None:
            smallest = len(memo.encode(bottom))
            raise RateError(f"cannot reach {goal.asked} for this {goal.width}x{goal.height} image: the smallest "
                            f"file lcodec can make for it is {smallest} bytes "
                            f"({8 * smallest / (goal.width * goal.height):.4g} bpp)")
    rq, data = found
    warning = None
    if len(data) < (1 - TOLERANCE) * goal.bytes:
        warning = (f"the file is {len(data)} bytes, {100 * (1 - len(data) / goal.bytes):.1f}% under the "
                   f"{goal.asked} asked for: "
                   + ("the model's highest rate is reached" if rq == hi else
                      f"the rate steps of this small image are coarser than {100 * TOLERANCE:g}%"))
    return Fit(rq, data, len(memo.estimates), len(memo.files), warning)


class _Memo:
    """One image's estimates and real files by rq, each made once."""

    def __init__(self, estimate_bytes: Callable[[int], float], encode: Callable[[int], bytes]):
        self._estimate_bytes, self._encode = estimate_bytes, encode
        self.estimates: dict[int, float] = {}
        self.files: dict[int, bytes] = {}

    def estimate(self, rq: int) -> float:
        if rq not in self.estimates:
            self.estimates[rq] = self._estimate_bytes(rq)
        return self.estimates[rq]

    def encode(self, rq: int) -> bytes:
        if rq not in self.files:
            self.files[rq] = self._encode(rq)
        return self.files[rq]


def start(estimate: Callable[[int], float], lo: int, below: float) -> int:
    """Where the rate search starts: walking down from level 0 in quarter steps, the first rq
    whose estimated file is at most `below` bytes, else the one with the smallest file.

    Below level 0 the gains are extrapolated, and a channel whose gain falls from level 0
    to level 1 gets a larger gain there: the size can grow again towards the bottom of the
    range (an M = 256 hyperprior's did, from about q = -0.5 down). The search needs a range where the
    size rises with rq, so the walk stops where the size stops falling. A target at or
    above level 0's size costs no step at all (the search probes level 0 anyway)."""
    step = RATE_SCALE // 4
    rq = 0
    while estimate(rq) > below and rq - step >= lo and estimate(rq - step) < estimate(rq):
        rq -= step
    return rq


def largest_below(cost: Callable[[int], float], budget: float, lo: int, hi: int,
                  guess: int | None = None, spread: int = 256, slack: float = 0.0) -> int | None:
    """Largest rq in [lo, hi] with cost(rq) <= budget, assuming cost rises with rq -- or, with a
    `slack`, the first rq probed whose cost is within [(1 - slack) * budget, budget].

    False position on log-costs (the cost is close to exponential in q), with the
    Illinois step -- when one end of the bracket moves twice in a row, the other
    end's value is halved -- so that the bracket closes from both sides; it aims at the
    middle of the slack window, so that probes land in it rather than just past its top. With
    a `guess`, the bracket is first narrowed to guess +- spread where those probes allow: the
    cost is far from exponential across the whole range, close to it across a quarter of a
    level. If the cost at guess + spread is still under the budget, the bracket's top is
    extrapolated from the two probes (the log-cost's slope between them, `spread` / 2 past
    where it reaches the budget), up to `EXTRAPOLATIONS` times before hi itself is probed.
    Returns None if cost(lo) > budget.
    """
    if guess is not None:
        lo, hi = _narrow(cost, budget, lo, hi, guess, spread)
    c_lo = cost(lo)
    if c_lo > budget:
        return None
    c_hi = cost(hi)
    if c_hi <= budget:
        return hi
    # Invariant: cost(lo) <= budget < cost(hi). f = log(cost / aim): f_lo < 0 < f_hi, where
    # aim is the middle of the slack window (a probe inside the window returns at once).
    log_b = math.log(max(budget * (1 - slack / 2), 1e-9))
    f_lo, f_hi = math.log(max(c_lo, 1e-9)) - log_b, math.log(max(c_hi, 1e-9)) - log_b
    side = 0  # which end the last probe replaced: -1 lo, +1 hi
    while hi - lo > 1:
        frac = f_lo / (f_lo - f_hi) if f_hi > f_lo else 0.5
        mid = min(max(lo + int(round(frac * (hi - lo))), lo + 1), hi - 1)
        c = cost(mid)
        if (1 - slack) * budget <= c <= budget:
            return mid
        f = math.log(max(c, 1e-9)) - log_b
        if c <= budget:
            lo, f_lo = mid, f
            if side == -1:  # the same end twice: the Illinois step, so that the other end moves too
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = mid, f
            if side == 1:
                f_lo /= 2
            side = 1
    return lo


EXTRAPOLATIONS = 2  # steps past guess + spread before the search probes the top of the range


def _narrow(cost: Callable[[int], float], budget: float, lo: int, hi: int, guess: int, spread: int
            ) -> tuple[int, int]:
    """[lo, hi] narrowed around `guess` (see `largest_below`): the probes at guess - spread and
    guess + spread, then extrapolated tops while the cost stays under the budget."""
    below: tuple[int, float] | None = None  # the last probe under the budget
    for edge in (max(lo, guess - spread), min(hi, guess + spread)):
        if lo < edge < hi:
            c = cost(edge)
            if c > budget:
                return lo, edge
            if below is not None and c > below[1] > 0:
                slope = math.log(c / below[1]) / (edge - below[0])
                for _ in range(EXTRAPOLATIONS):
                    step = math.log(budget / c) / slope + spread // 2
                    nxt = min(edge + max(int(step), 1), hi)
                    if nxt >= hi:
                        break
                    c_next = cost(nxt)
                    if c_next > budget:
                        return edge, nxt
                    slope = math.log(c_next / c) / (nxt - edge) if c_next > c else slope
                    edge, c = nxt, c_next
            below = (edge, c)
            lo = edge
    return lo, hi


def search(estimate_bytes: Callable[[int], float], encode: Callable[[int], bytes], target_bytes: int,
           lo: int, hi: int, guess: int | None = None) -> tuple[int, bytes] | None:
    """(rq, file) of the largest file <= target_bytes (and, where the model can, >= (1 - TOLERANCE)
    of it) from rq in [lo, hi], with at most MAX_ENCODES real encodes.

    `estimate_bytes(rq)` predicts the file size, `encode(rq)` makes the real file; both are called
    again for the same rq, so they should remember (`fit` passes its memo). `guess` is where the
    answer probably lies (it saves probes, not changes the answer); later rounds guess the rq
    encoded last. Returns None when even rq = lo gives a file over the target.
    """
    ratio = 1.0  # real size / estimated size, learned from real encodes
    best: tuple[int, bytes] | None = None
    too_big_at: int | None = None
    encodes = 0
    aim = target_bytes * (1 - TOLERANCE / 4)  # aim a little below: estimates are within ~1%
    while encodes < MAX_ENCODES:
        top = hi if too_big_at is None else too_big_at - 1
        low = lo if best is None else best[0]
        if top < low:
            break
        rq = largest_below(lambda r: estimate_bytes(r) * ratio, aim, low, top, guess, slack=SLACK)
        if rq is None:
            rq = low
        if best is not None and rq == best[0]:
            break
        data = encode(rq)
        encodes += 1
        guess = rq
        size = len(data)
        ratio = size / max(estimate_bytes(rq), 1.0)
        if size > target_bytes:
            too_big_at = rq if too_big_at is None else min(too_big_at, rq)
            if rq == lo:
                return best
            continue
        if best is None or size > len(best[1]):
            best = (rq, data)
        if size >= (1 - TOLERANCE) * target_bytes or rq == hi:
            break
    if best is None:
        # Could not get under the target within MAX_ENCODES: fall back to the lowest rate.
        data = encode(lo)
        if len(data) > target_bytes:
            return None
        best = (lo, data)
    return best
