"""The KServe v2 app driven directly as an ASGI callable (asyncio and trio)."""

from __future__ import annotations

import gzip
import importlib
import json
import struct
import threading
import zlib
from typing import Any

import anyio
import numpy as np
import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit.asgi import KServeApp, ServedModel, Tensor
from batchkit.asgi import Scope as Scope

from ..support.asgi import DATATYPES, identity_model, request, sample
from ..support.helpers import GatedModel

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


# 60 rows of 3: outputs of this size are compressed when the client accepts it (smaller are not).
LARGE = [float(i) for i in range(180)]


async def test_infer_responses_are_compressed_on_request_and_others_never() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {"inputs": [json_input("X", "FP32", LARGE, [60, 3])]}
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/id_fp32/infer", body, headers={"Accept-Encoding": "gzip"}
        )
        assert reply.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(reply.body))["outputs"][0]["data"] == LARGE
        meta = await request(app, "GET", "/v2", headers={"Accept-Encoding": "gzip"})
        assert "content-encoding" not in meta.headers


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("gzip, deflate, br", None), ("gzip", None), ("identity;q=0, gzip", "gzip")],
)
async def test_small_responses_are_not_compressed_unless_identity_is_refused(
    accept: str, expected: str | None
) -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/id_fp32/infer", body, headers={"Accept-Encoding": accept}
        )
    assert reply.headers.get("content-encoding") == expected
    raw = gzip.decompress(reply.body) if expected else reply.body
    assert json.loads(raw)["outputs"][0]["data"] == [1.0, 2.0, 3.0]


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


async def test_priority_follows_triton_one_first_and_none_or_zero_last() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, name="g", max_batch_size=1)
    app = KServeApp([scalar_model(model)], metrics=False)

    async def send(value: int, priority: int | None) -> None:
        body: dict[str, Any] = {"inputs": [json_input("INPUT0", "INT64", [value], [1])]}
        if priority is not None:
            body["parameters"] = {"priority": priority}
        assert (await request(app, "POST", "/v2/models/g/infer", body)).status == 200

    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(send, 0, None)
        await gated.started.wait()  # holds the model while the others queue
        # Triton: 1 is the highest level, larger numbers lower; 0 and none are the default
        # level, served after every explicit one.
        for value, priority in ((1, 0), (2, 5), (3, 1), (4, None), (5, 2**64 - 1)):
            tg.start_soon(send, value, priority)
            await anyio.wait_all_tasks_blocked()
        gated.open()
    assert gated.seen == [0, 3, 2, 5, 1, 4]


@pytest.mark.parametrize("priority", [-1, 1.5, 2**64, "1", True])
async def test_a_priority_that_is_not_a_uint64_is_refused(priority: Any) -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {
        "inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])],
        "parameters": {"priority": priority},
    }
    reply = await request(app, "POST", "/v2/models/id_fp32/infer", body)
    assert reply.status == 400
    assert "'priority'" in reply.error
    assert json.dumps(priority) in reply.error


async def test_timeout_parameter_in_microseconds_gives_504() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, name="g", max_batch_size=1)
    app = KServeApp([scalar_model(model)], metrics=False)
    replies: dict[str, Any] = {}

    async def send(key: str, value: int, timeout: int | None) -> None:
        body: dict[str, Any] = {"inputs": [json_input("INPUT0", "INT64", [value], [1])]}
        if timeout is not None:
            body["parameters"] = {"timeout": timeout}
        replies[key] = await request(app, "POST", "/v2/models/g/infer", body)

    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(send, "first", 0, None)
        await gated.started.wait()  # the model is held until the 504 below has arrived
        try:
            # 30 s: it must still be queued when the 0.2 s request below has expired.
            tg.start_soon(send, "patient", 1, 30_000_000)
            await anyio.wait_all_tasks_blocked()
            # 0.2 s: read as milliseconds it would be 200 s, past this bound.
            with anyio.fail_after(10):
                await send("late", 2, 200_000)
            assert "patient" not in replies
        finally:
            gated.open()
    assert replies["late"].status == 504
    assert "deadline" in replies["late"].error
    assert replies["patient"].status == 200
    assert gated.seen == [0, 1]  # the expired item never reached the model


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


# -- limits and malformed input -------------------------------------------------------------------


