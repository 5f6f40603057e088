"""Operating the HTTP app: request ids and trace context, the access and failure logs, client
disconnects, draining, and Triton's statistics extension (docs/operations.md)."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from batchkit import BatchedModel
from batchkit.asgi import ClientDisconnected, KServeApp, call_until_disconnect

from ..support.asgi import request, running_server
from ..support.helpers import wait_for

try:  # at module level: FastAPI resolves the route's annotations in the module's globals
    import fastapi
except ImportError:  # pragma: no cover - fastapi is a dev dependency
    fastapi = None

pytestmark = pytest.mark.anyio

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def body(*values: float, **extra: Any) -> dict[str, Any]:
    n = len(values)
    return {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [n, 1], "data": list(values)}],
        **extra,
    }


def doubling_app(**options: Any) -> KServeApp:
    model = BatchedModel(lambda xs: [x * 2 for x in xs], name="double")
    return KServeApp([model], metrics=False, **options)


class Gate:
    """An async model of arrays that records each batch and holds it until ``open()``."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.started = anyio.Event()
        self._gate = anyio.Event()

    def open(self) -> None:
        self._gate.set()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        await self._gate.wait()
        return items

    @property
    def seen(self) -> list[Any]:
        return [item for batch in self.batches for item in batch]


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "batchkit.access"]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


# -- request ids and trace context ------------------------------------------------------------


async def test_the_client_request_id_is_echoed_and_in_the_access_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = doubling_app()
    caplog.set_level(logging.INFO, "batchkit.access")
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/double/infer", body(1.0), headers={"X-Request-ID": "req-7"}
        )
    assert reply.status == 200
    assert reply.headers["x-request-id"] == "req-7"
    assert reply.json()["id"] == "req-7"  # the body has a place for it: given back there too
    (line,) = access_records(caplog)
    assert line.request_id == "req-7"  # type: ignore[attr-defined]
    fields = {k: getattr(line, k) for k in ("method", "path", "status", "model", "version")}
    assert fields == {
        "method": "POST",
        "path": "/v2/models/double/infer",
        "status": 200,
        "model": "double",
        "version": "1",
    }
    assert line.rows == 1  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]
    assert line.batch_size == 1  # type: ignore[attr-defined]
    assert line.queue_ms >= 0 and 0 <= line.compute_ms <= line.duration_ms  # type: ignore[attr-defined]


async def test_the_access_line_gives_each_request_its_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gated = Gate()
    model = BatchedModel(gated, name="gated", max_batch_size=4)
    app = KServeApp([model], metrics=False)
    caplog.set_level(logging.INFO, "batchkit.access")

    async def one(i: int) -> None:
        headers = {"X-Request-ID": f"r{i}"}
        await request(app, "POST", "/v2/models/gated/infer", body(float(i)), headers=headers)

    async with app.lifespan():
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            await gated.started.wait()  # held: the next three queue behind it
            for i in (1, 2, 3):
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            gated.open()
    lines = {r.request_id: r for r in access_records(caplog)}  # type: ignore[attr-defined]
    assert [len(b) for b in gated.batches] == [1, 3]
    assert lines["r0"].batch_size == 1  # type: ignore[attr-defined]
    together = [lines[f"r{i}"] for i in (1, 2, 3)]
    assert [r.batch_size for r in together] == [3, 3, 3]  # type: ignore[attr-defined]
    assert len({r.compute_ms for r in together}) == 1  # one batch, one compute time  # type: ignore[attr-defined]
    assert all(r.queue_ms >= 0 for r in together)  # type: ignore[attr-defined]
    text = together[0].getMessage()
    assert "batch=3" in text and "queue_ms=" in text and "compute_ms=" in text


