"""Hostile requests against a real uvicorn server: every client mistake is a 4xx with a JSON
error, never a 5xx, nothing is logged as a server error, and the server keeps serving."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchkit import BatchedModel, ConfigurationError
from batchkit.asgi import KServeApp, ServedModel, Tensor
from batchkit.asgi._tensors import MAX_DIMS

from ..support.asgi import identity, identity_model, request, running_server

pytest.importorskip("uvicorn")

INFER = "/v2/models/id_fp32/infer"
VEC = "/v2/models/vec_fp32/infer"
RAW = {"Inference-Header-Content-Length": "0"}
TOKEN = "s3cret"
ANY = "/v2/models/any_fp32/infer"
GOOD = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
# The server's loggers: a 5xx for a client's input writes a traceback to one of them.
LOGGERS = ("batchkit", "uvicorn.error", "uvicorn.asgi")


def any_shape_model(name: str, dims: int, datatype: str = "FP32") -> ServedModel:
    model = BatchedModel(identity, name=name)
    shape = (-1,) * dims
    return ServedModel(
        model, inputs=[Tensor("X", datatype, shape)], outputs=[Tensor("Y", datatype, shape)]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = KServeApp(
        [
            identity_model("FP32"),
            identity_model("BYTES", (-1,)),
            any_shape_model("any_fp32", 3),
            any_shape_model("any_bytes", 3, "BYTES"),
            any_shape_model("deep", MAX_DIMS - 1),
            any_shape_model("two_var", 2),
            identity_model("BYTES", (1,), name="one_bytes"),
            identity_model("BYTES", (), name="scalar_bytes"),
            identity_model("FP32", (-1,), name="vec_fp32"),
            two_input_model(),
        ],
        max_body_size=1 << 20,
        metrics=False,
        admin_token=TOKEN,
    )
    with running_server(app) as url:
        # Each model's engine thread starts on its first call: make them all before any test.
        for served in app.models:
            path = f"/v2/models/{served.name}/infer"
            assert post(url, path, warm_up_body(served))[0] == 200, served.name
        yield url


def warm_up_body(served: ServedModel) -> dict[str, Any]:
    inputs = []
    for tensor in served.inputs:
        shape = [1, *(1 if d == -1 else d for d in tensor.shape)]
        count = int(np.prod(shape))
        data: list[Any] = ["a"] * count if tensor.datatype == "BYTES" else [0] * count
        inputs.append(
            {"name": tensor.name, "datatype": tensor.datatype, "shape": shape, "data": data}
        )
    return {"inputs": inputs}


def two_input_model() -> ServedModel:
    model = BatchedModel(lambda items: [item["A"] for item in items], name="two_inputs")
    return ServedModel(
        model,
        inputs=[Tensor("A", "FP32", (-1,)), Tensor("B", "FP32", (-1,))],
        outputs=[Tensor("Y", "FP32", (-1,))],
    )


def post(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(url, timeout=30)
    try:
        # header values as UTF-8 bytes: http.client sends them as they are
        raw = {k: v.encode() for k, v in (headers or {}).items()}
        conn.request("POST", path, body=data, headers=raw)
        reply = conn.getresponse()
        return reply.status, reply.read(), {k.lower(): v for k, v in reply.getheaders()}
    finally:
        conn.close()


def still_serving(url: str) -> None:
    status, body, _ = post(url, INFER, GOOD)
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [1.0, 2.0, 3.0]


def assert_client_error(status: int, body: bytes, expected: int = 400) -> None:
    assert status == expected, body
    assert set(json.loads(body)) == {"error"}, body


@pytest.fixture(autouse=True)
def uvicorn_logs_too(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture uvicorn's loggers as well: its logging config stops them at "uvicorn"."""
    logger = logging.getLogger("uvicorn")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def no_server_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        r
        for r in caplog.records
        if r.name.startswith(LOGGERS) and (r.levelno >= logging.ERROR or r.exc_info)
    ]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def with_value(path: tuple[str, ...], value_json: str) -> bytes:
    """GOOD with the value at ``path`` replaced by raw JSON text (nested past json.dumps)."""
    marker = "__HOLE__"
    request: Any = json.loads(json.dumps(GOOD))
    target = request
    for key in path[:-1]:
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    if isinstance(target, list):
        target[int(path[-1])] = marker
    else:
        target[path[-1]] = marker
    return json.dumps(request).replace(json.dumps(marker), value_json).encode()


