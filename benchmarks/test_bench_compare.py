"""Scenario 8: ``batchkit bench --compare``, the demo model served twice, batching on and off.

The command serves the built-in demo model (2 ms per batch, as a small model on an
accelerator) with uvicorn in its own process, twice (``max_batch_size=64`` and 1), and drives
both with the asyncio tritonclient in closed loop, step by step; this benchmark runs that
command as a user would and records what its JSON says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ._measure import Findings

pytest.importorskip("uvicorn")
pytest.importorskip("tritonclient.http")

CONCURRENCY = (1, 8, 32, 128)
SECONDS = 4.0


def measure(out: Path) -> Findings:
    f = Findings(
        "bench_compare",
        "`batchkit bench --compare`: the demo model, batching on vs off, over HTTP",
        order=8,
        number="8",
    )
    command = [
        sys.executable, "-m", "batchkit", "bench", "--compare", "--quiet",
        "--concurrency", ",".join(map(str, CONCURRENCY)), "--duration", str(SECONDS),
        "--json", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=600, capture_output=True)
    report = json.loads(out.read_text())
    f.setup(
        "`python -m batchkit bench --compare --concurrency "
        f"{','.join(map(str, CONCURRENCY))} --duration {SECONDS:g}`: one process serves the demo "
        "model (2 ms per batch plus a little numpy per item) as `demo` (`max_batch_size=64`) and "
        "`demo_unbatched` (`max_batch_size=1`) with uvicorn, and drives each with "
        "`tritonclient.http.aio` (binary tensors), closed loop, interleaved step by step"
    )
    batched, unbatched = report["compare"]["batched"], report["compare"]["unbatched"]
    for b, u in zip(batched, unbatched, strict=True):
        c = b["concurrency"]
        f.figure(f"batched_rps_{c}", f"{c} in flight: batched requests/s", b["throughput"], "/s")
        f.figure(f"batched_p99_{c}", f"{c} in flight: batched p99", 1e3 * b["latency"]["p99"], "ms")
        f.figure(
            f"unbatched_rps_{c}", f"{c} in flight: unbatched requests/s", u["throughput"], "/s"
        )
        f.figure(
            f"unbatched_p99_{c}", f"{c} in flight: unbatched p99", 1e3 * u["latency"]["p99"], "ms"
        )
        f.figure(
            f"speedup_{c}",
            f"{c} in flight: batched / unbatched",
            b["throughput"] / u["throughput"],
            "x",
        )
        f.figure(
            f"batch_{c}", f"{c} in flight: server-side mean batch", b["server_batch_size"], "items"
        )
    failed = report["failed"]
    f.figure("failed", "failed requests (all steps)", failed, "count")
    return f


def test_bench_compare(benchmark: Any, tmp_path: Path) -> None:
    findings = benchmark.pedantic(lambda: measure(tmp_path / "bench.json"), rounds=1, iterations=1)
    findings.save(benchmark)
