"""The KServe v2 app driven directly as an ASGI callable (asyncio and trio)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from typing import Any

import anyio
import numpy as np
import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit.asgi import KServeApp, ServedModel, Tensor
from batchkit.asgi import Scope as Scope

from .asgi_helpers import DATATYPES, identity_model, request, sample
from .helpers import GatedModel

pytestmark = pytest.mark.anyio


def two_in_two_out() -> ServedModel:
    def add_mul(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"SUM": i["A"] + i["B"], "PROD": i["A"] * i["B"]} for i in items]

    return ServedModel(
        BatchedModel(add_mul, name="addmul"),
        inputs=[Tensor("A", "INT32", [2]), Tensor("B", "INT32", [2])],
        outputs=[Tensor("SUM", "INT32", [2]), Tensor("PROD", "INT32", [2])],
    )


def scalar_model(model: BatchedModel[Any, Any]) -> ServedModel:
    return ServedModel(
        model, inputs=[Tensor("INPUT0", "INT64", [])], outputs=[Tensor("OUTPUT0", "INT64", [])]
    )


def json_input(name: str, datatype: str, data: Any, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def binary_body(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def json_data(datatype: str, array: np.ndarray[Any, Any]) -> list[Any]:
    if datatype == "BYTES":
        return [b.decode("utf-8", "surrogateescape") for b in array.reshape(-1).tolist()]
    return array.reshape(-1).tolist()  # type: ignore[no-any-return]


def wire_bytes(datatype: str, array: np.ndarray[Any, Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in array.reshape(-1).tolist())
    if datatype == "BF16":
        return (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return (
        array.astype(np.dtype(datatype.lower().replace("fp", "float")).newbyteorder("<")).tobytes()
        if datatype != "BOOL"
        else array.astype(np.bool_).tobytes()
    )


# -- metadata and health --------------------------------------------------------------------------


async def test_server_metadata_lists_the_extensions_implemented() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    reply = await request(app, "GET", "/v2")
    assert reply.status == 200
    meta = reply.json()
    assert meta["name"] == "batchkit"
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_repository" not in meta["extensions"]  # no admin token
    admin = KServeApp([identity_model("FP32")], metrics=False, admin_token="t")
    assert "model_repository" in (await request(admin, "GET", "/v2")).json()["extensions"]


async def test_health_and_model_readiness() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    async with app.lifespan():
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/id_fp32/ready"):
            assert (await request(app, "GET", path)).status == 200
        assert (await request(app, "GET", "/v2/models/id_fp32/versions/1/ready")).status == 200


async def test_model_metadata_and_config_declare_the_signature() -> None:
    app = KServeApp([two_in_two_out()], metrics=False)
    meta = (await request(app, "GET", "/v2/models/addmul")).json()
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "A", "datatype": "INT32", "shape": [-1, 2]},
        {"name": "B", "datatype": "INT32", "shape": [-1, 2]},
    ]
    config = (await request(app, "GET", "/v2/models/addmul/versions/1/config")).json()
    assert config["max_batch_size"] == 32
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["input"][0]["dims"] == [2]
    assert [o["name"] for o in config["output"]] == ["SUM", "PROD"]


async def test_bytes_is_type_string_in_the_config() -> None:
    app = KServeApp([identity_model("BYTES")], metrics=False)
    config = (await request(app, "GET", "/v2/models/id_bytes/config")).json()
    assert config["input"][0]["data_type"] == "TYPE_STRING"


async def test_several_versions_of_one_model() -> None:
    v1 = ServedModel(BatchedModel(lambda xs: [x * 1 for x in xs], name="m", version="1"))
    v2 = ServedModel(BatchedModel(lambda xs: [x * 2 for x in xs], name="m", version="2"))
    app = KServeApp([v1, v2], metrics=False)
    body = {"inputs": [json_input("INPUT0", "FP32", [1.5], [1, 1])]}
    async with app.lifespan():
        assert (await request(app, "GET", "/v2/models/m")).json()["versions"] == ["1", "2"]
        latest = (await request(app, "POST", "/v2/models/m/infer", body)).json()
        assert (latest["model_version"], latest["outputs"][0]["data"]) == ("2", [3.0])
        first = (await request(app, "POST", "/v2/models/m/versions/1/infer", body)).json()
        assert (first["model_version"], first["outputs"][0]["data"]) == ("1", [1.5])
        missing = await request(app, "POST", "/v2/models/m/versions/3/infer", body)
        assert missing.status == 404
        assert "'3'" in missing.error


def test_duplicate_versions_are_refused() -> None:
    a = BatchedModel(lambda xs: xs, name="m")
    b = BatchedModel(lambda xs: xs, name="m")
    with pytest.raises(ConfigurationError, match="same version twice"):
        KServeApp([a, b])


def test_a_bad_tensor_declaration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="FP8"):
        Tensor("X", "FP8", [3])
    with pytest.raises(ConfigurationError, match="-2"):
        Tensor("X", "FP32", [-2])


# -- infer: every datatype, JSON and binary -------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_datatype_round_trips_as_json(datatype: str) -> None:
    app = KServeApp([identity_model(datatype)], metrics=False)
    array = sample(datatype)
    if datatype == "BYTES":  # JSON strings are UTF-8 text
        array = np.array([f"é{i}".encode() for i in range(6)], dtype=object).reshape(2, 3)
    body = {"id": "r1", "inputs": [json_input("X", datatype, json_data(datatype, array), [2, 3])]}
    async with app.lifespan():
        reply = await request(app, "POST", f"/v2/models/id_{datatype.lower()}/infer", body)
    assert reply.status == 200, reply.body
    out = reply.json()
    assert out["id"] == "r1"
    assert out["outputs"][0]["shape"] == [2, 3]
    assert out["outputs"][0]["datatype"] == datatype
    assert out["outputs"][0]["data"] == json_data(datatype, array)


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_datatype_round_trips_as_binary(datatype: str) -> None:
    app = KServeApp([identity_model(datatype)], metrics=False)
    array = sample(datatype)
    data = wire_bytes(datatype, array)
    header = {
        "inputs": [
            {"name": "X", "datatype": datatype, "shape": [2, 3],
             "parameters": {"binary_data_size": len(data)}}
        ],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    body, headers = binary_body(header, data)
    async with app.lifespan():
        reply = await request(
            app, "POST", f"/v2/models/id_{datatype.lower()}/infer", body, headers=headers
        )
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/octet-stream"
    size = int(reply.headers["inference-header-content-length"])
    out = reply.json()["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(data)
    assert reply.body[size:] == data


async def test_nested_json_data_is_accepted() -> None:
    app = KServeApp([identity_model("INT32")], metrics=False)
    body = {"inputs": [json_input("X", "INT32", [[1, 2, 3], [4, 5, 6]], [2, 3])]}
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/id_int32/infer", body)
    assert reply.json()["outputs"][0]["data"] == [1, 2, 3, 4, 5, 6]


async def test_mixed_binary_and_json_inputs_and_outputs() -> None:
    app = KServeApp([two_in_two_out()], metrics=False)
    b = np.array([[3, 4]], dtype="<i4").tobytes()
    header = {
        "inputs": [
            json_input("A", "INT32", [1, 2], [1, 2]),
            {"name": "B", "datatype": "INT32", "shape": [1, 2],
             "parameters": {"binary_data_size": len(b)}},
        ],
        "outputs": [
            {"name": "PROD", "parameters": {"binary_data": True}},
            {"name": "SUM", "parameters": {"binary_data": False}},
        ],
    }  # fmt: skip
    body, headers = binary_body(header, b)
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/addmul/infer", body, headers=headers)
    assert reply.status == 200, reply.body
    outs = reply.json()["outputs"]
    assert [o["name"] for o in outs] == ["PROD", "SUM"]
    assert outs[1]["data"] == [4, 6]
    size = int(reply.headers["inference-header-content-length"])
    assert np.frombuffer(reply.body[size:], "<i4").tolist() == [3, 8]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_request_bodies(encoding: str) -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    raw = json.dumps({"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}).encode()
    body = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/id_fp32/infer", body, headers={"Content-Encoding": encoding}
        )
    assert reply.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]


async def test_infer_responses_are_compressed_on_request_and_others_never() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/id_fp32/infer", body, headers={"Accept-Encoding": "gzip"}
        )
        assert reply.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(reply.body))["outputs"][0]["data"] == [1.0, 2.0, 3.0]
        meta = await request(app, "GET", "/v2", headers={"Accept-Encoding": "gzip"})
        assert "content-encoding" not in meta.headers


async def test_a_request_of_n_rows_is_n_items_batched_with_other_requests() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, name="g", max_batch_size=8)
    app = KServeApp([scalar_model(model)], metrics=False)
    replies: dict[str, Any] = {}

    async def send(rid: str, data: list[int]) -> None:
        body = {"id": rid, "inputs": [json_input("INPUT0", "INT64", data, [len(data)])]}
        replies[rid] = (await request(app, "POST", "/v2/models/g/infer", body)).json()

    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(send, "first", [1])
        await gated.started.wait()  # the first batch runs and holds the model
        tg.start_soon(send, "a", [2, 3, 4])
        tg.start_soon(send, "b", [5, 6])
        await anyio.wait_all_tasks_blocked()
        gated.open()
    assert [sorted(b) for b in gated.batches] == [[1], [2, 3, 4, 5, 6]]
    assert replies["a"]["outputs"][0]["data"] == [20, 30, 40]
    assert replies["b"]["outputs"][0]["data"] == [50, 60]
    assert replies["first"]["id"] == "first"


async def test_priority_is_passed_to_the_engine() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, name="g", max_batch_size=1)
    app = KServeApp([scalar_model(model)], metrics=False)

    async def send(value: int, priority: int) -> None:
        body = {
            "inputs": [json_input("INPUT0", "INT64", [value], [1])],
            "parameters": {"priority": priority},
        }
        assert (await request(app, "POST", "/v2/models/g/infer", body)).status == 200

    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(send, 0, 0)
        await gated.started.wait()
        tg.start_soon(send, 1, 5)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(send, 2, 1)
        await anyio.wait_all_tasks_blocked()
        gated.open()
    assert gated.seen == [0, 2, 1]


async def test_timeout_parameter_in_microseconds_gives_504() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, name="g", max_batch_size=1)
    app = KServeApp([scalar_model(model)], metrics=False)
    late: list[Any] = []

    async def first() -> None:
        body = {"inputs": [json_input("INPUT0", "INT64", [0], [1])]}
        await request(app, "POST", "/v2/models/g/infer", body)

    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(first)
        await gated.started.wait()
        body = {
            "inputs": [json_input("INPUT0", "INT64", [1], [1])],
            "parameters": {"timeout": 1000},
        }
        late.append(await request(app, "POST", "/v2/models/g/infer", body))
        gated.open()
    assert late[0].status == 504
    assert "deadline" in late[0].error
    assert gated.seen == [0]  # the expired item never reached the model


async def test_queue_full_gives_503_with_retry_after_and_withdraws_the_whole_request() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, name="g", max_batch_size=1, max_queue_size=2)
    app = KServeApp([scalar_model(model)], metrics=False)
    body = {"inputs": [json_input("INPUT0", "INT64", [1, 2, 3], [3])]}
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/g/infer", body)
        assert reply.status == 503
        assert int(reply.headers["retry-after"]) >= 1
        assert "capacity" in reply.error
        stats = model.statistics()
        assert (stats.rejected, stats.cancelled, stats.queue_depth) == (1, 2, 0)
        gated.open()
        ok = await request(
            app, "POST", "/v2/models/g/infer", {"inputs": [json_input("INPUT0", "INT64", [4], [1])]}
        )
        assert ok.json()["outputs"][0]["data"] == [40]
    assert gated.seen == [4]


async def test_a_failing_model_gives_500_without_its_message() -> None:
    def broken(items: list[Any]) -> list[Any]:
        raise ValueError("secret internals")

    app = KServeApp([ServedModel(BatchedModel(broken, name="broken"))], metrics=False)
    body = {"inputs": [json_input("INPUT0", "FP32", [1.0], [1, 1])]}
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/broken/infer", body)
    assert reply.status == 500
    assert "ValueError" in reply.error
    assert "secret" not in reply.error


async def test_an_output_that_breaks_the_signature_gives_500() -> None:
    wide = BatchedModel(lambda xs: [[1.0, 2.0]] * len(xs), name="wide")
    app = KServeApp([ServedModel(wide, outputs=[Tensor("OUTPUT0", "FP32", [3])])], metrics=False)
    body = {"inputs": [json_input("INPUT0", "FP32", [1.0], [1, 1])]}
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/wide/infer", body)
    assert reply.status == 500
    assert "declared [3]" in reply.error


async def test_requests_are_served_without_the_lifespan_on_background_engines() -> None:
    model = BatchedModel(lambda xs: [x + 1 for x in xs], name="plain")
    app = KServeApp([model], metrics=False)
    body = {"inputs": [json_input("INPUT0", "FP32", [1.0, 2.0], [1, 2])]}
    try:
        reply = await request(app, "POST", "/v2/models/plain/infer", body)
    finally:
        model.close()
    assert reply.json()["outputs"][0]["data"] == [2.0, 3.0]


# -- mounting -------------------------------------------------------------------------------------


class Router:
    """A minimal host app: mounts the KServe app under a prefix, runs its lifespan in its own."""

    def __init__(self, prefix: str, app: KServeApp) -> None:
        self.prefix, self.app = prefix, app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix + "/"):
            await self.app({**scope, "root_path": self.prefix}, receive, send)
            return
        body = json.dumps({"hello": "host"}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_mounted_under_a_prefix_in_a_host_app() -> None:
    kserve = KServeApp([identity_model("FP32")], metrics=False)
    host = Router("/ml", kserve)
    body = {"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}
    async with kserve.lifespan():  # the host's lifespan enters the mounted app's
        reply = await request(host, "POST", "/v2/models/id_fp32/infer", body, root_path="/ml")
        assert reply.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]
        assert (await request(host, "GET", "/v2/health/ready", root_path="/ml")).status == 200
        other = await request(host, "GET", "/elsewhere")
        assert json.loads(other.body) == {"hello": "host"}


async def test_lifespan_protocol_starts_and_stops_the_engines() -> None:
    model = BatchedModel(lambda xs: xs, name="life")
    app = KServeApp([model], metrics=False)
    to_app: list[dict[str, Any]] = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []
    started, stop = anyio.Event(), anyio.Event()

    async def receive() -> dict[str, Any]:
        if to_app:
            return to_app.pop(0)
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        started.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(app, {"type": "lifespan"}, receive, send)
        await started.wait()
        assert repr(model).endswith("running>")
        stop.set()
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert repr(model).endswith("idle>")
