"""The server's memory is bounded in bytes: what parsing costs is charged before it is done, to
one budget shared by every request (``max_inflight_bytes``); 503 with Retry-After beyond it."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

from batchkit import BatchedModel
from batchkit.asgi import KServeApp, ServedModel, Tensor
from batchkit.asgi._budget import MemoryBudget, cost_of_json, retained_bytes
from batchkit.asgi._errors import BadRequest, HTTPError
from batchkit.asgi._http import decompress
from batchkit.asgi._protocol import parse_request

from ..support.asgi import identity, identity_model, request

MiB = 1 << 20


def json_body(data: str, datatype: str = "FP32", shape: list[int] | None = None) -> bytes:
    count = data.count(",") + 1
    tensor = f'"name":"X","datatype":"{datatype}","shape":{json.dumps(shape or [1, count])}'
    return ('{"inputs":[{' + tensor + ',"data":[' + data + "]}]}").encode()


def in_parameters(value: str) -> bytes:
    # Junk the server parses and ignores: Triton ignores parameters it does not know.
    good = '{"name":"X","datatype":"FP32","shape":[1,3],"data":[1,2,3]}'
    return ('{"parameters":{"junk":' + value + '},"inputs":[' + good + "]}").encode()


def repeat(item: str, count: int) -> str:
    return ",".join([item] * count)


N = 100_000
# What a client can send to make parsing cost the most per byte: each is charged before parsing.
BODIES: dict[str, Callable[[], tuple[str, bytes]]] = {
    "floats": lambda: ("vec_fp32", json_body(repeat("0.5", N))),
    "large ints": lambda: ("vec_int64", json_body(repeat("100000", N), "INT64")),
    "uint64 past int64": lambda: ("vec_uint64", json_body(repeat(str(2**64 - 1), N), "UINT64")),
    "ints as floats": lambda: ("vec_int64", json_body(repeat("1.0", N), "INT64")),
    "nested rows": lambda: ("mat_fp32", json_body("[" + repeat("[0.5]", N) + "]", shape=[1, N, 1])),
    "strings": lambda: ("vec_bytes", json_body(repeat('"abcdefgh"', N), "BYTES")),
    "astral strings": lambda: ("vec_bytes", json_body(repeat('"\\ud83d\\ude00a"', N), "BYTES")),
    "empty lists": lambda: ("vec_fp32", in_parameters("[" + repeat("[]", N) + "]")),
    "empty objects": lambda: ("vec_fp32", in_parameters("[" + repeat("{}", N) + "]")),
    "one-member objects": lambda: ("vec_fp32", in_parameters("[" + repeat('{"a":0}', N) + "]")),
    "unique keys": lambda: (
        "vec_fp32",
        in_parameters("{" + ",".join(f'"k{i}":0' for i in range(N)) + "}"),
    ),
    "deep lists": lambda: (
        "vec_fp32",
        in_parameters("[" + repeat("[[[[[[[[0]]]]]]]]", N // 8) + "]"),
    ),
    "one long astral string": lambda: (
        "vec_fp32",
        in_parameters('"\U0001f600' + "a" * N * 8 + '"'),
    ),
}


def served_models() -> dict[str, ServedModel]:
    def vec(name: str, datatype: str, shape: tuple[int, ...] = (-1,)) -> ServedModel:
        model = BatchedModel(identity, name=name)
        return ServedModel(
            model, inputs=[Tensor("X", datatype, shape)], outputs=[Tensor("Y", datatype, shape)]
        )

    return {
        "vec_fp32": vec("vec_fp32", "FP32"),
        "vec_int64": vec("vec_int64", "INT64"),
        "vec_uint64": vec("vec_uint64", "UINT64"),
        "vec_bytes": vec("vec_bytes", "BYTES"),
        "mat_fp32": vec("mat_fp32", "FP32", (-1, -1)),
    }


@pytest.mark.parametrize("kind", list(BODIES))
def test_parsing_and_decoding_never_allocate_more_than_they_are_charged(kind: str) -> None:
    name, body = BODIES[kind]()
    served = served_models()[name]
    claim = MemoryBudget(1 << 40).claim()
    tracemalloc.start()
    try:
        try:
            assert parse_request(served, body, None, claim).rows == 1
        except BadRequest:
            assert kind == "ints as floats"  # refused once decoded: INT64 data must be integers
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= claim.size, f"{kind}: peak {peak} > charged {claim.size}"
    assert claim.size >= cost_of_json(body)


@pytest.mark.anyio
async def test_a_gzip_bomb_is_refused_before_its_json_is_parsed() -> None:
    # 16 MiB of floats from 16 KiB of gzip: parsing it would take ~600 MB.
    bomb = gzip.compress(json_body(repeat("0.5", 4 * MiB)), 9)
    assert len(bomb) < 64 * 1024
    app = KServeApp(
        identity_model("FP32", (-1,)), max_body_size=32 * MiB, max_inflight_bytes=48 * MiB
    )
    async with app.lifespan():
        tracemalloc.start()
        try:
            reply = await request(
                app, "POST", "/v2/models/id_fp32/infer", bomb, headers={"Content-Encoding": "gzip"}
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reply.status == 413, reply.body
        assert "max_inflight_bytes" in reply.error
        assert peak <= 48 * MiB, peak
        assert app.budget.used == 0


@pytest.mark.anyio
async def test_more_values_than_a_fixed_shape_model_takes_are_refused_before_parsing() -> None:
    served = identity_model("FP32", (16,))  # at most 64 rows of 16 elements: 1024
    assert served.max_elements == 64 * 16
    app = KServeApp(served, metrics=False)
    body = json_body(repeat("0.5", 200_000), shape=[1, 16])
    async with app.lifespan():
        tracemalloc.start()
        try:
            reply = await request(app, "POST", "/v2/models/id_fp32/infer", body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reply.status == 400, reply.body
        assert "takes at most 1024 tensor elements" in reply.error
        assert peak < 4 * len(body)  # parsing would hold ~10 MB of floats
        # the same data as its shape says is served: the limit is the model's, with room
        ok = json_body(repeat("0.5", 16 * 64), shape=[64, 16])
        assert (await request(app, "POST", "/v2/models/id_fp32/infer", ok)).status == 200
    assert identity_model("FP32", (-1,)).max_elements is None
    assert identity_model("BYTES", (3,)).max_elements is None


class Gate:
    """A model that holds its batch until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.entered.set()
        assert self.open.wait(20)
        return items


