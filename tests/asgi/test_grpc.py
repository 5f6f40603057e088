"""KServe v2 gRPC beside HTTP: a real uvicorn + grpc.aio server (one process, one event loop),
called with the stock tritonclient.grpc clients (sync and asyncio) and Triton's generated stub."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchkit import ConfigurationError
from batchkit.asgi import KServeApp, open_grpc_server, serving

from ..support.asgi import DATATYPES, identity_model, sample
from ..support.grpc_models import MAX_MESSAGE_SIZE, TOKEN, FileGate, Gate, models

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
grpc_aio_client = pytest.importorskip("tritonclient.grpc.aio")
httpclient = pytest.importorskip("tritonclient.http")
ml_dtypes = pytest.importorskip("ml_dtypes")
health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
pb = grpcclient.service_pb2
pb_grpc = grpcclient.service_pb2_grpc
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

AUTH = {"authorization": f"Bearer {TOKEN}"}


@dataclass
class Server:
    """One batchkit server: uvicorn and grpc.aio in one event loop, in this process or in a
    ``batchkit serve`` subprocess; its gated model's gate, and its models' item counts."""

    http: str
    grpc: str
    gate: Any
    counts: Callable[[str], dict[str, int]]


@pytest.fixture
def flavor() -> str:
    """Which server the protocol tests run against: tests/asgi/test_triton_grpc_conformance.py
    runs some of them against a real Triton, where this is "triton"."""
    return "batchkit"


@pytest.fixture(scope="module", params=["in-process", "subprocess"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The server under test: ``serving(app, grpc_port=0)`` or ``batchkit serve --grpc-port 0``."""
    if request.param == "in-process":
        yield from _in_process()
    else:
        yield from _subprocess(tmp_path_factory.mktemp("gate"))


def _in_process() -> Iterator[Server]:
    gate = Gate()
    app = KServeApp(models(gate), admin_token=TOKEN, metrics=False)
    by_name = {s.name: s.model for s in app.models}

    def counts(name: str) -> dict[str, int]:
        stats = by_name[name].statistics()
        held = stats.queue_depth + stats.in_flight_batches
        return {"held": held, "completed": stats.completed, "cancelled": stats.cancelled}

    with serving(app, grpc_port=0, grpc_max_message_size=MAX_MESSAGE_SIZE) as address:
        assert address.grpc is not None
        found = Server(str(address), address.grpc, gate, counts)
        warm_up(found)
        yield found


def _subprocess(folder: Path) -> Iterator[Server]:
    port = free_port()
    command = [
        sys.executable, "-W", "error", "-m", "batchkit", "serve",
        "tests.support.grpc_models:make_app", "--port", str(port), "--grpc-port", "0",
        "--grpc-max-message-size", str(MAX_MESSAGE_SIZE),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "BATCHKIT_TEST_GATE_DIR": str(folder),
        "BATCHKIT_ADMIN_TOKEN": TOKEN,
    }
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # read stderr to its end, so that the server never blocks writing it
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=drain, name="stderr-reader")
    reader.start()
    try:
        grpc_address, http_up = None, False
        while grpc_address is None or not http_up:
            line = lines.get(timeout=60)
            if line is None:
                pytest.fail(f"batchkit serve exited: {proc.wait()}")
            if "batchkit gRPC running on" in line:
                grpc_address = line.split("running on ")[1].split()[0]
            http_up = http_up or "Uvicorn running on" in line
        http = f"127.0.0.1:{port}"

        def counts(name: str) -> dict[str, int]:
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as reply:
                text = reply.read().decode()

            def value(metric: str, outcome: str = "") -> int:
                labels = rf'(?=[^}}]*model="{name}")'
                if outcome:
                    labels += rf'(?=[^}}]*outcome="{outcome}")'
                pattern = rf"^{metric}{{{labels}[^}}]*}} ([0-9.e+]+)$"
                match = re.search(pattern, text, re.MULTILINE)
                assert match is not None, f"no {metric} {outcome} for {name} in /metrics"
                return int(float(match.group(1)))

            return {
                "held": value("batchkit_queue_depth") + value("batchkit_in_flight_batches"),
                "completed": value("batchkit_items_total", "completed"),
                "cancelled": value("batchkit_items_total", "cancelled"),
            }

        found = Server(http, grpc_address, FileGate(folder), counts)
        warm_up(found)
        yield found
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def target(server: Server) -> str:
    return server.grpc


