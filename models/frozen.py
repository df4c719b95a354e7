"""The frozen model: what the codec runs. Produced by `lcodec.models.freeze`.

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

and at decode time ŷ = (s + mean) × inv_gain(q) ─► g_s ─crop─► x̂.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import nn

from ..bitstream.tables import CdfTables
from ..errors import ModelMismatchError, ModelNotFrozenError
from .integer_hyper import OUT_BITS, IntegerHyperSynthesis, table_index
from .networks import AnalysisTransform, HyperAnalysisTransform, ModelConfig, SynthesisTransform

FROZEN_FORMAT = "lcodec-frozen-1"
PAD = 64  # g_a downsamples by 16 and h_a by 4 more


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            raise ModelNotFrozenError(f"{path} is not a frozen lcodec model; run `python -m lcodec.models.freeze` first")
        self.config = ModelConfig.from_dict(state["config"])
        N, M = self.config.N, self.config.M
        self.analysis = _load(AnalysisTransform(N, M), state["analysis"])
        self.synthesis = _load(SynthesisTransform(N, M), state["synthesis"])
        self.hyper_analysis = _load(HyperAnalysisTransform(N, M), state["hyper_analysis"])
        self.hyper_synthesis = IntegerHyperSynthesis(state["hyper_synthesis"])
        self.log_gain = state["log_gain"].float()
        self.log_inv_gain = state["log_inv_gain"].float()
        self.y_tables = _tables_from_state(state["y_tables"])
        self.z_tables = _tables_from_state(state["z_tables"])
        self.scale_thresholds = state["scale_thresholds"].long()
        self.rate_range = (float(state["rate_range"][0]), float(state["rate_range"][1]))
        self.info = state.get("info", {})

    @property
    def levels(self) -> tuple[float, ...]:
        return self.config.levels

    def gains(self, q: float) -> tuple[torch.Tensor, torch.Tensor]:
        """gain(q), inv_gain(q) as (1, M, 1, 1): log-linear inter/extrapolation of the levels."""
        L = self.log_gain.shape[0]
        i = min(max(math.floor(q), 0), L - 2)
        t = q - i
        lg = (1 - t) * self.log_gain[i] + t * self.log_gain[i + 1]
        lig = (1 - t) * self.log_inv_gain[i] + t * self.log_inv_gain[i + 1]
        return lg.exp().view(1, -1, 1, 1), lig.exp().view(1, -1, 1, 1)

    @torch.no_grad()
    def analyze(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, 3, H, W) in [0, 1], H and W multiples of 64 -> y before the gain."""
        return self.analysis(x)

    @torch.no_grad()
    def hyper_latent(self, y_gained: torch.Tensor) -> torch.Tensor:
        """ẑ = round(h_a(y_g)) as int64."""
        return torch.round(self.hyper_analysis(y_gained)).to(torch.int64)

    def entropy_parameters(self, z_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From ẑ alone: the mean (float32) and the y table index (int64) of every latent.
        Exact: both sides compute the same values bit for bit."""
        mean_int, scale_int = self.hyper_synthesis(z_int)
        mean = (mean_int.double() / 2**OUT_BITS).float()
        return mean, table_index(scale_int, self.scale_thresholds)

    @torch.no_grad()
    def synthesize(self, y_hat_gained: torch.Tensor, q: float) -> torch.Tensor:
        """ŷ in the gained domain -> x̂ (1, 3, Hp, Wp), clamped to [0, 1]."""
        _, inv_gain = self.gains(q)
        return self.synthesis(y_hat_gained * inv_gain).clamp_(0, 1)


def _load(module: nn.Module, state: dict) -> nn.Module:
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval().requires_grad_(False)