async def test_rows_past_max_rows_are_refused_before_anything_is_queued() -> None:
    served = identity_model("FP32", (-1,), max_batch_size=8)
    assert served.max_rows == 64  # at least 64, whatever the batch size
    small = identity_model("FP32", (-1,), name="small", max_batch_size=8)
    small = ServedModel(small.model, inputs=small.inputs, outputs=small.outputs, max_rows=2)
    app = KServeApp([served, small], metrics=False)
    empty_rows = {"inputs": [json_input("X", "FP32", [], [1_000_000, 0])]}
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/id_fp32/infer", empty_rows)
        assert reply.status == 400
        assert "1000000 rows" in reply.error
        assert "64" in reply.error
        body = {"inputs": [json_input("X", "FP32", [1, 2, 3], [3, 1])]}
        assert (await request(app, "POST", "/v2/models/small/infer", body)).status == 400
        body = {"inputs": [json_input("X", "FP32", [1, 2], [2, 1])]}
        assert (await request(app, "POST", "/v2/models/small/infer", body)).status == 200
    assert served.model.statistics().submitted == 0


@pytest.mark.parametrize("max_rows", [0, -1, 1.5, True])
def test_a_bad_max_rows_is_refused(max_rows: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"max_rows must be an int >= 1, got {max_rows}"):
        ServedModel(BatchedModel(identity_fn, name="m"), max_rows=max_rows)


def identity_fn(items: list[Any]) -> list[Any]:
    return items


async def test_binary_sizes_are_checked_before_anything_is_allocated() -> None:
    app = KServeApp([identity_model("BYTES", (-1,)), identity_model("FP64", (-1,))], metrics=False)
    async with app.lifespan():
        for name, datatype in (("id_bytes", "BYTES"), ("id_fp64", "FP64")):
            header = {
                "inputs": [
                    {"name": "X", "datatype": datatype, "shape": [1, 2**40],
                     "parameters": {"binary_data_size": 8}}
                ]
            }  # fmt: skip
            body, headers = binary_body(header, b"\x00" * 8)
            reply = await request(app, "POST", f"/v2/models/{name}/infer", body, headers=headers)
            assert reply.status == 400, reply.body
            assert str(2**40) in reply.error
        huge_dim = {"inputs": [json_input("X", "FP64", [], [1, 0, 2**63])]}
        reply = await request(app, "POST", "/v2/models/id_fp64/infer", huge_dim)
        assert reply.status == 400
        assert "2**63" in reply.error


