"""Rate control: the rate parameter whose file is as big as asked, and no bigger.

The whole policy lives here; `lcodec.engine` supplies one image's size functions,
and `lcodec.api` checks the arguments (exactly one target, a positive bpp or size)
before any of this runs.

The file size is a step function of the integer rate parameter rq (q x 1024)
that rises with rq, within the part of the range where the search runs (see
`start`), and whose logarithm is close to linear in rq over a few hundred steps.
A size comes at three prices:

* an estimate (`estimate_bytes`): g_a runs once; each probe re-runs only what
  depends on q (the gain, h_a, a float32 h_s, the table costs), on a large image
  only on a fixed sample of its latents, scaled by area. It is off by a factor
  that changes little with rq: ~0.1% on a whole latent, up to tens of per cent on a
  sample (the first measure corrects it);
* a measure (`measure_bytes`): the real encode's symbols and their exact code
  length, within a few bytes of the real file; an encode at the same rq reuses them;
* the real file (`encode`): its symbols, range-coded. Only it decides.

`fit` runs the policy:

1. `target`: the byte budget from a bpp or a size, refused (before any work on
   the image) if this image's file could not even hold the header;
2. the first guess: where the levels' nominal rates put the target, log-linear
   between them (the images' own rates differ from the levels' by up to 2x);
3. `solve` on the estimates, from level 0 up: a secant search on log size for the
   aim, a little under the target (`Aim`; closer where the estimates see the whole
   latent). Its first step follows the levels' curve; it stops once an estimate is
   within the aim's slack under it, or once the secant's next step is short and safe
   (`CLOSE`, `ACROSS`): that step is predicted, not probed;
4. `search`: a measure where `solve` stops; a measure under the target and at
   least (1 - `TOLERANCE`) of it is encoded, else every estimate is corrected by
   the ratio of the measure to the estimate at its rq and `solve` runs again,
   up to `MAX_MEASURES` times;
5. only if even level 0's estimate is over the target, `start` walks below it, and
   if no file from there up is under the target, a second search from the
   smallest file; if that fails too, a `RateError` that names the smallest file;
6. a warning when the file is more than `TOLERANCE` under the target.

Each estimate, measure and real encode is made once per image: the walk, every
round of both searches and the error message share them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .bitstream.container import OVERHEAD_BYTES, RATE_SCALE
from .errors import RateError

TOLERANCE = 0.03  # a file this much under the target gets a warning
# A step of at most CLOSE (in log size) from the nearest estimate is measured without probing it
# first, when the other end of the secant is at most CLOSE * ACROSS / (the step) from the aim: the
# secant's error is about half the product of its ends' distances to the aim (kodim13 at 1 bpp: 1%
# from 3% and 65%), so this keeps it to a few tenths of a per cent. On the 24 Kodak images at
# 0.12-1 bpp: 2.6 estimates a search and one measure (CLOSE 0.025: 2.8; without the ACROSS
# bound, 2.5 and a second measure at 1 bpp now and then).
CLOSE = 0.04
ACROSS = 0.2
MAX_PROBES = 16  # estimates per `solve`: on a cost that does not rise as assumed, it gives up
MAX_MEASURES = 5  # measures (real encodes' symbols) per search


@dataclass(frozen=True)
class Aim:
    """Where the search aims an image's file: `fraction` of the target, or, where that is closer,
    `close` of it less `coder_bytes`; an estimate within `slack` (a fraction) under the aim ends
    `solve`."""

    fraction: float
    slack: float
    close: float = 0.0
    coder_bytes: float = math.inf

    def of(self, target_bytes: float) -> float:
        return max(self.fraction * target_bytes, self.close * target_bytes - self.coder_bytes)


# Estimates on a sample of a large image are off by up to tens of per cent; the first measure
# corrects them to a few tenths of one, and one more probe would move the file by less.
SAMPLED = Aim(1 - TOLERANCE / 4, slack=0.004)
# Estimates of the whole latent are within ~0.1% of the ideal code length, and the coder adds a
# few bytes to it (up to 13 on 256x384 Kodak crops, 0.12-2 bpp): 0.25% and 16 bytes under the
# target, a 0.2% window. The 24 Kodak images' files land 0.3-0.4% under their targets at 1.5-2 bpp
# (0.8-1.2% with `SAMPLED`), with as many estimates and measures; below ~3200 bytes `SAMPLED`'s aim
# is the closer one.
WHOLE = Aim(1 - TOLERANCE / 4, slack=0.002, close=1 - 0.0025, coder_bytes=16)


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
    measures: int  # real encodes' symbols made (one per rq)
    encodes: int  # of those, range-coded into a file
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


def fit(goal: Target, estimate_bytes: Callable[[int], float], measure_bytes: Callable[[int], float],
        encode: Callable[[int], bytes], lo: int, hi: int, levels: Sequence[float], aim: Aim = WHOLE) -> Fit:
    """The largest file <= goal.bytes that rq in [lo, hi] makes (and, where the model can, at least
    (1 - TOLERANCE) of it), by the policy in the module docstring.

    `estimate_bytes(rq)` predicts the file size, `measure_bytes(rq)` gives the real encode's
    exact code length (and should keep its symbols for an `encode(rq)` that follows), `encode(rq)`
    makes the real file; `levels` are the bpp the model's rate levels were trained for (level i
    at rq = i * RATE_SCALE); `aim` is `SAMPLED` where the estimates see a sample of the latent.
    Raises `RateError` when no rq in the range makes a file that small.
    """
    memo = _Memo(estimate_bytes, measure_bytes, encode)
    curve = LevelCurve(levels)
    guess = round(curve.rq(math.log(8 * goal.bytes / (goal.width * goal.height))))
    # From level 0 up the size rises with rq; below it only where `start` finds it does.
    bottom = min(max(0, lo), hi)
    if solve(memo.estimate, aim.of(goal.bytes), bottom, hi, {}, guess, curve, aim.slack) is None:
        bottom = start(memo.estimate, lo, goal.bytes)
    found = search(memo, goal.bytes, bottom, hi, guess, curve, aim)
    if found is None:  # under the target nowhere from the start up: go on down to the smallest file
        smallest = start(memo.estimate, lo, 0)
        found = search(memo, goal.bytes, smallest, hi, smallest, curve, aim) if smallest < bottom else None
        if found is None:
            size = len(memo.encode(smallest))
            raise RateError(f"cannot reach {goal.asked} for this {goal.width}x{goal.height} image: the smallest "
                            f"file lcodec can make for it is {size} bytes "
                            f"({8 * size / (goal.width * goal.height):.4g} bpp)")
    rq, data = found
    warning = None
    if len(data) < (1 - TOLERANCE) * goal.bytes:
        warning = (f"the file is {len(data)} bytes, {100 * (1 - len(data) / goal.bytes):.1f}% under the "
                   f"{goal.asked} asked for: "
                   + ("the model's highest rate is reached" if rq == hi else
                      f"the rate steps of this small image are coarser than {100 * TOLERANCE:g}%"))
    return Fit(rq, data, len(memo.estimates), len(memo.measures), len(memo.files), warning)


class _Memo:
    """One image's estimates, measures and real files by rq, each made once."""

    def __init__(self, estimate_bytes: Callable[[int], float], measure_bytes: Callable[[int], float],
                 encode: Callable[[int], bytes]):
        self._estimate_bytes, self._measure_bytes, self._encode = estimate_bytes, measure_bytes, encode
        self.estimates: dict[int, float] = {}
        self.measures: dict[int, float] = {}
        self.files: dict[int, bytes] = {}

    def estimate(self, rq: int) -> float:
        if rq not in self.estimates:
            self.estimates[rq] = self._estimate_bytes(rq)
        return self.estimates[rq]

    def measure(self, rq: int) -> float:
        if rq not in self.measures:
            self.measures[rq] = len(self.files[rq]) if rq in self.files else self._measure_bytes(rq)
        return self.measures[rq]

    def encode(self, rq: int) -> bytes:
        if rq not in self.files:
            self.files[rq] = self._encode(rq)
        return self.files[rq]


