"""The README's commands are the real ones: CI runs its test command, and its
lcodec commands work as written."""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SAMPLE = ROOT / "examples" / "sample.png"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.split("&&")[-1].strip() in ci
    assert "pip install -q torch==2.13.0" in ci or "pip install torch==2.13.0" in ci


def _lcodec_steps(line: str) -> list[list[str]]:
    return [shlex.split(part) for part in line.split("&&") if part.strip().startswith("lcodec ")]


def test_readme_quickstart_commands_run(tmp_path):
    """The first command's lcodec steps, verbatim, in a copy of what a fresh clone has: the sample only.

    Run twice, as a user may: `--force` makes the second run overwrite.
    """
    setup = next(line for block in _bash_blocks() for line in block.splitlines() if "lcodec encode" in line)
    inputs = {a for argv in _lcodec_steps(setup) for a in argv if a.startswith("examples/")}
    assert inputs == {"examples/sample.png"}  # nothing from outside the repository
    (tmp_path / "examples").mkdir()
    shutil.copy(SAMPLE, tmp_path / "examples")
    for _ in range(2):
        for argv in _lcodec_steps(setup):
            proc = subprocess.run([sys.executable, "-m", "lcodec", *argv[1:]], cwd=tmp_path, capture_output=True,
                                  text=True)
            assert proc.returncode == 0, proc.stderr
    width, height = Image.open(SAMPLE).size
    size = (tmp_path / "out" / "sample.lc").stat().st_size
    assert 0.97 * 0.25 * width * height / 8 <= size <= 0.25 * width * height / 8
    assert Image.open(tmp_path / "out" / "sample.png").size == (width, height)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples", "out"]  # the outputs go to out/ only
    assert "/out/" in (ROOT / ".gitignore").read_text().splitlines()  # and git ignores them


def test_sample_is_what_its_script_draws():
    """examples/sample.png is the committed output of examples/make_sample.py (so its licence is the repo's)."""
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    drawn = make_sample.sample_pixels().astype(int)
    committed = np.asarray(Image.open(SAMPLE).convert("RGB")).astype(int)
    assert committed.shape == drawn.shape
    assert np.abs(committed - drawn).max() <= 1  # float64 rounding may differ between machines, by one step
    assert SAMPLE.stat().st_size < 50_000


def test_test_extra_installs_what_the_benchmark_tests_need():
    """`.[test]` (the README's test command) brings kodak_eval's packages: its tests run, not skip."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "lcodec[bench]" in extras["test"]
    for package in ("scipy", "matplotlib", "imagecodecs", "av"):
        assert any(req.startswith(package) for req in extras["bench"]), package


def test_readme_usage_commands_parse(tmp_path):
    """Every `lcodec ...` line of the usage block is accepted by the CLI (checked with --help)."""
    usage = next(block for block in _bash_blocks() if "lcodec info" in block)
    commands = {line.split()[1] for line in usage.splitlines() if line.startswith("lcodec ")}
    assert commands == {"encode", "decode", "info"}
    for cmd in commands:
        proc = subprocess.run([sys.executable, "-m", "lcodec", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "Example" in proc.stdout


def test_documented_modules_exist(monkeypatch):
    """Every `python -m X` and `torchrun ... -m X` in the READMEs and the model card names a module that exists."""
    monkeypatch.syspath_prepend(str(ROOT))  # kodak_eval is run from the repository, not installed
    docs = [ROOT / "README.md", ROOT / "kodak_eval" / "README.md", ROOT / "models" / "weights" / "MODEL_CARD.md",
            ROOT / "models" / "history" / "TRAINING_HISTORY.md"]
    names = {m for doc in docs for m in re.findall(r"(?<![\w-])-m ([A-Za-z_][\w.]*)", doc.read_text())}
    assert {"lcodec.models.training.train", "kodak_eval.model_table"} <= names
    for name in sorted(names):
        assert importlib.util.find_spec(name) is not None, name


def test_documented_training_commands_parse():
    """Every `python -m lcodec.models.training.train` command in the README (continuation lines
    joined; those built from shell variables or elided with ... left out) parses, and every recipe
    command in the README and the model card names a recipe the runner can follow."""
    from lcodec.models.training import recipe, train

    text = README.replace("\\\n", " ")
    commands = [line.split("lcodec.models.training.train", 1)[1] for line in text.splitlines()
                if "-m lcodec.models.training.train " in line and "$" not in line and "..." not in line]
    assert commands
    for args in commands:
        train.parse_args(shlex.split(args))
    for doc in (ROOT / "README.md", ROOT / "models" / "weights" / "MODEL_CARD.md"):
        recipes = re.findall(r"-m lcodec\.models\.training\.recipe (\S+)", doc.read_text())
        assert recipes, doc
        for path in recipes:
            recipe.load(ROOT / path)
