"""Freeze a trained model into the file the codec ships and runs.

    python -m lcodec.models.training.freeze runs/hp64/checkpoint.pt models/weights/my-model.pt

Freezing is an explicit step (STYLE: train -> freeze): it
* stores g_a, g_s, h_a and the rate gains in fp16,
* quantises h_s to integer layers (`integer_hyper`),
* builds the entropy tables: one zero-mean discretised Gaussian (or Laplacian,
  as the model was trained) per entry of the scale table for y (`scale_table`:
  log-spaced from the model's scale bound to 256, 64 scales from 0.11 as in
  CompressAI, more from a smaller bound),
  and one table per channel of z from the learned factorized prior,
* prints the SHA-256 that goes into the model table (`registry.py`, SPEC.md).
The runtime (`FrozenModel`) accepts nothing else.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch

from ...bitstream.tables import gaussian_tables, laplace_tables, pmf_tables
from ..frozen import FROZEN_FORMAT
from ..registry import sha256_file
from ..integer_hyper import quantize_hyper_synthesis, scale_thresholds
from ..networks import MeanScaleHyperprior, ModelConfig, build_model

SCALE_MAX = 256.0
SCALE_STEP = math.log(SCALE_MAX / 0.11) / 63  # the log spacing of CompressAI's 64 scales from 0.11
Z_SUPPORT = 255  # the z prior is tabulated on -255..255 before trimming its tails
RATE_MARGIN = (2.0, 4.0)  # q may go this far below level 0 and above the top level
Y_TABLES = {"gaussian": gaussian_tables, "laplace": laplace_tables}


def scale_table(bound: float) -> np.ndarray:
    """The scales of the y tables: log-spaced from `bound` to `SCALE_MAX`, `SCALE_STEP` apart (to
    rounding); from 0.11, CompressAI's 64 scales."""
    n = round(math.log(SCALE_MAX / bound) / SCALE_STEP) + 1
    return np.exp(np.linspace(math.log(bound), math.log(SCALE_MAX), n))


def fp16_state(module: torch.nn.Module) -> dict:
    """A module's state as the frozen file stores it: every tensor in fp16."""
    return {k: v.detach().half() for k, v in module.state_dict().items()}


def _tables_state(tables) -> dict:
    arrays = tables.to_arrays()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items() if k != "precision"} | {
        "precision": int(tables.precision)}


def freeze(model: MeanScaleHyperprior, out: Path, info: dict | None = None, nearest_scale: bool = True) -> str:
    """Write the frozen file for `model` to `out` (atomically); return its SHA-256. Each latent is
    coded with the table whose scale is nearest in log to its predicted one (`nearest_scale`), or
    with the smallest table scale not below it (the rule models 0-7 were frozen with)."""
    model = model.float().eval()
    support, pmf = model.hyper_prior.integer_pmf(-Z_SUPPORT, Z_SUPPORT)
    L = len(model.config.levels)
    scales = scale_table(model.config.scale_bound)
    state = {
        "format": FROZEN_FORMAT,
        "config": model.config.to_dict(),
        "analysis": fp16_state(model.analysis),
        # The lifting model's g_s is its g_a run backwards: nothing more to store.
        "synthesis": {} if model.config.arch == "lifting" else fp16_state(model.synthesis),
        "hyper_analysis": fp16_state(model.hyper_analysis),
        "hyper_synthesis": quantize_hyper_synthesis(model.hyper_synthesis),
        "log_gain": model.gains.log_gain.detach().half(),
        "log_inv_gain": model.gains.log_inv_gain.detach().half(),
        "y_tables": _tables_state(Y_TABLES[model.config.likelihood](scales, precision=20)),
        "scale_thresholds": scale_thresholds(torch.from_numpy(scales), nearest=nearest_scale),
        "z_tables": _tables_state(pmf_tables(pmf, int(support[0]))),
        "rate_range": [-RATE_MARGIN[0], L - 1 + RATE_MARGIN[1]],
        "info": dict(info or {}),
    }
    return write_frozen(state, out)


def write_frozen(state: dict, out: Path) -> str:
    """Save a frozen model's state to `out` atomically; return the file's SHA-256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return sha256_file(out)


def load_checkpoint(path: Path) -> tuple[MeanScaleHyperprior, dict]:
    """The model of a training checkpoint (see `lcodec.models.training.train`), plus its metadata."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    config = ModelConfig.from_dict(ck["config"])
    if config.arch not in ("hyperprior", "lifting"):
        raise SystemExit("only the mean-scale hyperprior models can be frozen for the codec")
    model = build_model(config)
    model.load_state_dict({k: v.float() for k, v in ck["model"].items()})
    meta = {"step": int(ck["step"]), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in ck["args"].items()}}
    return model, meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--round-scale-up", action="store_true",
                   help="code each latent with the smallest table scale not below its predicted scale "
                        "(default: the table scale nearest in log)")
    args = p.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint)
    digest = freeze(model, args.out, info={"training": meta}, nearest_scale=not args.round_scale_up)
    print(f"{args.out}: sha256 {digest} (step {meta['step']})")


if __name__ == "__main__":
    main()
