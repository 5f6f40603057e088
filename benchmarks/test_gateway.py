"""Scenario 12: what the gateway (API keys + rate limits) costs a server of a trivial model.

Three ``batchkit serve`` subprocesses of the demo model (FP32[16], ``2x + 1``): no gateway; API
keys with an in-memory rate limit; API keys with the limit kept in a real ``redis-server`` on
127.0.0.1 (skipped where none is installed). The limits are far above the load, so every
request pays the check and none is refused. The client keeps 32 ``tritonclient.http.aio``
requests in flight with an API key, rotating between the servers round by round.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ._measure import Findings, median, percentile, rotated
from .test_serving import free_port, wait_ready

aio = pytest.importorskip("tritonclient.http.aio")
pytest.importorskip("uvicorn")

CONCURRENCY = 32
REQUESTS_PER_ROUND = 1500
ROUNDS = 5
KEY = "bench-secret"
TARGET_MEMORY_RATIO = 0.95  # from the issue: the gateway costs < 5 % of req/s


async def drive(url: str, n: int) -> tuple[float, list[float]]:
    """Send ``n`` infer requests with the API key, CONCURRENCY at a time."""
    client = aio.InferenceServerClient(url, conn_limit=CONCURRENCY)
    data = np.ones((1, 16), dtype=np.float32)
    headers = {"Authorization": f"Bearer {KEY}"}
    latencies: list[float] = []
    remaining = iter(range(n))
    clock = time.perf_counter

    async def worker() -> None:
        for _ in remaining:
            inp = aio.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(data)
            t0 = clock()
            result = await client.infer("demo", [inp], headers=headers)
            latencies.append(clock() - t0)
            assert result.as_numpy("OUTPUT0").shape == (1, 16)

    try:
        start = clock()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return clock() - start, latencies
    finally:
        await client.close()


def start(args: list[str]) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "serve", "--port", str(port),
         "--log-level", "warning", "--no-metrics", *args],
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"127.0.0.1:{port}"
    asyncio.run(wait_ready(url, proc))
    return url, proc


def start_redis() -> subprocess.Popen[bytes] | None:
    redis = shutil.which("redis-server")
    if redis is None or importlib.util.find_spec("redis") is None:
        return None
    proc = subprocess.Popen(
        [redis, "--port", str(port := free_port()), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    proc.port = port  # type: ignore[attr-defined]
    return proc


@pytest.mark.timeout(600)
def test_gateway_overhead(benchmark: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "bench", "key": KEY}]}))
    gateway = ["--api-keys", str(keys), "--rate-limit", "1000000/s"]
    servers: dict[str, tuple[str, subprocess.Popen[Any]]] = {}
    redis = start_redis()
    try:
        servers["plain"] = start([])
        servers["memory"] = start(gateway)
        if redis is not None:
            store = f"redis://127.0.0.1:{redis.port}/0"  # type: ignore[attr-defined]
            servers["redis"] = start([*gateway, "--rate-limit-store", store])
        findings = benchmark.pedantic(lambda: measure(servers), rounds=1, iterations=1)
    finally:
        for _, proc in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if redis is not None:
            redis.kill()
            redis.wait(10)
    findings.save(benchmark)


def measure(servers: dict[str, tuple[str, subprocess.Popen[Any]]]) -> Findings:
    f = Findings(
        "gateway",
        "Gateway: API keys and rate limits in front of a trivial model",
        order=12,
        number="12",
    )
    for url, _ in servers.values():  # warm up every server and connection pool
        asyncio.run(drive(url, 200))
    rps: dict[str, list[float]] = {name: [] for name in servers}
    lat: dict[str, list[float]] = {name: [] for name in servers}
    for round_no in range(ROUNDS):
        for name in rotated(round_no, list(servers)):
            seconds, latencies = asyncio.run(drive(servers[name][0], REQUESTS_PER_ROUND))
            rps[name].append(REQUESTS_PER_ROUND / seconds)
            lat[name].extend(latencies)
    f.setup(
        f"`batchkit serve` (demo model, FP32[16]) as {len(servers)} subprocesses: "
        + ", ".join(servers)
        + "; gateway: `--api-keys` (one key) `--rate-limit 1000000/s` (never reached)"
    )
    f.setup(
        f"{CONCURRENCY} tritonclient.http.aio requests in flight with `Authorization: Bearer`, "
        f"{REQUESTS_PER_ROUND} per round, {ROUNDS} rounds in rotated order"
    )
    for name in servers:
        f.figure(
            f"{name}_rps", f"{name}: requests/s (median of rounds)", median(rps[name]), "req/s"
        )
        ms = [1e3 * v for v in lat[name]]
        f.figure(f"{name}_p50", f"{name}: latency p50", percentile(ms, 0.5), "ms")
        f.figure(f"{name}_p99", f"{name}: latency p99", percentile(ms, 0.99), "ms")
    for name in servers:
        if name == "plain":
            continue
        ratios = [a / b for a, b in zip(rps[name], rps["plain"], strict=True)]
        f.figure(
            f"{name}_ratio",
            f"{name} / plain requests/s (median of per-round ratios)",
            median(ratios),
            "x",
        )
    label = "keys + in-memory limit vs no gateway, req/s"
    f.target(label, "memory_ratio", ">=", TARGET_MEMORY_RATIO)
    if "redis" not in servers:
        f.note("no redis-server or redis package: the Redis store was not measured")
    return f
