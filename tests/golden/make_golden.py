"""Writes the golden .lc files of tests/golden/ (run once per format version).

    python tests/golden/make_golden.py

Never regenerate an existing golden file: they pin a format version (`v<n>_`) and a model
each (id 0, the tiny test model, unless the name says `_m<id>`). A new format
version or a new shipped model adds files beside them; existing ones are skipped.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from lcodec import engine

HERE = Path(__file__).resolve().parent


def images() -> dict[str, tuple[np.ndarray, str, float, int]]:
    from PIL import Image

    sample = np.asarray(Image.open(HERE.parents[1] / "examples" / "sample.png").convert("RGB"))
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, (xx + yy) * 2 % 256], axis=2).astype(np.uint8)
    rng = np.random.default_rng(7)
    gray = (np.add.outer(np.arange(37) * 6, np.arange(65) * 3) % 256).astype(np.uint8)
    gray = np.clip(gray.astype(int) + rng.integers(-8, 9, gray.shape), 0, 255).astype(np.uint8)
    return {"v1_rgb_64x48": (rgb, "RGB", 5.0, 0), "v1_gray_65x37": (gray, "L", 2.0, 0),
            "v1_rgb_64x48_m6": (rgb, "RGB", 5.0, 6), "v1_rgb_64x48_m7": (rgb, "RGB", 5.0, 7),
            "v1_rgb_64x48_m8": (rgb, "RGB", 5.0, 8), "v1_rgb_64x48_m9": (rgb, "RGB", 5.0, 9),
            "v1_rgb_64x48_m10": (rgb, "RGB", 5.0, 10), "v1_rgb_64x48_m11": (rgb, "RGB", 5.0, 11),
            # Format version 2 and the subband context: the small picture, and one whose bands
            # are big enough for every label and prediction to occur.
            "v2_rgb_64x48_m12": (rgb, "RGB", 5.0, 12), "v2_sample_256x176_m12": (sample, "RGB", 4.0, 12),
            "v2_rgb_64x48_m13": (rgb, "RGB", 5.0, 13), "v2_sample_256x176_m13": (sample, "RGB", 4.0, 13),
            "v2_rgb_64x48_m14": (rgb, "RGB", 5.0, 14), "v2_sample_256x176_m14": (sample, "RGB", 4.0, 14),
            # z tables per rate: a high rate's bucket as well.
            "v2_rgb_64x48_m15": (rgb, "RGB", 5.0, 15), "v2_sample_256x176_m15": (sample, "RGB", 4.0, 15),
            "v2_sample_256x176_m15_q9": (sample, "RGB", 9.0, 15)}


def main() -> None:
    manifest_path = HERE / "golden.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name, (pixels, mode, rate, model_id) in images().items():
        path = HERE / f"{name}.lc"
        if path.exists():
            continue  # golden files are never regenerated
        data = engine.encode_array(pixels, mode, rate=rate, model_id=model_id).data
        path.write_bytes(data)
        decoded, _ = engine.decode_array(data)
        manifest[path.name] = {"mode": mode, "shape": list(decoded.shape),
                               "pixels_sha256": hashlib.sha256(decoded.tobytes()).hexdigest(),
                               "file_sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