async def test_the_kserve_body_id_is_the_request_id_without_a_header(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = doubling_app()
    caplog.set_level(logging.INFO, "batchkit.access")
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/double/infer", body(1.0, id="body-id"))
        await request(app, "GET", "/v2/health/ready")
    health = access_records(caplog)[1]
    assert (health.queue_ms, health.compute_ms, health.batch_size) == (None, None, None)  # type: ignore[attr-defined]
    assert "queue_ms=- compute_ms=- batch=-" in health.getMessage()
    assert reply.headers["x-request-id"] == "body-id"
    assert reply.json()["id"] == "body-id"
    assert access_records(caplog)[0].request_id == "body-id"  # type: ignore[attr-defined]


async def test_a_request_without_an_id_gets_a_new_one_everywhere() -> None:
    app = doubling_app()
    async with app.lifespan():
        first = await request(app, "POST", "/v2/models/double/infer", body(1.0))
        second = await request(app, "POST", "/v2/models/double/infer", body(1.0))
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]
    assert "id" not in first.json()  # as Triton: a generated id stays out of the body


async def test_traceparent_continues_the_callers_trace_with_a_new_span() -> None:
    app = doubling_app()
    sent = f"00-{TRACE}-{PARENT}-01"
    async with app.lifespan():
        reply = await request(app, "GET", "/v2/health/live", headers={"traceparent": sent})
    version, trace, span, flags = reply.headers["traceparent"].split("-")
    assert (version, trace, flags) == ("00", TRACE, "01")
    assert re.fullmatch(r"[0-9a-f]{16}", span) and span != PARENT


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE.upper()}X-{PARENT}-01",
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace(bad: str) -> None:
    app = doubling_app()
    async with app.lifespan():
        reply = await request(app, "GET", "/v2/health/live", headers={"traceparent": bad})
    assert reply.status == 200
    trace = reply.headers["traceparent"].split("-")[1]
    assert re.fullmatch(r"[0-9a-f]{32}", trace) and trace != TRACE


async def test_a_hostile_request_id_is_cut_and_cleaned() -> None:
    app = doubling_app()
    async with app.lifespan():
        reply = await request(
            app, "GET", "/v2/health/live", headers={"X-Request-ID": "a\tb" + "x" * 500}
        )
    rid = reply.headers["x-request-id"]
    assert rid.startswith("a?b") and len(rid) == 128


async def test_the_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    app = doubling_app(access_log=False)
    caplog.set_level(logging.INFO, "batchkit.access")
    async with app.lifespan():
        assert (await request(app, "GET", "/v2/health/ready")).status == 200
    assert access_records(caplog) == []


# -- model failures ---------------------------------------------------------------------------


async def test_a_failed_batch_is_logged_once_with_its_traceback_and_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gated = Gate()

    async def broken(items: list[Any]) -> list[Any]:
        await gated(items)
        raise ValueError("broken weights")  # a new exception per batch, as models raise them

    model = BatchedModel(broken, name="broken", max_batch_size=4)
    app = KServeApp([model], metrics=False)
    replies: list[Any] = []
    caplog.set_level(logging.ERROR, "batchkit")

    async def one(i: int) -> None:
        headers = {"X-Request-ID": f"r{i}"}
        replies.append(
            await request(app, "POST", "/v2/models/broken/infer", body(i), headers=headers)
        )

    async with app.lifespan():
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0)
            await gated.started.wait()  # the first batch runs alone, held
            for i in (1, 2, 3, 4):
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            gated.open()
    assert [r.status for r in replies] == [500] * 5
    assert all("the server log has the details" in r.error for r in replies)
    assert [len(b) for b in gated.batches] == [1, 4]
    logged = tracebacks(caplog)
    assert len(logged) == 2  # once per batch, not once per request
    sizes = sorted(r.batch_size for r in logged)  # type: ignore[attr-defined]
    assert sizes == [1, 4]
    for record in logged:
        assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
        assert record.model == "broken" and record.version == "1"  # type: ignore[attr-defined]
        assert record.request_id in {f"r{i}" for i in range(5)}  # type: ignore[attr-defined]
        assert "broken weights" in record.getMessage()