@pytest.fixture(scope="module")
def addresses(server: Server) -> tuple[str, str]:
    return server.http, server.grpc


@pytest.fixture
def gate(server: Server) -> Iterator[Any]:
    yield server.gate
    server.gate.open()  # nothing stays held past its test
    server.gate.reset()


def warm_up(server: Server) -> None:
    """Call every model once, so the engines' model threads exist before any test starts."""
    server.gate.open()
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        for served in models(Gate()):
            tensor = served.inputs[0]
            rows = 2 if served.name == "pair" else 1  # fills its batch: it leaves at once
            shape = [rows, *(1 if d == -1 else d for d in tensor.shape)]
            inp = grpcclient.InferInput(tensor.name, shape, tensor.datatype)
            data = sample(tensor.datatype, rows, shape[1])
            inp.set_data_from_numpy(as_client_array(tensor.datatype, data))
            try:
                client.infer(served.name, [inp])
            except InferenceServerException:
                pass  # the broken model, the one that outgrows the message size
    finally:
        client.close()
        server.gate.reset()


@pytest.fixture
def client(target: str) -> Iterator[Any]:
    c = grpcclient.InferenceServerClient(target)
    yield c
    c.close()


def as_client_array(datatype: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return array.astype(ml_dtypes.bfloat16) if datatype == "BF16" else array


def fp32(rows: int, width: int = 3, value: float = 0.0, name: str = "X") -> Any:
    inp = grpcclient.InferInput(name, [rows, width], "FP32")
    inp.set_data_from_numpy(np.full((rows, width), value, np.float32))
    return inp


def expect(code: str, call: Any, *args: Any, **kwargs: Any) -> str:
    """Call, expect an InferenceServerException with gRPC ``code``; return its message."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{code}", info.value
    return str(info.value.message())


# -- health, metadata, configuration ------------------------------------------------------------


def test_health_metadata_and_config(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("id_fp32")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "batchkit"
    assert "model_repository" in metadata["extensions"]
    meta = client.get_model_metadata("id_int8", "1", as_json=True)
    assert meta["inputs"] == [{"name": "X", "datatype": "INT8", "shape": ["-1", "3"]}]
    assert meta["versions"] == ["1"]
    config = client.get_model_config("id_fp16", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "X", "data_type": "TYPE_FP16", "dims": ["3"]}]
    assert config["dynamic_batching"]["preferred_batch_size"] == [64]
    assert "unknown model 'nope'" in expect("NOT_FOUND", client.get_model_config, "nope")
    assert "no version '9'" in expect("NOT_FOUND", client.get_model_metadata, "id_fp32", "9")


def test_grpc_health_v1(target: str, flavor: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        services = [""] if flavor == "triton" else ["", "inference.GRPCInferenceService"]
        for service in services:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        if flavor == "batchkit":
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


# -- tensors: raw and typed, every datatype -----------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_raw_with_the_sync_client(client: Any, datatype: str) -> None:
    array = as_client_array(datatype, sample(datatype))
    inp = grpcclient.InferInput("X", [2, 3], datatype)
    inp.set_data_from_numpy(array)
    out = grpcclient.InferRequestedOutput("Y")
    result = client.infer(f"id_{datatype.lower()}", [inp], outputs=[out], request_id="req-7")
    assert result.get_response().id == "req-7"
    got = result.as_numpy("Y")
    assert got.shape == (2, 3)
    assert got.tolist() == array.tolist()


CONTENTS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BF16": "fp32_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def typed_request(model: str, datatype: str, array: Any, *, typed_out: bool) -> Any:
    request = pb.ModelInferRequest(model_name=model, id="typed")
    entry = request.inputs.add(name="X", datatype=datatype, shape=list(array.shape))
    getattr(entry.contents, CONTENTS[datatype]).extend(array.reshape(-1).tolist())
    out = request.outputs.add(name="Y")
    if typed_out:
        out.parameters["binary_data"].bool_param = False
    return request


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_as_typed_contents_both_ways(
    target: str, datatype: str, flavor: str
) -> None:
    if flavor == "triton" and datatype in ("FP16", "BF16"):
        pytest.skip("Triton takes FP16 and BF16 only raw (batchkit also as fp32_contents)")
    array = sample(datatype)  # BF16 and FP16 travel as fp32_contents
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        model = f"id_{datatype.lower()}"
        # typed in, raw out (Triton's answer): what tritonclient reads
        reply = stub.ModelInfer(typed_request(model, datatype, array, typed_out=False), timeout=10)
        assert len(reply.raw_output_contents) == 1
        got = grpcclient.InferResult(reply).as_numpy("Y")
        assert got.tolist() == as_client_array(datatype, array).tolist()
        if flavor == "triton":
            return  # Triton answers raw whatever the request asks
        # typed in, typed out (the output's binary_data: false)
        reply = stub.ModelInfer(typed_request(model, datatype, array, typed_out=True), timeout=10)
        assert not reply.raw_output_contents
        (output,) = reply.outputs
        assert (output.datatype, list(output.shape)) == (datatype, [2, 3])
        values = list(getattr(output.contents, CONTENTS[datatype]))
        assert values == array.reshape(-1).tolist()


def test_typed_contents_in_the_wrong_field_or_beside_raw_are_refused(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="id_fp32")
        request.inputs.add(name="X", datatype="FP32", shape=[1, 3]).contents.int_contents.extend(
            [1, 2, 3]
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fp32_contents" in info.value.details()
        request.raw_input_contents.append(np.zeros(3, np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert "both typed contents and raw_input_contents" in info.value.details()
        bad = typed_request("id_int8", "INT8", np.array([[1, 2, 300]]), typed_out=False)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(bad, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of range for INT8" in info.value.details()


def test_shared_memory_sequences_and_mixed_outputs_are_refused(target: str) -> None:
    def refused(request: Any) -> str:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return str(info.value.details())

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = typed_request("id_fp32", "FP32", np.zeros((1, 3)), typed_out=False)
        request.inputs[0].parameters["shared_memory_region"].string_param = "r"
        assert "shared memory is not supported" in refused(request)
        request = typed_request("id_fp32", "FP32", np.zeros((1, 3)), typed_out=False)
        request.parameters["sequence_id"].int64_param = 7
        assert "not a sequence model" in refused(request)
        request = typed_request("id_fp32", "FP32", np.zeros((1, 3)), typed_out=False)
        request.parameters["priority"].int64_param = -1
        assert "'priority' must be an integer" in refused(request)
        request = typed_request("spare", "FP32", np.zeros((1, 3)), typed_out=True)
        request.outputs.add(name="Y")  # a second time
        assert "requested more than once" in refused(request)


def test_classification_priority_and_requested_outputs(client: Any) -> None:
    inp = grpcclient.InferInput("X", [1, 3], "FP32")
    inp.set_data_from_numpy(np.array([[0.5, 2.5, 1.5]], np.float32))
    top = grpcclient.InferRequestedOutput("Y", class_count=2)
    result = client.infer("id_fp32", [inp], outputs=[top], priority=1)
    assert result.as_numpy("Y").tolist() == [[b"2.500000:1", b"1.500000:2"]]
    wrong = grpcclient.InferRequestedOutput("Z")
    assert 'has no output "Z"' in expect(
        "INVALID_ARGUMENT", client.infer, "id_fp32", [inp], outputs=[wrong]
    )


# -- errors: the same messages as HTTP, Triton's codes ------------------------------------------


def test_client_errors_have_tritons_codes(client: Any) -> None:
    good = fp32(1)
    wrong_shape = fp32(1, 4)
    assert re.search(
        r"\[-1, ?3\]", expect("INVALID_ARGUMENT", client.infer, "id_fp32", [wrong_shape])
    )
    wrong_type = grpcclient.InferInput("X", [1, 3], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 3)))
    assert "FP64" in expect("INVALID_ARGUMENT", client.infer, "id_fp32", [wrong_type])
    unknown = fp32(1, name="Z")
    assert re.search(r"[\"']Z[\"']", expect("INVALID_ARGUMENT", client.infer, "id_fp32", [unknown]))
    out = grpcclient.InferRequestedOutput("NOPE")
    assert "NOPE" in expect("INVALID_ARGUMENT", client.infer, "id_fp32", [good], outputs=[out])
    assert "nope" in expect("NOT_FOUND", client.infer, "nope", [good])
    no_version = expect("NOT_FOUND", client.infer, "id_fp32", [good], model_version="9")
    assert re.search(r"\b9\b", no_version)
    expect("NOT_FOUND", client.get_model_metadata, "nope")
    expect("NOT_FOUND", client.get_model_config, "nope")
    assert not client.is_model_ready("nope")
    assert client.is_server_ready()


def test_errors_have_the_http_messages_and_triton_codes(
    addresses: tuple[str, str], client: Any
) -> None:
    http = httpclient.InferenceServerClient(addresses[0])
    try:

        def both(code: str, model: str, inputs: list[Any]) -> str:
            message = expect(code, client.infer, model, inputs)
            http_inputs = []
            for inp in inputs:
                shape = [int(d) for d in inp.shape()]
                h = httpclient.InferInput(inp.name(), shape, inp.datatype())
                h.set_data_from_numpy(
                    np.zeros(shape, np.float32 if inp.datatype() == "FP32" else np.int32)
                )
                http_inputs.append(h)
            with pytest.raises(InferenceServerException) as info:
                http.infer(model, http_inputs)
            assert info.value.message() == message
            return message

        assert "unknown model 'nope'" in both("NOT_FOUND", "nope", [fp32(1)])
        assert "has shape [1, 4]" in both("INVALID_ARGUMENT", "id_fp32", [fp32(1, 4)])
        wrong = grpcclient.InferInput("X", [1, 3], "INT32")
        wrong.set_data_from_numpy(np.zeros((1, 3), np.int32))
        assert "expected FP32" in both("INVALID_ARGUMENT", "id_fp32", [wrong])
        assert "capacity" in both("UNAVAILABLE", "tiny_queue", [fp32(2)])
        full = pb.ModelInferRequest(model_name="tiny_queue")
        full.inputs.add(name="X", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(
            [0.0] * 6
        )
        with grpc.insecure_channel(addresses[1]) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(full, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        retry = dict(info.value.trailing_metadata())["retry-after"]
        assert retry.isdigit() and int(retry) >= 1
        message = both("INTERNAL", "broken", [fp32(1, name="INPUT0")])
        assert "RuntimeError" in message
        assert "secret" not in message
    finally:
        http.close()
    assert client.infer("tiny_queue", [fp32(1, value=1.0)]).as_numpy("Y").tolist() == [[1.0] * 3]


def test_deadline_passing_is_deadline_exceeded(target: str, gate: Any) -> None:
    inp = fp32(1, 1, name="INPUT0")
    c1 = grpcclient.InferenceServerClient(target)
    c2 = grpcclient.InferenceServerClient(target)
    results: queue.Queue[Any] = queue.Queue()
    try:
        c1.async_infer("gated", [inp], callback=lambda result, error: results.put((result, error)))
        assert gate.wait_entered(10)
        # timeout is in microseconds: 0.2 s in the queue behind the held batch
        message = expect("DEADLINE_EXCEEDED", c2.infer, "gated", [inp], timeout=200_000)
        assert "deadline" in message
    finally:
        gate.open()
        result, error = results.get(timeout=10)
        c1.close()
        c2.close()
    assert error is None
    assert result.as_numpy("OUTPUT0").tolist() == [[0.0]]


def gated_request(value: float) -> Any:
    request = pb.ModelInferRequest(model_name="gated", id=str(value))
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.array([value], np.float32).tobytes())
    return request


async def wait_for(server: Server, outcome: str, count: int) -> None:
    """Read the gated model's counts on the server until ``outcome`` reaches ``count``."""
    for _ in range(500):
        if server.counts("gated")[outcome] == count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never reached {count} {outcome}: {server.counts('gated')}")


def test_a_cancelled_rpc_withdraws_its_item(target: str, server: Server, gate: Any) -> None:
    async def scenario() -> None:
        before = server.counts("gated")
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            held = stub.ModelInfer(gated_request(1.0))
            assert await asyncio.to_thread(gate.wait_entered, 10)
            withdrawn = stub.ModelInfer(gated_request(2.0))
            await wait_for(server, "held", 2)  # the first in the model, the second behind it
            withdrawn.cancel()
            await wait_for(server, "cancelled", before["cancelled"] + 1)
            gate.open()
            reply = await held
            assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.0]
            with pytest.raises(asyncio.CancelledError):
                await withdrawn
        assert server.counts("gated")["completed"] == before["completed"] + 1
        assert gate.seen() == [1.0]  # the cancelled item was never computed

    asyncio.run(scenario())


