"""Scenario 12: KServe v2 over gRPC vs HTTP, 32 requests in flight, and vs Triton's gRPC.

``batchkit serve benchmarks.serving_models:grpc_models --grpc-port`` runs in a subprocess: one
uvicorn + grpc.aio server in one event loop, serving ``id_fp32`` (identity on FP32[3], batched up
to 64) over both protocols. The client, in this process, keeps 32 requests in flight, with
``tritonclient.grpc.aio`` to the gRPC port and ``tritonclient.http.aio`` to the HTTP port (binary
tensors), in interleaved rounds of the same run. 12b (``nox -s triton``) adds a real Triton's
gRPC endpoint serving a model of the same name and shape (Python backend, dynamic batcher) as a
third way in the same rounds. Client and servers share this machine's cores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ._measure import Findings, median, percentile, rotated

grpc_aio = pytest.importorskip("tritonclient.grpc.aio")
grpcclient = pytest.importorskip("tritonclient.grpc")
http_aio = pytest.importorskip("tritonclient.http.aio")
pytest.importorskip("uvicorn")
pytest.importorskip("grpc_health")

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 32
REQUESTS_PER_ROUND = 2000
ROUNDS = 5
TRITON_GRPC_RPS = 2700.0  # Triton's gRPC on this machine, same model, 32 in flight (issue 18)
TARGET_VS_TRITON = 1.5


async def drive(infer: Any, n: int) -> tuple[float, list[float]]:
    """Send ``n`` requests, CONCURRENCY at a time; return (seconds, latencies)."""
    latencies: list[float] = []
    remaining = iter(range(n))
    clock = time.perf_counter

    async def worker() -> None:
        for _ in remaining:
            t0 = clock()
            await infer()
            latencies.append(clock() - t0)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return clock() - start, latencies


def grpc_way(client: Any) -> Any:
    data = np.ones((1, 3), np.float32)

    async def infer() -> None:
        inp = grpcclient.InferInput("X", [1, 3], "FP32")
        inp.set_data_from_numpy(data)
        result = await client.infer("id_fp32", [inp])
        assert result.as_numpy("Y").shape == (1, 3)

    return infer


def http_way(client: Any) -> Any:
    data = np.ones((1, 3), np.float32)

    async def infer() -> None:
        inp = http_aio.InferInput("X", [1, 3], "FP32")
        inp.set_data_from_numpy(data)
        result = await client.infer("id_fp32", [inp])
        assert result.as_numpy("Y").shape == (1, 3)

    return infer


async def measure(http: str, grpc: str, triton: str | None) -> Findings:
    f = Findings(
        "grpc_triton" if triton else "grpc",
        "KServe v2 gRPC vs HTTP"
        + (" vs Triton's gRPC" if triton else "")
        + ": 32 requests in flight",
        order=12,
        number="12b" if triton else "12",
    )
    f.setup(
        f"{CONCURRENCY} requests in flight, one row each (FP32[3] identity, `id_fp32`); "
        f"{ROUNDS} interleaved rounds of {REQUESTS_PER_ROUND:,} requests per way"
    )
    f.setup(
        "server: `batchkit serve --grpc-port` in a subprocess: uvicorn (httptools, uvloop) and "
        "grpc.aio in one event loop; clients: tritonclient.grpc.aio and tritonclient.http.aio"
    )
    if triton:
        f.setup("Triton: nvidia-pytriton's tritonserver on CPU, Python backend, dynamic batcher")
    clients = {
        "grpc": grpc_aio.InferenceServerClient(grpc),
        "http": http_aio.InferenceServerClient(http, conn_limit=CONCURRENCY),
    }
    ways = {"grpc": grpc_way(clients["grpc"]), "http": http_way(clients["http"])}
    if triton:
        clients["triton"] = grpc_aio.InferenceServerClient(triton)
        ways["triton"] = grpc_way(clients["triton"])
    rps: dict[str, list[float]] = {name: [] for name in ways}
    lat: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for infer in ways.values():  # warm-up: connections, threads
            await drive(infer, 300)
        for round_no in range(ROUNDS):
            for name in rotated(round_no, list(ways)):
                seconds, latencies = await drive(ways[name], REQUESTS_PER_ROUND)
                rps[name].append(REQUESTS_PER_ROUND / seconds)
                lat[name].extend(latencies)
    finally:
        for client in clients.values():
            await client.close()
    labels = {"grpc": "batchkit gRPC", "http": "batchkit HTTP", "triton": "Triton gRPC"}
    for name in ways:
        f.figure(
            f"{name}_rps", f"{labels[name]}: requests/s, median round", median(rps[name]), "/s"
        )
        f.figure(
            f"{name}_p50", f"{labels[name]}: latency p50", 1e3 * percentile(lat[name], 0.5), "ms"
        )
        f.figure(
            f"{name}_p99", f"{labels[name]}: latency p99", 1e3 * percentile(lat[name], 0.99), "ms"
        )
    ratios = [g / h for g, h in zip(rps["grpc"], rps["http"], strict=True)]
    f.figure("grpc_vs_http", "gRPC / HTTP requests/s (median of rounds)", median(ratios), "x")
    if triton:
        vs = [g / t for g, t in zip(rps["grpc"], rps["triton"], strict=True)]
        f.figure("grpc_vs_triton", "batchkit gRPC / Triton gRPC requests/s", median(vs), "x")
        f.target(
            "batchkit gRPC vs Triton's gRPC requests/s", "grpc_vs_triton", ">=", TARGET_VS_TRITON
        )
        p99 = f.value("grpc_p99") / f.value("triton_p99")
        f.figure("p99_vs_triton", "batchkit gRPC p99 / Triton gRPC p99", p99, "x")
        f.target("batchkit gRPC p99 vs Triton's", "p99_vs_triton", "<=", 1.0)
    else:
        f.figure(
            "grpc_vs_triton_2700",
            f"batchkit gRPC vs Triton's gRPC as measured in issue 18 ({TRITON_GRPC_RPS:,.0f}/s)",
            f.value("grpc_rps") / TRITON_GRPC_RPS,
            "x",
        )
    f.note(
        "Client and servers share this machine's cores: the figures are for the pair, and "
        "shift with the machine's load (see the load average below)."
    )
    return f


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    """Wait until uvicorn answers (it listens after the lifespan, hence after gRPC)."""
    client = http_aio.InferenceServerClient(url)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if await client.is_server_ready():
                    return
            except Exception:
                await asyncio.sleep(0.05)  # the server is still starting (not ordering a test)
        raise RuntimeError("the server did not become ready")
    finally:
        await client.close()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    """``batchkit serve --grpc-port 0`` in a subprocess: its HTTP and gRPC ``host:port``."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "serve", "benchmarks.serving_models:grpc_models",
         "--port", str(port), "--grpc-port", "0", "--no-metrics", "--log-level", "warning"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # printed once gRPC listens, whatever the log level
            if "batchkit gRPC running on" in line:
                grpc = line.split("running on ")[1].split()[0]
                break
        else:
            raise RuntimeError(f"the server exited with {proc.wait()}")
        http = f"127.0.0.1:{port}"
        asyncio.run(wait_ready(http, proc))
        yield http, grpc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.timeout(600)
def test_grpc_serving_throughput(benchmark: Any, server: tuple[str, str]) -> None:
    findings = benchmark.pedantic(
        lambda: asyncio.run(measure(*server, None)), rounds=1, iterations=1
    )
    findings.save(benchmark)


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_grpc_serving_vs_triton(
    benchmark: Any, server: tuple[str, str], triton_server: Any
) -> None:
    triton = triton_server.grpc_url.removeprefix("grpc://")
    findings = benchmark.pedantic(
        lambda: asyncio.run(measure(*server, triton)), rounds=1, iterations=1
    )
    findings.save(benchmark)
