"""The frozen model: what the codec runs. Produced by `lcodec.models.training.freeze`.

A frozen weights file holds the float transforms (g_a, g_s, h_a, the rate
gains) in fp16, the hyper-synthesis h_s as integer layers, and the entropy
tables (one per scale bucket for y, one per channel for z) as integer
frequencies. Loading checks the SHA-256 of the file against the model table;
the runtime refuses a file without tables.

Data flow at encode time (q = rate parameter, see `RateGains`)::

    x ─pad─► g_a ─► y ─× gain(q)─► y_g ─► h_a ─round─► ẑ ─IntegerHyperSynthesis─► (mean_int, scale_int)
                                    │                                                 │
                                    └──── s = round(y_g − mean) ◄── mean = mean_int / 2^16
                                                       idx = table_index(scale_int)

and at decode time ŷ = (s + mean) × inv_gain(q) ─► g_s ─► post-filter(q) ─crop─► x̂
(the post-filter only where the model has one, `ModelConfig.postfilter`). A reduced-size decode
(`synthesize_reduced`, lifting models) needs only y's coarse channels and skips the post-filter::

    ŷ[:C] × inv_gain(q)[:C] ─► g_s down to level k ─► shift by (2^k − 1) / 2^(k+1) ─crop─► x̂ at 1/2^k

g_a and g_s run in tiles (`run_tiled`), a lifting model's larger than one tile level by level, each
level in tiles with the halo of its own reach (`_analyze_by_levels`, `_inverse_levels`); h_s runs in
tiles too (`hyper_tiles`), h_a in bands of rows (`hyper_analysis_bands`). Tiles are computed side by side with one thread per operation.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..bitstream.tables import CdfTables
from ..errors import ModelMismatchError, ModelNotFrozenError
from .context import LL_CHANNELS, SubbandContext
from .integer_hyper import OUT_BITS, ApproximateHyperSynthesis, IntegerHyperSynthesis, table_index, written
from .lifting import (LATENT_CHANNELS, LEVEL_REACH, WAVELET_LEVELS, InverseLifting, LiftingTransform, coarse_dwt,
                      reduced_channels)
from .networks import AnalysisTransform, HyperAnalysisTransform, ModelConfig, SynthesisTransform, interpolate_levels
from .postfilter import PostFilter
from .registry import sha256_file

FROZEN_FORMAT = "lcodec-frozen-1"
PAD = 64  # g_a downsamples by 16 and h_a by 4 more
TILE_LATENTS = 64  # g_a and g_s run on tiles of 64x64 latents (1024x1024 pixels) ...
HALO_LATENTS = 4  # ... each read with 4 extra latents (64 pixels) of context on every side
LEVEL_TILE_LATENTS = 32  # a lifting g_a or g_s computed level by level runs on tiles of at most 32x32 latents
LIFTING_HALO_LATENTS = 12  # the lifting transform reaches further (see test_lifting_tiles_are_exact) ...
COARSE_HALO_LATENTS = (0, 4, 12)  # ... and its coarse levels further still: 9 taps of LL4, then of LL5
FINEST_HALO = 2  # latents of context of g_s's finest level with the post-filter (`_synthesize_by_levels`) ...
POSTFILTER_CONTEXT = 16  # ... of which the post-filter reads this many pixels (its reach is 8)
HYPER_TILE = 32  # h_s runs on tiles of 32x32 hyper-latents (2048x2048 pixels) ...
HYPER_HALO = 3  # ... with 3 of context: a hyper-latent reaches 2 of them (measured), so tiling is exact
HYPER_ANALYSIS_POSITIONS = 96 * 256  # h_a runs on an even number of bands of at most this many latents ...
HYPER_ANALYSIS_HALO = 8  # ... each read with 8 rows of y above and below: a row of ẑ reaches 7 either side


def lifting_halo(coarse_levels: int) -> int:
    """The halo, in latents, of the lifting transform's tiles (a multiple of 4: the coarse
    levels' blocks of 2^coarse_levels latents stay aligned)."""
    return LIFTING_HALO_LATENTS + COARSE_HALO_LATENTS[coarse_levels]


class Tile(NamedTuple):
    """One tile of a grid of cells: the rows and columns it owns, and the rows and columns it is
    computed from (its own plus up to a halo of context on every side, clipped at the edges)."""

    rows: slice
    cols: slice
    read_rows: slice
    read_cols: slice


def tiles(H: int, W: int, tile: int, halo: int) -> list[Tile]:
    """The tiles of an H x W grid, row by row, each `tile` x `tile` cells (less at the bottom and right
    edges) read with `halo` cells of context; one tile reading everything if the grid fits in one
    tile with its halo."""
    if H <= tile + 2 * halo and W <= tile + 2 * halo:
        return [Tile(slice(0, H), slice(0, W), slice(0, H), slice(0, W))]
    return [Tile(slice(top, min(top + tile, H)), slice(left, min(left + tile, W)),
                 slice(max(top - halo, 0), min(top + tile + halo, H)), slice(max(left - halo, 0), min(left + tile + halo, W)))
            for top in range(0, H, tile) for left in range(0, W, tile)]


