"""The append-only model table: every model id ever written into a .lc file.

An id is never reused and never re-pointed at other weights: a file names its
model id and the first 4 bytes of the weights' SHA-256, and a decoder refuses
weights whose digest does not match. New weights get a new id. The same table
is in `bitstream/SPEC.md`. `MODELS` is read-only: code that runs other weights
passes them to `lcodec.engine` as an argument.

The package ships the weights of `SHIPPED_MODEL_IDS` only (`weights/`); the table
keeps every id with its digest. The weights of the other released models are kept
outside the package (in the repository, `models/archive/`): a decoder finds them in
the folders that the environment variable `LCODEC_WEIGHTS_PATH` names
(os.pathsep-separated, searched after the installed ones), so old files still
decode wherever someone has their weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import ModelMismatchError

def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file (a weights file's digest, as the model table holds it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH_VARIABLE = "LCODEC_WEIGHTS_PATH"


def weights_dirs() -> list[Path]:
    """Where weights files are looked for, in order: the installed ones, then the folders of
    `LCODEC_WEIGHTS_PATH` (read at every call, so a process may set it late)."""
    extra = os.environ.get(WEIGHTS_PATH_VARIABLE, "")
    return [WEIGHTS_DIR, *(Path(p).expanduser().absolute() for p in extra.split(os.pathsep) if p)]


@dataclass(frozen=True)
class ModelEntry:
    model_id: int
    name: str
    filename: str
    sha256: str  # hex digest of the weights file
    retired: bool = False  # not shipped: no release ever wrote a file with this id

    def find(self) -> Path | None:
        """The weights file in the first folder of `weights_dirs()` that has it, or None."""
        return next((d / self.filename for d in weights_dirs() if (d / self.filename).is_file()), None)

    @property
    def installed(self) -> bool:
        return self.find() is not None

    @property
    def path(self) -> Path:
        """The weights file (`find`); its digest is checked when it is loaded.

        Raises `ModelMismatchError` naming the model and what to do where no folder has it:
        this lcodec does not ship it (only `SHIPPED_MODEL_IDS`), or it was retired."""
        found = self.find()
        if found is not None:
            return found
        if self.retired:
            raise ModelMismatchError(f"model id {self.model_id} ({self.name}) was retired before the first release "
                                     "and is not shipped; no released lcodec wrote this file")
        shipped = " and ".join(map(str, sorted(SHIPPED_MODEL_IDS)))
        raise ModelMismatchError(
            f"the weights of model id {self.model_id} ({self.name}) are not installed: this lcodec ships the "
            f"weights of models {shipped} only; put {self.filename} in a folder named by {WEIGHTS_PATH_VARIABLE} "
            "(the lcodec repository keeps it in models/archive/)")

    @property
    def digest4(self) -> bytes:
        """What the container stores: the first 4 bytes of the SHA-256."""
        return bytes.fromhex(self.sha256)[:4]


MODELS: Mapping[int, ModelEntry] = MappingProxyType({
    # id 0: a tiny model (N=8, M=12) trained for a few steps; it exists so that the golden
    # test files pin the format and stay fast. Not for real use.
    0: ModelEntry(0, "tiny-test", "tiny-test.pt", "520e084ac735caff567529a5acf70ca59d5d1390792becfe1c972368257eb217"),
    # ids 1-5: snapshots of the training run of id 6 (models/history/TRAINING_HISTORY.md), retired before
    # the first release; their ids stay taken.
    1: ModelEntry(1, "hp-64-96", "hp-64-96.pt", "3843751f3522cd80867d15bd05843b8d0f9413b18896cbb03ec60c92424a0279", retired=True),
    2: ModelEntry(2, "hp-64-96-v2", "hp-64-96-v2.pt", "d56266d48a504a8eac2e7361d230e6e0451c54293dce250ea279be44d56b9033", retired=True),
    3: ModelEntry(3, "hp-64-256", "hp-64-256.pt", "fa928472a3422b693c95b7d6c728d7a997470ca13a1cf9b94c51edb3439bedee", retired=True),
    4: ModelEntry(4, "hp-64-256-v2", "hp-64-256-v2.pt", "b02e01289b449f73b9990d0546860878d68da8654e7e9a105c64eff564f7e104", retired=True),
    5: ModelEntry(5, "hp-64-96-v3", "hp-64-96-v3.pt", "5560e388cdaac252f6275d262e4dda74dc5d437b309cef2df5debee2d64635aa", retired=True),
    # id 6: mean-scale hyperprior, N=64, M=96, nine levels 0.04-2 bpp (models/history/TRAINING_HISTORY.md).
    6: ModelEntry(6, "hp-64-96-v4", "hp-64-96-v4.pt", "f89554407887dafa92299f583f77ec29d3529cdca8dcaa910cc4feb36fa6b806"),
    # id 7: mean-scale hyperprior over CDF 9/7 lifting (arch "lifting"), N=128, M=768, nine levels.
    7: ModelEntry(7, "lift-97-128", "lift-97-128.pt", "2a16471fa6dc7483043a7169f9bad3793a04232ca40591f5bd62979b3ac6ab51"),
    # id 8: id 7's transform and gains with an entropy model trained on the rate of the rounded latents
    # and Laplacian tables, nine levels.
    8: ModelEntry(8, "lift-97-128-v2", "lift-97-128-v2.pt", "85b5359839bbd22eca5016425fb1b927b94f2d306c1d3009a2b468a54b6abc61"),
    # id 9: id 8's transform, gains and h_a; h_s and the z prior trained for scales down to 0.01,
    # y tables from 0.01 (83), nine levels.
    9: ModelEntry(9, "lift-97-128-v3", "lift-97-128-v3.pt", "794b98e689b9c2232cf8398e275cb58136b8868289d2dd5f7fb8b621d2104266"),
    # id 10: id 9's transform with LL4 split two more 9/7 levels in place (coarse_levels = 2); h_a, h_s
    # and the z prior trained for it, levels refitted to their targets, nine levels.
    10: ModelEntry(10, "lift-97-128-v4", "lift-97-128-v4.pt", "40f822c22ab48a69ca169417e57d78e22b5858dd539513835cb78eae70eedd20"),
    # id 11: id 10 with a post-filter (width 48) ending its synthesis, trained on id 10's decoded images.
    11: ModelEntry(11, "lift-97-128-v5", "lift-97-128-v5.pt", "b9758d0cdd8e18f72327e8925c3d9580722e8e0a9e784189feaad788931fb3d2"),
    # id 12: id 11 with a subband context (`models/context.py`): the detail coefficients coded in
    # passes, coarse to fine, each with a table and a prediction from the symbols coded before;
    # levels refitted to their targets.
    12: ModelEntry(12, "lift-97-128-v6", "lift-97-128-v6.pt", "dc29ceb69918bc39bb3ba66fe0864e2b5ec588bb954ad7d7ab751ee05d3fa5cf"),
    # id 13: id 12 with its LL block coded in passes too, each position's table from its hyper index,
    # its neighbours and the colours before it; levels refitted to their targets.
    13: ModelEntry(13, "lift-97-128-v7", "lift-97-128-v7.pt", "42f1e0c58f5c7cb2f74820320edbe419822c7a950fafefa4f1a4e0dde8368e00"),
    # id 14: id 13 with its post-filter trained further on id 13's decoded images, weighing every rate alike.
    14: ModelEntry(14, "lift-97-128-v8", "lift-97-128-v8.pt", "bcad12a0b9a45e84e0be784fb3109c00832ba78e2243374e5fb4a76cb17f2984"),
    # id 15: id 14 with its post-filter trained further on id 14's decoded images (the top rates weighing
    # more) and z tables per rate (one set for each integer q), levels refitted.
    15: ModelEntry(15, "lift-97-128-v9", "lift-97-128-v9.pt", "090e024e9ae89239c296726b42d0f63c1d72430c740f24afe5c574d07e79bce1"),
})

# The model of one-pass encodes (`rate=`) and of `model_info`.
DEFAULT_MODEL_ID = 15
# The models an encode to a bpp or size target chooses between, per image: it keeps the file
# whose decoded pixels have the higher PSNR (ties: the first). One model: with id 10, id 6 as a
# second choice bought +0.005 / +0.008 dB at 0.06 / 0.12 bpp and nothing from 0.25 bpp (first 8
# Kodak images) for twice the encode time, and each later id is above the one before at every level.
CHOICE_MODEL_IDS = (15,)
# The models whose weights the package ships (`weights/`; pyproject.toml's package-data takes every
# .pt file there, and tests/test_release.py checks that the wheel holds these and nothing else):
# the test model and the models new files are made with. The others' files are in models/archive/.
SHIPPED_MODEL_IDS = frozenset({0, DEFAULT_MODEL_ID, *CHOICE_MODEL_IDS})