@pytest.mark.parametrize(
    ("case", "body", "fragment"),
    [
        (
            "deep nesting",
            b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,3],"data":'
            + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
            "nested too deeply",
        ),
        (
            "lone surrogate",
            b'{"inputs":[{"name":"X","datatype":"BYTES","shape":[1,3],"data":["a","b","\\ud800"]}]}',
            "not valid Unicode",
        ),
        (
            "timeout past uint64",
            json.dumps(
                {"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])],
                 "parameters": {"timeout": 10**400}}
            ).encode(),
            "'timeout'",
        ),
        (
            "BYTES numbers",
            json.dumps({"inputs": [json_input("X", "BYTES", ["a", 1, True], [1, 3])]}).encode(),
            "must hold strings, element 1 is 1",
        ),
        (
            "BYTES bool",
            json.dumps({"inputs": [json_input("X", "BYTES", ["a", "b", True], [1, 3])]}).encode(),
            "element 2 is True",
        ),
        (
            "header length with an underscore",
            json.dumps({"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}).encode(),
            "decimal integer",
        ),
        (
            "output twice",
            json.dumps(
                {"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])],
                 "outputs": [{"name": "Y"}, {"name": "Y"}]}
            ).encode(),
            "more than once",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
async def test_client_mistakes_are_400_not_500(case: str, body: bytes, fragment: str) -> None:
    datatype = "BYTES" if "BYTES" in case or "surrogate" in case else "FP32"
    app = KServeApp([identity_model(datatype)], metrics=False)
    headers = {"Inference-Header-Content-Length": " 1_0"} if "header length" in case else {}
    async with app.lifespan():
        reply = await request(
            app, "POST", f"/v2/models/id_{datatype.lower()}/infer", body, headers=headers
        )
    assert reply.status == 400, reply.body
    assert fragment in reply.error


# -- protocol details -----------------------------------------------------------------------------


async def test_binary_inputs_reach_the_model_writable_like_json_inputs() -> None:
    def double_in_place(items: list[Any]) -> list[Any]:
        for item in items:
            item *= 2
        return items

    model = BatchedModel(double_in_place, name="inplace")
    app = KServeApp(
        [ServedModel(model, inputs=[Tensor("X", "FP32", [3])], outputs=[Tensor("Y", "FP32", [3])])],
        metrics=False,
    )
    data = np.array([[1, 2, 3], [4, 5, 6]], dtype="<f4")
    header = {
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 3],
                    "parameters": {"binary_data_size": data.nbytes}}],
    }  # fmt: skip
    body, headers = binary_body(header, data.tobytes())
    as_json = {"inputs": [json_input("X", "FP32", data.reshape(-1).tolist(), [2, 3])]}
    async with app.lifespan():
        binary = await request(app, "POST", "/v2/models/inplace/infer", body, headers=headers)
        plain = await request(app, "POST", "/v2/models/inplace/infer", as_json)
    assert binary.status == plain.status == 200, (binary.body, plain.body)
    assert binary.json()["outputs"][0]["data"] == plain.json()["outputs"][0]["data"]
    assert plain.json()["outputs"][0]["data"] == (2 * data).reshape(-1).tolist()


async def test_scalar_tensors_are_reshaped_as_triton_does() -> None:
    app = KServeApp([scalar_model(BatchedModel(identity_fn, name="s"))], metrics=False)
    async with app.lifespan():
        config = (await request(app, "GET", "/v2/models/s/config")).json()
        assert config["input"][0]["dims"] == [1]
        assert config["input"][0]["reshape"] == {"shape": []}
        assert config["output"][0]["reshape"] == {"shape": []}
        for shape in ([3], [3, 1]):
            body = {"inputs": [json_input("INPUT0", "INT64", [1, 2, 3], shape)]}
            reply = await request(app, "POST", "/v2/models/s/infer", body)
            assert reply.status == 200, reply.body
            assert reply.json()["outputs"][0]["data"] == [1, 2, 3]
        wrong = {"inputs": [json_input("INPUT0", "INT64", [1, 2, 3, 4, 5, 6], [3, 2])]}
        assert (await request(app, "POST", "/v2/models/s/infer", wrong)).status == 400


async def test_binary_data_output_leaves_explicitly_listed_outputs_json() -> None:
    app = KServeApp([two_in_two_out()], metrics=False)
    inputs = [json_input("A", "INT32", [1, 2], [1, 2]), json_input("B", "INT32", [3, 4], [1, 2])]
    async with app.lifespan():
        listed = await request(
            app,
            "POST",
            "/v2/models/addmul/infer",
            {
                "inputs": inputs,
                "parameters": {"binary_data_output": True},
                "outputs": [{"name": "SUM"}, {"name": "PROD", "parameters": {"binary_data": True}}],
            },
        )
        unlisted = await request(
            app,
            "POST",
            "/v2/models/addmul/infer",
            {"inputs": inputs, "parameters": {"binary_data_output": True}},
        )
    sum_out, prod_out = listed.json()["outputs"]
    assert sum_out["data"] == [4, 6]
    assert prod_out["parameters"]["binary_data_size"] == 8
    assert all("data" not in o for o in unlisted.json()["outputs"])


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, deflate", "gzip"),
        ("identity;q=1, gzip;q=0.1", None),
        ("gzip;q=0.5, deflate;q=0.9", "deflate"),
        ("gzip;q=0, deflate;q=0", None),
        ("gzip;q=0", None),
        ("*", "gzip"),
        ("*;q=0.5, identity", None),
        ("identity;q=0, *;q=0.2", "gzip"),
        ("br", None),
        ("GZIP ; Q=0.3", "gzip"),
        ("gzip;q=bad", None),
    ],
)
async def test_accept_encoding_honours_q_values(accept: str, expected: str | None) -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {"inputs": [json_input("X", "FP32", LARGE, [60, 3])]}
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/id_fp32/infer", body, headers={"Accept-Encoding": accept}
        )
    assert reply.headers.get("content-encoding") == expected
    raw = reply.body
    if expected == "gzip":
        raw = gzip.decompress(raw)
    elif expected == "deflate":
        raw = zlib.decompress(raw)
    assert json.loads(raw)["outputs"][0]["data"] == LARGE


