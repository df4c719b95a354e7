"""How much quality a latent width M can hold at all: the PCA bound.

    python -m kodak_eval.latent_bound --out kodak_eval/results/latent_bound.md

g_a maps each 16 x 16 RGB block (768 samples) to M latents. Even with no
quantisation at all, a transform that keeps M numbers per block loses detail.
The best *linear* transform for MSE on non-overlapping blocks is PCA (the
Karhunen-Loeve transform): this script fits it on blocks of the training crops
(never Kodak), keeps the first M components and reports the PSNR of the 24
Kodak images reconstructed from them.

A learned non-linear transform with overlapping support can beat block PCA,
so this is a guide rather than a hard limit. It is why the M = 96 model's (id 6)
top levels flatten out near 31 dB (see models/weights/MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

BLOCK = 16  # g_a downsamples by 16


def blocks(path: Path) -> np.ndarray:
    """The image's whole 16 x 16 RGB blocks as rows of 768 values in [0, 1]."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    h, w = a.shape[0] // BLOCK, a.shape[1] // BLOCK
    a = a[: h * BLOCK, : w * BLOCK].reshape(h, BLOCK, w, BLOCK, 3)
    return a.transpose(0, 2, 1, 3, 4).reshape(h * w, BLOCK * BLOCK * 3)


def pca_bound(train: list[Path], kodak: list[Path], widths: list[int]) -> dict[int, float]:
    """PSNR (dB, over all Kodak samples) of the M-component block PCA reconstruction, per M."""
    x = np.concatenate([blocks(p) for p in train])
    mean = x.mean(0)
    _, vectors = np.linalg.eigh(np.cov((x - mean).T))
    vectors = vectors[:, ::-1]  # largest variance first
    k = np.concatenate([blocks(p) for p in kodak]) - mean
    out = {}
    for m in widths:
        basis = vectors[:, :m]
        mse = float(((k - (k @ basis) @ basis.T) ** 2).mean())
        out[m] = 10 * np.log10(1.0 / mse)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, default=Path("../shared/data/train"))
    p.add_argument("--kodak", type=Path, default=Path("../shared/data/kodak"))
    p.add_argument("--train-images", type=int, default=400, help="fit PCA on the first K training crops")
    p.add_argument("--widths", type=int, nargs="+", default=[48, 96, 128, 192, 256, 320, 384])
    p.add_argument("--out", type=Path, default=None, help="also write this Markdown table")
    args = p.parse_args(argv)
    train = sorted(args.train.glob("*.png"))[: args.train_images]
    kodak = sorted(args.kodak.glob("*.png"))
    if not train or not kodak:
        raise SystemExit(f"no PNG images in {args.train} or {args.kodak}")
    bound = pca_bound(train, kodak, args.widths)
    lines = [
        "# PCA bound of the latent width (Kodak, no quantisation)",
        "",
        f"Block PCA on 16x16 RGB blocks, fitted on the first {len(train)} crops of `{args.train}`,",
        f"evaluated on the {len(kodak)} Kodak images. `python -m kodak_eval.latent_bound`.",
        "",
        "| M (latents per 16x16 block) | " + " | ".join(str(m) for m in bound) + " |",
        "|---|" + "---:|" * len(bound),
        "| PSNR of the best linear block transform (dB) | " + " | ".join(f"{v:.2f}" for v in bound.values()) + " |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