async def test_a_thousand_failing_requests_log_a_bounded_number_of_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(items: list[Any]) -> list[Any]:
        raise RuntimeError("always")

    model = BatchedModel(broken, name="broken", max_batch_size=4)
    app = KServeApp([model], metrics=False, access_log=False)
    statuses: list[int] = []
    caplog.set_level(logging.ERROR, "batchkit")
    payload = json.dumps(body(1.0)).encode()

    async def some(n: int) -> None:
        for _ in range(n):
            reply = await request(app, "POST", "/v2/models/broken/infer", payload)
            statuses.append(reply.status)

    async with app.lifespan():
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(some, 100)
    assert statuses == [500] * 1000
    assert model.statistics().failed == 1000
    assert model.statistics().batches >= 250
    assert len(tracebacks(caplog)) == 5  # the default burst, within the minute


def test_ten_thousand_failures_log_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from batchkit._core import FailureLog, ModelError

    failures = FailureLog(logging.getLogger("batchkit.test"), burst=3, period=3600)
    caplog.set_level(logging.ERROR, "batchkit.test")
    logged = 0
    for i in range(10_000):
        try:
            raise ValueError(f"failure {i}")
        except ValueError as cause:
            error = ModelError("batch failed", batch_size=2, version="1")
            error.__cause__ = cause
            logged += failures.report("m", error)
            logged += failures.report("m", error)  # the other caller of the batch
    assert logged == 3
    assert len(caplog.records) == 3
    assert all(r.exc_info is not None for r in caplog.records)


def test_failures_held_back_are_counted_in_the_next_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from batchkit._core import FailureLog

    failures = FailureLog(logging.getLogger("batchkit.test"), burst=1, period=0.0)
    failures.period = 3600.0
    caplog.set_level(logging.ERROR, "batchkit.test")
    for i in range(4):
        failures.report("m", ValueError(i))
    assert len(caplog.records) == 1
    failures.period = 0.0  # the window is over
    failures.report("m", ValueError("next"))
    summary, traceback = caplog.records[1:]
    assert summary.suppressed == 3  # type: ignore[attr-defined]
    assert "3 more failures were not logged" in summary.getMessage()
    assert traceback.exc_info is not None


# -- client disconnects -----------------------------------------------------------------------


async def test_a_client_gone_while_queued_withdraws_its_item(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gated = Gate()
    model = BatchedModel(gated, name="gated", max_batch_size=1)
    app = KServeApp([model], metrics=False)
    caplog.set_level(logging.INFO, "batchkit.access")
    gone = anyio.Event()
    sent: list[Any] = []
    payload = json.dumps(body(2.0)).encode()
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/gated/infer",
        "headers": [],
        "query_string": b"",
    }
    async with app.lifespan():
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, app, "POST", "/v2/models/gated/infer", body(1.0))
            await gated.started.wait()
            try:
                async with anyio.create_task_group() as gone_client:
                    gone_client.start_soon(app, scope, receive, send)
                    await anyio.wait_all_tasks_blocked()
                    assert model.statistics().queue_depth == 1
                    gone.set()
                # its handler has returned
                assert model.statistics().cancelled == 1
            finally:
                gated.open()
    assert [float(x[0]) for x in gated.seen] == [1.0]  # the gone client's item never ran
    assert sent == []  # nobody to answer
    assert sorted(r.status for r in access_records(caplog)) == [200, 499]  # type: ignore[attr-defined]


async def test_call_until_disconnect_returns_and_raises_as_the_call_would() -> None:
    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async def ok(x: int) -> int:
        return x + 1

    async def fails() -> None:
        raise KeyError("k")

    assert await call_until_disconnect(receive, ok, 1) == 2
    with pytest.raises(KeyError):
        await call_until_disconnect(receive, fails)

    async def disconnected() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    with pytest.raises(ClientDisconnected):
        await call_until_disconnect(disconnected, anyio.sleep_forever)


def raw_infer(address: str, path: str, payload: dict[str, Any]) -> socket.socket:
    """Send an infer request on a raw socket, without reading the response."""
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    sock.sendall(head + data)
    return sock