async def test_gzip_bodies_of_several_members_are_decoded_and_trailing_bytes_refused() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    raw = json.dumps({"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}).encode()
    two_members = gzip.compress(raw[:20]) + gzip.compress(raw[20:])
    cases = [
        ("gzip", two_members, 200, ""),
        ("gzip", gzip.compress(raw) + b"GARBAGE", 400, "7 bytes after"),
        ("deflate", zlib.compress(raw) + b"GARBAGE", 400, "7 bytes after"),
        ("deflate", zlib.compress(raw[:20]) + zlib.compress(raw[20:]), 400, "bytes after"),
    ]
    async with app.lifespan():
        for encoding, body, status, fragment in cases:
            reply = await request(
                app,
                "POST",
                "/v2/models/id_fp32/infer",
                body,
                headers={"Content-Encoding": encoding},
            )
            assert reply.status == status, (encoding, reply.body)
            if status == 200:
                assert reply.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]
            else:
                assert fragment in reply.error


async def test_classification_returns_the_top_classes_of_each_row_as_triton_does() -> None:
    app = KServeApp(
        [identity_model("FP32", (4,)), identity_model("INT32", (2, 2)), identity_model("BOOL")],
        metrics=False,
    )
    scores = [[0.1, 0.7, 0.2, 0.7], [0.4, 0.3, 0.2, 0.1]]

    def body(name: str, datatype: str, data: Any, shape: list[int], **params: Any) -> Any:
        return {
            "inputs": [json_input("X", datatype, data, shape)],
            "outputs": [{"name": "Y", "parameters": params}],
        }

    async with app.lifespan():
        top2 = body("X", "FP32", scores, [2, 4], classification=2)
        reply = await request(app, "POST", "/v2/models/id_fp32/infer", top2)
        out = reply.json()["outputs"][0]
        assert (out["datatype"], out["shape"]) == ("BYTES", [2, 2])
        # Highest first, ties in index order; floats as C's %f.
        assert out["data"] == ["0.700000:1", "0.700000:3", "0.400000:0", "0.300000:1"]
        ints = body("X", "INT32", [5, -1, 7, 2], [1, 2, 2], classification=9, binary_data=True)
        reply = await request(app, "POST", "/v2/models/id_int32/infer", ints)
        size = int(reply.headers["inference-header-content-length"])
        out = reply.json()["outputs"][0]
        assert (out["datatype"], out["shape"]) == ("BYTES", [1, 4])  # k: at most the elements
        elements, data, offset = [], reply.body[size:], 0
        while offset < len(data):
            (n,) = struct.unpack_from("<I", data, offset)
            elements.append(data[offset + 4 : offset + 4 + n])
            offset += 4 + n
        assert elements == [b"7:2", b"5:0", b"2:3", b"-1:1"]
        flags = body("X", "BOOL", [True, False, True], [1, 3], classification=1)
        reply = await request(app, "POST", "/v2/models/id_bool/infer", flags)
        assert reply.status == 400
        assert "classification needs a numeric output" in reply.error
        bad = body("X", "FP32", scores, [2, 4], classification=-1)
        assert (await request(app, "POST", "/v2/models/id_fp32/infer", bad)).status == 400
    assert "classification" in (await request(app, "GET", "/v2")).json()["extensions"]


async def test_nan_and_infinity_in_json_outputs_are_written_as_triton_writes_them() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {"inputs": [json_input("X", "FP32", [1.0, 2.0, 3.0], [1, 3])]}
    raw = json.dumps(body).replace("1.0", "NaN").replace("2.0", "Infinity")
    raw = raw.replace("3.0", "-Infinity")
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/id_fp32/infer", raw.encode())
    assert reply.status == 200, reply.body
    # rapidjson's kWriteNanAndInfFlag tokens, which Triton writes and tritonclient reads.
    assert b'"data":[NaN,Infinity,-Infinity]' in reply.body


async def test_versions_sort_as_numbers_and_an_unloaded_model_is_404_everywhere() -> None:
    versions = [
        ServedModel(BatchedModel(identity_fn, name="m", version=v)) for v in ("2", "10", "1")
    ]
    app = KServeApp(versions, metrics=False, admin_token="t")
    auth = {"Authorization": "Bearer t"}
    async with app.lifespan():
        meta = (await request(app, "GET", "/v2/models/m")).json()
        assert meta["versions"] == ["1", "2", "10"]
        missing = await request(app, "GET", "/v2/models/m/versions/3")
        assert "['1', '2', '10']" in missing.error
        unload = await request(app, "POST", "/v2/repository/models/m/unload", b"", headers=auth)
        assert unload.status == 200
        for path in ("/v2/models/m", "/v2/models/m/config", "/v2/models/m/versions/2/config"):
            reply = await request(app, "GET", path)
            assert reply.status == 404, path
            assert "unloaded" in reply.error
        assert (await request(app, "GET", "/v2/models/m/ready")).status == 503


async def test_a_root_path_is_stripped_only_at_a_segment_boundary() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)
    assert (await request(app, "GET", "/v2/health/live", root_path="/ml")).status == 200
    # "/mlv2/health/live" is not under "/ml/".
    assert (await request(app, "GET", "v2/health/live", root_path="/ml")).status == 404


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_are_labelled_by_served_name_and_version() -> None:
    pytest.importorskip("prometheus_client")
    v1 = ServedModel(BatchedModel(identity_fn, name="inner", version="1"), name="public")
    v2 = ServedModel(BatchedModel(identity_fn, name="inner", version="2"), name="public")
    app = KServeApp([v1, v2], metrics=True)
    body = {"inputs": [json_input("INPUT0", "FP32", [1.0], [1, 1])]}
    async with app.lifespan():
        for path in ("/v2/models/public/versions/1/infer", "/v2/models/public/infer"):
            assert (await request(app, "POST", path, body)).status == 200
        text = (await request(app, "GET", "/metrics")).body.decode()
    assert "inner" not in text
    for version in ("1", "2"):
        labels = f'model="public",version="{version}"'
        completed = f'model="public",outcome="completed",version="{version}"'
        assert f"batchkit_items_total{{{completed}}} 1.0" in text
        ok = f'model="public",status="200",version="{version}"'
        assert f"batchkit_http_requests_total{{{ok}}} 1.0" in text
        assert f"batchkit_model_version_info{{{labels}}} 1.0" in text
        assert f"batchkit_batch_size_count{{{labels}}} 1.0" in text


