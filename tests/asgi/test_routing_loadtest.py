"""The load-test harness (examples/canary_loadtest.py) run as a user runs it: a real server, the
stock tritonclient, the observed canary split, the shadow's disagreement, overload shedding."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("uvicorn")
pytest.importorskip("tritonclient.http.aio")


@pytest.mark.timeout(120)
def test_the_harness_shows_the_split_the_disagreement_and_the_shedding(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            str(ROOT / "examples" / "canary_loadtest.py"),
            "--requests",
            "400",
            "--concurrency",
            "8",
            "--canary",
            "0.2",
            "--json",
            str(report_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(report_path.read_text())
    n, p = 400, 0.2
    canary = report["canary"]
    assert canary["configured"] == p
    assert abs(canary["observed"] - p) <= 3.2905 * math.sqrt(p * (1 - p) / n)
    low, high = canary["interval"]
    assert low <= canary["observed"] <= high
    assert report["versions"]["v2"] == report["routed"]["v2"] == round(canary["observed"] * n)
    assert sum(report["versions"].values()) == n
    shadow = report["shadow"]
    # inputs 0..399: the shadow disagrees on those whose value is 0, 1 or 2 modulo 100
    assert (shadow["mirrored"], shadow["disagreed"], shadow["agreed"]) == (400, 12, 388)
    assert shadow["disagreement_rate"] == 0.03
    assert shadow["errors"] == shadow["dropped"] == 0
    overload = report["overload"]
    assert overload["shed"] >= 1 and overload["served"] >= 1
    assert overload["shed"] + overload["served"] == overload["burst"]
    assert overload["retry_after"] == ["1"] and overload["other"] == []
    assert f"configured 20.0%, observed {canary['observed']:.1%} of 400 requests" in out.stdout
    assert "shadow v3: 3.0% disagreement (12 of 400 compared)" in out.stdout
    assert "shed with 503 + Retry-After 1 s" in out.stdout
