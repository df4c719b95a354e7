"""The README's commands are the real ones: CI runs its test command, and its
lcodec commands work as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
KODAK = ROOT.parent / "shared" / "data" / "kodak"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.split("&&")[-1].strip() in ci
    assert "pip install -q torch==2.13.0" in ci or "pip install torch==2.13.0" in ci


def _lcodec_steps(line: str) -> list[list[str]]:
    return [shlex.split(part) for part in line.split("&&") if part.strip().startswith("lcodec ")]


@pytest.mark.skipif(not (KODAK / "kodim23.png").exists(), reason="../shared/data/kodak is not present")
def test_readme_quickstart_commands_run(tmp_path):
    setup = next(line for block in _bash_blocks() for line in block.splitlines() if "lcodec encode" in line)
    for argv in _lcodec_steps(setup):
        argv = [str(KODAK / "kodim23.png") if a.startswith("../shared/data/kodak/") else a for a in argv]
        proc = subprocess.run([sys.executable, "-m", "lcodec", *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    lc = tmp_path / "kodim23.lc"
    assert lc.stat().st_size <= 0.25 * 768 * 512 / 8
    assert (tmp_path / "kodim23.png").stat().st_size > 0


def test_readme_usage_commands_parse(tmp_path):
    """Every `lcodec ...` line of the usage block is accepted by the CLI (checked with --help)."""
    usage = next(block for block in _bash_blocks() if "lcodec info" in block)
    commands = {line.split()[1] for line in usage.splitlines() if line.startswith("lcodec ")}
    assert commands == {"encode", "decode", "info"}
    for cmd in commands:
        proc = subprocess.run([sys.executable, "-m", "lcodec", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "Example" in proc.stdout
