"""TritonModel against a real Triton Inference Server (nvidia-pytriton's tritonserver, on CPU).

Run by ``nox -s triton``; skipped when pytriton is not installed. The server's test models are
in tests/triton_server.py. tritonclient's asyncio clients are asyncio-only, so these tests run
on asyncio (the anyio plugin, asyncio backend).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchkit import (
    BatchedModel,
    BatchInfo,
    DeadlineExceeded,
    RemoteError,
    RemoteInvalidInput,
    RemoteUnavailable,
)

from ..support.triton_server import DATATYPES, TritonServer, find_tritonserver

np = pytest.importorskip("numpy")
pytest.importorskip("tritonclient.grpc.aio")
triton_module = pytest.importorskip("batchkit.triton")
TritonModel = triton_module.TritonModel

pytestmark = [
    pytest.mark.triton,
    pytest.mark.anyio,
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),
]

PROTOCOLS = pytest.mark.parametrize("protocol", ["grpc", "http"])


def url(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def sample(datatype: str, rows: int) -> list[Any]:
    """``rows`` items of ``datatype``, shape (3,), with the type's extreme values."""
    n = rows * 3
    if datatype == "BOOL":
        values: Any = np.arange(n) % 3 == 0
    elif datatype == "BYTES":
        values = np.array([f"é{i}".encode() if i else b"\x00\xff" for i in range(n)], dtype=object)
    elif datatype in ("FP16", "FP32", "FP64", "BF16"):
        values = np.arange(n) - 2.5  # exact in every float type, bfloat16 included
    else:
        info = np.iinfo(np.dtype(datatype.lower()))
        values = np.resize(np.array([info.min, info.max, 0, 1], dtype=datatype.lower()), n)
    return list(np.asarray(values).reshape(rows, 3))


async def inference_counts(server: TritonServer, model: str) -> tuple[int, int]:
    """Return Triton's (successful requests, inferred rows) for ``model``."""
    import tritonclient.http.aio as http

    client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        stats = await client.get_inference_statistics(model)
    finally:
        await client.close()
    model_stats = stats["model_stats"][0]
    return model_stats["inference_stats"]["success"]["count"], model_stats["inference_count"]


# -- results -------------------------------------------------------------------------------------


@PROTOCOLS
@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_datatype_equals_the_local_computation(
    triton_server: TritonServer, protocol: str, datatype: str
) -> None:
    items = sample(datatype, 5)
    async with (
        TritonModel(url(triton_server, protocol), f"id_{datatype.lower()}") as triton,
        BatchedModel(triton, max_batch_size=8) as model,
    ):
        outputs = await model.call_many(items)
    expected = [np.asarray(item, dtype=item.dtype) for item in items]
    if datatype == "BF16":
        import ml_dtypes

        expected = [item.astype(ml_dtypes.bfloat16) for item in items]
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == (3,)
        assert got.tolist() == want.tolist()


@PROTOCOLS
async def test_several_inputs_and_outputs(triton_server: TritonServer, protocol: str) -> None:
    rng = np.random.default_rng(7)
    items = [{"X": rng.standard_normal(4), "K": np.array([k], np.float32)} for k in range(6)]
    async with TritonModel(url(triton_server, protocol), "scale") as triton:
        assert [t.name for t in triton.inputs] == ["X", "K"]
        assert triton.max_batch_size == 8
        async with BatchedModel(triton) as model:
            outputs = await model.call_many(items)
    for item, out in zip(items, outputs, strict=True):
        y = item["X"].astype(np.float32) * item["K"]
        np.testing.assert_allclose(out["Y"], y, rtol=1e-6)
        np.testing.assert_allclose(out["S"], [y.sum()], rtol=1e-5)


@PROTOCOLS
async def test_batches_over_the_servers_limit_are_split_and_reassembled_in_order(
    triton_server: TritonServer, protocol: str
) -> None:
    items = [{"X": np.full(4, i, np.float32), "K": np.array([2], np.float32)} for i in range(21)]
    requests, rows = await inference_counts(triton_server, "scale")
    async with TritonModel(url(triton_server, protocol), "scale", max_in_flight=3) as triton:
        outputs = await triton(items)  # one batch of 21 rows, to a model taking at most 8
    assert [o["Y"].tolist() for o in outputs] == [[2.0 * i] * 4 for i in range(21)]
    assert await inference_counts(triton_server, "scale") == (requests + 3, rows + 21)