@pytest.mark.anyio
async def test_requests_over_the_budget_get_503_with_retry_after_until_it_frees() -> None:
    gate = Gate()
    served = ServedModel(
        BatchedModel(gate, name="gated"),
        inputs=[Tensor("X", "FP32", (-1,))],
        outputs=[Tensor("Y", "FP32", (-1,))],
    )
    body = json_body(repeat("0.5", 20_000))
    one = 2 * len(body) + cost_of_json(body)  # what one request is charged to parse
    # what it keeps charged while the model runs: its body and its array
    held = retained_bytes(len(body), {"X": np.zeros((1, 20_000), np.float32)})
    assert held < one // 4
    limit = one + held // 2  # one request fits alone, not beside another that is running
    free = identity_model("FP32", (-1,))
    app = KServeApp([served, free], max_inflight_bytes=limit, metrics=False)
    path = "/v2/models/gated/infer"
    replies: list[Any] = []
    async with app.lifespan(), anyio.create_task_group() as tg:

        async def first() -> None:
            replies.append(await request(app, "POST", path, body))

        tg.start_soon(first)
        await anyio.to_thread.run_sync(gate.entered.wait, 20)
        assert app.budget.used == held
        busy = await request(app, "POST", path, body)
        assert busy.status == 503, busy.body
        assert busy.headers["retry-after"] == "1"
        assert "busy" in busy.error
        assert app.budget.used == held  # the refused request gave back what it charged
        small = json_body("1")  # a small request still fits beside the first one
        reply = await request(app, "POST", "/v2/models/id_fp32/infer", small)
        assert reply.status == 200, reply.body
        gate.open.set()
    assert replies[0].status == 200
    assert app.budget.used == 0
    assert one <= app.budget.peak <= limit
    async with app.lifespan():  # the budget is free again: the same request is served
        assert (await request(app, "POST", path, body)).status == 200


# -- the worst case, measured on a real server process -------------------------------------------


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


