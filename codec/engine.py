"""The torch side of the codec: pixels <-> .lc bytes with a frozen model.

`encode_array` / `decode_array` work on numpy pixels; `lcodec.api` wraps them
for PIL images and files. Only this module (and `lcodec.models`) import torch,
and `lcodec.api` imports this module lazily, so `lcodec info` stays light.

Which weights code an image is an argument, never a global: by default the
installed weights of a model id in the (read-only) model table, or any frozen
file loaded with `Weights.load` -- e.g. weights under training, to benchmark.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import ratecontrol, refine, rounding
from .bitstream import container, range_coder
from .bitstream.container import RATE_SCALE
from .bitstream.tables import ESCAPE_MAX_BITS
from .errors import CorruptFileError, ModelMismatchError, RateError, UnsupportedImageError
from .models import context
from .models.frozen import (PAD, FrozenModel, box_reduce, hyper_tiles, latent_region, map_large_blocks,
                            one_thread_per_operation, release_free_memory, to_pixels, worker_threads)
from .models.lifting import reduced_channels
from .models.registry import CHOICE_MODEL_IDS, DEFAULT_MODEL_ID, MODELS, sha256_file

OVERHEAD = container.OVERHEAD_BYTES
# A full-size decode of a picture of more pixels than this writes g_s's tiles straight into its
# uint8 pixels (`FrozenModel.synthesize_into`): no float picture (400 MB at 8K).
DIRECT_PIXELS = 1 << 22
REDUCTIONS = (1, 2, 4, 8, 16)  # the factors a picture can be decoded smaller by (SPEC "Reduced-size decoding")
ERROR_ROWS = 256  # rows of pixels a time in `_squared_error`


@dataclass(frozen=True)
class EncodeResult:
    data: bytes
    rate: float  # the rate parameter q used
    bpp: float  # real bits per pixel of the whole file
    target_bytes: int | None
    warning: str | None = None  # e.g. the model's top rate was reached below the target
    probes: int = 0  # size estimates the rate control made (none for an explicit rate)
    encodes: int = 1  # real encodes made (their symbols at one rate each; the chosen one range-coded)


@dataclass(frozen=True, eq=False)
class Weights:
    """A loaded frozen model, with the SHA-256 of its file: files made with it carry the first
    4 bytes, and a decoder refuses weights with another digest."""

    model: FrozenModel
    sha256: str
    name: str  # for messages: the table entry's name, or the file name

    @property
    def digest4(self) -> bytes:
        return bytes.fromhex(self.sha256)[:4]

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> Weights:
        """The frozen weights file at `path`, installed or not; checked against `sha256` if given."""
        path = Path(path)
        return cls(FrozenModel(path, sha256), sha256 or sha256_file(path), path.name)


@functools.lru_cache(maxsize=4)
def load_model(model_id: int = DEFAULT_MODEL_ID) -> FrozenModel:
    """The frozen model of the table entry `model_id`, loaded once per process."""
    entry = MODELS.get(model_id)
    if entry is None:
        raise ModelMismatchError(f"this lcodec does not know model id {model_id}; a newer lcodec may")
    if entry.retired:
        raise ModelMismatchError(f"model id {model_id} ({entry.name}) was retired before the first release and "
                                 "is not shipped; no released lcodec wrote this file")
    if not entry.path.exists():
        raise ModelMismatchError(f"the weights of model {entry.name!r} ({entry.path.name}) are not installed")
    return FrozenModel(entry.path, entry.sha256)


def installed_weights(model_id: int = DEFAULT_MODEL_ID) -> Weights:
    """The installed weights of the table entry `model_id` (the model is loaded once per process)."""
    model = load_model(model_id)
    entry = MODELS[model_id]
    return Weights(model, entry.sha256, entry.name)


def model_info(model_id: int = DEFAULT_MODEL_ID) -> dict:
    model = load_model(model_id)
    entry = MODELS[model_id]
    return {"name": entry.name, "model_id": model_id, "digest": entry.sha256, "levels": list(model.levels),
            "rate_range": model.rate_range}


def _rate_bounds(model: FrozenModel) -> tuple[int, int]:
    """The model's rate range as rate_q integers (both ends allowed)."""
    lo, hi = model.rate_range
    return round(lo * RATE_SCALE), round(hi * RATE_SCALE)


def _tiles(tile_latents: int | None) -> dict:
    """Keyword arguments for `FrozenModel.analyze` / `synthesize`: none for the model's own tiles."""
    return {} if tile_latents is None else {"tile_latents": tile_latents}