# -- requests in flight --------------------------------------------------------------------------


@PROTOCOLS
@pytest.mark.parametrize("in_flight", [1, 4])
async def test_requests_in_flight_overlap_up_to_the_limit(
    triton_server: TritonServer, protocol: str, in_flight: int
) -> None:
    # sleepy: 4 instances, 2 rows per request, 0.25 s per request; it reports when it ran.
    items = [np.array([i], np.float32) for i in range(8)]
    async with TritonModel(url(triton_server, protocol), "sleepy", max_in_flight=in_flight) as t:
        outputs = await t(items)
    spans = sorted({(float(o["START"][0]), float(o["END"][0])) for o in outputs})
    assert len(spans) == 4
    if in_flight == 4:  # all four requests ran at once
        assert max(start for start, _ in spans) < min(end for _, end in spans)
    else:  # one after the other
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


# -- priorities and deadlines --------------------------------------------------------------------


class Gate:
    """The slow model holds a request whose X is positive until ``open()``."""

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self.release = server.state / "release"
        self.started = server.state / "started"

    def close(self) -> None:
        self.release.unlink(missing_ok=True)
        self.started.unlink(missing_ok=True)

    def open(self) -> None:
        self.release.touch()

    async def wait_started(self) -> None:
        await wait_for(self.started.exists, "the slow model to start the held request")

    async def wait_pending(self, n: int) -> None:
        def pending() -> bool:
            return self.server.metric("nv_inference_pending_request_count", "slow") == n

        await wait_for(pending, f"{n} requests pending in Triton")