TARGET = """
from batchkit import BatchedModel
from batchkit.asgi import ServedModel, Tensor

def identity(items):
    return items

models = [
    ServedModel(
        BatchedModel(identity, name="any"),
        inputs=[Tensor("INPUT0", "FP32", [-1])],
        outputs=[Tensor("OUTPUT0", "FP32", [-1])],
    )
]
"""


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[int, int]]:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read a process's peak memory")
    (tmp_path / "bomb_target.py").write_text(TARGET)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    with socket_port() as port:
        pass
    budget = 64 * MiB
    proc = subprocess.Popen(
        [
            sys.executable, "-W", "error", "-m", "batchkit", "serve", "bomb_target:models",
            "--port", str(port), "--no-metrics",
            "--max-body-size", str(16 * MiB), "--max-inflight-bytes", str(budget),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # uvicorn logs this line once it listens
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited: {proc.wait()}")
        yield proc.pid, port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        if proc.stderr is not None:
            proc.stderr.close()


class socket_port:
    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def post(port: int, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v2/models/any/infer", body=body, headers=headers)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_concurrent_gzip_bombs_stay_within_the_documented_worst_case(
    server_process: tuple[int, int],
) -> None:
    pid, port = server_process
    budget = 64 * MiB
    good = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1] * 16}]}
    ).encode()
    assert post(port, good, {}) == 200  # warm: imports, the engine thread, first allocations
    at_rest = peak_rss(pid)
    gz = {"Content-Encoding": "gzip"}

    # Each decompresses to 14 MB of floats (~500 MB to parse), or 2 MiB (~60 MB, under the
    # budget alone: several at once must share it).
    def bomb(count: int) -> bytes:  # outputs as binary data: their encoding costs nothing
        body = json_body(repeat("0.5", count)).replace(b'"X"', b'"INPUT0"')
        return gzip.compress(
            body.replace(b"{", b'{"parameters":{"binary_data_output":true},', 1), 9
        )

    big, small = bomb(3_500_000), bomb(MiB // 2)
    bodies = [big] * 4 + [small] * 12
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(lambda b: post(port, b, gz), bodies))
    # 200: served; 413: a request that needs more than the whole budget; 503: the budget is held
    # by others (retry later)
    assert set(statuses) <= {200, 413, 503}, statuses
    assert set(statuses[:4]) <= {413, 503}, statuses  # never parsed
    assert post(port, good, {}) == 200
    # The documented worst case (docs/serving.md): at rest + max_inflight_bytes + 2 MiB per
    # request in flight (uvicorn's buffers, a worker thread, the allocator's slack) + what the
    # model and its outputs hold (nothing here).
    growth = peak_rss(pid) - at_rest
    assert growth <= budget + len(bodies) * 2 * MiB, f"grew {growth / MiB:.0f} MiB"


def test_a_json_request_is_charged_15_to_55_times_its_size() -> None:
    # as docs/serving.md says: short numbers cost the most; reading charges twice the body
    for number, low, high in (("1", 45, 55), ("0.5", 28, 36), ("0.12345678901234567", 15, 20)):
        body = json_body(repeat(number, 100_000))
        ratio = (2 * len(body) + cost_of_json(body)) / len(body)
        assert low <= ratio <= high, (number, ratio)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_decompression_is_charged_piece_by_piece_before_it_is_done(encoding: str) -> None:
    data = os.urandom(3 * MiB) + b"a" * (5 * MiB)  # incompressible, then a bomb's worth
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    body = compress(data)
    if encoding == "gzip":  # every member is decoded
        body = gzip.compress(b"first,") + gzip.compress(b"") + body
        data = b"first," + data
    claim = MemoryBudget(1 << 40).claim()
    assert decompress(body, encoding, 16 * MiB, claim) == data
    # twice what came out (the pieces and the joined body), and at most one piece more
    assert 2 * len(data) <= claim.size <= 2 * len(data) + 2 * MiB + 6 * 64 * 1024
    small = MemoryBudget(4 * MiB).claim()
    with pytest.raises(HTTPError) as refused:
        decompress(body, encoding, 16 * MiB, small)
    assert refused.value.status == 413
    assert small.size <= 4 * MiB  # stopped before decompressing past the budget
