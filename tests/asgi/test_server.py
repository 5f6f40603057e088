"""A real uvicorn server called with the stock tritonclient.http clients (sync and asyncio)."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from batchkit import BatchedModel
from batchkit.asgi import KServeApp, ServedModel, Tensor

from ..support.asgi import DATATYPES, identity_model, running_server, sample

tritonclient_http = pytest.importorskip("tritonclient.http")
aio = pytest.importorskip("tritonclient.http.aio")
ml_dtypes = pytest.importorskip("ml_dtypes")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException


class Gate:
    """A sync model that holds its batch until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.entered.set()
        assert self.release.wait(30), "the test never opened the gate"
        return items


def broken(items: list[Any]) -> list[Any]:
    raise RuntimeError("the secret stack")


def double_in_place(items: list[Any]) -> list[Any]:
    for item in items:
        item *= 2
    return items


def not_numbers(items: list[Any]) -> list[Any]:
    return [np.array([np.nan, np.inf, -np.inf], np.float32) for _ in items]


@pytest.fixture
def flavor() -> str:
    """Which server the protocol tests run against: tests/asgi/test_triton_conformance.py runs some
    of them against a real Triton, where this is "triton"."""
    return "batchkit"


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def app(gate: Gate) -> KServeApp:
    models = [identity_model(dt, max_batch_size=64) for dt in DATATYPES]
    models.append(identity_model("FP32", name="batched", max_batch_size=64, max_wait=30.0))
    models.append(identity_model("FP32", name="tiny_queue", max_queue_size=1))
    models.append(ServedModel(BatchedModel(broken, name="broken")))
    models.append(ServedModel(BatchedModel(gate, name="gated", max_batch_size=1)))
    models.append(
        ServedModel(
            BatchedModel(double_in_place, name="inplace"),
            inputs=[Tensor("X", "FP32", [3])],
            outputs=[Tensor("Y", "FP32", [3])],
        )
    )
    models.append(
        ServedModel(
            BatchedModel(not_numbers, name="nan"),
            inputs=[Tensor("X", "FP32", [3])],
            outputs=[Tensor("Y", "FP32", [3])],
        )
    )
    return KServeApp(models, max_body_size=1 << 20)


@pytest.fixture(scope="module")
def server(app: KServeApp, gate: Gate) -> Iterator[str]:
    with running_server(app) as url:
        warm_up(url, app, gate)
        yield url


def warm_up(url: str, app: KServeApp, gate: Gate) -> None:
    """Call every model once, so the engines' model threads exist before any test starts
    (they belong to the module's server, not to a test)."""
    gate.release.set()
    client = tritonclient_http.InferenceServerClient(url)
    try:
        for served in app.models:
            tensor = served.inputs[0]
            rows = 64 if served.name == "batched" else 1  # fills its batch: it leaves at once
            shape = [rows, *(1 if d == -1 else d for d in tensor.shape)]
            inp = tritonclient_http.InferInput(tensor.name, shape, tensor.datatype)
            inp.set_data_from_numpy(
                as_client_array(tensor.datatype, sample(tensor.datatype, rows, shape[1]))
            )
            try:
                client.infer(served.name, [inp])
            except InferenceServerException:
                pass  # the broken model
    finally:
        client.close()
        gate.release.clear()
        gate.entered.clear()


@pytest.fixture
def client(server: str) -> Iterator[Any]:
    c = tritonclient_http.InferenceServerClient(server, concurrency=8)
    yield c
    c.close()


