"""docs/model-repository.md: its Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "model-repository.md"


@pytest.mark.timeout(120)
def test_the_python_example_runs(tmp_path: Path) -> None:
    for module in ("onnx", "onnxruntime", "uvicorn", "tritonclient.http"):
        pytest.importorskip(module)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", blocks[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "[[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]\n"
