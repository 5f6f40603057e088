"""Scenario 9: 64 callers through batchkit to a real Triton, vs one request per item to Triton.

A real Triton Inference Server (nvidia-pytriton's tritonserver, on CPU) serves ``id_fp32``: the
identity on 3 floats per row, ``max_batch_size`` 64, Triton's dynamic batcher on. 64 asyncio
callers each send their rows one after another. batchkit: each row is ``await model.call(row)``
on ``BatchedModel(TritonModel(grpc), max_batch_size=64, max_concurrency=4)``, so the rows that
queue while a request is out leave together as one request. Direct: each row is one request
from the same asyncio gRPC client (``tritonclient.grpc.aio``), as code without a batcher would
send it; Triton's own dynamic batcher may still merge them server-side. The two alternate round
by round. Runs in ``nox -s triton``; skipped without pytriton.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from batchkit import BatchedModel
from tests.support.triton_server import TritonServer

from ._measure import Findings, batch_size_delta, mean_batch_size, median, rotated

np = pytest.importorskip("numpy")
grpc_aio = pytest.importorskip("tritonclient.grpc.aio")
grpc = pytest.importorskip("tritonclient.grpc")
TritonModel = pytest.importorskip("batchkit.triton").TritonModel

pytestmark = pytest.mark.triton

CALLERS = 64
ROWS_PER_CALLER = 24  # per round
ROUNDS = 7
MAX_BATCH_SIZE = 64
MAX_CONCURRENCY = 4


async def run_callers(call: Any, rows: list[Any]) -> float:
    """Run ``CALLERS`` tasks, each calling ``call(row)`` on its rows in turn; return seconds."""

    async def caller(n: int) -> None:
        row = rows[n]
        for _ in range(ROWS_PER_CALLER):
            out = await call(row)
            assert out.shape == (3,)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(CALLERS):
            tg.start_soon(caller, n)
    return time.perf_counter() - start


async def measure(server: TritonServer) -> Findings:
    f = Findings(
        "triton",
        "Triton: 64 callers through batchkit vs one request per item",
        order=9,
        number="9",
    )
    address = server.grpc_url.removeprefix("grpc://")
    rows = [np.full(3, n, np.float32) for n in range(CALLERS)]
    client = grpc_aio.InferenceServerClient(address)

    async def direct(row: Any) -> Any:
        tensor = grpc.InferInput("X", [1, 3], "FP32")
        tensor.set_data_from_numpy(row[np.newaxis])
        result = await client.infer("id_fp32", [tensor])
        return result.as_numpy("Y")[0]

    triton = TritonModel(server.grpc_url, "id_fp32", max_in_flight=MAX_CONCURRENCY)
    model = BatchedModel(triton, max_batch_size=MAX_BATCH_SIZE, max_concurrency=MAX_CONCURRENCY)
    try:
        async with triton, model:
            for n, row in enumerate(rows):  # warm-up, and each caller gets its own row back
                assert (await model.call(row)).tolist() == [float(n)] * 3
                assert (await direct(row)).tolist() == [float(n)] * 3
            ways = {"batchkit": model.call, "direct": direct}
            before = dict(model.statistics().batch_sizes)
            times: dict[str, list[float]] = {name: [] for name in ways}
            for round_no in range(ROUNDS):
                for name in rotated(round_no, list(ways)):
                    times[name].append(await run_callers(ways[name], rows))
            sizes = batch_size_delta(before, model.statistics().batch_sizes)
    finally:
        await client.close()

    items = CALLERS * ROWS_PER_CALLER
    f.setup(
        f"a real tritonserver on CPU (nvidia-pytriton), model `id_fp32`: identity on 3 FP32 per "
        f"row, Python backend, `max_batch_size` {MAX_BATCH_SIZE}, Triton's dynamic batcher on"
    )
    f.setup(f"{CALLERS} asyncio callers, {ROWS_PER_CALLER} rows each per round, one after another")
    f.setup(
        f"batchkit: `await model.call(row)` on `BatchedModel(TritonModel(grpc), max_batch_size="
        f"{MAX_BATCH_SIZE}, max_concurrency={MAX_CONCURRENCY})`"
    )
    f.setup("direct: one `tritonclient.grpc.aio` request per row, from the same kind of client")
    f.setup(f"{ROUNDS} rounds of {items:,} rows each way, alternating in rotated order")
    kit = [items / t for t in times["batchkit"]]
    alone = [items / t for t in times["direct"]]
    ratios = [k / a for k, a in zip(kit, alone, strict=True)]
    f.figure("batchkit_rows_s", "batchkit -> Triton: rows/s", median(kit), "items/s")
    f.figure("direct_rows_s", "one request per row -> Triton: rows/s", median(alone), "items/s")
    f.figure("vs_direct", "batchkit / direct (median of rounds)", median(ratios), "x")
    f.figure("vs_direct_min", "  lowest round", min(ratios), "x")
    f.figure("vs_direct_max", "  highest round", max(ratios), "x")
    f.figure("mean_batch", "batchkit: mean batch size", mean_batch_size(sizes), "items")
    f.distribution("batchkit batch sizes (timed rounds)", sizes)
    f.note(
        "Both sides share the machine with Triton (2 cores): the figures are throughput of the "
        "whole loop, client and server, not of the client alone."
    )
    return f


@pytest.mark.timeout(600)
def test_triton_throughput(benchmark: Any, triton_server: TritonServer) -> None:
    findings = benchmark.pedantic(
        lambda: anyio.run(measure, triton_server, backend="asyncio"), rounds=1, iterations=1
    )
    findings.save(benchmark)