def as_client_array(datatype: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return array.astype(ml_dtypes.bfloat16) if datatype == "BF16" else array


def test_health_metadata_and_config(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("id_fp32")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("id_int8", "1")
    assert meta["inputs"] == [{"name": "X", "datatype": "INT8", "shape": [-1, 3]}]
    config = client.get_model_config("id_fp16")
    assert config["max_batch_size"] == 64
    # Triton adds fields of its own (allow_ragged_batch, optional, ...): compare these.
    assert {
        "name": "X", "data_type": "TYPE_FP16", "format": "FORMAT_NONE", "dims": [3],
        "is_shape_tensor": False,
    }.items() <= config["input"][0].items()  # fmt: skip


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_with_the_sync_client(
    client: Any, datatype: str, binary: bool, flavor: str
) -> None:
    if datatype == "BF16" and not binary:
        pytest.skip("tritonclient sends BF16 only as binary data")
    if datatype == "FP16" and not binary and flavor == "triton":
        pytest.skip("Triton takes FP16 only as binary data (batchkit also takes it as JSON)")
    array = as_client_array(datatype, sample(datatype))
    if datatype == "BYTES" and not binary:
        array = np.array([f"é{i}".encode() for i in range(6)], dtype=object).reshape(2, 3)
    inp = tritonclient_http.InferInput("X", [2, 3], datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    out = tritonclient_http.InferRequestedOutput("Y", binary_data=binary or datatype == "BF16")
    result = client.infer(f"id_{datatype.lower()}", [inp], outputs=[out], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    got = result.as_numpy("Y")
    if datatype == "BYTES" and not binary:
        got = np.array([s.encode() for s in got.reshape(-1)], dtype=object).reshape(2, 3)
    assert got.shape == (2, 3)
    assert got.tolist() == array.tolist()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compression_both_ways(server: str, client: Any, algorithm: str) -> None:
    rows = [[float(3 * i + j) for j in range(3)] for i in range(60)]  # worth compressing
    values = [v for row in rows for v in row]
    inp = tritonclient_http.InferInput("X", [60, 3], "FP64")
    inp.set_data_from_numpy(np.array(rows), binary_data=False)
    result = client.infer(
        "id_fp64",
        [inp],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert result.as_numpy("Y").tolist() == rows
    # What tritonclient asks for is what comes back: compressed, and marked so.
    body = json.dumps(
        {"inputs": [{"name": "X", "datatype": "FP64", "shape": [60, 3], "data": values}]}
    ).encode()
    conn = http.client.HTTPConnection(server, timeout=10)
    conn.request(
        "POST", "/v2/models/id_fp64/infer", body=body, headers={"Accept-Encoding": algorithm}
    )
    reply = conn.getresponse()
    raw = reply.read()
    conn.close()
    assert reply.getheader("content-encoding") == algorithm
    plain = gzip.decompress(raw) if algorithm == "gzip" else zlib.decompress(raw)
    assert raw != plain
    assert json.loads(plain)["outputs"][0]["data"] == values


def test_concurrent_sync_clients_each_get_their_own_result(server: str) -> None:
    def one(i: int) -> list[float]:
        c = tritonclient_http.InferenceServerClient(server)
        try:
            inp = tritonclient_http.InferInput("X", [1, 3], "FP32")
            inp.set_data_from_numpy(np.full((1, 3), i, dtype=np.float32))
            return c.infer("id_fp32", [inp]).as_numpy("Y").reshape(-1).tolist()  # type: ignore[no-any-return]
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    assert results == [[float(i)] * 3 for i in range(32)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_clients_are_batched_together(server: str, app: KServeApp) -> None:
    import asyncio

    (model,) = [s.model for s in app.models if s.name == "batched"]
    full_batches = model.statistics().batch_sizes.get(64, 0)
    # max_batch_size 64 with a 30 s window: the batch leaves when the 64th request arrives.
    client = aio.InferenceServerClient(server, conn_limit=64)
    try:

        async def one(i: int) -> list[float]:
            inp = aio.InferInput("X", [1, 3], "FP32")
            inp.set_data_from_numpy(np.full((1, 3), i, dtype=np.float32))
            result = await client.infer("batched", [inp], request_id=str(i))
            assert result.get_response()["id"] == str(i)
            return result.as_numpy("Y").reshape(-1).tolist()  # type: ignore[no-any-return]

        assert await client.is_server_ready()
        results = await asyncio.gather(*(one(i) for i in range(64)))
        assert results == [[float(i)] * 3 for i in range(64)]
        assert model.statistics().batch_sizes.get(64, 0) == full_batches + 1
    finally:
        await client.close()


def test_batches_formed_across_clients_show_in_metrics(server: str) -> None:
    conn = http.client.HTTPConnection(server, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    # The warm-up sent "batched" one request of 64 rows: one batch of 64.
    assert 'batchkit_batch_size_bucket{le="32",model="batched",version="1"} 0.0' in text
    assert 'batchkit_batch_size_bucket{le="64",model="batched",version="1"}' in text
    assert 'batchkit_items_total{model="batched",outcome="completed",version="1"}' in text
    assert 'batchkit_http_requests_total{model="batched",status="200",version="1"}' in text
    assert 'batchkit_http_requests_total{model="broken",status="500",version="1"}' in text
    assert 'batchkit_model_version_info{model="id_fp32",version="1"} 1.0' in text
    # Latency histograms count every sample: at least the 64 items of that one batch.
    pattern = r'batchkit_(\w+)_seconds_count\{model="batched",version="1"\} ([\d.e+]+)'
    counts = dict(re.findall(pattern, text))
    assert float(counts["queue_wait"]) >= 64
    assert float(counts["end_to_end"]) >= 64
    assert float(counts["compute"]) >= 1
    assert 'batchkit_queue_wait_seconds_bucket{le="+Inf",model="batched",version="1"}' in text
    assert 'batchkit_queue_wait_recent_seconds{model="batched",quantile="0.99",version="1"}' in text


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_as_tritonclient_asks_for_it(client: Any, binary: bool) -> None:
    inp = tritonclient_http.InferInput("X", [2, 3], "FP32")
    inp.set_data_from_numpy(np.array([[0.1, 0.7, 0.2], [3.0, 1.0, 2.0]], np.float32))
    out = tritonclient_http.InferRequestedOutput("Y", binary_data=binary, class_count=2)
    got = client.infer("id_fp32", [inp], outputs=[out]).as_numpy("Y")
    assert got.shape == (2, 2)
    texts = [b if isinstance(b, str) else b.decode() for b in got.reshape(-1).tolist()]
    assert texts == ["0.700000:1", "0.200000:2", "3.000000:0", "2.000000:2"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_binary_and_json_inputs_can_be_changed_in_place_by_the_model(
    client: Any, binary: bool
) -> None:
    inp = tritonclient_http.InferInput("X", [2, 3], "FP32")
    inp.set_data_from_numpy(np.ones((2, 3), np.float32), binary_data=binary)
    assert client.infer("inplace", [inp]).as_numpy("Y").tolist() == [[2.0] * 3] * 2


def test_nan_and_infinity_reach_tritonclient_from_json_outputs(client: Any) -> None:
    inp = tritonclient_http.InferInput("X", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), np.float32))
    out = tritonclient_http.InferRequestedOutput("Y", binary_data=False)
    got = client.infer("nan", [inp], outputs=[out]).as_numpy("Y")
    assert np.isnan(got[0, 0])
    assert got[0, 1:].tolist() == [np.inf, -np.inf]


# -- errors as tritonclient sees them -------------------------------------------------------------


def expect_error(status: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    assert info.value.status() == status, info.value.message()
    return str(info.value.message())


def test_client_errors(client: Any) -> None:
    good = tritonclient_http.InferInput("X", [1, 3], "FP32")
    good.set_data_from_numpy(np.zeros((1, 3), np.float32))
    wrong_shape = tritonclient_http.InferInput("X", [1, 4], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 4), np.float32))
    assert re.search(r"\[-1, ?3\]", expect_error("400", client.infer, "id_fp32", [wrong_shape]))
    wrong_type = tritonclient_http.InferInput("X", [1, 3], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 3)))
    assert "FP64" in expect_error("400", client.infer, "id_fp32", [wrong_type])
    unknown = tritonclient_http.InferInput("Z", [1, 3], "FP32")
    unknown.set_data_from_numpy(np.zeros((1, 3), np.float32))
    assert re.search(r"[\"']Z[\"']", expect_error("400", client.infer, "id_fp32", [unknown]))
    out = tritonclient_http.InferRequestedOutput("NOPE")
    assert "NOPE" in expect_error("400", client.infer, "id_fp32", [good], outputs=[out])
    assert "nope" in expect_error("404", client.infer, "nope", [good])
    no_version = expect_error("404", client.infer, "id_fp32", [good], model_version="9")
    assert re.search(r"\b9\b", no_version)
    expect_error("404", client.get_model_metadata, "nope")


def test_model_failure_is_500_with_a_safe_message(client: Any) -> None:
    inp = tritonclient_http.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 2), np.float32))
    message = expect_error("500", client.infer, "broken", [inp])
    assert "RuntimeError" in message
    assert "secret" not in message