def test_a_cancelled_stream_withdraws_its_requests(target: str, server: Server, gate: Any) -> None:
    async def scenario() -> None:
        before = server.counts("gated")
        sent: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> Any:
            while (request := await sent.get()) is not None:
                yield request

        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(requests())
            sent.put_nowait(gated_request(1.0))
            assert await asyncio.to_thread(gate.wait_entered, 10)
            sent.put_nowait(gated_request(2.0))
            await wait_for(server, "held", 2)
            call.cancel()
            # both are withdrawn: the queued one, and the one in the model (its answer dropped)
            await wait_for(server, "cancelled", before["cancelled"] + 2)
            gate.open()
            await wait_for(server, "held", 0)
        assert gate.seen() == [1.0]  # the withdrawn request was never computed

    asyncio.run(scenario())


def test_messages_over_the_limit_are_refused_and_the_server_goes_on(client: Any) -> None:
    # the server's limit is 64 KiB: a request of 80 KB, then a response of 16 KB per row
    message = expect("RESOURCE_EXHAUSTED", client.infer, "id_fp32", [fp32(20, 1000)])
    assert "larger than max" in message
    one = grpcclient.InferInput("X", [5, 1], "FP32")
    one.set_data_from_numpy(np.zeros((5, 1), np.float32))
    message = expect("RESOURCE_EXHAUSTED", client.infer, "grow", [one])
    assert "more than the server's max message size of 65536 bytes" in message
    assert client.is_server_live()
    assert client.infer("id_fp32", [fp32(1, value=2.0)]).as_numpy("Y").tolist() == [[2.0] * 3]


