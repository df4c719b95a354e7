"""The torch side of the codec: pixels <-> .lc bytes with a frozen model.

`encode_array` / `decode_array` work on numpy pixels; `lcodec.api` wraps them
for PIL images and files. Only this module (and `lcodec.models`) import torch,
and `lcodec.api` imports this module lazily, so `lcodec info` stays light.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .bitstream import container, range_coder
from .bitstream.container import RATE_SCALE
from .errors import CorruptFileError, ModelMismatchError, RateError, UnsupportedImageError
from .models.frozen import PAD, FrozenModel
from .models.registry import DEFAULT_MODEL_ID, MODELS
from .ratecontrol import search

OVERHEAD = container.OVERHEAD_BYTES


@dataclass(frozen=True)
class EncodeResult:
    data: bytes
    rate: float  # the rate parameter q used
    bpp: float  # real bits per pixel of the whole file
    target_bytes: int | None
    warning: str | None = None  # e.g. the model's top rate was reached below the target


@functools.lru_cache(maxsize=4)
def load_model(model_id: int = DEFAULT_MODEL_ID) -> FrozenModel:
    """The frozen model of the table entry `model_id`, loaded once per process."""
    entry = MODELS.get(model_id)
    if entry is None:
        raise ModelMismatchError(f"this lcodec does not know model id {model_id}; a newer lcodec may")
    if not entry.path.exists():
        raise ModelMismatchError(f"the weights of model {entry.name!r} ({entry.path.name}) are not installed")
    return FrozenModel(entry.path, entry.sha256)


def model_info(model_id: int = DEFAULT_MODEL_ID) -> dict:
    model = load_model(model_id)
    entry = MODELS[model_id]
    return {"name": entry.name, "model_id": model_id, "digest": entry.sha256, "levels": list(model.levels),
            "rate_range": model.rate_range}


def _rate_bounds(model: FrozenModel) -> tuple[int, int]:
    """The model's rate range as rate_q integers (both ends allowed)."""
    lo, hi = model.rate_range
    return round(lo * RATE_SCALE), round(hi * RATE_SCALE)


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
    """Checked pixels -> (1, 3, Hp, Wp) float in [0, 1], padded to multiples of PAD."""
    if mode == "L":
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    h, w = pixels.shape[:2]
    x = torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    hp, wp = math.ceil(h / PAD) * PAD, math.ceil(w / PAD) * PAD
    # Edge replication is cheaper to code than zeros; the decoder crops it away.
    return F.pad(x, (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x


class _Encoder:
    """One image's encoder state: g_a has run once; each rate probe reuses y."""

    def __init__(self, model: FrozenModel, model_id: int, pixels: np.ndarray, mode: str):
        self.model, self.model_id, self.mode = model, model_id, mode
        self.height, self.width = pixels.shape[:2]
        self.y = model.analyze(_to_tensor(pixels, mode))
        zh, zw = self.y.shape[2] // 4, self.y.shape[3] // 4
        self.z_index = np.repeat(np.arange(model.config.N), zh * zw)

    def _symbols(self, rq: int, exact: bool = True):
        """ẑ, the y symbols and their table indices at rate rq. `exact=False` runs h_s in
        float32 (for estimates only: a few indices may differ from the bitstream's)."""
        gain, _ = self.model.gains(rq / RATE_SCALE)
        y_g = self.y * gain
        z = self.model.hyper_latent(y_g)
        params = self.model.entropy_parameters if exact else self.model.approximate_entropy_parameters
        mean, idx = params(z)
        sym = torch.round(y_g - mean).to(torch.int64)
        return z.numpy().ravel(), sym.numpy().ravel(), idx.numpy().ravel()

    def estimate_bytes(self, rq: int) -> float:
        """Predicted file size at rq: the ideal code length under the frozen tables (the real
        coder is within ~0.01% of it), with the fast float32 hyper-synthesis."""
        z, sym, idx = self._symbols(rq, exact=False)
        bits = self.model.z_tables.cost_bits(z, self.z_index) + self.model.y_tables.cost_bits(sym, idx)
        return OVERHEAD + bits / 8

    def payload(self, rq: int) -> bytes:
        """The range-coded stream at rq (everything of the file but the header and CRC)."""
        z, sym, idx = self._symbols(rq)
        return range_coder.encode([(z, self.z_index, self.model.z_tables), (sym, idx, self.model.y_tables)])

    def encode(self, rq: int) -> bytes:
        payload = self.payload(rq)
        header = container.Header(
            version=container.FORMAT_VERSION, model_id=self.model_id, weights_digest=MODELS[self.model_id].digest4,
            width=self.width, height=self.height, mode=self.mode, rate_q=rq, payload_size=len(payload))
        return container.pack(header, payload)


def _search_start(estimate: Callable[[int], float], lo: int, below: float) -> int:
    """Where the rate search starts: walking down from level 0 in quarter steps, the first rq
    whose estimated file is at most `below` bytes, else the one with the smallest file.

    Below level 0 the gains are extrapolated, and a channel whose gain falls from level 0
    to level 1 gets a larger gain there: the size can grow again towards the bottom of the
    range (model 3's does, from about q = -0.5 down). The search needs a range where the
    size rises with rq, so the walk stops where the size stops falling. A target at or
    above level 0's size costs no step at all (the search probes level 0 anyway)."""
    step = RATE_SCALE // 4
    rq = 0
    while estimate(rq) > below and rq - step >= lo and estimate(rq - step) < estimate(rq):
        rq -= step
    return rq


def encode_array(pixels: np.ndarray, mode: str, *, bpp: float | None = None, size: int | None = None,
                 rate: float | None = None, model_id: int = DEFAULT_MODEL_ID) -> EncodeResult:
    """Encode uint8 pixels ((H, W, 3) RGB or (H, W) L) to .lc bytes.

    Exactly one of: `bpp` (file <= bpp*H*W/8 bytes, header included), `size`
    (file <= size bytes), `rate` (the rate parameter q itself: one pass, no search).
    """
    if sum(v is not None for v in (bpp, size, rate)) != 1:
        raise ValueError("give exactly one of bpp, size or rate")
    _check_pixels(pixels, mode)
    height, width = pixels.shape[:2]
    pixels_n = width * height
    model = load_model(model_id)
    lo, hi = _rate_bounds(model)
    if rate is not None:
        rq = round(rate * RATE_SCALE)
        if not lo <= rq <= hi:
            raise RateError(f"rate parameter {rate} is outside the model's range {model.rate_range}")
        data = _Encoder(model, model_id, pixels, mode).encode(rq)
        return EncodeResult(data, rq / RATE_SCALE, 8 * len(data) / pixels_n, None)

    if bpp is not None:
        if not (bpp > 0 and math.isfinite(bpp)):
            raise RateError(f"--bpp must be a positive number, got {bpp}")
        target = math.floor(bpp * pixels_n / 8)
        asked = f"{bpp:g} bpp ({target} bytes)"
    else:
        if size <= 0:
            raise RateError(f"--size must be a positive number of bytes, got {size}")
        target = int(size)
        asked = f"{target} bytes ({8 * target / pixels_n:.4g} bpp)"
    if target <= OVERHEAD:
        raise RateError(f"{asked} is too small for a {width}x{height} image: "
                        f"the .lc header alone takes {OVERHEAD} bytes")
    enc = _Encoder(model, model_id, pixels, mode)  # runs g_a: only after the cheap checks
    estimate = functools.cache(enc.estimate_bytes)  # the walk's probes are the search's too
    encode = functools.cache(enc.encode)  # the error below reports a file the search has made
    # Where the levels' nominal rates put the target (log-linear between them): the
    # search's first guess. Images differ from the levels' training crops by +-15% or so.
    levels = np.log(model.levels)
    guess = round(RATE_SCALE * np.interp(math.log(8 * target / pixels_n), levels, np.arange(len(levels))))
    start = _search_start(estimate, lo, target)
    found = search(estimate, encode, target, start, hi, guess=guess)
    if found is None:  # under the target nowhere from start up: go on down to the smallest file
        bottom = _search_start(estimate, lo, 0)
        found = search(estimate, encode, target, bottom, hi) if bottom < start else None
    if found is None:
        smallest = len(encode(bottom))
        raise RateError(f"cannot reach {asked} for this {enc.width}x{enc.height} image: the smallest file "
                        f"lcodec can make for it is {smallest} bytes ({8 * smallest / pixels_n:.4g} bpp)")
    data = found.data
    warning = None
    if len(data) < 0.97 * target:
        warning = (f"the file is {len(data)} bytes, {100 * (1 - len(data) / target):.1f}% under the {asked} asked for: "
                   + ("the model's highest rate is reached" if found.rq == hi else
                      "the rate steps of this small image are coarser than 3%"))
    return EncodeResult(data, found.rq / RATE_SCALE, 8 * len(data) / pixels_n, target, warning)


def coded_sizes(model: FrozenModel, pixels: np.ndarray, mode: str, rates: list[float]) -> list[int]:
    """Real file sizes in bytes (header included) of one-pass encodes at each rate q, for a
    frozen model that need not be installed: training validation counts really coded bits."""
    _check_pixels(pixels, mode)
    enc = _Encoder(model, -1, pixels, mode)  # no model id: nothing here writes a header
    return [OVERHEAD + len(enc.payload(round(q * RATE_SCALE))) for q in rates]


def decode_array(data: bytes, *, max_pixels: int = container.DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Decode .lc bytes to uint8 pixels and their mode ("RGB" or "L")."""
    header, payload = container.unpack(data, max_pixels=max_pixels)
    entry = MODELS.get(header.model_id)
    if entry is None:
        raise ModelMismatchError(f"the file was made with model id {header.model_id}, which this lcodec does not have")
    if entry.digest4 != header.weights_digest:
        raise ModelMismatchError(f"the file was made with other weights for model {entry.name!r} "
                                 f"(digest {header.weights_digest.hex()}, installed {entry.digest4.hex()})")
    model = load_model(header.model_id)
    lo, hi = _rate_bounds(model)
    if not lo <= header.rate_q <= hi:
        # The encoder never writes such a value; far outside it the gains overflow to inf/NaN.
        raise CorruptFileError(f"the file's rate parameter {header.rate_q / RATE_SCALE:g} is outside the range "
                               f"{model.rate_range} of model {entry.name!r}")
    hp, wp = math.ceil(header.height / PAD) * PAD, math.ceil(header.width / PAD) * PAD
    N, M = model.config.N, model.config.M
    zh, zw = hp // PAD, wp // PAD
    dec = range_coder.Decoder(payload)
    z = dec.decode(np.repeat(np.arange(N), zh * zw), model.z_tables)
    z = torch.from_numpy(z.astype(np.int64)).view(1, N, zh, zw)
    mean, idx = model.entropy_parameters(z)
    sym = dec.decode(idx.numpy().ravel(), model.y_tables)
    dec.finish()
    del idx
    y_hat = torch.from_numpy(sym.astype(np.float32)).view(1, M, zh * 4, zw * 4).add_(mean)
    del sym, mean
    x = model.synthesize(y_hat, header.rate_q / RATE_SCALE)[0, :, :header.height, :header.width]
    # In place: at 8K each full-size float temporary would cost 400 MB of peak memory.
    pixels = x.nan_to_num_(nan=0.0).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    if header.mode == "L":
        return np.round(pixels.astype(np.float32).mean(axis=2)).astype(np.uint8), "L"
    return np.ascontiguousarray(pixels), "RGB"