# Where deeply nested JSON goes: every place a client's value is read, checked or echoed.
NEST_PATHS = [
    ("parameters",),
    ("parameters", "x"),
    ("parameters", "priority"),
    ("parameters", "timeout"),
    ("parameters", "binary_data_output"),
    ("parameters", "sequence_id"),
    ("id",),
    ("inputs",),
    ("inputs", "0"),
    ("inputs", "0", "name"),
    ("inputs", "0", "datatype"),
    ("inputs", "0", "shape"),
    ("inputs", "0", "data"),
    ("inputs", "0", "parameters"),
    ("inputs", "0", "parameters", "binary_data_size"),
    ("outputs",),
    ("outputs", "0"),
]
# Every depth just short of json.loads' limit (the interpreter's recursion limit, 1000, less the
# frames below the parser), where the JSON parses but code that walks it deeper in the stack
# (json.dumps, repr, ==) would not; and past the limit.
DEPTHS = [*range(920, 1002), 5000]


@pytest.mark.parametrize("path", NEST_PATHS, ids=["/".join(p) for p in NEST_PATHS])
def test_json_nested_to_the_parsers_limit_is_never_a_5xx(
    server: str, path: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    for kind in ("list", "dict"):
        for depth in DEPTHS:
            body = with_value(path, nested(depth, kind))
            status, reply, _ = post(server, INFER, body)
            # a 400, or served: unknown parameters are ignored, as Triton does
            assert status in (200, 400), (depth, kind, reply)
            if status == 400 or depth > 1000:
                assert_client_error(status, reply)
        if path == ("outputs",):  # and in a requested output's parameters
            for depth in DEPTHS:
                output = f'[{{"name": "Y", "parameters": {{"x": {nested(depth, kind)}}}}}]'
                status, reply, _ = post(server, INFER, with_value(("outputs",), output))
                assert status in (200, 400), (depth, kind, reply)
                if status == 400 or depth > 1000:
                    assert_client_error(status, reply)
    still_serving(server)
    no_server_errors(caplog)


ZERO_ELEMENT_SHAPES = [
    [1, 0, 2**62, 2**62],
    [1, 2**62, 0, 2**62],
    [1, 0, 2**63 - 1, 2**63 - 1],
    [1, 2**40, 2**40, 0],
]


@pytest.mark.parametrize("shape", ZERO_ELEMENT_SHAPES, ids=str)
def test_zero_element_inputs_whose_other_dimensions_overflow_are_a_400(
    server: str, shape: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    for model, datatype in (("any_fp32", "FP32"), ("any_bytes", "BYTES")):
        path = f"/v2/models/{model}/infer"
        tensor = {"name": "X", "datatype": datatype, "shape": shape}
        status, reply, _ = post(server, path, {"inputs": [{**tensor, "data": []}]})
        assert_client_error(status, reply)
        assert "too large" in json.loads(reply)["error"]
        head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 0}}]})
        status, reply, _ = post(
            server, path, head.encode(), {"Inference-Header-Content-Length": str(len(head))}
        )
        assert_client_error(status, reply)
    still_serving(server)
    no_server_errors(caplog)