def test_bad_protobuf_does_not_kill_the_server(target: str, client: Any) -> None:
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12" * 100):
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=10)
            assert info.value.code() != grpc.StatusCode.OK
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        replies: list[bytes] = []
        code = grpc.StatusCode.OK
        try:
            replies = list(stream(iter([b"\xff\xff"]), timeout=10))
        except grpc.RpcError as exc:  # batchkit ends the stream with an error
            code = exc.code()
        # Triton answers with error messages instead, or not at all
        assert code != grpc.StatusCode.OK or all(
            pb.ModelStreamInferResponse.FromString(r).error_message for r in replies
        )
    assert client.is_server_ready()
    assert client.infer("id_fp32", [fp32(1, value=3.0)]).as_numpy("Y").tolist() == [[3.0] * 3]


# -- streaming, concurrency -----------------------------------------------------------------------


def test_stream_infer_answers_each_request_once(client: Any, flavor: str) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(8):
            client.async_stream_infer("id_fp32", [fp32(1, value=float(i))], request_id=str(i))
        client.async_stream_infer("nope", [fp32(1)], request_id="bad")
        client.async_stream_infer("id_fp32", [fp32(1, 4)], request_id="bad-shape")
        got, errors = {}, []
        for _ in range(10):
            result, error = answers.get(timeout=10)
            if error is not None:
                errors.append(error.message())
            else:
                got[result.get_response().id] = result.as_numpy("Y").tolist()
    finally:
        client.stop_stream()
    assert got == {str(i): [[float(i)] * 3] for i in range(8)}
    assert len(errors) == 2
    assert answers.empty()
    if flavor == "triton":
        return
    assert sorted(errors) == sorted(
        [
            "unknown model 'nope'; serving " + str(sorted(got_models(client))),
            "input 'X' has shape [1, 4], expected [-1, 3] (a batch dimension >= 1, then the "
            "item's shape; -1 is any size)",
        ]
    )


