"""What a release ships: the code, the default model's and the test model's weights, the model
card and the SPEC -- no other weights, logs, curves or result tables, and under 15 MB. Files of
the released models it does not ship fail with a clear error, and decode where their archived
weights are found."""

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import lcodec
from conftest import ARCHIVE
from lcodec import engine
from lcodec.errors import ModelMismatchError
from lcodec.models.registry import MODELS, SHIPPED_MODEL_IDS, WEIGHTS_PATH_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
MAX_WHEEL_BYTES = 15_000_000
SHIPPED_FILES = {f"lcodec/models/weights/{MODELS[i].filename}": MODELS[i].sha256 for i in SHIPPED_MODEL_IDS}
DOCUMENTS = {"lcodec/models/weights/MODEL_CARD.md", "lcodec/bitstream/SPEC.md"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of what a fresh clone builds from: pyproject.toml, README, LICENSE and
    the package folders, everything in them included (the archive, the history and the run
    states sit there too). A copy, because building in place leaves a build/ folder whose stale
    files go into the next wheel."""
    tmp = tmp_path_factory.mktemp("release")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in sorted(set(config["package-dir"].values())):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp / "dist")], check=True, capture_output=True)
    (built,) = (tmp / "dist").glob("lcodec-*.whl")
    return built


def test_the_wheel_ships_the_code_two_weights_files_and_two_documents_only(wheel):
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = {name.replace(".", "/") for name in config["packages"]}
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if ".dist-info/" not in n]
        data = {n for n in names if not (n.endswith(".py") and n.rsplit("/", 1)[0] in package_dirs)}
        assert data == set(SHIPPED_FILES) | DOCUMENTS
        for name, sha256 in SHIPPED_FILES.items():
            assert hashlib.sha256(z.read(name)).hexdigest() == sha256, name
        installed = sum(info.file_size for info in z.infolist())
    assert wheel.stat().st_size <= MAX_WHEEL_BYTES, f"{wheel.stat().st_size:,} bytes ({installed:,} installed)"


def test_the_shipped_models_are_the_test_model_and_the_models_new_files_use():
    assert SHIPPED_MODEL_IDS == {0, engine.DEFAULT_MODEL_ID, *engine.CHOICE_MODEL_IDS}
    assert all(not MODELS[i].retired for i in SHIPPED_MODEL_IDS)


def test_the_archive_holds_every_released_model_the_package_does_not_ship():
    """So that their files keep decoding (with LCODEC_WEIGHTS_PATH): each with its digest."""
    released = {e.filename: e.sha256 for i, e in MODELS.items() if not e.retired and i not in SHIPPED_MODEL_IDS}
    assert {p.name for p in ARCHIVE.glob("*.pt")} == set(released)
    for name, sha256 in released.items():
        assert hashlib.sha256((ARCHIVE / name).read_bytes()).hexdigest() == sha256, name


def test_a_file_of_a_model_that_is_not_installed_fails_clearly(cli, tmp_path, monkeypatch, no_leftovers):
    """One line that names the model and says what to do; no traceback, no output file."""
    monkeypatch.delenv(WEIGHTS_PATH_VARIABLE, raising=False)
    engine.load_model.cache_clear()  # another test may have loaded the archived weights in this process
    src = tmp_path / "old.lc"
    src.write_bytes((GOLDEN / "v1_rgb_64x48_m7.lc").read_bytes())
    with pytest.raises(ModelMismatchError, match=r"model id 7 \(lift-97-128\) are not installed.*LCODEC_WEIGHTS_PATH"):
        lcodec.decode(src.read_bytes())
    result = cli("decode", src, "-o", tmp_path / "old.png")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "lift-97-128.pt" in result.stderr and WEIGHTS_PATH_VARIABLE in result.stderr
    no_leftovers(tmp_path, "old.lc")

    monkeypatch.setenv(WEIGHTS_PATH_VARIABLE, os.pathsep.join([str(tmp_path / "nowhere"), str(ARCHIVE)]))
    assert cli("decode", src, "-o", tmp_path / "old.png").exit_code == 0