def test_more_dimensions_than_numpy_allows_is_a_400(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    for dims in (MAX_DIMS + 1, 65, 70):
        shape = [1, 0, *([3] * (dims - 2))]
        tensor = {"name": "X", "datatype": "FP32", "shape": shape, "data": []}
        status, reply, _ = post(server, "/v2/models/deep/infer", {"inputs": [tensor]})
        assert_client_error(status, reply)
    shape = [1, 0, *([2**40] * (MAX_DIMS - 2))]  # as declared, and no element
    tensor = {"name": "X", "datatype": "FP32", "shape": shape, "data": []}
    status, reply, _ = post(server, "/v2/models/deep/infer", {"inputs": [tensor]})
    assert_client_error(status, reply)
    assert "too large" in json.loads(reply)["error"]
    still_serving(server)
    no_server_errors(caplog)


def test_a_served_tensor_may_not_declare_more_dimensions_than_an_array_has() -> None:
    with pytest.raises(ConfigurationError, match="at most 32"):
        any_shape_model("too_deep", MAX_DIMS)
    assert any_shape_model("deep", MAX_DIMS - 1).inputs[0].shape == (-1,) * (MAX_DIMS - 1)


HUGE = "9" * 5000
NUMERIC_HEADERS = [
    {"Inference-Header-Content-Length": HUGE},
    {"Inference-Header-Content-Length": "1" * 20},
    {"Inference-Header-Content-Length": "²"},
    {"Inference-Header-Content-Length": "١٢"},
    {"Inference-Header-Content-Length": "-0"},
]


@pytest.mark.parametrize("headers", NUMERIC_HEADERS, ids=lambda h: repr(h)[:60])
def test_numeric_headers_out_of_range_or_not_ascii_digits_are_a_400(
    server: str, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    assert_client_error(*post(server, INFER, GOOD, headers)[:2])
    still_serving(server)
    no_server_errors(caplog)


@pytest.mark.anyio
@pytest.mark.parametrize("length", [HUGE, "²", "١٢", "1" * 20])
async def test_a_content_length_past_int64_or_not_ascii_digits_is_a_400(length: str) -> None:
    # uvicorn refuses these before the app sees them; other ASGI servers may pass them on.
    app = KServeApp(identity_model("FP32"), metrics=False)
    async with app.lifespan():
        reply = await request(app, "POST", INFER, GOOD, headers={"Content-Length": length})
        assert reply.status == 400, reply.body
        assert "Content-Length" in reply.error


def test_a_content_length_of_thousands_of_digits_on_the_wire(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {HUGE}\r\n\r\n".encode() + b"{}"
        )
        answer = sock.recv(65536)
    status = int(answer.split(b" ", 2)[1]) if answer else 400
    assert 400 <= status < 500, answer
    still_serving(server)
    no_server_errors(caplog)


BAD_TIMEOUTS = [1.5, 1.0, 0.0, True, False, -1, -(2**64), 2**64, 10**30, 1e30, "5", None, [1], {}]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_a_timeout_that_is_not_a_uint64_of_microseconds_is_a_400(
    server: str, timeout: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = {**GOOD, "parameters": {"timeout": timeout}}
    status, reply, _ = post(server, INFER, body)
    assert_client_error(status, reply)
    assert "'timeout' must be an integer number of microseconds" in json.loads(reply)["error"]
    no_server_errors(caplog)


@pytest.mark.parametrize("timeout", [0, 1, 10_000_000, 2**63, 2**64 - 1])
def test_a_valid_timeout_in_microseconds_is_served(server: str, timeout: int) -> None:
    status, reply, _ = post(server, INFER, {**GOOD, "parameters": {"timeout": timeout}})
    if timeout == 1:  # 1 us: it passes before the model answers (Triton too)
        assert status == 504, reply
    else:
        assert status == 200, reply
        assert json.loads(reply)["outputs"][0]["data"] == [1.0, 2.0, 3.0]


@pytest.mark.anyio
@pytest.mark.parametrize("odd", ["²", "١٢", "٣", "9" * 5000, "007", "v3"])
async def test_versions_that_isdigit_accepts_but_int_refuses_keep_the_model_serving(
    odd: str,
) -> None:
    models = [
        ServedModel(BatchedModel(identity, name="m", version=v), **SIGNATURE) for v in ("2", odd)
    ]
    app = KServeApp(models, metrics=False)
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    async with app.lifespan():
        meta = await request(app, "GET", "/v2/models/m")
        assert meta.status == 200, meta.body
        versions = meta.json()["versions"]
        assert sorted(versions) == sorted(["2", odd])
        # numbers (ASCII digits) sort by value, after every other version
        numeric = odd.isascii() and odd.isdigit()
        larger = len(odd.lstrip("0")) > 1 or odd.lstrip("0") > "2"
        expected_latest = odd if numeric and larger else "2"
        assert versions[-1] == expected_latest
        reply = await request(app, "POST", "/v2/models/m/infer", body)
        assert reply.status == 200, reply.body
        assert reply.json()["model_version"] == expected_latest
        pinned = await request(app, "POST", f"/v2/models/m/versions/{odd}/infer", body)
        assert pinned.status == 200, pinned.body
        assert pinned.json()["model_version"] == odd


SIGNATURE: dict[str, Any] = {
    "inputs": [Tensor("X", "FP32", [3])],
    "outputs": [Tensor("Y", "FP32", [3])],
}


# -- Triton's raw binary request ------------------------------------------------------------------


def split_binary(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    size = int(headers["inference-header-content-length"])
    return json.loads(body[:size]), body[size:]


def test_a_raw_binary_request_is_one_row_of_the_single_input_and_answers_binary(
    server: str,
) -> None:
    values = np.arange(3, dtype="<f4")
    status, body, headers = post(server, INFER, values.tobytes(), RAW)
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    header, data = split_binary(body, headers)
    assert header["model_name"] == "id_fp32"
    assert "id" not in header
    (output,) = header["outputs"]
    assert output == {
        "name": "Y",
        "datatype": "FP32",
        "shape": [1, 3],
        "parameters": {"binary_data_size": 12},
    }
    np.testing.assert_array_equal(np.frombuffer(data, dtype="<f4"), values)


def test_a_raw_binary_request_sizes_its_one_variable_dimension_from_the_body(
    server: str,
) -> None:
    values = np.arange(7, dtype="<f4")
    status, body, headers = post(server, VEC, values.tobytes(), RAW)
    assert status == 200, body
    header, data = split_binary(body, headers)
    assert header["outputs"][0]["shape"] == [1, 7]
    np.testing.assert_array_equal(np.frombuffer(data, dtype="<f4"), values)
    status, body, headers = post(server, VEC, b"", RAW)  # no data: zero elements
    assert status == 200, body
    assert split_binary(body, headers)[0]["outputs"][0]["shape"] == [1, 0]


def test_a_raw_binary_request_for_bytes_is_one_element_of_the_whole_body(server: str) -> None:
    raw = b"raw \x00\xff bytes"
    status, body, headers = post(server, "/v2/models/one_bytes/infer", raw, RAW)
    assert status == 200, body
    header, data = split_binary(body, headers)
    assert header["outputs"][0]["shape"] == [1, 1]
    assert data == struct.pack("<I", len(raw)) + raw
    status, body, headers = post(server, "/v2/models/scalar_bytes/infer", raw, RAW)
    assert status == 200, body
    header, data = split_binary(body, headers)
    assert header["outputs"][0]["shape"] == [1]
    assert data == struct.pack("<I", len(raw)) + raw


def test_a_raw_binary_request_the_model_cannot_take_is_a_400(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    cases = [
        (INFER, b"\x00" * 8),  # 2 floats for a model of 3
        (INFER, b"\x00" * 13),  # not whole floats
        (VEC, b"\x00" * 13),  # not whole floats, and the variable dimension
        ("/v2/models/id_bytes/infer", b"abc"),  # BYTES declared [-1], not [1] (as Triton)
        ("/v2/models/two_inputs/infer", b"\x00" * 8),  # two inputs
        ("/v2/models/two_var/infer", b"\x00" * 8),  # two variable dimensions
    ]
    for path, body in cases:
        status, reply, _ = post(server, path, body, RAW)
        assert_client_error(status, reply)
    still_serving(server)
    no_server_errors(caplog)


# -- Hypothesis: whatever a client sends, no 5xx -------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, 2**64, 2**64 - 1, 10**300]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["X", "Y", "FP32", "BYTES", "INT8", "²", "١٢"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(min_value=0, max_value=4),
    st.sampled_from([0, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, -1]),
)
tensor_entry = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["X", "Y", "Q"]) | json_value,
        "datatype": st.sampled_from(["FP32", "BYTES", "INT8", "BF16", "BOOL"]) | json_value,
        "shape": st.lists(dims, max_size=5) | json_value,
    },
    optional={
        "data": st.lists(json_leaf, max_size=6) | json_value,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "binary_data", "classification", "x"]),
            json_value,
            max_size=2,
        )
        | json_value,
    },
)
hostile_request = st.fixed_dictionaries(
    {},
    optional={
        "id": json_value,
        "inputs": st.lists(tensor_entry, max_size=3) | json_value,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["Y", "X"]) | json_value},
                optional={"parameters": json_value},
            ),
            max_size=2,
        )
        | json_value,
        "parameters": st.dictionaries(
            st.sampled_from(["priority", "timeout", "binary_data_output", "sequence_id", "x"]),
            json_value,
            max_size=3,
        )
        | json_value,
    },
)
header_value = st.one_of(
    st.sampled_from(["0", "1", "12", "²", "١٢", HUGE, "1" * 19, "1" * 20, "-1", " 3", "x"]),
    st.text(alphabet="0123456789", min_size=1, max_size=30),
)
paths = st.sampled_from(
    [
        INFER,
        ANY,
        "/v2/models/id_bytes/infer",
        "/v2/models/two_inputs/infer",
        "/v2/models/deep/infer",
        "/v2/models/id_fp32/versions/%C2%B2/infer",  # version "²"
        "/v2/repository/index",
        "/v2/repository/models/id_fp32/load",  # (never unload: the server must keep serving)
    ]
)
encodings = st.sampled_from([None, "gzip", "deflate", "br", "gzip, gzip"])


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=hostile_request,
    path=paths,
    header_length=st.none() | header_value,
    tail=st.binary(max_size=24),
    encoding=encodings,
)
def test_no_request_a_client_can_send_gets_a_5xx(
    server: str,
    caplog: pytest.LogCaptureFixture,
    body: dict[str, Any],
    path: str,
    header_length: str | None,
    tail: bytes,
    encoding: str | None,
) -> None:
    data = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if header_length is not None:
        data += tail
        headers["Inference-Header-Content-Length"] = header_length
    if encoding is not None:
        headers["Content-Encoding"] = encoding
        if encoding == "gzip":
            data = gzip.compress(data)
        elif encoding == "deflate":
            data = zlib.compress(data)
    status, reply, _ = post(server, path, data, headers)
    assert status < 500 or status == 504, (status, reply)  # 504: a valid, too short timeout
    if status >= 400:
        assert set(json.loads(reply)) == {"error"}
    still_serving(server)
    no_server_errors(caplog)