def got_models(client: Any) -> list[str]:
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    return sorted({m["name"] for m in index})


def test_grpc_and_http_requests_share_a_batch(addresses: tuple[str, str], client: Any) -> None:
    def batches() -> dict[int, int]:
        stats = client.get_inference_statistics("pair", as_json=True)["model_stats"][0]
        return {
            int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in stats.get("batch_stats", [])
        }

    before = batches()
    http = httpclient.InferenceServerClient(addresses[0])
    try:
        with ThreadPoolExecutor(1) as pool:
            # "pair" waits up to 30 s for a second item: the two leave together
            over_http = pool.submit(http.infer, "pair", [http_fp32(1, value=1.0)])
            over_grpc = client.infer("pair", [fp32(1, value=2.0)])
            assert over_http.result(20).as_numpy("Y").tolist() == [[1.0] * 3]
        assert over_grpc.as_numpy("Y").tolist() == [[2.0] * 3]
    finally:
        http.close()
    assert batches().get(2, 0) == before.get(2, 0) + 1


def http_fp32(rows: int, width: int = 3, value: float = 0.0) -> Any:
    inp = httpclient.InferInput("X", [rows, width], "FP32")
    inp.set_data_from_numpy(np.full((rows, width), value, np.float32))
    return inp


def test_concurrent_requests_with_the_asyncio_client(target: str) -> None:
    async def scenario() -> list[list[list[float]]]:
        client = grpc_aio_client.InferenceServerClient(target)
        try:
            calls = [client.infer("id_fp32", [fp32(2, value=float(i))]) for i in range(48)]
            return [r.as_numpy("Y").tolist() for r in await asyncio.gather(*calls)]
        finally:
            await client.close()

    results = asyncio.run(scenario())
    assert results == [[[float(i)] * 3] * 2 for i in range(48)]


