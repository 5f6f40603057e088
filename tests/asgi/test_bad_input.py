"""Bad input against a real server: each gets its status and a JSON error, and it keeps serving."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib
from collections.abc import Iterator

import pytest

from batchkit.asgi import KServeApp

from ..support.asgi import identity_model, running_server

pytest.importorskip("uvicorn")

LIMIT = 64 * 1024
INFER = "/v2/models/id_fp32/infer"
GOOD = json.dumps(
    {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
).encode()


def header_and(data: bytes, header: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def binary_input(size: int, shape: list[int] | None = None) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": shape or [1, 3],
             "parameters": {"binary_data_size": size}}
        ]
    }  # fmt: skip


def json_input(**fields: object) -> bytes:
    tensor = {"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3], **fields}
    return json.dumps({"inputs": [tensor]}).encode()


HUGE_BYTES = {
    "name": "X",
    "datatype": "BYTES",
    "shape": [1, 2**40],
    "parameters": {"binary_data_size": 0},
}

# What the error says, where the status alone could come from an earlier check.
MESSAGES = {
    "binary without header length": "no Inference-Header-Content-Length header",
    "header length not decimal digits": "decimal integer",
    "gzip with trailing bytes": "7 bytes after",
    "too many rows": "1000000 rows",
    "huge BYTES count": "4-byte length prefix",
    "deep nesting": "nested too deeply",
}

CASES: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
    ("garbage bytes", "POST", INFER, b"\x00\xff\xfe garbage", {}, 400),
    ("empty body", "POST", INFER, b"", {}, 400),
    ("truncated JSON", "POST", INFER, GOOD[:-7], {}, 400),
    ("JSON array", "POST", INFER, b"[1, 2]", {}, 400),
    ("no inputs", "POST", INFER, b"{}", {}, 400),
    ("inputs not a list", "POST", INFER, b'{"inputs": 3}', {}, 400),
    ("input not an object", "POST", INFER, b'{"inputs": [3]}', {}, 400),
    ("wrong shape", "POST", INFER, json_input(shape=[1, 4]), {}, 400),
    ("shape not a list", "POST", INFER, json_input(shape="1,3"), {}, 400),
    ("negative shape", "POST", INFER, json_input(shape=[-1, 3]), {}, 400),
    ("zero rows", "POST", INFER, json_input(shape=[0, 3], data=[]), {}, 400),
    ("data length != shape", "POST", INFER, json_input(data=[1, 2]), {}, 400),
    ("ragged data", "POST", INFER, json_input(data=[[1, 2], [3]]), {}, 400),
    ("strings for FP32", "POST", INFER, json_input(data=["a", "b", "c"]), {}, 400),
    ("data not a list", "POST", INFER, json_input(data=7), {}, 400),
    ("wrong datatype", "POST", INFER, json_input(datatype="INT32"), {}, 400),
    ("unknown input", "POST", INFER, json_input(name="Q"), {}, 400),
    ("no data", "POST", INFER, json_input(data=None).replace(b'"data": null', b'"x": 1'), {}, 400),
    (
        "unknown output",
        "POST",
        INFER,
        json.dumps({**json.loads(GOOD), "outputs": [{"name": "NOPE"}]}).encode(),
        {},
        400,
    ),
    (
        "bad priority",
        "POST",
        INFER,
        json.dumps({**json.loads(GOOD), "parameters": {"priority": "hi"}}).encode(),
        {},
        400,
    ),
    (
        "bad timeout",
        "POST",
        INFER,
        json.dumps({**json.loads(GOOD), "parameters": {"timeout": -5}}).encode(),
        {},
        400,
    ),
    ("id not a string", "POST", INFER, json.dumps({**json.loads(GOOD), "id": 5}).encode(), {}, 400),
    ("short binary body", "POST", INFER, *header_and(b"\x00" * 8, binary_input(12)), 400),
    ("binary size != shape", "POST", INFER, *header_and(b"\x00" * 8, binary_input(8)), 400),
    ("extra binary bytes", "POST", INFER, *header_and(b"\x00" * 16, binary_input(12)), 400),
    # Valid JSON, so the check that binary_data_size needs the header is what answers.
    ("binary without header length", "POST", INFER, json.dumps(binary_input(12)).encode(), {}, 400),
    (
        "header length not decimal digits",
        "POST",
        INFER,
        GOOD,
        {"Inference-Header-Content-Length": " 1_0"},
        400,
    ),
    (
        "gzip with trailing bytes",
        "POST",
        INFER,
        gzip.compress(GOOD) + b"GARBAGE",
        {"Content-Encoding": "gzip"},
        400,
    ),
    ("too many rows", "POST", INFER, json_input(shape=[1_000_000, 3], data=[]), {}, 400),
    (
        "huge BYTES count",
        "POST",
        "/v2/models/id_bytes/infer",
        *header_and(b"", {"inputs": [HUGE_BYTES]}),
        400,
    ),
    (
        "deep nesting",
        "POST",
        INFER,
        GOOD.replace(b"[1, 2, 3]", b"[" * 30_000 + b"]" * 30_000),
        {},
        400,
    ),
    (
        "timeout past uint64",
        "POST",
        INFER,
        json.dumps({**json.loads(GOOD), "parameters": {"timeout": 10**400}}).encode(),
        {},
        400,
    ),
    (
        "header length not a number",
        "POST",
        INFER,
        GOOD,
        {"Inference-Header-Content-Length": "x"},
        400,
    ),
    (
        "header length past the body",
        "POST",
        INFER,
        GOOD,
        {"Inference-Header-Content-Length": "99999"},
        400,
    ),
    ("bad gzip", "POST", INFER, b"not gzip", {"Content-Encoding": "gzip"}, 400),
    ("truncated gzip", "POST", INFER, gzip.compress(GOOD)[:-10], {"Content-Encoding": "gzip"}, 400),
    ("unknown encoding", "POST", INFER, GOOD, {"Content-Encoding": "br"}, 400),
    ("huge body", "POST", INFER, b"x" * (LIMIT + 1), {}, 413),
    (
        "gzip bomb",
        "POST",
        INFER,
        gzip.compress(b" " * (LIMIT * 4)),
        {"Content-Encoding": "gzip"},
        413,
    ),
    (
        "deflate bomb",
        "POST",
        INFER,
        zlib.compress(b" " * (LIMIT * 4)),
        {"Content-Encoding": "deflate"},
        413,
    ),
    ("unknown model", "POST", "/v2/models/nope/infer", GOOD, {}, 404),
    ("unknown version", "POST", "/v2/models/id_fp32/versions/7/infer", GOOD, {}, 404),
    ("unknown route", "GET", "/v3/anything", b"", {}, 404),
    ("unknown model action", "GET", "/v2/models/id_fp32/explode", b"", {}, 404),
    ("root", "GET", "/", b"", {}, 404),
    ("GET infer", "GET", INFER, b"", {}, 405),
    ("POST metadata", "POST", "/v2/models/id_fp32", b"{}", {}, 405),
    ("DELETE health", "DELETE", "/v2/health/live", b"", {}, 405),
    ("admin disabled", "POST", "/v2/repository/index", b"", {}, 403),
]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = KServeApp([identity_model("FP32"), identity_model("BYTES", (-1,))], max_body_size=LIMIT)
    with running_server(app) as url:
        # The engine's model thread starts on the first call; make it before any test does.
        conn = http.client.HTTPConnection(url, timeout=10)
        conn.request("POST", INFER, body=GOOD)
        assert conn.getresponse().status == 200
        conn.close()
        yield url


def send(
    url: str, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(url, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "headers", "status"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_gets_its_status_and_the_server_keeps_serving(
    server: str,
    case: str,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    got, reply = send(server, method, path, body, headers)
    assert got == status, reply
    assert set(json.loads(reply)) == {"error"}
    assert MESSAGES.get(case, "") in json.loads(reply)["error"]
    ok, answer = send(server, "POST", INFER, GOOD, {})
    assert ok == 200
    assert json.loads(answer)["outputs"][0]["data"] == [1.0, 2.0, 3.0]


def test_no_content_type_is_needed_and_any_is_accepted(server: str) -> None:
    for content_type in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/json"}):
        assert send(server, "POST", INFER, GOOD, content_type)[0] == 200


def test_a_client_that_hangs_up_mid_body_does_not_stop_the_server(server: str) -> None:
    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST " + INFER.encode() + b' HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inp'
        )
    assert send(server, "POST", INFER, GOOD, {})[0] == 200


def test_a_raw_malformed_http_request_does_not_stop_the_server(server: str) -> None:
    host, port = server.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        sock.recv(4096)
    assert send(server, "POST", INFER, GOOD, {})[0] == 200