# -- large requests off the event loop ------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "stage"),
    [("_http", "decompress"), ("_infer", "parse_request"), ("_infer", "encode_response")],
)
async def test_a_large_request_leaves_the_event_loop_free(
    monkeypatch: pytest.MonkeyPatch, where: str, stage: str
) -> None:
    """Each heavy stage of a large request is held in the middle; a health check answers
    meanwhile. Were the stage on the event loop, the health check could only answer after it."""
    module = importlib.import_module(f"batchkit.asgi.{where}")

    entered, release = threading.Event(), threading.Event()
    order: list[str] = []
    real = getattr(module, stage)

    def held(*args: Any) -> Any:
        entered.set()
        if not release.wait(10):
            order.append(f"{stage} held the event loop")
        order.append(stage)
        return real(*args)

    monkeypatch.setattr(module, stage, held)
    app = KServeApp([identity_model("FP32", (-1,))], metrics=False)
    values = np.random.default_rng(0).random(200_000).astype(np.float32).tolist()
    raw = json.dumps({"inputs": [json_input("X", "FP32", values, [1, len(values)])]}).encode()
    assert len(raw) > importlib.import_module("batchkit.asgi._infer").OFFLOAD_BYTES
    replies: list[Any] = []

    async def big() -> None:
        body = gzip.compress(raw, 1)
        headers = {"Content-Encoding": "gzip"}
        reply = await request(app, "POST", "/v2/models/id_fp32/infer", body, headers=headers)
        replies.append(reply)

    async with app.lifespan(), anyio.create_task_group() as tg:
        tg.start_soon(big)
        assert await anyio.to_thread.run_sync(entered.wait, 10)
        assert (await request(app, "GET", "/v2/health/live")).status == 200
        order.append("live")
        release.set()
    assert order == ["live", stage]
    assert replies[0].status == 200
    assert len(replies[0].json()["outputs"][0]["data"]) == len(values)


async def test_small_requests_stay_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchkit.asgi import _infer

    threads: list[int] = []
    real_parse, real_encode = _infer.parse_request, _infer.encode_response

    def parse(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real_parse(*args)

    def encode(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return real_encode(*args)

    monkeypatch.setattr(_infer, "parse_request", parse)
    monkeypatch.setattr(_infer, "encode_response", encode)
    app = KServeApp([identity_model("FP32")], metrics=False)
    body = {"inputs": [json_input("X", "FP32", [1, 2, 3], [1, 3])]}
    async with app.lifespan():
        reply = await request(
            app, "POST", "/v2/models/id_fp32/infer", body, headers={"Accept-Encoding": "gzip"}
        )
    assert reply.status == 200
    assert threads == [threading.get_ident()] * 2
