"""Lines per second through ``batchkit pipe``, and the batch sizes the pipe lets form.

Usage (from the repository root)::

    python benchmarks/pipe_throughput.py [LINES]

Measures, for a model that does no work (so the figures are the adapter's own cost):

1. raw lines: LINES request lines written to a ``batchkit pipe`` child by a thread, all
   responses read back; from the first write to the last response;
2. the async ``PipeClient``: ``call_many`` of LINES/4 items.

Prints lines/s (the best of three runs: the machines are shared) and the server's mean batch
size for each, on each server backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from batchkit import BatchedModel
from batchkit.pipe import PipeClient

ROOT = Path(__file__).resolve().parent.parent
TARGET = "benchmarks.pipe_throughput:echo"


async def _echo(items: list[Any]) -> list[Any]:
    return items


echo = BatchedModel(_echo, max_batch_size=256, name="echo")


def raw_lines(n: int, backend: str) -> tuple[float, float]:
    """Return (lines/s, mean batch size) for ``n`` lines written straight to the pipe."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "pipe", TARGET, "--backend", backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"id": "ready", "op": "ping"}\n')
    proc.stdin.flush()
    proc.stdout.readline()  # started and serving
    payload = b"".join(b'{"id": %d, "input": %d}\n' % (i, i) for i in range(n))

    def write() -> None:
        assert proc.stdin is not None
        proc.stdin.write(payload)
        proc.stdin.write(b'{"id": "stats", "op": "stats"}\n')
        proc.stdin.close()

    start = time.perf_counter()
    writer = threading.Thread(target=write)
    writer.start()
    stats: dict[str, Any] = {}
    count = 0
    for line in proc.stdout:
        response = json.loads(line)
        if response["id"] == "stats":
            stats = response["stats"]["models"]["echo"]
        else:
            count += 1
    elapsed = time.perf_counter() - start
    writer.join()
    proc.wait()
    assert count == n, count
    return n / elapsed, stats["mean_batch_size"]


async def client_calls(n: int) -> tuple[float, float]:
    """Return (calls/s, mean batch size) for ``n`` concurrent calls through ``PipeClient``."""
    async with PipeClient(TARGET, cwd=ROOT) as client:
        start = time.perf_counter()
        results = await client.call_many(range(n))
        elapsed = time.perf_counter() - start
        assert results == list(range(n))
        stats = await client.statistics()
    return n / elapsed, stats.mean_batch_size


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    for backend in ("asyncio", "trio"):
        rate, mean = max(raw_lines(n, backend) for _ in range(3))
        print(f"raw lines, {backend} server: {rate:,.0f} lines/s, mean batch size {mean:.1f}")
    rate, mean = max(anyio.run(client_calls, n // 4) for _ in range(3))
    print(f"PipeClient.call_many, asyncio: {rate:,.0f} calls/s, mean batch size {mean:.1f}")


if __name__ == "__main__":
    main()
