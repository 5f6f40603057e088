"""TritonModel without a Triton server: settings, error translation, the asyncio-only rule, a
server that is down, and batchkit in front of batchkit (a TritonModel calling batchkit's own
KServe v2 server, served by uvicorn). The tests against a real Triton are in
test_triton_server.py; tritonclient.aio is asyncio-only, so these run on asyncio."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from batchkit import (
    BatchedModel,
    BatchInfo,
    ConfigurationError,
    DeadlineExceeded,
    ModelError,
    RemoteError,
    RemoteInvalidInput,
    RemoteRejected,
    RemoteUnavailable,
    WrongLoopError,
)

np = pytest.importorskip("numpy")
pytest.importorskip("tritonclient.http.aio")
pytest.importorskip("tritonclient.grpc.aio")
pytest.importorskip("uvicorn")

from tritonclient.utils import InferenceServerException  # noqa: E402

from batchkit.asgi import KServeApp, ServedModel, Tensor  # noqa: E402
from batchkit.triton import TensorSpec, TritonModel  # noqa: E402
from batchkit.triton._errors import is_transient, translate  # noqa: E402

from ..support.asgi import running_server  # noqa: E402

ASYNCIO = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("", "m"), {}, "url must be a non-empty string, got ''"),
        (("ftp://h:1", "m"), {}, "url must start with grpc:// or http://, got 'ftp://h:1'"),
        (("http://h:1", "m"), {"protocol": "grpc"}, "contradicts protocol='grpc'"),
        (("h:1", "m"), {"protocol": "tcp"}, "protocol must be 'grpc' or 'http', got 'tcp'"),
        (("http://h:1/v2", "m"), {}, "url must be scheme://host:port, got 'http://h:1/v2'"),
        (("h:1", ""), {}, "model must be a non-empty string, got ''"),
        (("h:1", "m"), {"version": 2}, "version must be a non-empty string or None, got 2"),
        (("h:1", "m"), {"max_in_flight": 0}, "max_in_flight must be an int >= 1, got 0"),
        (("h:1", "m"), {"retries": -1}, "retries must be an int >= 0, got -1"),
        (("h:1", "m"), {"backoff": 0}, "backoff must be a number of seconds > 0, got 0"),
        (("h:1", "m"), {"priority": 3}, "priority must be callable, got 3"),
        (("h:1", "m"), {"outputs": "Y"}, "outputs must be a non-empty list of names, got 'Y'"),
    ],
)
def test_bad_settings_name_the_bad_value(
    args: tuple[str, str], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        TritonModel(*args, **kwargs)


def test_urls() -> None:
    assert TritonModel("127.0.0.1:8001", "m").url == "grpc://127.0.0.1:8001"
    assert TritonModel("127.0.0.1:8000", "m", protocol="http").url == "http://127.0.0.1:8000"
    assert TritonModel("http://h:8000/", "m").address == "h:8000"
    assert repr(TritonModel("grpc://h:1", "scale")) == "<TritonModel 'scale' at grpc://h:1>"
    assert BatchedModel(TritonModel("h:1", "scale")).name == "scale"


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", RemoteUnavailable),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", RemoteRejected),
        ("StatusCode.UNAVAILABLE", "Request timeout expired", DeadlineExceeded),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded),
        ("StatusCode.RESOURCE_EXHAUSTED", "too many", RemoteRejected),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'X'", RemoteInvalidInput),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'x' is not found", RemoteUnavailable),
        ("StatusCode.INTERNAL", "negative input: -1.0", RemoteError),
        ("400", "unexpected datatype FP64 for input 'X'", RemoteInvalidInput),
        ("400", "Request for unknown model: 'x' is not found", RemoteUnavailable),
        ("503", "Exceeds maximum queue size", RemoteRejected),
        ("504", "the deadline passed", DeadlineExceeded),
        ("500", "boom", RemoteError),
    ],
)
def test_server_errors_are_translated(status: str, message: str, expected: type) -> None:
    exc = InferenceServerException(msg=message, status=status)
    error = translate(exc, "model 'm' at grpc://h:1", 3)
    assert type(error) is expected
    assert error.__cause__ is exc
    assert message in str(error)
    if isinstance(error, RemoteError):
        assert error.batch_size == 3
        assert isinstance(error, ModelError)


def test_only_connection_failures_are_transient() -> None:
    assert is_transient(ConnectionRefusedError())
    unavailable = "StatusCode.UNAVAILABLE"
    assert is_transient(InferenceServerException("Connection reset by peer", unavailable))
    assert not is_transient(InferenceServerException("Exceeds maximum queue size", unavailable))
    assert not is_transient(InferenceServerException("bad", "StatusCode.INVALID_ARGUMENT"))
    assert not is_transient(ValueError())
    assert issubclass(RemoteUnavailable, ConnectionError)
    assert issubclass(RemoteInvalidInput, ValueError)


# -- asyncio only --------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_is_refused_with_a_clear_error() -> None:
    triton = TritonModel(f"127.0.0.1:{dead_port()}", "m")
    with pytest.raises(WrongLoopError, match="asyncio"):
        await triton.connect()


# -- a server that is down -----------------------------------------------------------------------


@pytest.mark.anyio
@ASYNCIO
@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_a_server_that_is_down_gives_a_clear_error_after_retries(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    triton = TritonModel(f"{protocol}://127.0.0.1:{dead_port()}", "scale", retries=2, backoff=0.01)
    assert not await triton.ready()
    caplog.set_level(logging.INFO, logger="batchkit.triton")
    with pytest.raises(RemoteUnavailable, match=r"model 'scale' at .* (cannot be used|is unr)"):
        await triton.connect()
    retries = [r for r in caplog.records if "retry in" in r.getMessage()]
    assert [r.getMessage().rsplit(" ", 2)[-2] for r in retries] == ["0.010", "0.020"]
    async with BatchedModel(triton) as model:
        results = await model.call_many([1.0, 2.0], return_exceptions=True)
    assert [type(r) for r in results] == [RemoteUnavailable, RemoteUnavailable]
    assert results[0] is not results[1]
    assert results[0].batch_size == 2
    await triton.aclose()


# -- batchkit in front of batchkit ---------------------------------------------------------------


class Recorder:
    """An async model for the inner batchkit server: doubles rows, records each BatchInfo."""

    def __init__(self) -> None:
        self.infos: list[BatchInfo] = []
        self.batch_sizes: list[int] = []

    async def __call__(self, items: list[Any]) -> list[Any]:
        return await self.call_with_info(items, BatchInfo(len(items), 0, None, 0.0))

    async def call_with_info(self, items: list[Any], info: BatchInfo) -> list[Any]:
        self.infos.append(info)
        self.batch_sizes.append(len(items))
        return [np.asarray(item) * 2 for item in items]


@pytest.fixture(scope="module")
def inner() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def batchkit_server(inner: Recorder) -> Iterator[str]:
    doubler = ServedModel(
        BatchedModel(inner, name="double", max_batch_size=4),
        inputs=[Tensor("X", "FP32", (3,))],
        outputs=[Tensor("Y", "FP32", (3,))],
    )

    async def add_and_subtract(items: list[Any]) -> list[Any]:
        return [{"S": it["A"] + it["B"], "D": it["A"] - it["B"]} for it in items]

    pair = ServedModel(
        BatchedModel(add_and_subtract, name="pair", max_batch_size=16),
        inputs=[Tensor("A", "INT32", (2,)), Tensor("B", "INT32", (2,))],
        outputs=[Tensor("S", "INT32", (2,)), Tensor("D", "INT32", (2,))],
    )  # fmt: skip
    with running_server(KServeApp([doubler, pair])) as url:
        yield f"http://{url}"


@pytest.mark.anyio
@ASYNCIO
async def test_batchkit_in_front_of_batchkit(batchkit_server: str, inner: Recorder) -> None:
    rows = [np.full(3, i, np.float32) for i in range(10)]
    async with TritonModel(batchkit_server, "double", max_in_flight=2) as triton:
        assert triton.inputs == (TensorSpec("X", "FP32", (3,)),)
        assert triton.max_batch_size == 4
        assert await triton.ready()
        async with BatchedModel(triton, max_batch_size=10, max_wait=5.0) as model:
            outputs = await model.call_many(rows, priority=3, timeout=30)
    assert [o.tolist() for o in outputs] == [[2.0 * i] * 3 for i in range(10)]
    # One batch of 10 went out as requests of at most the server's 4 rows.
    assert sorted(inner.batch_sizes[-3:]) == [2, 4, 4]
    for info in inner.infos[-3:]:
        assert info.priority == 2**63 + 3  # batchkit's 0 is the server's middle level
        assert info.timeout is not None
        assert 0 < info.timeout <= 30


@pytest.mark.anyio
@ASYNCIO
async def test_several_inputs_and_outputs_as_mappings(batchkit_server: str) -> None:
    items = [{"A": np.array([i, 1], np.int32), "B": np.array([1, i], np.int32)} for i in range(3)]
    async with TritonModel(batchkit_server, "pair") as triton, BatchedModel(triton) as model:
        outputs = await model.call_many(items)
        only_s = TritonModel(batchkit_server, "pair", outputs=["S"])
        try:
            assert (await only_s(items[:1]))[0].tolist() == [1, 1]
        finally:
            await only_s.aclose()
    assert [o["S"].tolist() for o in outputs] == [[i + 1, 1 + i] for i in range(3)]
    assert [o["D"].tolist() for o in outputs] == [[i - 1, 1 - i] for i in range(3)]


@pytest.mark.anyio
@ASYNCIO
async def test_bad_items_fail_only_their_request(batchkit_server: str) -> None:
    async with TritonModel(batchkit_server, "double") as triton:
        results = await triton([np.zeros(3), np.zeros(4)])  # rows of different shapes
        assert all(isinstance(r, RemoteInvalidInput) for r in results)
        results = await triton([np.zeros(5)])  # the server rejects the shape
        assert isinstance(results[0], RemoteInvalidInput)
        assert "[-1, 3]" in str(results[0]) or "shape" in str(results[0])
        (good,) = await triton([np.ones(3)])
        assert good.tolist() == [2.0, 2.0, 2.0]
        unknown = TritonModel(batchkit_server, "nope", retries=0)
        with pytest.raises(RemoteUnavailable, match="nope"):
            await unknown.connect()
        await unknown.aclose()


@pytest.mark.anyio
@ASYNCIO
async def test_a_sync_caller_through_the_background_engine(batchkit_server: str) -> None:
    triton = TritonModel(batchkit_server, "double")
    model = BatchedModel(triton)

    def call() -> Any:
        with model:
            return model.call_sync(np.ones(3, np.float32), timeout=30)

    assert (await anyio.to_thread.run_sync(call)).tolist() == [2.0, 2.0, 2.0]
    await triton.aclose()  # closes the client on the background engine's loop, if still there


# -- a batchkit server in front of a TritonModel -------------------------------------------------


@pytest.mark.anyio
@ASYNCIO
@pytest.mark.parametrize(
    ("target", "status", "phrase"),
    [("dead", 503, "unavailable"), ("double", 400, "rejected the input")],
)
async def test_the_asgi_server_answers_upstream_failures(
    batchkit_server: str, target: str, status: int, phrase: str
) -> None:
    from ..support.asgi import infer_body, request

    address = f"http://127.0.0.1:{dead_port()}" if target == "dead" else batchkit_server
    triton = TritonModel(address, "double", retries=0)
    served = ServedModel(
        BatchedModel(triton, name="front"),
        inputs=[Tensor("X", "FP32", (-1,))],
        outputs=[Tensor("Y", "FP32", (-1,))],
    )
    app = KServeApp([served])
    async with served.model:
        body = infer_body([{"name": "X", "datatype": "FP32", "shape": [1, 5], "data": [0] * 5}])
        reply = await request(app, "POST", "/v2/models/front/infer", body)
    await triton.aclose()
    assert reply.status == status
    assert phrase in reply.error


@pytest.mark.anyio
@ASYNCIO
async def test_the_decorator_wraps_a_triton_model(batchkit_server: str) -> None:
    from batchkit import AsyncBatched, batched

    triton = TritonModel(batchkit_server, "double")
    model = batched(max_batch_size=8)(triton)
    assert isinstance(model, AsyncBatched)
    async with triton, model:
        assert (await model.call(np.ones(3, np.float32), priority=1)).tolist() == [2.0] * 3