def test_statistics(client: Any) -> None:
    before = client.get_inference_statistics("id_int16", as_json=True)["model_stats"][0]
    inp = grpcclient.InferInput("X", [2, 3], "INT16")
    inp.set_data_from_numpy(np.ones((2, 3), np.int16))
    client.infer("id_int16", [inp])
    stats = client.get_inference_statistics("id_int16", as_json=True)["model_stats"][0]
    assert (stats["name"], stats["version"]) == ("id_int16", "1")
    assert int(stats["inference_count"]) == int(before.get("inference_count", 0)) + 2
    assert int(stats["inference_stats"]["success"]["count"]) == int(stats["inference_count"])
    assert int(stats["execution_count"]) >= 1
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert "id_fp64" in {s["name"] for s in every}
    expect("NOT_FOUND", client.get_inference_statistics, "nope")


# -- the model repository, with the admin token from the call's metadata ------------------------


def test_repository_needs_the_admin_token(client: Any) -> None:
    message = expect("UNAUTHENTICATED", client.get_model_repository_index)
    assert "Authorization: Bearer" in message
    expect("UNAUTHENTICATED", client.unload_model, "spare", headers={"authorization": "Bearer no"})
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert {"name": "spare", "version": "1", "state": "READY"} in index
    try:
        client.unload_model("spare", headers=AUTH)
        assert not client.is_model_ready("spare")
        assert "unloaded" in expect("NOT_FOUND", client.infer, "spare", [fp32(1)])
        index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
        assert {
            "name": "spare",
            "version": "1",
            "state": "UNAVAILABLE",
            "reason": "unloaded",
        } in index
    finally:
        client.load_model("spare", headers=AUTH)
    assert client.is_model_ready("spare")
    assert "unknown model 'nope'" in expect("NOT_FOUND", client.load_model, "nope", headers=AUTH)


