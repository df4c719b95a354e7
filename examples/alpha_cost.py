#!/usr/bin/env python
"""What lcodec's alpha costs against WebP's and AVIF's, on synthetic logos and Kodak cut-outs.

    python examples/alpha_cost.py [--kodak ../shared/data/kodak]

Each picture is made here, in memory (nothing is written, no Kodak data leaves its folder):
an antialiased logo (shapes and text drawn at 4x and reduced), a hard-edged icon, and three
768x512 cut-outs of Kodak images (kodim23 under a feathered ellipse and under a colour
segmentation mask with 1-pixel soft edges, kodim04 under a hard ellipse). For each it prints the
bytes of

* lcodec: the ALPH chunk (`lcodec.alpha.encode`: lossless WebP of the plane), plus its 8-byte head;
* PNG: Pillow's PNG of the plane at ``optimize=True`` (zlib);
* WebP: the ALPH chunk of Pillow's RGBA WebP at its defaults (quality 80, method 4, lossless alpha
  with the fast filter: cwebp's defaults);
* AVIF: imagecodecs' AVIF of the RGBA picture less that of the RGB picture, at level 60 (lossy
  colour; the alpha is coded as a second AV1 picture), and a lossless monochrome AVIF of the plane.

AVIF and imagecodecs come with the ``bench`` extra (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lcodec import alpha


def logo() -> np.ndarray:
    s, w, h = 4, 512, 256
    big = Image.new("RGBA", (w * s, h * s), (0, 0, 0, 0))
    d = ImageDraw.Draw(big)
    d.ellipse((20 * s, 20 * s, 236 * s, 236 * s), fill=(220, 40, 40, 255))
    d.rounded_rectangle((120 * s, 60 * s, 480 * s, 200 * s), radius=40 * s, fill=(30, 90, 200, 200))
    d.polygon([(300 * s, 10 * s), (500 * s, 240 * s), (260 * s, 240 * s)], fill=(250, 200, 0, 255))
    d.text((150 * s, 90 * s), "lcodec", fill=(255, 255, 255, 255), font=ImageFont.load_default(size=60 * s))
    return np.asarray(big.resize((w, h), Image.LANCZOS))


def icon() -> np.ndarray:
    im = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rectangle((32, 32, 224, 224), fill=(0, 120, 0, 255))
    d.ellipse((64, 64, 192, 192), fill=(0, 0, 0, 0))
    return np.asarray(im)


def cut_outs(kodak: Path) -> dict[str, np.ndarray]:
    parrots = np.asarray(Image.open(kodak / "kodim23.png").convert("RGB"))
    h, w = parrots.shape[:2]
    y, x = np.mgrid[:h, :w]
    r = np.hypot((x - w * 0.45) / (w * 0.3), (y - h * 0.5) / (h * 0.42))
    soft = np.round(255 * np.clip((1.08 - r) / 0.08, 0, 1)).astype(np.uint8)
    saturation = np.asarray(Image.fromarray(parrots).convert("HSV"))[:, :, 1]
    mask = Image.fromarray(np.where(saturation > 110, 255, 0).astype(np.uint8))
    segment = np.asarray(mask.filter(ImageFilter.MedianFilter(9)).filter(ImageFilter.GaussianBlur(1.2)))
    hat = np.asarray(Image.open(kodak / "kodim04.png").convert("RGB"))
    h, w = hat.shape[:2]
    y, x = np.mgrid[:h, :w]
    hard = np.where(((x - w / 2) / (w * 0.35)) ** 2 + ((y - h * 0.45) / (h * 0.4)) ** 2 < 1, 255, 0).astype(np.uint8)
    return {"kodim23, feathered ellipse": np.dstack([parrots, soft]),
            "kodim23, segmentation mask": np.dstack([parrots, segment]),
            "kodim04, hard ellipse": np.dstack([hat, hard])}


def webp_alpha_chunk(rgba: np.ndarray) -> int:
    out = io.BytesIO()
    Image.fromarray(rgba).save(out, format="WEBP")  # Pillow's defaults: quality 80, method 4, alpha_quality 100
    data, pos = out.getvalue(), 12
    while pos + 8 <= len(data):
        tag, n = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if tag == b"ALPH":
            return n + 8
        pos += 8 + n + (n & 1)
    return 0


def costs(rgba: np.ndarray) -> dict[str, int]:
    import imagecodecs

    plane = np.ascontiguousarray(rgba[:, :, 3])
    png = io.BytesIO()
    Image.fromarray(plane).save(png, format="PNG", optimize=True)
    rgb = np.ascontiguousarray(rgba[:, :, :3])
    return {"lcodec": 8 + len(alpha.encode(plane)), "PNG": len(png.getvalue()), "WebP": webp_alpha_chunk(rgba),
            "AVIF": len(imagecodecs.avif_encode(rgba, level=60)) - len(imagecodecs.avif_encode(rgb, level=60)),
            "AVIF lossless": len(imagecodecs.avif_encode(plane, level=100))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kodak", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kodak")
    args = parser.parse_args()
    pictures = {"logo 512x256, antialiased": logo(), "icon 256x256, hard edges": icon()}
    if (args.kodak / "kodim23.png").exists():
        pictures |= cut_outs(args.kodak)
    rows = {name: costs(p) for name, p in pictures.items()}
    columns = list(next(iter(rows.values())))
    print("| alpha bytes | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:,}" for c in columns) + " |")


if __name__ == "__main__":
    main()