def test_queue_full_is_503(client: Any) -> None:
    inp = tritonclient_http.InferInput("X", [2, 3], "FP32")  # two rows, room for one
    inp.set_data_from_numpy(np.zeros((2, 3), np.float32))
    assert "capacity" in expect_error("503", client.infer, "tiny_queue", [inp])
    one = tritonclient_http.InferInput("X", [1, 3], "FP32")
    one.set_data_from_numpy(np.ones((1, 3), np.float32))
    assert client.infer("tiny_queue", [one]).as_numpy("Y").tolist() == [[1.0, 1.0, 1.0]]


def test_deadline_passing_is_504(server: str, gate: Gate) -> None:
    inp = tritonclient_http.InferInput("INPUT0", [1, 1], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1), np.float32))
    with ThreadPoolExecutor(1) as pool:
        c1 = tritonclient_http.InferenceServerClient(server)
        # timeout is in microseconds: 0.2 s. Read as milliseconds (200 s) the client gives up
        # at 20 s first; the gate opens only after the 504 arrived.
        c2 = tritonclient_http.InferenceServerClient(server, network_timeout=20.0)
        try:
            held = pool.submit(c1.infer, "gated", [inp])
            assert gate.entered.wait(10)
            message = expect_error("504", c2.infer, "gated", [inp], timeout=200_000)
            assert "deadline" in message
            gate.release.set()
            assert held.result(10).as_numpy("OUTPUT0").tolist() == [[0.0]]
        finally:
            gate.release.set()
            c1.close()
            c2.close()


def test_body_over_the_limit_is_413(client: Any) -> None:
    big = tritonclient_http.InferInput("X", [100_000, 3], "FP32")
    big.set_data_from_numpy(np.zeros((100_000, 3), np.float32))
    expect_error("413", client.infer, "id_fp32", [big])
    assert client.is_server_live()


def test_error_bodies_are_json_with_an_error_field(server: str, flavor: str) -> None:
    conn = http.client.HTTPConnection(server, timeout=10)
    conn.request("PUT", "/v2/models/id_fp32/infer", body=b"{}")
    reply = conn.getresponse()
    assert reply.status == 405
    if flavor == "batchkit":  # RFC 9110 wants Allow with a 405; Triton sends none
        assert reply.getheader("allow") == "POST"
    assert set(json.loads(reply.read())) == {"error"}
    conn.close()