def test_repository_load_with_weights_maps_its_errors(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelLoadRequest(model_name="spare")
        request.parameters["weights"].string_param = "w.pt"
        request.parameters["version"].string_param = "2"
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(request, metadata=tuple(AUTH.items()), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "weights directory" in info.value.details()
        request.parameters["version"].string_param = "1"
        request.parameters["weights"].int64_param = 3
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(request, metadata=tuple(AUTH.items()), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the lifespan-independent API ---------------------------------------------------------------


def test_open_grpc_server_alone_runs_the_engines_for_its_block() -> None:
    app = KServeApp([identity_model("FP32")], metrics=False)

    async def scenario() -> None:
        async with open_grpc_server(app, port=0, max_message_size=1 << 20) as server:
            assert server.port > 0
            client = grpc_aio_client.InferenceServerClient(server.address)
            try:
                assert await client.is_server_ready()
                result = await client.infer("id_fp32", [fp32(1, value=4.0)])
                assert result.as_numpy("Y").tolist() == [[4.0] * 3]
            finally:
                await client.close()

    asyncio.run(scenario())


def test_open_grpc_server_refuses_bad_settings_and_other_loops() -> None:
    trio = pytest.importorskip("trio")
    app = KServeApp([identity_model("FP32")], metrics=False)

    async def enter(**options: Any) -> None:
        async with open_grpc_server(app, **options):
            pass

    with pytest.raises(ConfigurationError, match="max_message_size"):
        asyncio.run(enter(max_message_size=0))
    with pytest.raises(ConfigurationError, match="port"):
        asyncio.run(enter(port=70000))
    with pytest.raises(ConfigurationError, match="KServeApp"):
        asyncio.run(open_grpc_server(object()).__aenter__())
    with pytest.raises(RuntimeError, match="asyncio"):
        trio.run(enter)


def test_serving_refuses_grpc_for_an_app_that_is_not_a_kserve_app() -> None:
    async def raw_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ConfigurationError, match="KServeApp"), serving(raw_app, grpc_port=0):
        pass


def test_import_batchkit_asgi_does_not_import_grpc() -> None:
    code = (
        "import sys, batchkit, batchkit.asgi; "
        "bad = [m for m in ('grpc', 'grpc_health', 'tritonclient', 'google.protobuf') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_open_grpc_server_with_tls_credentials(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    app = KServeApp([identity_model("FP32")], metrics=False)

    async def scenario() -> None:
        async with open_grpc_server(app, credentials=credentials) as server:
            client = grpc_aio_client.InferenceServerClient(
                server.address, ssl=True, root_certificates=str(cert)
            )
            try:
                result = await client.infer("id_fp32", [fp32(1, value=5.0)])
                assert result.as_numpy("Y").tolist() == [[5.0] * 3]
            finally:
                await client.close()
            plain = grpc_aio_client.InferenceServerClient(server.address)
            try:
                with pytest.raises(InferenceServerException):
                    await plain.is_server_live(client_timeout=5)
            finally:
                await plain.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("index", [0, 1])
def test_the_python_examples_of_docs_grpc_run(index: int, tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "grpc.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), re.S)
    assert len(blocks) == 2
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", blocks[index]],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ["[[2. 4. 6.]]", "True"][index]


def test_grpc_infer_requests_count_in_the_request_metrics() -> None:
    pytest.importorskip("prometheus_client")
    from ..support.asgi import request

    app = KServeApp([identity_model("FP32")], metrics=True)

    async def scenario() -> str:
        async with open_grpc_server(app) as server:
            client = grpc_aio_client.InferenceServerClient(server.address)
            try:
                await client.infer("id_fp32", [fp32(1)])
                with pytest.raises(InferenceServerException):
                    await client.infer("id_fp32", [fp32(1, 4)])
            finally:
                await client.close()
            return (await request(app, "GET", "/metrics")).body.decode()

    text = asyncio.run(scenario())
    for status in ("200", "400"):
        pattern = (
            r'^batchkit_http_requests_total\{(?=[^}]*model="id_fp32")'
            rf'(?=[^}}]*status="{status}")[^}}]*\}} 1\.0$'
        )
        assert re.search(pattern, text, re.MULTILINE), text


def test_a_model_repository_folder_over_grpc(tmp_path: Path) -> None:
    from batchkit.asgi import ModelRepository

    from ..support import model_files as mf

    root = tmp_path / "repo"
    mf.python_model(root / "custom", offset=1.0)
    mf.write_config(root / "custom", "pbtxt", mf.PYTHON_CONFIG, "custom")
    app = KServeApp(ModelRepository(root), metrics=False, admin_token=TOKEN)

    def inputs() -> list[Any]:
        text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"abc"]], dtype=object))
        value = grpcclient.InferInput("VALUE", [1, 2], "FP32")
        value.set_data_from_numpy(np.full((1, 2), 2.0, np.float32))
        return [text, value]

    async def scenario() -> None:
        async with open_grpc_server(app) as server:
            client = grpc_aio_client.InferenceServerClient(server.address)
            try:
                result = await client.infer("custom", inputs())
                assert result.as_numpy("LENGTH").tolist() == [[3]]
                assert result.as_numpy("SHIFTED").tolist() == [[3.0, 3.0]]
                index = await client.get_model_repository_index(headers=AUTH, as_json=True)
                assert {"name": "custom", "version": "1", "state": "READY"} in [
                    {k: m.get(k) for k in ("name", "version", "state")} for m in index["models"]
                ]
                await client.unload_model("custom", headers=AUTH)
                assert not await client.is_model_ready("custom")
                with pytest.raises(InferenceServerException) as info:
                    await client.infer("custom", inputs())
                assert info.value.status() == "StatusCode.NOT_FOUND"
                await client.load_model("custom", headers=AUTH)
                assert await client.is_model_ready("custom")
                result = await client.infer("custom", inputs())
                assert result.as_numpy("SHIFTED").tolist() == [[3.0, 3.0]]
            finally:
                await client.close()

    asyncio.run(scenario())