def post(address: str, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class SyncGate:
    """A sync model that records what it runs and holds each batch until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[float] = []

    def __call__(self, items: list[Any]) -> list[Any]:
        self.seen.extend(float(x[0]) for x in items)
        assert self.gate.wait(20)
        return items


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs asyncio
def test_under_uvicorn_a_client_that_closes_its_socket_is_never_computed(
    anyio_backend: str,
) -> None:
    fn = SyncGate()
    model = BatchedModel(fn, name="gated", max_batch_size=1)
    app = KServeApp([model], metrics=False)
    path = "/v2/models/gated/infer"
    with running_server(app) as address:
        first: list[Any] = []
        worker = threading.Thread(target=lambda: first.append(post(address, path, body(1.0))))
        worker.start()
        wait_for(lambda: fn.seen == [1.0])  # held in the model
        sock = raw_infer(address, path, body(2.0))
        wait_for(lambda: model.statistics().submitted == 2)  # queued (or staged)
        sock.close()  # the client gives up while its item is queued
        wait_for(lambda: model.statistics().cancelled == 1)
        fn.gate.set()
        worker.join(20)
        assert first[0][0] == 200
        assert post(address, path, body(3.0))[0] == 200
    assert fn.seen == [1.0, 3.0]  # 2.0 was withdrawn, never computed
    stats = model.statistics()
    assert (stats.completed, stats.cancelled) == (2, 1)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_the_helper_in_a_fastapi_route_withdraws_a_gone_clients_item(anyio_backend: str) -> None:
    if fastapi is None:
        pytest.skip("needs fastapi")

    fn = SyncGate()
    model = BatchedModel(fn, name="gated", max_batch_size=1)

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with model:
            yield

    api = fastapi.FastAPI(lifespan=lifespan)

    @api.post("/predict")
    async def predict(request: fastapi.Request) -> dict[str, Any]:
        payload = await request.json()
        x = payload["inputs"][0]["data"]
        try:
            y = await call_until_disconnect(request.receive, model.call, x)
        except ClientDisconnected:
            return {}  # nobody reads it
        return {"y": y}

    with running_server(api) as address:
        first: list[Any] = []
        worker = threading.Thread(target=lambda: first.append(post(address, "/predict", body(1.0))))
        worker.start()
        wait_for(lambda: fn.seen == [1.0])
        sock = raw_infer(address, "/predict", body(2.0))
        wait_for(lambda: model.statistics().submitted == 2)  # queued (or staged)
        sock.close()
        wait_for(lambda: model.statistics().cancelled == 1)
        fn.gate.set()
        worker.join(20)
        assert first[0] == (200, {"y": [1.0]})
        assert post(address, "/predict", body(3.0)) == (200, {"y": [3.0]})
    assert fn.seen == [1.0, 3.0]


# -- draining and the end of a shutdown -------------------------------------------------------


async def test_draining_turns_ready_to_503_and_keeps_serving() -> None:
    app = doubling_app()
    async with app.lifespan():
        assert (await request(app, "GET", "/v2/health/ready")).status == 200
        app.start_draining()
        assert (await request(app, "GET", "/v2/health/ready")).status == 503
        assert (await request(app, "GET", "/v2/health/live")).status == 200
        reply = await request(app, "POST", "/v2/models/double/infer", body(2.0))
        assert reply.status == 200 and reply.json()["outputs"][0]["data"] == [4.0]


async def test_aborting_the_waits_answers_503_and_withdraws_queued_items() -> None:
    gated = Gate()
    model = BatchedModel(gated, name="gated", max_batch_size=1)
    app = KServeApp([model], metrics=False)
    replies: dict[float, Any] = {}

    async def one(x: float) -> None:
        replies[x] = await request(app, "POST", "/v2/models/gated/infer", body(x))

    async with app.lifespan():
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 1.0)
            await gated.started.wait()
            tg.start_soon(one, 2.0)
            await anyio.wait_all_tasks_blocked()
            assert app.abort_waits() == 2
            await anyio.wait_all_tasks_blocked()
            gated.open()
        late = await request(app, "POST", "/v2/models/gated/infer", body(3.0))
    for reply in (replies[1.0], replies[2.0], late):
        assert reply.status == 503
        assert "shut down before the model answered" in reply.error
    assert [float(x[0]) for x in gated.seen] == [1.0]  # the queued one never ran
    assert model.statistics().cancelled >= 1


# -- statistics -------------------------------------------------------------------------------


async def test_statistics_count_what_was_sent() -> None:
    def maybe(items: list[Any]) -> list[Any]:
        return [ValueError("neg") if x[0] < 0 else x for x in items]

    app = KServeApp(
        [BatchedModel(maybe, name="m"), BatchedModel(lambda xs: xs, name="other")],
        metrics=False,
    )
    async with app.lifespan():
        for x in (1.0, 2.0, 3.0, -1.0):
            await request(app, "POST", "/v2/models/m/infer", body(x))
        reply = await request(app, "POST", "/v2/models/m/infer", body(4.0, 5.0))
        assert reply.status == 200
        one = (await request(app, "GET", "/v2/models/m/stats")).json()
        versioned = (await request(app, "GET", "/v2/models/m/versions/1/stats")).json()
        every = (await request(app, "GET", "/v2/models/stats")).json()
        missing = await request(app, "GET", "/v2/models/nope/stats")
        meta = (await request(app, "GET", "/v2")).json()
    (stats,) = one["model_stats"]
    assert versioned == one
    assert [s["name"] for s in every["model_stats"]] == ["m", "other"]
    assert missing.status == 404
    assert "statistics" in meta["extensions"]
    inference = stats["inference_stats"]
    assert stats["inference_count"] == 5 and inference["success"]["count"] == 5
    assert inference["fail"]["count"] == 1
    assert inference["queue"]["count"] == 6 == inference["compute_infer"]["count"]
    assert inference["compute_infer"]["ns"] > 0
    assert stats["execution_count"] == sum(
        b["compute_infer"]["count"] for b in stats["batch_stats"]
    )
    assert stats["last_inference"] > 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs asyncio
def test_tritonclient_reads_the_statistics(anyio_backend: str) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    import numpy as np

    app = KServeApp([BatchedModel(lambda xs: [x * 2 for x in xs], name="double")], metrics=False)
    with running_server(app) as address:
        client = httpclient.InferenceServerClient(address)
        try:
            for n in (1, 2, 3):
                inp = httpclient.InferInput("INPUT0", [n, 4], "FP32")
                inp.set_data_from_numpy(np.ones((n, 4), np.float32))
                client.infer("double", [inp], request_id=f"stats-{n}")
            one = client.get_inference_statistics("double")
            every = client.get_inference_statistics()
        finally:
            client.close()
    (stats,) = one["model_stats"]
    assert every == one
    assert (stats["name"], stats["version"]) == ("double", "1")
    assert stats["inference_count"] == 6  # rows
    assert stats["inference_stats"]["success"]["count"] == 6
    assert stats["inference_stats"]["fail"]["count"] == 0
    assert (
        sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    )


# -- warm-up ----------------------------------------------------------------------------------


async def test_readiness_is_503_until_the_warm_up_ran(caplog: pytest.LogCaptureFixture) -> None:
    from batchkit.asgi import ServedModel

    gated = Gate()
    served = ServedModel(BatchedModel(gated, name="warm"), warmup=[[0.0], [0.5]])
    other = BatchedModel(lambda xs: xs, name="plain")
    app = KServeApp([served, other], metrics=False)
    caplog.set_level(logging.INFO, "batchkit")
    async with app.lifespan():
        await gated.started.wait()
        ready = await request(app, "GET", "/v2/health/ready")
        assert ready.status == 503 and "warming up" in ready.error
        assert (await request(app, "GET", "/v2/models/warm/ready")).status == 503
        assert (await request(app, "GET", "/v2/models/plain/ready")).status == 200
        assert (await request(app, "GET", "/v2/health/live")).status == 200
        gated.open()
        await anyio.wait_all_tasks_blocked()  # the warm-up task has finished
        assert (await request(app, "GET", "/v2/health/ready")).status == 200
        assert (await request(app, "GET", "/v2/models/warm/ready")).status == 200
    assert [[list(x) for x in batch] for batch in gated.batches] == [[[0.0], [0.5]]]
    assert served.model.statistics().completed == 2  # warm-up items count
    assert any("warmed up (2 items" in r.getMessage() for r in caplog.records)


async def test_a_failed_warm_up_keeps_the_model_not_ready(caplog: pytest.LogCaptureFixture) -> None:
    from batchkit.asgi import ServedModel

    async def broken(items: list[Any]) -> list[Any]:
        raise RuntimeError("no weights")

    served = ServedModel(BatchedModel(broken, name="cold"), warmup=[[1.0]])
    app = KServeApp([served], metrics=False)
    caplog.set_level(logging.ERROR, "batchkit")
    async with app.lifespan():
        await anyio.wait_all_tasks_blocked()  # the warm-up task has finished
        assert any("failed its warm-up" in r.getMessage() for r in caplog.records)
        assert (await request(app, "GET", "/v2/health/ready")).status == 503
        assert (await request(app, "GET", "/v2/models/cold/ready")).status == 503
    assert len(tracebacks(caplog)) == 1


def test_warm_up_items_must_be_a_sequence() -> None:
    from batchkit import ConfigurationError
    from batchkit.asgi import ServedModel

    with pytest.raises(ConfigurationError, match="warmup must be a sequence"):
        ServedModel(BatchedModel(lambda xs: xs, name="m"), warmup="abc")


# -- tracing (OpenTelemetry) ------------------------------------------------------------------


async def test_a_span_per_request_continues_the_callers_trace() -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def maybe(items: list[Any]) -> list[Any]:
        if any(x[0] < 0 for x in items):
            raise ValueError("negative")
        return items

    app = KServeApp([BatchedModel(maybe, name="m")], metrics=False, tracing=provider)
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "X-Request-ID": "traced"}
    async with app.lifespan():
        ok = await request(app, "POST", "/v2/models/m/infer", body(1.0, 2.0), headers=headers)
        failed = await request(app, "POST", "/v2/models/m/infer", body(-1.0))
    spans = exporter.get_finished_spans()
    first, second = [s for s in spans if s.kind == SpanKind.SERVER]
    batches = [s for s in spans if s.kind == SpanKind.INTERNAL]
    assert [b.name for b in batches] == ["batch m", "batch m"]
    for batch, served in zip(batches, (first, second), strict=True):
        assert [link.context.span_id for link in batch.links] == [served.context.span_id]
        assert batch.parent is None  # its own trace, linked to the requests it served
        assert batch.start_time <= batch.end_time
    assert dict(batches[0].attributes or {})["batchkit.batch_size"] == 2
    assert batches[1].status.status_code == StatusCode.ERROR
    assert first.name == "POST /v2/models/m/infer"
    assert first.context.trace_id == int(TRACE, 16)
    assert first.parent is not None and first.parent.span_id == int(PARENT, 16)
    # the response and the logs name the span that was exported
    assert ok.headers["traceparent"] == f"00-{TRACE}-{first.context.span_id:016x}-01"
    attributes = dict(first.attributes or {})
    assert attributes["http.response.status_code"] == 200
    assert attributes["batchkit.request_id"] == "traced"
    assert (attributes["batchkit.model"], attributes["batchkit.model_version"]) == ("m", "1")
    assert attributes["batchkit.rows"] == 2
    assert attributes["batchkit.batch_size"] == 2
    assert attributes["batchkit.queue_ms"] >= 0 and attributes["batchkit.compute_ms"] >= 0
    assert second.parent is None  # no traceparent: a new trace
    assert failed.headers["traceparent"].split("-")[1] == f"{second.context.trace_id:032x}"
    assert second.status.status_code == StatusCode.ERROR


def test_tracing_without_opentelemetry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from batchkit import ConfigurationError

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"batchkit\[otel\]"):
        doubling_app(tracing=True)


async def test_cancelling_the_caller_of_call_until_disconnect_is_not_a_disconnect() -> None:
    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    cancelled = False
    with anyio.move_on_after(0) as scope:
        try:
            await call_until_disconnect(receive, anyio.sleep_forever)
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise
    assert scope.cancelled_caught and cancelled
