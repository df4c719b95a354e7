"""Writes the golden .lc files of tests/golden/ (run once per format version).

    python tests/golden/make_golden.py

Never regenerate an existing golden file: they pin format version 1 and the
tiny test model (id 0). A new format version adds new files beside them.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from lcodec import engine

HERE = Path(__file__).resolve().parent


def images() -> dict[str, tuple[np.ndarray, str, float]]:
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, (xx + yy) * 2 % 256], axis=2).astype(np.uint8)
    rng = np.random.default_rng(7)
    gray = (np.add.outer(np.arange(37) * 6, np.arange(65) * 3) % 256).astype(np.uint8)
    gray = np.clip(gray.astype(int) + rng.integers(-8, 9, gray.shape), 0, 255).astype(np.uint8)
    return {"v1_rgb_64x48": (rgb, "RGB", 5.0), "v1_gray_65x37": (gray, "L", 2.0)}


def main() -> None:
    manifest = {}
    for name, (pixels, mode, rate) in images().items():
        path = HERE / f"{name}.lc"
        if path.exists():
            raise SystemExit(f"{path} exists: golden files are never regenerated")
        data = engine.encode_array(pixels, mode, rate=rate, model_id=0).data
        path.write_bytes(data)
        decoded, _ = engine.decode_array(data)
        manifest[path.name] = {"mode": mode, "shape": list(decoded.shape),
                               "pixels_sha256": hashlib.sha256(decoded.tobytes()).hexdigest(),
                               "file_sha256": hashlib.sha256(data).hexdigest()}
    (HERE / "golden.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
