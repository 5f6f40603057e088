"""The README quickstart and the examples run as shown; the code passes ruff."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code_or_path: str | Path, tmp_path: Path) -> str:
    args = [str(code_or_path)] if isinstance(code_or_path, Path) else ["-c", code_or_path]
    out = subprocess.run(
        [sys.executable, "-W", "error", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_readme_quickstart_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has a python quickstart"
    quickstart = blocks[0]
    assert len(quickstart.strip().splitlines()) <= 12
    assert run_python(quickstart, tmp_path).splitlines() == ["5", "1.0"]


MAIN_COMMAND = "python -m batchkit bench --compare --concurrency 1,8,32 --duration 2"


def test_readme_main_command_is_the_serving_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f'python -m pip install -e ".[server,bench]" && {MAIN_COMMAND}' in readme


@pytest.mark.timeout(180)
def test_readme_main_command_runs(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("tritonclient.http")
    out = subprocess.run(
        [sys.executable, "-W", "error", *MAIN_COMMAND.split()[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "batching on (up to 64) vs off" in out.stdout
    assert "speedup" in out.stdout


def test_readme_names_the_ci_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m nox -s tests" in readme
    assert "nox -s tests" in ci


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    run_python(example, tmp_path)


@pytest.mark.timeout(120)
def test_ruff_is_clean() -> None:
    pytest.importorskip("ruff")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "batchkit",
            "tests",
            "benchmarks",
            "examples",
            "noxfile.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