# -- the routing admin of a Deployment ------------------------------------------------------------

DEEP = "[" * 990 + "]" * 990
ROUTING_VALUES = [
    DEEP,
    '{"1": ' + DEEP + "}",
    '{"1": 1e400, "2": 0}',
    '{"1": -1, "2": 2}',
    '{"1": NaN}',
    '{"1": true}',
    '{"nope": 1}',
    '{"1": 99999999999999999999999999999}',
    '{"version": ' + DEEP + "}",
    '{"version": "1", "fraction": ' + DEEP + "}",
    '{"version": "1", "fraction": 1e400}',
    '{"version": "1", "fraction": -1}',
    '{"version": "nope"}',
    '"²"',
    '"' + "x" * 200_000 + '"',
    "[" + "1," * 100_000 + "1]",
    "null",
    "12",
    "false",
]


@pytest.mark.anyio
async def test_routing_changes_a_client_can_send_are_never_a_5xx(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from batchkit import Deployment

    versions = {v: BatchedModel(identity, name="dep", version=v) for v in ("1", "2")}
    deployment = Deployment(versions, weights={"1": 1.0})
    app = KServeApp([ServedModel(deployment, **SIGNATURE)], admin_token=TOKEN, metrics=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with app.lifespan():
        deep = [
            template.replace("DEEP", "[" * depth + "]" * depth)
            for depth in range(900, 1001)
            for template in ("DEEP", '{"1": DEEP}', '{"version": DEEP}')
        ]
        for what in ("weights", "shadow", "promote", "rollback"):
            for value in ROUTING_VALUES + deep:
                body = f'{{"{what}": {value}}}'.encode()
                reply = await request(app, "POST", "/v2/routing/models/dep", body, headers=auth)
                assert reply.status < 500, (what, value[:40], reply.body)
                if reply.status >= 400:  # an error echoes a short part of a value, if any
                    assert 0 < len(reply.error) < 1000, (what, value[:40], reply.body[:200])
        infer = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
        assert (await request(app, "POST", "/v2/models/dep/infer", infer)).status == 200
    no_server_errors(caplog)