class LevelCurve:
    """The levels' nominal log bpp as a function of rq: log-linear between the levels (level i at
    rq = i * RATE_SCALE), extended past the ends along the end levels' slopes. An image's own
    log size is this curve shifted, and bent a little: its first step and its first guess."""

    def __init__(self, levels: Sequence[float]):
        self._log = np.log(np.asarray(levels, dtype=np.float64))
        self._rq = RATE_SCALE * np.arange(len(levels), dtype=np.float64)

    def log_bpp(self, rq: float) -> float:
        return _extended(rq, self._rq, self._log)

    def rq(self, log_bpp: float) -> float:
        """The inverse of `log_bpp` (the levels' bpp rise)."""
        return _extended(log_bpp, self._log, self._rq)


def _extended(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """The piecewise-linear function through (xs, ys) (xs increasing) at x, extended past the ends
    along the end segments."""
    if x < xs[0]:
        return float(ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
    if x > xs[-1]:
        return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(np.interp(x, xs, ys))


def start(estimate: Callable[[int], float], lo: int, below: float) -> int:
    """Where the rate search starts when level 0 is too big: walking down from level 0 in quarter
    steps, the first rq whose estimated file is at most `below` bytes, else the one with the
    smallest file.

    Below level 0 the gains are extrapolated, and a channel whose gain falls from level 0
    to level 1 gets a larger gain there: the size can grow again towards the bottom of the
    range (an M = 256 hyperprior's did, from about q = -0.5 down). The search needs a range where the
    size rises with rq, so the walk stops where the size stops falling. A target at or
    above level 0's size costs no step below it."""
    step = RATE_SCALE // 4
    rq = 0
    while estimate(rq) > below and rq - step >= lo and estimate(rq - step) < estimate(rq):
        rq -= step
    return rq


def solve(cost: Callable[[int], float], aim: float, lo: int, hi: int, known: dict[int, float],
          guess: int, curve: LevelCurve, slack: float = WHOLE.slack) -> tuple[int, float] | None:
    """An rq in [lo, hi] for a file of `aim` bytes by `cost` (rising with rq), and its predicted
    cost: the first probed rq within `slack` under the aim, or the rq a step of at most `CLOSE`
    (in log size) from the nearest probe predicts (without probing it), or, where the cost steps
    past the window, the largest rq under the aim. None if cost(lo) > aim.

    `known` holds costs already known (by rq), used before any probe; `guess` is probed first
    unless they are. A secant on log cost through the two probes nearest the aim, kept inside the
    bracket where there is one; with one probe, a step along `curve`. It aims at the middle of
    the window, so that probes land in it rather than just past its top.
    """
    pts = {r: c for r, c in known.items() if lo <= r <= hi}
    log_mid = math.log(max(aim * (1 - slack / 2), 1e-9))

    def f(r: int) -> float:
        return math.log(max(pts[r], 1e-9)) - log_mid

    order: list[int] = []  # this call's probes, in order
    sides: list[int] = []  # the side of the aim each fell on: -1 under, +1 over
    if not pts:
        order.append(min(max(guess, lo), hi))
        pts[order[0]] = cost(order[0])
        sides.append(-1 if pts[order[0]] <= aim else 1)
    while True:
        # A bracket consistent with a rising cost: probes under the aim past its top are ignored.
        above = min((r for r, c in pts.items() if c > aim), default=None)
        below = max((r for r, c in pts.items() if c <= aim and (above is None or r < above)), default=None)
        if below is not None and pts[below] >= (1 - slack) * aim:
            return below, pts[below]
        if below == hi:
            return hi, pts[hi]
        if above == lo:
            return None
        if below is not None and above is not None and above - below <= 1 or len(sides) == MAX_PROBES:
            return None if below is None else (below, pts[below])
        # The two probes nearest the aim (in log size) give the slope; one probe, the curve's.
        near = sorted(pts, key=lambda r: abs(f(r)))[:2]
        r0 = near[0]
        secant = len(near) == 2 and (f(near[1]) - f(r0)) * (near[1] - r0) > 0
        if secant:
            slope = (f(near[1]) - f(r0)) / (near[1] - r0)
            x = r0 - f(r0) / slope
        else:  # along the levels' curve: the image's log size is about the curve's, shifted
            x = curve.rq(curve.log_bpp(r0) - f(r0))
        # Predicted (the line's cost there, at most the window's middle) when the secant's error,
        # about proportional to the product of its ends' distances to the aim, is small.
        if secant and abs(f(r0)) <= CLOSE and abs(f(r0) * f(near[1])) <= CLOSE * ACROSS:
            nxt = min(max(math.floor(x), lo if below is None else below + 1), hi if above is None else above - 1)
            return nxt, math.exp(log_mid + f(r0) + (nxt - r0) * slope)
        # Safeguards, so that a flat or bent cost costs a few probes more, not many: when a secant's
        # probe (the third on) came less than halfway to the aim from the one before, on the same
        # side, past one side at least as long a step again, inside a bracket its middle (also
        # where the secant leaves the bracket).
        stalled = len(order) >= 3 and sides[-1] == sides[-2] and abs(f(order[-1])) > abs(f(order[-2])) / 2
        if below is not None and above is not None:
            if stalled or not below < x < above:
                x = (below + above) / 2
        elif stalled:
            last, before = order[-1], order[-2]
            x = last + (last - before) * max((x - last) / (last - before), 1.0)
        # Strictly inside the bracket, or past the known side (no probe is there), and within [lo, hi].
        nxt = min(max(math.floor(x), lo if below is None else below + 1), hi if above is None else above - 1)
        pts[nxt] = cost(nxt)
        order.append(nxt)
        sides.append(-1 if pts[nxt] <= aim else 1)


def search(memo: _Memo, target_bytes: int, lo: int, hi: int, guess: int, curve: LevelCurve, aim: Aim = WHOLE
           ) -> tuple[int, bytes] | None:
    """(rq, file) of the largest file <= target_bytes (and, where the model can, >= (1 - TOLERANCE)
    of it) from rq in [lo, hi], with at most MAX_MEASURES measures.

    Each round `solve`s on the estimates times the ratio of the last measure to the estimate at
    its rq, seeded with every measure and every estimate made so far (so a round after a measure
    probes little). With estimates on a sample the first measure often misses, and corrects them:
    an estimate of the whole image would cost as much as a measure (12 MP: 2.8 s against 2.5 s),
    and a measure that lands is coded. `guess` is where the answer probably lies (it saves
    probes, not changes the answer). Returns None when even rq = lo gives a file over the target.
    """
    floor = (1 - TOLERANCE) * target_bytes
    ratio = 1.0  # measured size / estimated size, from the last measure
    under: tuple[int, float] | None = None  # the largest measure under the floor
    too_big_at: int | None = None
    for _ in range(MAX_MEASURES):
        top = hi if too_big_at is None else too_big_at - 1
        low = lo if under is None else under[0]
        if top < low:
            break
        known = {r: e * ratio for r, e in memo.estimates.items()} | memo.measures
        found = solve(lambda r: memo.estimate(r) * ratio, aim.of(target_bytes), low, top, known, guess, curve,
                      aim.slack)
        rq = found[0] if found is not None else low
        if under is not None and rq == under[0]:
            break
        size = memo.measure(rq)
        guess = rq
        if size <= target_bytes and (size >= floor or rq == hi):
            data = memo.encode(rq)
            if len(data) <= target_bytes:
                return rq, data
            size = memo.measures[rq] = len(data)  # the coder's last bytes took it over
        # A miss: the estimates' error at rq (an estimate there, if the measure was at a predicted rq).
        ratio = size / max(memo.estimate(rq), 1.0)
        if size > target_bytes:
            too_big_at = rq if too_big_at is None else min(too_big_at, rq)
            if rq == lo:
                return None
            continue
        if under is None or size > under[1]:
            under = (rq, size)
    # No file in the window within MAX_MEASURES: the largest measured under the target, else the lowest rate.
    return _encoded_under(memo, target_bytes, ([under[0]] if under else []) + [lo])


def _encoded_under(memo: _Memo, target_bytes: int, rqs: list[int]) -> tuple[int, bytes] | None:
    """The first of `rqs` whose real file is <= target_bytes, and that file; None if none is."""
    for rq in rqs:
        if memo.measure(rq) <= target_bytes:
            data = memo.encode(rq)
            if len(data) <= target_bytes:
                return rq, data
    return None