async def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Wait until ``condition()`` holds: the state of another process, observed by polling."""
    with anyio.fail_after(timeout):
        while not await anyio.to_thread.run_sync(condition):  # noqa: ASYNC110 (no event to wait on)
            await anyio.sleep(0.01)


@pytest.fixture
def gate(triton_server: TritonServer) -> Iterator[Gate]:
    gate = Gate(triton_server)
    gate.close()
    try:
        yield gate
    finally:
        gate.open()  # never leave a request held


@pytest.fixture
async def slow(triton_server: TritonServer) -> AsyncIterator[Any]:
    async with TritonModel(triton_server.grpc_url, "slow", max_in_flight=8) as triton:
        yield triton


async def test_the_remaining_deadline_arrives_as_the_request_timeout(slow: Any) -> None:
    async with BatchedModel(slow) as model:
        timed = await model.call(np.zeros(1, np.float32), timeout=5.0)
        untimed = await model.call(np.zeros(1, np.float32))
    assert 0 < int(timed["TIMEOUT"][0]) <= 5_000_000
    assert int(untimed["TIMEOUT"][0]) == 0


async def test_priorities_order_the_requests_queued_in_triton(slow: Any, gate: Gate) -> None:
    # slow: one instance, one row per request, priority levels 1 (first) to 3, default 2.
    orders: dict[str, int] = {}
    async with BatchedModel(slow, max_batch_size=1, max_concurrency=4) as model:

        async def call(name: str, x: float, priority: float) -> None:
            out = await model.call(np.array([x], np.float32), priority=priority, timeout=30)
            orders[name] = int(out["ORDER"][0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "held", 1.0, 0)
            await gate.wait_started()
            tg.start_soon(call, "later", 0.0, 5)  # sent first, as Triton's level 3
            await gate.wait_pending(1)
            tg.start_soon(call, "urgent", 0.0, -5)  # sent second, as Triton's level 1
            await gate.wait_pending(2)
            gate.open()
    assert orders["held"] < orders["urgent"] < orders["later"]


async def test_triton_rejects_a_request_whose_deadline_passed_in_its_queue(
    slow: Any, gate: Gate
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(slow, [np.ones(1, np.float32)])
        await gate.wait_started()
        deadline = anyio.current_time() + 0.3
        info = BatchInfo(size=1, priority=0, deadline=deadline, started=anyio.current_time())
        results: list[Any] = []

        async def late() -> None:
            results.extend(await slow.call_with_info([np.zeros(1, np.float32)], info))

        tg.start_soon(late)
        await gate.wait_pending(1)
        await anyio.sleep_until(deadline + 0.05)  # let the deadline pass in Triton's queue
        gate.open()
    (error,) = results
    assert isinstance(error, DeadlineExceeded), repr(error)
    assert "in the server" in str(error)
    assert error.__cause__ is not None


# -- errors --------------------------------------------------------------------------------------


@PROTOCOLS
async def test_a_triton_error_fails_only_the_affected_request(
    triton_server: TritonServer, protocol: str
) -> None:
    # fail: at most 4 rows per request; a request with a negative value fails in Triton.
    items = [np.array([x], np.float32) for x in (1, 2, 3, 4, 5, -6, 7, 8)]
    async with (
        TritonModel(url(triton_server, protocol), "fail") as triton,
        BatchedModel(triton, max_batch_size=8, max_wait=5.0) as model,
    ):
        results = await model.call_many(items, return_exceptions=True)
        assert [r.tolist() for r in results[:4]] == [[10.0], [20.0], [30.0], [40.0]]
        for error in results[4:]:
            assert isinstance(error, RemoteError), repr(error)
            assert "negative input: -6" in str(error)
            assert error.batch_size == 4
        assert len({id(e) for e in results[4:]}) == 4  # one error per caller
        assert (await model.call(np.array([9], np.float32))).tolist() == [90.0]


@PROTOCOLS
async def test_bad_input_is_a_typed_error(triton_server: TritonServer, protocol: str) -> None:
    async with TritonModel(url(triton_server, protocol), "id_fp32") as triton:
        (error,) = await triton([np.zeros(5, np.float32)])  # the model takes 3 values
    assert isinstance(error, RemoteInvalidInput), repr(error)


@PROTOCOLS
async def test_an_unknown_model_is_unavailable(triton_server: TritonServer, protocol: str) -> None:
    triton = TritonModel(url(triton_server, protocol), "nope", retries=0)
    assert not await triton.ready()
    with pytest.raises(RemoteUnavailable, match="'nope'"):
        await triton.connect()
    await triton.aclose()


# -- the server going away -----------------------------------------------------------------------


@pytest.fixture
def lone_server(tmp_path: Path) -> Iterator[TritonServer]:
    """A Triton of its own (the scale model only), for tests that stop and restart it."""
    package = find_tritonserver()
    if package is None:
        pytest.skip("no tritonserver: nvidia-pytriton is not installed (run `nox -s triton`)")
    server = TritonServer(package, tmp_path, models=["scale"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@PROTOCOLS
@pytest.mark.timeout(180)
async def test_the_server_going_away_gives_typed_errors_and_recovery_when_back(
    lone_server: TritonServer, protocol: str
) -> None:
    def item(i: int) -> dict[str, Any]:
        return {"X": np.full(4, i, np.float32), "K": np.ones(1, np.float32)}

    triton = TritonModel(url(lone_server, protocol), "scale", retries=6, backoff=0.1)
    async with triton, BatchedModel(triton, max_batch_size=4) as model:
        assert (await model.call(item(1)))["Y"].tolist() == [1.0] * 4
        await anyio.to_thread.run_sync(lone_server.stop)
        assert not await triton.ready()
        results = await model.call_many([item(2), item(3)], return_exceptions=True)
        assert all(isinstance(r, RemoteUnavailable) for r in results), results
        assert "unreachable" in str(results[0])
        await anyio.to_thread.run_sync(lone_server.start)
        # The same model recovers: connection failures are retried with backoff.
        outputs = await model.call_many([item(i) for i in range(6)], timeout=60)
        assert [o["Y"][0] for o in outputs] == [float(i) for i in range(6)]
        assert await triton.ready()
