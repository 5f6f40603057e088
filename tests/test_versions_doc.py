"""docs/versions.md: every python block runs as written (in a fresh interpreter, warnings as
errors), and the console examples show what the code prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "versions.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_guide_has_runnable_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs(index: int, tmp_path: Path) -> None:
    if "batchkit.asgi" in BLOCKS[index]:
        pytest.importorskip("uvicorn")
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", BLOCKS[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