def run_tiled(fn, x: torch.Tensor, scale: int, tile: int, halo: int, inverse: bool, workers: int = 1) -> torch.Tensor:
    """Apply a fully convolutional `fn` tile by tile so memory stays bounded.

    `x` is on the input grid of `fn`; the output grid is `scale` times finer
    (`inverse`, g_s) or coarser (g_a). Each tile is computed from its region
    plus `halo` input cells of context (wider than the receptive field), and
    only the tile's own region of the output is kept, so there are no seams.
    `tile` and `halo` are in input cells and must keep the latent grid aligned.
    Up to `workers` tiles are computed at once (`map_tiles`).
    """
    _, _, H, W = x.shape
    grid = tiles(H, W, tile, halo)
    if len(grid) == 1:
        return fn(x)
    f = (lambda v: v * scale) if inverse else (lambda v: v // scale)

    def one_tile(t: Tile) -> torch.Tensor:
        y = fn(x[:, :, t.read_rows, t.read_cols])
        top, left = t.read_rows.start, t.read_cols.start
        return y[:, :, f(t.rows.start - top):f(t.rows.stop - top), f(t.cols.start - left):f(t.cols.stop - left)]

    out = None

    def place(t: Tile, crop: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = torch.empty(1, crop.shape[1], f(H), f(W), dtype=crop.dtype)
        out[:, :, f(t.rows.start):f(t.rows.stop), f(t.cols.start):f(t.cols.stop)] = crop

    map_tiles(one_tile, place, grid, workers)
    return out


def map_tiles(compute, place, grid: list[Tile], workers: int) -> None:
    """place(tile, compute(tile)) for every tile of `grid`, in order, computing up to `workers`
    tiles at once in threads (torch releases the GIL), so that at most that many tiles'
    activations are alive together."""
    step = max(workers, 1)
    with ThreadPoolExecutor(max_workers=max(step - 1, 1)) as pool:
        for i in range(0, len(grid), step):
            group = grid[i:i + step]
            # This thread computes the first tile of a group itself. Memory a thread frees stays in its
            # malloc arena, where only that thread finds it again: g_a in a worker thread left 450 MB
            # there (8K, lifting model), and g_s in workers only did not reuse what this thread had
            # freed (8K decode, model 6: 2.0-2.1 GB peak RSS instead of 1.7-1.8 GB).
            others = [pool.submit(compute, t) for t in group[1:]]
            results = [compute(group[0])] + [other.result() for other in others]
            for t, result in zip(group, results):
                place(t, result)


_threads_outside: int | None = None  # torch's thread count outside the outermost block below


@contextmanager
def one_thread_per_operation():
    """Run torch operations single-threaded inside the block; yields the thread count from
    before the outermost such block (nested blocks, e.g. the synthesis inside an encode, get
    the same count for their tiles).

    A convolution's result can depend on how its work is split between threads
    (measured: +-1 in a few of a million pixels between 1, 2 and 4 threads). One
    thread per operation makes the synthesis a fixed sequence of float operations,
    so a file decodes to the same pixels whatever the thread setting; the
    parallelism comes from computing tiles side by side instead.
    """
    global _threads_outside
    before = torch.get_num_threads()
    outermost = _threads_outside is None
    if outermost:
        _threads_outside = before
    torch.set_num_threads(1)
    try:
        yield _threads_outside
    finally:
        torch.set_num_threads(before)
        if outermost:
            _threads_outside = None


def worker_threads() -> int:
    """How many threads work side by side on tiles or parts: torch's thread count, or inside
    `one_thread_per_operation` the count from before it."""
    return torch.get_num_threads() if _threads_outside is None else _threads_outside


def release_free_memory() -> None:
    """Give the pages that glibc's malloc holds free back to the system (`malloc_trim`; nothing
    elsewhere). A tile's temporaries are below malloc's mmap threshold, so their pages stay in
    the arenas when freed, and the arenas of the tiles' worker threads are not reused by other
    threads: called between the phases of a large encode, it keeps freed memory out of the
    next phase's peak."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Blocks of at least this many bytes get their own mappings once `map_large_blocks` is called.
MMAP_THRESHOLD = 8 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


def map_large_blocks() -> None:
    """Make glibc's malloc give every block of `MMAP_THRESHOLD` bytes or more its own mapping,
    unmapped when the block is freed (`mallopt(M_MMAP_THRESHOLD)`, for the rest of the process;
    nothing elsewhere). By default the threshold rises to the largest block freed, up to 32 MB,
    and then a large picture's tile temporaries of a few MB are carved from the arenas, which
    fragment over a long refinement and raise its peak. A much smaller threshold would map and
    fault in pages too often (at 2 MB refinement takes nearly twice as long)."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _libc(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")


def _tables_from_state(d: dict) -> CdfTables:
    return CdfTables.from_arrays({k: v.numpy() for k, v in d.items() if k != "precision"} | {"precision": int(d["precision"])})


class FrozenModel:
    """A loaded, verified, frozen model. Pure inference; holds no optimizer state."""

    def __init__(self, path: Path, expected_sha256: str | None = None):
        if expected_sha256 is not None and expected_sha256 != "TBD":
            actual = sha256_file(path)
            if actual != expected_sha256:
                raise ModelMismatchError(f"weights file {path} has SHA-256 {actual[:16]}…, expected {expected_sha256[:16]}…")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FROZEN_FORMAT or "y_tables" not in state:
            raise ModelNotFrozenError(f"{path} is not a frozen lcodec model; run `python -m lcodec.models.training.freeze` first")
        self.config = ModelConfig.from_dict(state["config"])
        N, M = self.config.N, self.config.M
        if self.config.arch == "lifting":
            self.analysis = _load(LiftingTransform(coarse_levels=self.config.coarse_levels), state["analysis"])
            self.synthesis = InverseLifting(self.analysis)
            self.halo_latents = lifting_halo(self.config.coarse_levels)
        else:
            self.analysis = _load(AnalysisTransform(N, M), state["analysis"])
            self.synthesis = _load(SynthesisTransform(N, M), state["synthesis"])
            self.halo_latents = HALO_LATENTS
        self.postfilter = None
        if self.config.postfilter:
            self.postfilter = _load(PostFilter(self.config.postfilter, len(self.config.levels)), state["postfilter"])
        self.hyper_analysis = _load(HyperAnalysisTransform(N, M), state["hyper_analysis"])
        self.hyper_synthesis = IntegerHyperSynthesis(state["hyper_synthesis"])
        self._hyper_layers = state["hyper_synthesis"]
        self._partial_hyper: dict[int, IntegerHyperSynthesis] = {}
        self.approximate_hyper_synthesis = ApproximateHyperSynthesis(state["hyper_synthesis"])
        self.log_gain = state["log_gain"].float()
        self.log_inv_gain = state["log_inv_gain"].float()
        self.y_tables = _tables_from_state(state["y_tables"])
        self.z_tables = _tables_from_state(state["z_tables"])
        # ẑ's tables per rate: z_tables holds len(z_buckets) sets of N tables, set b for the rate
        # parameters nearest z_buckets[b] (`z_table_offset`); without it one set for every rate.
        self.z_buckets = state["z_buckets"].numpy().astype(np.int64) if "z_buckets" in state else np.zeros(1, np.int64)
        if (self.z_tables.num_tables != len(self.z_buckets) * N or np.any(np.diff(self.z_buckets) <= 0)
                or np.any(self.z_buckets % 2)):
            raise ModelNotFrozenError(f"{path}: its z tables do not match its rate buckets")
        self.scale_thresholds = state["scale_thresholds"].long()
        self.rate_range = (float(state["rate_range"][0]), float(state["rate_range"][1]))
        # The subband context model (`lcodec.models.context`), for lifting models that have one.
        self.context = SubbandContext.from_state(state["context"]) if "context" in state else None
        if self.context is not None and len(self.context.magnitude) != self.y_tables.num_tables:
            raise ModelNotFrozenError(f"{path}: its subband context does not match its y tables")
        if self.context is not None and not self.hyper_synthesis.zero_means_from(LL_CHANNELS):
            raise ModelNotFrozenError(f"{path}: a subband context needs the details' means to be 0")
        self.info = state.get("info", {})

    @property
    def levels(self) -> tuple[float, ...]:
        return self.config.levels

    def z_table_offset(self, rq: int) -> int:
        """The first of the N z tables of a file at rate parameter rq (q · RATE_SCALE): bucket b
        of `z_buckets` is the number of midpoints (z_buckets[i] + z_buckets[i + 1]) / 2 at or
        below rq, and its tables are b·N .. b·N + N - 1 (SPEC.md, "z tables per rate")."""
        middles = (self.z_buckets[:-1] + self.z_buckets[1:]) // 2
        return int(np.count_nonzero(middles <= rq)) * self.config.N

    def z_index(self, rq: int, per_channel: int) -> np.ndarray:
        """The z table of each element of ẑ (N, per_channel elements each, C order) at rate rq."""
        return np.repeat(np.arange(self.config.N, dtype=np.int64) + self.z_table_offset(rq), per_channel)

    def gains(self, q: float) -> tuple[torch.Tensor, torch.Tensor]:
        """gain(q), inv_gain(q) as (1, M, 1, 1): log-linear inter/extrapolation of the levels."""
        lg, lig = interpolate_levels(self.log_gain, q), interpolate_levels(self.log_inv_gain, q)
        return lg.exp().view(1, -1, 1, 1), lig.exp().view(1, -1, 1, 1)

    @torch.no_grad()
    def analyze(self, x: torch.Tensor, *, tile_latents: int = TILE_LATENTS) -> torch.Tensor:
        """x (1, 3, H, W) in [0, 1], H and W multiples of 64 -> y before the gain, on tiles of
        `tile_latents` latents (a lifting model's picture, but for a small one: level by level,
        `_analyze_by_levels`)."""
        _, _, H, W = x.shape
        if self._by_levels(H // 16, W // 16, tile_latents):
            with one_thread_per_operation() as threads:
                return self._analyze_by_levels(x, tile_latents, threads)
        return run_tiled(self.analysis, x, 16, tile_latents * 16, self.halo_latents * 16, inverse=False)

    def _analyze_by_levels(self, x: torch.Tensor, tile_latents: int, workers: int) -> torch.Tensor:
        """g_a of a lifting model one level at a time, as `_inverse_levels` runs g_s: each level in
        tiles of at most `LEVEL_TILE_LATENTS` latents with the halo of its own reach, computed side
        by side in `workers` threads with one thread per operation (the same values whatever the
        thread count); the whole transform at once would need a halo of all the reaches together.
        Equal to the whole-image transform within float rounding."""
        transform = self.analysis
        _, _, H, W = x.shape
        h, w = H // 16, W // 16
        y = torch.empty(1, LATENT_CHANNELS, h, w)
        band = x
        for level in range(WAVELET_LEVELS):
            r = 2**(WAVELET_LEVELS - 1 - level)  # samples of the level's output bands per latent
            out = torch.empty(1, 3, r * h, r * w)
            start = reduced_channels(level + 1)

            def compute(t: Tile, band=band, level=level, r=r) -> tuple[torch.Tensor, torch.Tensor]:
                rows, cols = _scaled(t.read_rows, 2 * r), _scaled(t.read_cols, 2 * r)
                part = band[:, :, rows, cols]
                coarser, details = transform.forward_level(transform.from_rgb(part) if level == 0 else part, level,
                                                           channels_last=True)
                return _crop(coarser, t, r), F.pixel_unshuffle(_crop(details, t, r), r)

            def place(t: Tile, parts: tuple[torch.Tensor, torch.Tensor], out=out, r=r, start=start) -> None:
                out[:, :, _scaled(t.rows, r), _scaled(t.cols, r)] = parts[0]
                y[:, start:start + parts[1].shape[1], t.rows, t.cols] = parts[1]

            map_tiles(compute, place, tiles(h, w, min(tile_latents, LEVEL_TILE_LATENTS), -(-LEVEL_REACH // r)), workers)
            band = out
        y[:, :3] = coarse_dwt(band, self.config.coarse_levels)
        return y

    @torch.no_grad()
    def hyper_latent(self, y: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        """ẑ = round(h_a(y_g)) as int64, y_g = y · `gain` (1, M, 1, 1), or y itself without one.

        h_a runs on bands of y's rows (`hyper_analysis_bands`), side by side with one thread per
        operation, each band multiplied by the gain as it is read: no gained copy of the whole
        latent. Each band's ẑ rows see their whole receptive field, and the convolutions give
        the same floats on a band as on the whole latent (checked by test_hyper_latent_bands),
        so ẑ does not depend on the bands or the thread count."""
        _, _, h, w = y.shape
        bands = hyper_analysis_bands(h, w)

        def compute(band: Tile) -> torch.Tensor:
            part = y[:, :, band.read_rows]
            z = torch.round(self.hyper_analysis(part if gain is None else part * gain)).to(torch.int64)
            top = (band.rows.start - band.read_rows.start) // 4
            return z[:, :, top:top + (band.rows.stop - band.rows.start) // 4]

        if len(bands) == 1:
            return compute(bands[0])
        z = torch.empty(1, self.config.N, h // 4, w // 4, dtype=torch.int64)

        def place(band: Tile, part: torch.Tensor) -> None:
            z[:, :, band.rows.start // 4:band.rows.stop // 4] = part

        with one_thread_per_operation() as threads:
            map_tiles(compute, place, bands, threads)
        return z

    def entropy_parameters(self, z_int: torch.Tensor, tile: Tile, channels: int | None = None,
                           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """From ẑ alone, for the latents of one h_s tile (`hyper_tiles`, `latent_region`): their
        mean (float32) and y table index (int32), each (1, M, rows, columns), or with `channels`
        only those of y's first `channels` channels; with `out`, written there instead
        (`IntegerHyperSynthesis.entropy_parameters`). Exact: both sides compute the same values
        bit for bit, and a channel's values do not depend on which others are computed."""
        top, left = tile.rows.start - tile.read_rows.start, tile.cols.start - tile.read_cols.start
        return self._hyper_synthesis_for(channels).entropy_parameters(
            z_int[:, :, tile.read_rows, tile.read_cols], self.scale_thresholds,
            slice(4 * top, 4 * (top + tile.rows.stop - tile.rows.start)),
            slice(4 * left, 4 * (left + tile.cols.stop - tile.cols.start)), out=out)

    def latent_entropy_parameters(self, z_int: torch.Tensor, index_dtype: np.dtype, channels: int | None = None,
                                  workers: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """`entropy_parameters` for the whole latent, computed tile by tile into two buffers: the
        means (1, M, H, W) float32 and the table indices (M, H, W) as `index_dtype` (with
        `channels`, only y's first `channels` channels: M becomes `channels`); nothing else
        as big as the latent is alive meanwhile but up to `workers` tiles, computed side by side
        in threads (exact: the same integers in any order). With `workers` None, as many tiles
        as torch has threads, one thread per operation (on 2 shared cores that is 1.5-2x faster
        than 2-thread operations, which lose most when another process takes a core)."""
        if workers is None:
            with one_thread_per_operation() as threads:
                return self.latent_entropy_parameters(z_int, index_dtype, channels, threads)
        M = channels or self.config.M
        return _tiles_into(lambda tile, out: self.entropy_parameters(z_int, tile, channels, out=out), z_int, M, M,
                           index_dtype, workers)

    def context_entropy_parameters(self, z_int: torch.Tensor, index_dtype: np.dtype, exact: bool = True
                                   ) -> tuple[torch.Tensor, np.ndarray]:
        """For a model with a subband context, whose details' means are 0 (checked when it is
        loaded): the LL block's means (1, LL_CHANNELS, H, W) float32 and all of y's table indices
        (M, H, W) as `index_dtype`, tiles side by side with one thread per operation as
        `latent_entropy_parameters` (the same values; `exact=False`:
        `approximate_entropy_parameters`, for estimates). No latent-sized means."""
        params = self.entropy_parameters if exact else self.approximate_entropy_parameters
        with one_thread_per_operation() as threads:
            return _tiles_into(lambda tile, out: params(z_int, tile, out=out), z_int, LL_CHANNELS, self.config.M,
                               index_dtype, threads)

    def _hyper_synthesis_for(self, channels: int | None) -> IntegerHyperSynthesis:
        """The integer h_s, or with `channels` < M one whose last layer computes only the means and
        scales of y's first `channels` channels: each output channel of a convolution is its own
        exact integer sum, so they are the same integers, for a fraction of the last layer's work
        (which with the table lookup is most of h_s on a lifting model: a reduced-size decode)."""
        M = self.config.M
        if channels is None or channels == M:
            return self.hyper_synthesis
        if not 0 < channels < M:
            raise ValueError(f"channels must be within 1..{M}, got {channels}")
        if channels not in self._partial_hyper:
            *hidden, last = self._hyper_layers
            keep = torch.cat([torch.arange(channels), M + torch.arange(channels)])
            dim = 1 if last["transposed"] else 0
            last = {**last, "weight": last["weight"].index_select(dim, keep), "bias": last["bias"][keep],
                    "shift": last["shift"][keep]}
            self._partial_hyper[channels] = IntegerHyperSynthesis([*hidden, last])
        return self._partial_hyper[channels]

    @torch.no_grad()
    def approximate_entropy_parameters(self, z_int: torch.Tensor, tile: Tile,
                                       out: tuple[torch.Tensor, torch.Tensor] | None = None
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `entropy_parameters`, in float32: for the rate search's estimates only."""
        mean_fixed, scale_fixed = _hyper_tile(self.approximate_hyper_synthesis, z_int, tile).chunk(2, dim=1)  # OUT_BITS fractional bits
        return written(mean_fixed / 2**OUT_BITS, table_index(scale_fixed.floor(), self.scale_thresholds), out)

    def draw(self, y: torch.Tensor, q: float) -> torch.Tensor:
        """g_s of ŷ after the inverse gain, unclamped: the synthesis transform, then, where the model
        has one, the post-filter at rate q on its output clamped to [0, 1] (what it was trained
        on: `lcodec.models.training.postfilter`). Differentiable (latent refinement)."""
        x = self.synthesis(y)
        return x if self.postfilter is None else self.postfilter(x.clamp(0, 1), q)

    @torch.no_grad()
    def synthesize(self, y_hat_gained: torch.Tensor, q: float, *, tile_latents: int = TILE_LATENTS) -> torch.Tensor:
        """ŷ in the gained domain -> x̂ (1, 3, Hp, Wp), clamped to [0, 1], on tiles of `tile_latents` latents
        (a lifting model's latent larger than one tile: level by level, `_synthesize_by_levels`).
        Takes over `y_hat_gained`: it is multiplied by the inverse gain in place (a copy would cost
        4 bytes per latent, 400 MB for an 8K image with 768 latent channels)."""
        _, inv_gain = self.gains(q)
        y = y_hat_gained.mul_(inv_gain)
        with one_thread_per_operation() as threads:
            x = self._draw_tiled(y, q, tile_latents, threads)
        return x.clamp_(0, 1)

    def _draw_tiled(self, y: torch.Tensor, q: float, tile_latents: int, workers: int, into=None
                    ) -> torch.Tensor | None:
        """`draw` of y (after the inverse gain), unclamped, on tiles of `tile_latents` latents, or
        for a lifting model's latent larger than one tile level by level (`_synthesize_by_levels`).
        With `into`, the picture goes to into(tile, pixels) tile by tile instead (one tile of
        the whole latent when it does not run by levels)."""
        _, _, h, w = y.shape
        if self._by_levels(h, w, tile_latents):
            return self._synthesize_by_levels(y, q, tile_latents, workers, into)
        x = run_tiled(lambda t: self.draw(t, q), y, 16, tile_latents, self.halo_latents, inverse=True, workers=workers)
        if into is None:
            return x
        into(Tile(slice(0, h), slice(0, w), slice(0, h), slice(0, w)), x)
        return None

    def _by_levels(self, h: int, w: int, tile_latents: int) -> bool:
        """Whether g_a and g_s of an h x w latent run level by level (`_analyze_by_levels`,
        `_inverse_levels`): a lifting model's latent larger than one tile, or at the default tiles
        larger than `LEVEL_TILE_LATENTS` a side (Kodak's 48 x 32: 1.6x faster decodes, a pixel
        differing by at most one step). The rest run the whole transform at once, as it has
        always run: pictures of up to 512 pixels a side (the golden files) decode to the same
        pixels as ever, and `tile_latents` of 10^6 gives the untiled reference."""
        if self.config.arch != "lifting":
            return False
        return (len(tiles(h, w, tile_latents, self.halo_latents)) > 1
                or (tile_latents == TILE_LATENTS and max(h, w) > LEVEL_TILE_LATENTS))

    def _inverse_levels(self, y: torch.Tensor, stop: int, tile_latents: int, workers: int) -> torch.Tensor:
        """LL_stop (1, 3, H/2^stop, W/2^stop) of a lifting model's y (after the inverse gain), one
        level at a time, each in tiles of `tile_latents` latents with the halo its own reach needs
        (`LEVEL_REACH` samples: 1 to 7 latents from the finest level to the coarsest). The whole
        transform at once in tiles needs a halo of all the levels' reaches together (24 latents:
        1.9 times the work on tiles of 64); a level's own halo costs 1.1 to 2 times its work
        (most for the coarsest level, which is 1/64 of the finest's). Tiles of 32 latents keep the
        activations of a tile within the CPU's caches and out of fresh pages: measured faster
        than tiles of 16, 24 or 48 (12 MP)."""
        transform = self.analysis
        band = transform.coarsest_band(y)
        _, _, h, w = y.shape
        for level in reversed(range(stop, WAVELET_LEVELS)):
            r = 2**(WAVELET_LEVELS - 1 - level)  # samples of the level's bands per latent
            out = torch.empty(1, 3, 2 * r * h, 2 * r * w)

            def compute(t: Tile, band=band, level=level, r=r) -> torch.Tensor:
                rows, cols = t.read_rows, t.read_cols
                finer = transform.inverse_level(band[:, :, r * rows.start:r * rows.stop, r * cols.start:r * cols.stop],
                                                transform.level_details(y[:, :, rows, cols], level), level,
                                                channels_last=True)
                return _crop(finer, t, 2 * r)

            def place(t: Tile, crop: torch.Tensor, out=out, r=r) -> None:
                out[:, :, _scaled(t.rows, 2 * r), _scaled(t.cols, 2 * r)] = crop

            map_tiles(compute, place, tiles(h, w, min(tile_latents, LEVEL_TILE_LATENTS), -(-LEVEL_REACH // r)), workers)
            band = out
        return band

    def _synthesize_by_levels(self, y: torch.Tensor, q: float, tile_latents: int, workers: int,
                              into=None) -> torch.Tensor | None:
        """`draw` of a lifting model's y (after the inverse gain), unclamped, as `_inverse_levels`:
        levels 4..2 one at a time, then the finest level, the colour transform and the post-filter
        together in tiles with `FINEST_HALO` latents of context: the finest level reaches 14
        pixels, and the post-filter reads `POSTFILTER_CONTEXT` rows and columns of what it
        leaves valid (its reach is 8). With `into`, each tile's pixels (1, 3, rows, columns) go
        to into(tile, pixels) instead, in order, and no picture is made."""
        transform, pf = self.analysis, self.postfilter
        band = self._inverse_levels(y, 1, tile_latents, workers)
        _, _, h, w = y.shape
        x = torch.empty(1, 3, 16 * h, 16 * w) if into is None else None

        def compute(t: Tile) -> torch.Tensor:
            rows, cols = t.read_rows, t.read_cols
            pixels = transform.to_rgb(transform.inverse_level(
                band[:, :, 8 * rows.start:8 * rows.stop, 8 * cols.start:8 * cols.stop],
                transform.level_details(y[:, :, rows, cols], 0), 0, channels_last=True))
            if pf is None:
                return _crop(pixels, t, 16)
            # The post-filter's input: the tile and its context, within the picture.
            top = max(16 * t.rows.start - POSTFILTER_CONTEXT, 0)
            left = max(16 * t.cols.start - POSTFILTER_CONTEXT, 0)
            bottom = min(16 * t.rows.stop + POSTFILTER_CONTEXT, 16 * h)
            right = min(16 * t.cols.stop + POSTFILTER_CONTEXT, 16 * w)
            pixels = pixels[:, :, top - 16 * rows.start:bottom - 16 * rows.start,
                            left - 16 * cols.start:right - 16 * cols.start]
            filtered = pf.filter_whole(pixels.clamp(0, 1), q, channels_last=True)
            return filtered[:, :, 16 * t.rows.start - top:16 * t.rows.stop - top,
                            16 * t.cols.start - left:16 * t.cols.stop - left]

        def place(t: Tile, crop: torch.Tensor) -> None:
            x[:, :, _scaled(t.rows, 16), _scaled(t.cols, 16)] = crop

        map_tiles(compute, place if into is None else into,
                  tiles(h, w, min(tile_latents, LEVEL_TILE_LATENTS), FINEST_HALO), workers)
        return x

    @torch.no_grad()
    def synthesize_into(self, y_hat_gained: torch.Tensor, q: float, out: np.ndarray, *,
                        tile_latents: int = TILE_LATENTS) -> None:
        """`synthesize`'s picture as a decoder's pixels, written into `out` (H, W, 3) uint8, H and W
        at most the padded size: cropped to H x W, then `to_pixels`. The same pixels as
        `to_pixels(synthesize(...)[0, :, :H, :W])`; a lifting model's latent that runs by levels
        goes from each tile of the finest level straight into `out`, without a float picture
        (400 MB at 8K). Takes over `y_hat_gained` as `synthesize` does."""
        H, W = out.shape[:2]
        _, inv_gain = self.gains(q)
        y = y_hat_gained.mul_(inv_gain)

        def place(t: Tile, crop: torch.Tensor) -> None:
            rows = slice(16 * t.rows.start, min(16 * t.rows.stop, H))
            cols = slice(16 * t.cols.start, min(16 * t.cols.stop, W))
            if rows.start < rows.stop and cols.start < cols.stop:
                out[rows, cols] = to_pixels(crop[0, :, :rows.stop - rows.start, :cols.stop - cols.start].clamp(0, 1))

        with one_thread_per_operation() as threads:
            self._draw_tiled(y, q, tile_latents, threads, place)

    @torch.no_grad()
    def synthesize_reduced(self, y_hat_gained: torch.Tensor, q: float, stop: int, *,
                           tile_latents: int = TILE_LATENTS) -> torch.Tensor:
        """A lifting model's picture at 1/2^stop scale (1, 3, Hp/2^stop, Wp/2^stop), clamped to
        [0, 1], from ŷ's first `reduced_channels(stop)` channels in the gained domain (more are
        ignored; taken over as in `synthesize`): g_s down to level `stop` (`LiftingTransform.inverse`),
        without the post-filter, which works on the full picture. Sample (i, j) of LL_stop is
        centred on pixel (2^stop i, 2^stop j) of the full picture; `half_block_shift` moves it to
        the centre of its 2^stop x 2^stop block, where a box reduce (and JPEG's reduced decode)
        puts it. Tiled and single-threaded per operation as `synthesize`."""
        if self.config.arch != "lifting":
            raise ValueError(f"a {self.config.arch!r} model has no reduced synthesis: reduce its full picture")
        if not 0 < stop <= 4:
            raise ValueError(f"stop must be a level from 1 to 4, got {stop}")
        _, inv_gain = self.gains(q)
        C = reduced_channels(stop)
        y = y_hat_gained[:, :C].mul_(inv_gain[:, :C])
        scale = 16 // 2**stop
        with one_thread_per_operation() as threads:
            if self._by_levels(y.shape[2], y.shape[3], tile_latents):
                x = self.analysis.to_rgb(self._inverse_levels(y, stop, tile_latents, threads).div_(2.0**stop))
            else:
                x = run_tiled(lambda t: self.analysis.inverse(t, stop), y, scale, tile_latents, self.halo_latents,
                              inverse=True, workers=threads)
            return half_block_shift(x, 2**stop).clamp_(0, 1)


def _tiles_into(params, z_int: torch.Tensor, means: int, channels: int, index_dtype: np.dtype, workers: int
                ) -> tuple[torch.Tensor, np.ndarray]:
    """h_s's parameters of the whole latent of ẑ, `params(tile, out)` writing each of `hyper_tiles`
    into its region of two buffers, up to `workers` tiles side by side: the means of y's first
    `means` channels (1, means, H, W) float32 and the table indices of its first `channels` (channels,
    H, W) as `index_dtype`."""
    zh, zw = z_int.shape[2], z_int.shape[3]
    mean = torch.empty(1, means, 4 * zh, 4 * zw)
    idx = np.empty((channels, 4 * zh, 4 * zw), dtype=index_dtype)
    index = torch.from_numpy(idx)[None]

    def one_tile(tile: Tile) -> None:
        rows, cols = latent_region(tile)
        params(tile, (mean[:, :, rows, cols], index[:, :, rows, cols]))

    map_tiles(one_tile, lambda tile, _: None, hyper_tiles(z_int), workers)
    return mean, idx


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """A picture (3, H, W) in [0, 1] (NaN read as 0) as uint8 pixels (H, W, 3): times 255 and
    rounded, computed in place in x."""
    return x.nan_to_num_(nan=0.0).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()


def _scaled(cells: slice, scale: int) -> slice:
    return slice(scale * cells.start, scale * cells.stop)


def _crop(out: torch.Tensor, t: Tile, scale: int) -> torch.Tensor:
    """The tile's own region of `out`, computed from its read region on a grid `scale` times finer."""
    top, left = t.rows.start - t.read_rows.start, t.cols.start - t.read_cols.start
    return out[:, :, scale * top:scale * (top + t.rows.stop - t.rows.start),
               scale * left:scale * (left + t.cols.stop - t.cols.start)]


# Keys' cubic convolution (a = -0.5) at offsets 1 + d, d, 1 - d, 2 - d: the weights of samples
# i - 1, i, i + 1, i + 2 for the value at i + d, 0 <= d < 1.
def _cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2 if t < 2 else 0.0


def half_block_shift(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x (B, C, h, w), a picture whose sample (i, j) stands for pixel (f i, f j) of a picture f =
    `factor` times larger, resampled to stand for the centre of block (i, j) instead, (f i + (f - 1)/2,
    ...): cubic interpolation (Keys, a = -0.5) at d = (f - 1) / (2 f) samples right and down, the
    edge sample repeated. Without it a reduced decode sits up to half a pixel up and left of a
    box-reduced picture (-5 to -10 dB against one on Kodak, lossless)."""
    d = (factor - 1) / (2 * factor)
    taps = torch.tensor([_cubic(1 + d), _cubic(d), _cubic(1 - d), _cubic(2 - d)], dtype=x.dtype)
    B, C, h, w = x.shape
    rows = F.pad(x.reshape(B * C, 1, h, w), (0, 0, 1, 2), mode="replicate")
    x = F.conv2d(rows, taps.view(1, 1, 4, 1))
    cols = F.pad(x, (1, 2, 0, 0), mode="replicate")
    return F.conv2d(cols, taps.view(1, 1, 1, 4)).reshape(B, C, h, w)


def box_reduce(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x (B, C, H, W) reduced `factor` times by averaging each factor x factor block, the blocks at
    the bottom and right edges over the pixels they have: (B, C, ceil(H / factor), ceil(W / factor)),
    as Pillow's `Image.reduce`. For models without a reduced synthesis."""
    return F.avg_pool2d(x, factor, ceil_mode=True) if factor > 1 else x


def hyper_tiles(z: torch.Tensor) -> list[Tile]:
    """The tiles h_s runs on, for ẑ (1, N, zh, zw). Run on a whole large image, its float64
    convolutions peak at about 130 bytes per pixel (9 GB for a 21-byte file declaring
    8192 x 8192 with an M = 256 hyperprior), and everything computed from its output (means, table indices,
    symbols) is as big as the latent: the codec works tile by tile, which bounds both, and
    the integer h_s gives the same integers either way, since every tile sees all of its
    receptive field."""
    return tiles(z.shape[2], z.shape[3], HYPER_TILE, HYPER_HALO)


def hyper_analysis_bands(h: int, w: int) -> list[Tile]:
    """The bands of rows of an h x w latent (h a multiple of 4) that h_a runs on: an even number
    of equal bands of at most `HYPER_ANALYSIS_POSITIONS` latents (a multiple of 4 rows, at least
    4; the last band shorter: a band's gained input alone is 4·M bytes a latent), each read with
    `HYPER_ANALYSIS_HALO` rows of context (clipped at the edges), whole rows. They depend on the
    latent's size only, not on the thread count."""
    most = max(4, 4 * (HYPER_ANALYSIS_POSITIONS // (4 * w)))
    count = 2 * -(-h // (2 * most))
    rows = 4 * -(-h // (4 * count))
    return [Tile(slice(top, min(top + rows, h)), slice(0, w), slice(max(top - HYPER_ANALYSIS_HALO, 0),
                 min(top + rows + HYPER_ANALYSIS_HALO, h)), slice(0, w)) for top in range(0, h, rows)]


def latent_region(tile: Tile) -> tuple[slice, slice]:
    """The rows and columns of y that an h_s tile (of `hyper_tiles`) gives parameters for."""
    return slice(4 * tile.rows.start, 4 * tile.rows.stop), slice(4 * tile.cols.start, 4 * tile.cols.stop)


def _hyper_tile(hyper_synthesis, z: torch.Tensor, tile: Tile) -> torch.Tensor:
    """h_s of one tile: computed from the tile's read region of ẑ, cropped to its own latents."""
    out = hyper_synthesis(z[:, :, tile.read_rows, tile.read_cols])
    top, left = tile.rows.start - tile.read_rows.start, tile.cols.start - tile.read_cols.start
    return out[:, :, 4 * top:4 * (top + tile.rows.stop - tile.rows.start),
               4 * left:4 * (left + tile.cols.stop - tile.cols.start)]


def _load(module: nn.Module, state: dict) -> nn.Module:
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval().requires_grad_(False)
