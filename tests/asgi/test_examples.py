"""The HTTP examples run against a real uvicorn server, called with the stock tritonclient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_a_torch_module_is_served_over_http_and_its_weights_swapped(tmp_path: Path) -> None:
    for needed in ("torch", "uvicorn", "tritonclient.http"):
        pytest.importorskip(needed)
    out = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / "torch_http.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # 1 + 2 + 3 + 4 = 10: times 1 before the swap (version 1), times 10 after (version 2).
    assert out.stdout.splitlines() == ["before: [10.0, 10.0] 1", "after:  [100.0, 100.0] 2"]
