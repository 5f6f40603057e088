"""``batchkit.notebook.serve`` (``batchkit/notebook/_server.py``): a server on a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("uvicorn")
np = pytest.importorskip("numpy")

from batchkit import BatchedModel, ConfigurationError  # noqa: E402
from batchkit.notebook import serve  # noqa: E402


def double_rows(rows: list[Any]) -> list[Any]:
    return [2 * row for row in rows]


def infer(url: str, values: list[float]) -> list[float]:
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, len(values)], "datatype": "FP32", "data": values}
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/double_rows/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        data: list[float] = json.load(response)["outputs"][0]["data"]
    return data


def server_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "batchkit-http"]


def test_serve_a_model_then_stop() -> None:
    model = BatchedModel(double_rows)
    with serve(model) as server:
        assert server.running
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.address == f"127.0.0.1:{server.port}"
        assert infer(server.url, [1.0, 2.5]) == [2.0, 5.0]
        assert model.statistics().completed == 1
    assert not server.running
    assert server_threads() == []
    with pytest.raises(urllib.error.URLError):
        infer(server.url, [1.0])
    assert repr(server) == f"<BackgroundServer {server.url} stopped>"


def test_serve_from_inside_a_running_loop() -> None:
    async def cell() -> list[float]:
        with serve(BatchedModel(double_rows)) as server:
            return infer(server.url, [3.0])

    assert asyncio.run(cell()) == [6.0]


def test_serve_any_asgi_app() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hello"})

    with serve(app) as server:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            assert response.read() == b"hello"


def test_stopping_twice_is_harmless() -> None:
    server = serve(BatchedModel(double_rows))
    server.stop()
    server.stop()
    assert server_threads() == []


def test_serve_refuses_what_is_neither_an_app_nor_models() -> None:
    with pytest.raises(ConfigurationError, match="expected an ASGI app or models to serve, got 42"):
        serve(42)
    assert server_threads() == []


def test_serve_with_grpc_beside_http() -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("grpc_health")
    model = BatchedModel(double_rows)
    with serve(model, grpc_port=0) as server:
        assert server.grpc_address is not None
        assert server.grpc_address != server.address
        client = grpcclient.InferenceServerClient(server.grpc_address)
        try:
            inp = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
            inp.set_data_from_numpy(np.array([[1.0, 2.5]], np.float32))
            result = client.infer("double_rows", [inp])
            assert result.as_numpy("OUTPUT0").tolist() == [[2.0, 5.0]]
        finally:
            client.close()
        assert infer(server.url, [3.0]) == [6.0]  # the same model, over HTTP
        assert model.statistics().completed == 2
    assert server_threads() == []
    with serve(model) as plain:
        assert plain.grpc_address is None