def test_a_deployment_over_grpc_routing_key_pinned_version_and_statistics() -> None:
    from batchkit import BatchedModel, Deployment
    from batchkit.asgi import ServedModel, Tensor

    def plus(offset: float) -> Any:
        return lambda items: [np.asarray(x, np.float32) + offset for x in items]

    versions = {
        "1": BatchedModel(plus(0), name="clf", version="1"),
        "2": BatchedModel(plus(100), name="clf", version="2"),
    }
    deployment = Deployment(versions, weights={"1": 0.5, "2": 0.5}, seed=5)
    signature = {"inputs": [Tensor("X", "FP32", (3,))], "outputs": [Tensor("Y", "FP32", (3,))]}
    app = KServeApp([ServedModel(deployment, **signature)], metrics=False)

    async def scenario() -> None:
        async with open_grpc_server(app) as server:
            client = grpc_aio_client.InferenceServerClient(server.address)
            try:

                async def version(key: str | None = None, pinned: str = "") -> str:
                    headers = None if key is None else {"batchkit-routing-key": key}
                    result = await client.infer(
                        "clf", [fp32(1)], model_version=pinned, headers=headers
                    )
                    response = result.get_response()
                    offset = result.as_numpy("Y")[0, 0]
                    assert offset == (100.0 if response.model_version == "2" else 0.0)
                    return str(response.model_version)

                for user in range(12):  # a key sticks to one version
                    seen = {await version(f"user-{user}") for _ in range(4)}
                    assert len(seen) == 1, seen
                assert {await version(pinned="2") for _ in range(5)} == {"2"}
                with pytest.raises(InferenceServerException, match="batchkit-routing-key"):
                    await version("k" * 300)
                stats = await client.get_inference_statistics("clf", as_json=True)
                (model,) = stats["model_stats"]
                assert int(model["inference_count"]) == 12 * 4 + 5
            finally:
                await client.close()

    asyncio.run(scenario())