def _check_pixels(pixels: np.ndarray, mode: str) -> None:
    """Refuse what the encoder cannot take, before any work is done."""
    if mode == "L":
        if pixels.ndim != 2:
            raise UnsupportedImageError(f"mode L needs an (H, W) array, got shape {pixels.shape}")
    elif mode != "RGB" or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UnsupportedImageError(f"expected mode RGB with an (H, W, 3) array, got {mode} {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise UnsupportedImageError(f"expected uint8 pixels, got {pixels.dtype}")
    h, w = pixels.shape[:2]
    if h == 0 or w == 0:
        raise UnsupportedImageError("the image is empty (0 pixels)")
    if h > 65535 or w > 65535:
        raise UnsupportedImageError(f"{w}x{h} is too large: width and height are limited to 65535")


def _to_tensor(pixels: np.ndarray, mode: str) -> torch.Tensor:
    """Checked pixels -> (1, 3, Hp, Wp) float in [0, 1], padded to multiples of PAD by repeating
    the last row and column (cheaper to code than zeros; the decoder crops them away), filled in
    place channel by channel: no float copy of the picture but the result (400 MB at 8K)."""
    h, w = pixels.shape[:2]
    hp, wp = math.ceil(h / PAD) * PAD, math.ceil(w / PAD) * PAD
    x = torch.empty(1, 3, hp, wp)
    inside = x[0, :, :h, :w]
    for c in range(3):
        inside[c].numpy()[...] = pixels if mode == "L" else pixels[:, :, c]
    inside.div_(255.0)
    x[0, :, :h, w:] = x[0, :, :h, w - 1:w]
    x[0, :, h:] = x[0, :, h - 1:h]
    return x


def _table_index_dtype(model: FrozenModel) -> np.dtype:
    """The smallest integer type that holds every y table index (uint8 for the shipped models):
    the whole latent's indices are kept at once on both sides."""
    return np.min_scalar_type(model.y_tables.num_tables - 1)


# A large image's estimates look at a fixed sample of its latents: their size is then off by a
# factor (a few tens of per cent on a 12 MP graphic), but one that changes little with rq (~1% over
# a quarter level), which rate control measures; on a whole latent they cost ~30x more at 12 MP.
SAMPLE_POSITIONS = 6144  # latent positions (16x16 pixels each) in a sample: 4 Kodak images' worth
SAMPLE_BLOCK = 16  # latents: the side of a sample block (256 pixels; a multiple of h_a's stride 4)
SAMPLE_ROW = 4  # blocks side by side in the sample latent


def sample_latent(y: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """A fixed sample of the latent y (1, M, h, w) and how many times more positions y has, or None
    for a latent of at most 2 x `SAMPLE_POSITIONS` positions (estimates see all of it), or one
    narrower than a block.

    The sample is SAMPLE_POSITIONS / SAMPLE_BLOCK² blocks of the grid of SAMPLE_BLOCK-latent
    blocks, at block row (i + 1/2) · rows / k and column frac(i · golden ratio) · columns for
    i < k (a rank-1 lattice: spread over both axes), laid side by side SAMPLE_ROW to a row."""
    _, _, h, w = y.shape
    rows, cols = h // SAMPLE_BLOCK, w // SAMPLE_BLOCK
    k = SAMPLE_POSITIONS // SAMPLE_BLOCK**2
    if h * w <= 2 * SAMPLE_POSITIONS or rows == 0 or cols == 0:
        return None
    golden = (math.sqrt(5) - 1) / 2
    blocks = []
    for i in range(k):
        r, c = int((i + 0.5) * rows / k), int((i * golden) % 1 * cols)
        blocks.append(y[:, :, r * SAMPLE_BLOCK:(r + 1) * SAMPLE_BLOCK, c * SAMPLE_BLOCK:(c + 1) * SAMPLE_BLOCK])
    sample = torch.cat([torch.cat(blocks[i:i + SAMPLE_ROW], dim=3) for i in range(0, k, SAMPLE_ROW)], dim=2)
    return sample, h * w / (k * SAMPLE_BLOCK**2)


class Encoder:
    """One image's encoder state with one model: g_a runs once, when it is made; each rate rq
    then costs only what depends on it -- `estimate_bytes` for a rate-control probe (on a large
    image, on a fixed sample of the latent), `measure_bytes` for a real encode's symbols and their
    exact size, `payload` for a real encode (it codes what a measure at the same rq kept).
    `tile_latents` sets g_a's tiles (None: the model's own).

    h_s runs tile by tile (`frozen.hyper_tiles`), tiles side by side. Without a context a probe
    holds no more than one tile's means, indices and symbols; with one, every size needs the
    whole latent's hyper table indices (`_table_index_dtype`) and symbols, or the coder's items,
    and the LL block's residuals: a detail's residual is made pass by pass from y. A
    picture large enough to be estimated on a sample lets go of its latent while the coder
    runs (`payload`); whatever needs it later makes it again."""

    def __init__(self, model: FrozenModel, pixels: np.ndarray, mode: str, *, tile_latents: int | None = None):
        self.model, self.mode = model, mode
        self.height, self.width = pixels.shape[:2]
        self._pixels, self._tile_latents = pixels, tile_latents
        self._set_latent(self._analyzed())
        # A large image's estimates are made on a sample of its latents (see `sample_latent`).
        sample = sample_latent(self.y)
        self._sample = None if sample is None else (self._of_latent(sample[0]), sample[1])
        self._kept: tuple[int, np.ndarray, list] | None = None  # `measure_bytes`'s rq, ẑ and coder's items

    def _analyzed(self) -> torch.Tensor:
        return self.model.analyze(_to_tensor(self._pixels, self.mode), **_tiles(self._tile_latents))

    def _set_latent(self, y: torch.Tensor) -> None:
        self._y, self.shape = y, tuple(y.shape[1:])
        self._z_elements = (y.shape[2] // 4) * (y.shape[3] // 4)  # of each channel of ẑ

    def z_index(self, rq: int) -> np.ndarray:
        """The z table of each element of ẑ (flat, C order) at rate rq."""
        return self.model.z_index(rq, self._z_elements)

    @property
    def y(self) -> torch.Tensor:
        """g_a's latent (1, M, h, w), before the gain: made again (g_a, the same values) if a large
        picture's `payload` let it go."""
        if self._y is None:
            self._y = self._analyzed()
        return self._y

    def _of_latent(self, y: torch.Tensor) -> Encoder:
        """An encoder of the latent y (a sample of this one's), for estimates only."""
        enc = Encoder.__new__(Encoder)
        enc.model, enc.mode, enc.height, enc.width = self.model, self.mode, 16 * y.shape[2], 16 * y.shape[3]
        enc._set_latent(y)
        enc._sample, enc._kept = None, None
        return enc

    def _hyper_latent(self, rq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gain (1, M, 1, 1) and ẑ (1, N, zh, zw) at rate rq (the start of every estimate and
        measure: on a large picture, what the last one freed goes back to the system first)."""
        self._release_free_memory()
        gain, _ = self.model.gains(rq / RATE_SCALE)
        return gain, self.model.hyper_latent(self.y, gain)

    def _release_free_memory(self) -> None:
        """`frozen.release_free_memory` for a picture large enough to be estimated on a sample: on
        a small one the pages it would return are few and faulted in again at a cost (0.2 s of a
        Kodak encode)."""
        if self._sample is not None:
            release_free_memory()

    def _symbol_tiles(self, gain: torch.Tensor, z: torch.Tensor, exact: bool = True
                      ) -> Iterator[tuple[tuple[slice, slice], torch.Tensor, torch.Tensor]]:
        """For each h_s tile: its rows and columns of y, and there the symbols s (`rounding.round_latents` of y * gain - mean)
        (int32) and their table indices (int32), each (1, M, rows, columns). `exact=False` runs h_s
        in float32 (for estimates only: a few indices may differ from the bitstream's)."""
        params = self.model.entropy_parameters if exact else self.model.approximate_entropy_parameters
        for tile in hyper_tiles(z):
            rows, cols = latent_region(tile)
            mean, idx = params(z, tile)
            sym = rounding.round_latents(self.y[:, :, rows, cols] * gain - mean, idx, self.model)
            # Clamped so that the int32 conversion is defined; the coder refuses |s| >= 2^24 anyway.
            sym = sym.clamp_(-2**ESCAPE_MAX_BITS, 2**ESCAPE_MAX_BITS)
            yield (rows, cols), sym.to(torch.int32), idx

    def _symbols(self, rq: int, z: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ẑ (by default h_a's), the y symbols and their hyper table indices at rate rq, flat in C
        order (for a context model, rounded pass by pass: `rounding.round_in_passes`)."""
        return self._coded(rq, z, count=False)[:3]

    def _coded(self, rq: int, z: torch.Tensor | None = None, count: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """`_symbols`, and the ideal code length in bits of the y symbols as they are coded (with
        `count`; a context model's rounding counts them anyway)."""
        if z is None:
            gain, z = self._hyper_latent(rq)
        else:
            gain, _ = self.model.gains(rq / RATE_SCALE)
        if self.model.context is not None:
            sym, bits, idx = self._rounded_in_passes(rq, gain, z, exact=True)
            return z.numpy().ravel(), sym.ravel(), idx.ravel(), bits
        shape = self.y.shape[1:]
        sym, idx = np.empty(shape, dtype=np.int32), np.empty(shape, dtype=_table_index_dtype(self.model))
        bits = 0.0
        for (rows, cols), tile_sym, tile_idx in self._symbol_tiles(gain, z):
            sym[:, rows, cols], idx[:, rows, cols] = tile_sym[0].numpy(), tile_idx[0].numpy()
            if count:
                bits += self.model.y_tables.cost_bits(tile_sym.numpy().ravel(), tile_idx.numpy().ravel())
        return z.numpy().ravel(), sym.ravel(), idx.ravel(), bits

    def _rounded_in_passes(self, rq: int, gain: torch.Tensor, z: torch.Tensor, exact: bool, items: bool = False
                           ) -> tuple[np.ndarray | list, float, np.ndarray]:
        """A context model's symbols (M, h, w) at rate rq, its gain and ẑ (`rounding.round_in_passes`),
        their code length in bits and their hyper table indices, h_s run tile by tile
        (`exact=False`: in float32, for estimates), tiles side by side as the decoder's: the same
        integers, and estimates that do not depend on the thread count. Only the LL block's
        residuals are made here: a lifting model's details have mean 0 (checked at load), and the rounding
        takes them as y · gain."""
        block = context.LL_CHANNELS
        ll_mean, idx = self.model.context_entropy_parameters(z, _table_index_dtype(self.model), exact)
        ll = (self.y[:, :block] * gain[:, :block] - ll_mean)[0].numpy()
        del ll_mean
        self._release_free_memory()  # h_s's tiles' temporaries, before the passes' own
        sym, bits = rounding.round_in_passes(self.model, self.y[0].numpy(), idx, gain=gain.numpy().ravel(), ll=ll,
                                             q=rq / RATE_SCALE, compact=True, items=items)
        return sym, bits, idx

    @property
    def sampled(self) -> bool:
        """Whether `estimate_bytes` sees a sample of the latent (a large picture) rather than all of it."""
        return self._sample is not None

    def estimate_bytes(self, rq: int) -> float:
        """Predicted file size at rq: the ideal code length under the frozen tables (the real
        coder is within a few bytes of it), with the fast float32 hyper-synthesis (within ~0.1% of
        the file) -- for a large image on its sample, scaled by area (off by a factor that
        changes little with rq: rate control corrects it by measures)."""
        if self._sample is None:
            return self._estimate(rq)
        sample, scale = self._sample
        return OVERHEAD + (sample._estimate(rq) - OVERHEAD) * scale

    def _estimate(self, rq: int) -> float:
        gain, z = self._hyper_latent(rq)
        bits = self.model.z_tables.cost_bits(z.numpy().ravel(), self.z_index(rq))
        if self.model.context is not None:
            _, y_bits, _ = self._rounded_in_passes(rq, gain, z, exact=False)
            return OVERHEAD + (bits + y_bits) / 8
        for _, sym, idx in self._symbol_tiles(gain, z, exact=False):
            bits += self.model.y_tables.cost_bits(sym.numpy().ravel(), idx.numpy().ravel())
        return OVERHEAD + bits / 8

    def measure_bytes(self, rq: int) -> float:
        """The file size at rq by the ideal code length of the very symbols a real encode codes
        (the coder adds a few bytes): a real encode but for the range coder. What the coder takes
        (ẑ and y's items: with a subband context, each pass's coded values and tables, as
        `rounding.round_in_passes` made them) is kept for a `payload(rq)` that follows, until the
        next measure (values as int8 or int16 where they fit: mostly 2 bytes a latent with the
        tables)."""
        self._kept = None  # one latent's items at a time
        gain, z = self._hyper_latent(rq)
        if self.model.context is not None:
            items, y_bits, _ = self._rounded_in_passes(rq, gain, z, exact=True, items=True)
        else:
            _, sym, idx, y_bits = self._coded(rq, z)
            items = [([rounding.narrowed(sym)], [idx])]
        z = z.numpy().ravel()
        self._kept = rq, z, items
        return OVERHEAD + (self.model.z_tables.cost_bits(z, self.z_index(rq)) + y_bits) / 8

    def payload(self, rq: int, refined: refine.Refined | None = None) -> bytes:
        """The range-coded stream at rq (everything of the file but the header and CRC); with
        `refined` (at rq), its ẑ and y symbols instead of h_a's and g_a's."""
        self._release_free_memory()
        kept, self._kept = self._kept, None
        if refined is None and kept is not None and kept[0] == rq:
            z, items = kept[1], _taken(kept[2], self.model.y_tables)
        else:
            z, sym, idx = self._symbols(rq, None if refined is None else refined.z)
            items = latent_items(self.model, sym if refined is None else refined.symbols, idx, self.shape)
        del kept
        if self._sample is not None:  # a large picture's latent is not needed while the coder runs
            self._y = None
        return range_coder.encode(itertools.chain([(z, self.z_index(rq), self.model.z_tables)], items))

    def file(self, rq: int, model_id: int, digest4: bytes, refined: refine.Refined | None = None) -> bytes:
        """The whole .lc file at rq, naming model `model_id` and weights digest `digest4`."""
        payload = self.payload(rq, refined)
        header = container.Header(
            version=container.FORMAT_VERSION, model_id=model_id, weights_digest=digest4,
            width=self.width, height=self.height, mode=self.mode, rate_q=rq, payload_size=len(payload))
        return container.pack(header, payload)


def _taken(items: list, tables) -> Iterator[tuple[np.ndarray, np.ndarray, object]]:
    """A measure's kept items for the coder (`context.joined`), each let go once it is taken."""
    items.reverse()
    while items:
        values, idx = context.joined(items.pop())
        yield values, idx, tables


def latent_items(model: FrozenModel, sym: np.ndarray, idx: np.ndarray, shape: tuple[int, int, int]
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, object]]:
    """The coder's items of y (flat symbols and hyper indices of a latent of `shape`): (symbols,
    table indices, tables) in coding order -- one item with the hyper indices, or with a
    subband context the LL block and then one item per pass, made as the coder takes them."""
    if model.context is None:
        yield sym, idx, model.y_tables
        return
    for _, s, t in context.pass_items(model.context, sym.reshape(shape), idx.reshape(shape), worker_threads()):
        yield s, t, model.y_tables


def _decode_passes(dec: range_coder.Decoder, model: FrozenModel, idx: np.ndarray, y: np.ndarray, stop: int = 0
                   ) -> None:
    """Decode the y symbols of a context-coded stream pass by pass (`idx`: hyper indices) and add
    each pass's to the means `y` (C, h, w) float32, in place: y becomes ŷ without a symbol array
    as big as the latent.

    With `stop` = k > 0, only the LL block (one item, or its passes) and the passes of levels
    4 .. k+1, which come first in the stream, are decoded, and the rest of the stream is left
    unread: y and `idx` need only hold y's first `reduced_channels(k)` channels."""
    M, h, w = model.config.M, idx.shape[1], idx.shape[2]
    if idx.shape[0] != M:  # the passes' state is laid out for the whole latent: the rest is never read
        whole = np.zeros((M, h, w), dtype=idx.dtype)
        whole[:idx.shape[0]] = idx
        idx = whole
    if model.context.ll_remap is None:  # the LL block is one item under its hyper indices
        ll = slice(0, context.LL_CHANNELS)
        # float32 + float32 (a symbol, |s| < 2^24, is exact in float32): the one rounding of torch's add.
        y[ll] += dec.decode(idx[ll].ravel(), model.y_tables).reshape(y[ll].shape).astype(np.float32)

    def decoded(p: context.Pass, t: np.ndarray, mu: np.ndarray) -> np.ndarray:
        s = dec.decode(t, model.y_tables) + mu
        context.put_pass(y, p, context.pass_values(y, p) + s.astype(np.float32))
        return s

    wanted = context.coarse_passes(model.context, stop)  # coarse to fine: the first ones
    for _ in itertools.islice(context.code_passes(model.context, idx, decoded), wanted):
        pass


def encode_array(pixels: np.ndarray, mode: str, *, bpp: float | None = None, size: int | None = None,
                 rate: float | None = None, model_id: int = DEFAULT_MODEL_ID, weights: Weights | None = None,
                 tile_latents: int | None = None, effort: int = 0, progress=None) -> EncodeResult:
    """Encode uint8 pixels ((H, W, 3) RGB or (H, W) L) to .lc bytes.

    One target, as `lcodec.api` checks (exactly one, with a usable value): `rate` (the rate
    parameter q itself: one pass, no search), else `bpp` (file <= bpp*H*W/8 bytes, header
    included) or `size` (file <= size bytes), met by `lcodec.ratecontrol`. The file names `model_id` and the digest of
    `weights`, by default that id's installed weights. `tile_latents` sets g_a's tiles (None:
    the model's own); it changes no more than float rounding.

    `effort` 1-9 refines the encode (`lcodec.refine`) within the same budget -- for `rate`, at
    that rate parameter and within the size of the one-pass file -- and keeps the refined file
    only if it decodes closer to the image. `progress`, a tqdm-like object, is reset to the
    number of refinement steps and updated after each.
    """
    _check_pixels(pixels, mode)
    if weights is None:
        weights = installed_weights(model_id)
    job = _Job(pixels, mode, bpp, size, rate, model_id, weights, tile_latents)
    if not _refines(pixels, effort):
        return _unrefined(job.fit()[0], effort)
    return _best_of(pixels, [job], effort, progress)


@dataclass(frozen=True)
class _Job:
    """One model's encode of one image to one target."""

    pixels: np.ndarray
    mode: str
    bpp: float | None
    size: int | None
    rate: float | None
    model_id: int
    weights: Weights
    tile_latents: int | None = None

    def fit(self) -> tuple[EncodeResult, Encoder]:
        """The one-pass file at the target, and the encoder that made it."""
        height, width = self.pixels.shape[:2]
        model = self.weights.model
        lo, hi = _rate_bounds(model)
        if self.rate is not None:
            rq = round(self.rate * RATE_SCALE)
            if not lo <= rq <= hi:
                raise RateError(f"rate parameter {self.rate} is outside the model's range {model.rate_range}")
            enc = Encoder(model, self.pixels, self.mode, tile_latents=self.tile_latents)
            data = enc.file(rq, self.model_id, self.weights.digest4)
            result = EncodeResult(data, rq / RATE_SCALE, 8 * len(data) / (width * height), None)
        else:
            goal = ratecontrol.target(width, height, bpp=self.bpp, size=self.size)
            enc = Encoder(model, self.pixels, self.mode, tile_latents=self.tile_latents)  # g_a: after the cheap checks
            fit = ratecontrol.fit(goal, enc.estimate_bytes, enc.measure_bytes,
                                  lambda rq: enc.file(rq, self.model_id, self.weights.digest4), lo, hi, model.levels,
                                  ratecontrol.SAMPLED if enc.sampled else ratecontrol.WHOLE)
            result = EncodeResult(fit.data, fit.rq / RATE_SCALE, 8 * len(fit.data) / (width * height), goal.bytes,
                                  fit.warning, fit.probes, fit.measures)
        return result, enc

    def refined(self, enc: Encoder, result: EncodeResult, effort: int, tick) -> EncodeResult | None:
        """The refined file of the one-pass `result`, or None if refinement found nothing better
        in the budget: the target, or for a rate the one-pass file's size."""
        rq = round(result.rate * RATE_SCALE)
        budget = result.target_bytes if result.target_bytes is not None else len(result.data)
        floor = min((1 - refine.RATE_SLACK) * budget, len(result.data))
        x = _to_tensor(self.pixels, self.mode)
        # A rate parameter that was asked for stays.
        found = refine.refine(enc.model, x, enc.height, enc.width, enc.y, rq, budget, floor, effort, tick,
                              fixed_rate=self.rate is not None)
        if found is None:
            return None
        data = enc.file(found.rq, self.model_id, self.weights.digest4, found)
        if not floor <= len(data) <= budget:
            return None
        return replace(result, data=data, rate=found.rq / RATE_SCALE, bpp=8 * len(data) / (enc.height * enc.width),
                       warning=None, encodes=result.encodes + 1)


def _refines(pixels: np.ndarray, effort: int) -> bool:
    """Whether `effort` refines this image: 1-9, and not larger than `refine.MAX_PIXELS`."""
    _check_effort(effort)
    return effort > 0 and pixels.shape[0] * pixels.shape[1] <= refine.MAX_PIXELS


def _check_effort(effort: int) -> None:
    if not isinstance(effort, int) or not 0 <= effort < len(refine.HYPER_ITERATIONS):
        raise ValueError(f"effort must be an integer from 0 to {len(refine.HYPER_ITERATIONS) - 1}, got {effort!r}")


def _unrefined(result: EncodeResult, effort: int) -> EncodeResult:
    """`result` of an image refinement does not take, with a warning if an effort was asked for."""
    if effort == 0:
        return result
    note = (f"effort {effort} does not apply to images of more than {refine.MAX_PIXELS:,} pixels: "
            "encoded at effort 0")
    return replace(result, warning=note if result.warning is None else f"{result.warning}; {note}")


class _Stopped(Exception):
    """Raised in a refining thread when the caller was interrupted."""


def _best_of(pixels: np.ndarray, jobs: list[_Job], effort: int, progress) -> EncodeResult:
    """Each job's one-pass file, then the refinement of those within `refine.WITHIN_DB` of the best
    one (refinement gains less than that), computed side by side with one thread per torch
    operation, so the bytes do not depend on the thread setting. The candidate whose decoded
    pixels are closest to the image wins (a tie: the earlier job, its one-pass file first)."""
    stop = threading.Event()
    if effort and any(refine.tile_count(*pixels.shape[:2], job.weights.model) > 1 for job in jobs):
        map_large_blocks()  # a long refinement of a large picture would fragment malloc's arenas

    def tick() -> None:
        if stop.is_set():
            raise _Stopped
        if progress is not None:
            progress.update()

    def fit(job: _Job) -> tuple[EncodeResult, Encoder] | RateError:
        try:
            return job.fit()
        except RateError as exc:
            return exc

    with one_thread_per_operation() as threads:
        with ThreadPoolExecutor(max(min(threads, len(jobs)), 1)) as pool:
            fitted = _all(pool, fit, jobs, stop)
            if all(isinstance(f, RateError) for f in fitted):
                raise fitted[-1]  # every model's RateError: the last one's, as without refinement
            ready = [(job, *f) for job, f in zip(jobs, fitted) if not isinstance(f, RateError)]
            if len(ready) == 1 and not effort:  # nothing to compare: no decode needed
                return ready[0][1]
            errors = _all(pool, lambda r: _squared_error(pixels, r[1], r[0].weights), ready, stop)
            best = min(errors)
            chosen = [r for r, e in zip(ready, errors) if e <= best * 10 ** (refine.WITHIN_DB / 10)]
            if progress is not None:
                progress.reset(total=sum(refine.iterations(effort, r[0].weights.model, *pixels.shape[:2])
                                         for r in chosen))
            refined = _all(pool, lambda r: r[0].refined(r[2], r[1], effort, tick), chosen, stop) if effort \
                else [None] * len(chosen)
            others = [(result, job.weights) for (job, _, _), result in zip(chosen, refined) if result is not None]
            # The encoders (g_a's latent, the size of the picture) are not needed to compare the files.
            ready = [(job, result) for job, result, _ in ready]
            del fitted, chosen, refined
            other_errors = _all(pool, lambda c: _squared_error(pixels, *c), others, stop)
    candidates = [(r[1], e) for r, e in zip(ready, errors)] + [(c[0], e) for c, e in zip(others, other_errors)]
    return min(candidates, key=lambda c: c[1])[0]  # min keeps the earliest of equal values


def _all(pool: ThreadPoolExecutor, fn, items: list, stop: threading.Event) -> list:
    """fn of every item in `pool`, in order; on an interruption, `stop` tells the others to end."""
    futures = [pool.submit(fn, item) for item in items]
    try:
        return [future.result() for future in futures]
    except BaseException:
        stop.set()
        raise


def _squared_error(pixels: np.ndarray, result: EncodeResult, weights: Weights) -> float:
    """Mean squared error of the file's decoded pixels (0 when the file decodes exactly), summed
    exactly in integers `ERROR_ROWS` rows at a time: a 12 MP picture's difference in float64
    would be 290 MB, each temporary."""
    decoded, _ = decode_array(result.data, weights=weights)
    total = 0
    for top in range(0, pixels.shape[0], ERROR_ROWS):
        d = decoded[top:top + ERROR_ROWS].astype(np.int32) - pixels[top:top + ERROR_ROWS]
        total += int(np.square(d, out=d).sum(dtype=np.int64))
    return total / pixels.size


def _closest(pixels: np.ndarray, results: list[tuple[EncodeResult, Weights]]) -> EncodeResult:
    """The result whose decoded pixels have the least squared error (a tie: the earliest)."""
    if len(results) == 1:  # nothing to compare: no decode needed
        return results[0][0]
    return min(results, key=lambda r: _squared_error(pixels, *r))[0]  # min keeps the earliest of equal values


def coded_sizes(model: FrozenModel, pixels: np.ndarray, mode: str, rates: list[float]) -> list[int]:
    """Real file sizes in bytes (header included) of one-pass encodes at each rate q, for a
    frozen model that need not be installed: training validation counts really coded bits."""
    _check_pixels(pixels, mode)
    enc = Encoder(model, pixels, mode)
    return [OVERHEAD + len(enc.payload(round(q * RATE_SCALE))) for q in rates]


def reduced_size(width: int, height: int, reduce: int) -> tuple[int, int]:
    """The (width, height) of a picture decoded `reduce` times smaller: ceil(width / reduce) x
    ceil(height / reduce), as Pillow's `Image.reduce` and JPEG's `draft` make them."""
    return -(-width // reduce), -(-height // reduce)


def _reduction_levels(reduce: int) -> int:
    """k for a `reduce` of 2^k (one of `REDUCTIONS`)."""
    if isinstance(reduce, bool) or reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(map(str, REDUCTIONS))}, got {reduce!r}")
    return int(reduce).bit_length() - 1


def decode_array(data: bytes, *, max_pixels: int = container.DEFAULT_MAX_PIXELS, weights: Weights | None = None,
                 tile_latents: int | None = None, reduce: int = 1) -> tuple[np.ndarray, str]:
    """Decode .lc bytes to uint8 pixels and their mode ("RGB" or "L").

    The weights are the installed ones of the file's model id, or `weights`; either way their
    digest must be the file's. `tile_latents` sets g_s's tiles (None: the model's own).

    `reduce` = 2^k (2, 4, 8 or 16) gives the picture `reduce` times smaller (`reduced_size`;
    SPEC "Reduced-size decoding"): a lifting model's inverse transform stops at level k
    (`FrozenModel.synthesize_reduced`), and with a subband context only the coarse levels' symbols
    are decoded; other models decode the whole picture and average each reduce x reduce block.
    """
    stop = _reduction_levels(reduce)
    header, model, y_hat = decode_latent(data, max_pixels=max_pixels, weights=weights, reduce=reduce)
    q = header.rate_q / RATE_SCALE
    if reduce == 1 and header.width * header.height > DIRECT_PIXELS:
        pixels = np.empty((header.height, header.width, 3), dtype=np.uint8)
        model.synthesize_into(y_hat, q, pixels, **_tiles(tile_latents))
    else:
        if stop and model.config.arch == "lifting":
            width, height = reduced_size(header.width, header.height, reduce)
            x = model.synthesize_reduced(y_hat, q, stop, **_tiles(tile_latents))[0, :, :height, :width]
        else:
            x = model.synthesize(y_hat, q, **_tiles(tile_latents))[:, :, :header.height, :header.width]
            x = box_reduce(x, reduce)[0]
        pixels = to_pixels(x)  # in place: at 8K each full-size float temporary would cost 400 MB
    if header.mode == "L":
        return np.round(pixels.astype(np.float32).mean(axis=2)).astype(np.uint8), "L"
    return np.ascontiguousarray(pixels), "RGB"


def decode_latent(data: bytes, *, max_pixels: int = container.DEFAULT_MAX_PIXELS, weights: Weights | None = None,
                  reduce: int = 1) -> tuple[container.Header, FrozenModel, torch.Tensor]:
    """The first half of `decode_array`: the file's header, its model and ŷ (1, M, h, w) in the
    gained domain, entropy-decoded and checked, before `FrozenModel.synthesize`.

    With `reduce` = 2^k > 1 and a model with a subband context, ŷ has only y's first
    `reduced_channels(k)` channels: h_s computes only their tables, the stream is read up to the
    last pass of level k+1 and not checked for an end (the container's CRC still covers every
    byte). Other models decode the whole ŷ whatever `reduce` is."""
    stop = _reduction_levels(reduce)
    header, payload = container.unpack(data, max_pixels=max_pixels)
    if weights is None:
        entry = MODELS.get(header.model_id)
        if entry is None:
            raise ModelMismatchError(f"the file was made with model id {header.model_id}, "
                                     "which this lcodec does not have")
        if entry.digest4 != header.weights_digest:
            raise ModelMismatchError(f"the file was made with other weights for model {entry.name!r} "
                                     f"(digest {header.weights_digest.hex()}, installed {entry.digest4.hex()})")
        weights = installed_weights(header.model_id)
    elif weights.digest4 != header.weights_digest:
        raise ModelMismatchError(f"the file was made with other weights than {weights.name!r} "
                                 f"(digest {header.weights_digest.hex()}, given {weights.digest4.hex()})")
    model = weights.model
    if model.context is not None and header.version < 2:
        raise CorruptFileError(f"the file is corrupt: it declares format version {header.version}, but model "
                               f"{weights.name!r} codes with a subband context, which needs version 2")
    lo, hi = _rate_bounds(model)
    if not lo <= header.rate_q <= hi:
        # The encoder never writes such a value; far outside it the gains overflow to inf/NaN.
        raise CorruptFileError(f"the file's rate parameter {header.rate_q / RATE_SCALE:g} is outside the range "
                               f"{model.rate_range} of model {weights.name!r}")
    hp, wp = math.ceil(header.height / PAD) * PAD, math.ceil(header.width / PAD) * PAD
    N, M = model.config.N, model.config.M
    zh, zw = hp // PAD, wp // PAD
    dec = range_coder.Decoder(payload)
    z = dec.decode(model.z_index(header.rate_q, zh * zw), model.z_tables)
    z = torch.from_numpy(z.astype(np.int64)).view(1, N, zh, zw)
    partial = stop > 0 and model.context is not None
    channels = reduced_channels(stop) if partial else M
    # The means become ŷ once the symbols are added (h_s's tiles side by side, one thread per operation).
    y_hat, idx = model.latent_entropy_parameters(z, _table_index_dtype(model), channels if partial else None)
    if model.context is None:
        sym = dec.decode(idx.ravel(), model.y_tables)
        del idx
        y_hat.add_(torch.from_numpy(sym).view(1, channels, zh * 4, zw * 4))
        del sym
    else:
        _decode_passes(dec, model, idx, y_hat[0].numpy(), stop)
        del idx
    if not partial:
        dec.finish()
    return header, model, y_hat


def encode_best(pixels: np.ndarray, mode: str, *, bpp: float | None = None, size: int | None = None,
                model_ids: tuple[int, ...] = CHOICE_MODEL_IDS, effort: int = 0, progress=None) -> EncodeResult:
    """Encode to a bpp or size target with each model of `model_ids` and keep the file whose
    decoded pixels have the higher PSNR (on a tie, the earlier model). The file names its model,
    so every decoder reads it. A model that cannot reach the target for this image is skipped;
    if none can, the last model's `RateError` is raised. `effort` and `progress` as for
    `encode_array`: each model's file is refined, and its one-pass file stays a candidate.

    Up to `refine.MAX_PIXELS` the models encode side by side, one thread per torch operation (the
    same bytes whatever the thread setting); a larger image is encoded by one model after the
    other, each with every thread, so that only one model's activations are alive at a time."""
    _check_pixels(pixels, mode)
    _check_effort(effort)
    jobs = [_Job(pixels, mode, bpp, size, None, model_id, installed_weights(model_id)) for model_id in model_ids]
    if pixels.shape[0] * pixels.shape[1] <= refine.MAX_PIXELS:
        return _best_of(pixels, jobs, effort, progress)
    results, error = [], None
    for job in jobs:
        try:
            results.append((job.fit()[0], job.weights))
        except RateError as exc:
            error = exc
    if not results:
        raise error
    return _unrefined(_closest(pixels, results), effort)
