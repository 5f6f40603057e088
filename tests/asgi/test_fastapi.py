"""The KServe app mounted under FastAPI (docs/serving.md), served by real uvicorn.

The stock tritonclient reaches it through the mount prefix, FastAPI's own routes keep working
beside it, and the host's lifespan runs the models' engines in the server's event loop (no
background engine thread), so concurrent requests are batched together.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

np = pytest.importorskip("numpy")
fastapi = pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpclient = pytest.importorskip("tritonclient.http")
aio = pytest.importorskip("tritonclient.http.aio")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

from batchkit import BatchedModel  # noqa: E402
from batchkit.asgi import KServeApp, ServedModel, Tensor  # noqa: E402
from tests.support.asgi import running_server  # noqa: E402


def affine(rows: list[Any]) -> list[Any]:
    return list(np.stack(rows) * 2.0 + 1.0)


def build() -> tuple[Any, BatchedModel[Any, Any]]:
    """Return a FastAPI app with the KServe app mounted at /ml, and the served model."""
    model = BatchedModel(affine, name="affine", max_batch_size=64)
    kserve = KServeApp(
        [
            ServedModel(
                model,
                inputs=[Tensor("INPUT0", "FP32", [4])],
                outputs=[Tensor("OUTPUT0", "FP32", [4])],
            )
        ]
    )

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with kserve.lifespan():
            yield

    api = fastapi.FastAPI(lifespan=lifespan)
    api.mount("/ml", kserve)

    @api.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    return api, model


def infer_input(rows: int) -> Any:
    data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    row = httpclient.InferInput("INPUT0", [rows, 4], "FP32")
    row.set_data_from_numpy(data)
    return row, data


def test_tritonclient_infers_through_the_mount_prefix_beside_fastapi_routes() -> None:
    api, model = build()
    with running_server(api) as address:
        client = httpclient.InferenceServerClient(f"{address}/ml")
        try:
            assert client.is_server_ready()
            assert client.is_model_ready("affine")
            assert client.get_model_metadata("affine")["name"] == "affine"
            row, data = infer_input(3)
            result = client.infer("affine", [row]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(result, data * 2 + 1)
            outside = httpclient.InferenceServerClient(address)  # no prefix: FastAPI's 404
            with pytest.raises(InferenceServerException) as info:
                outside.get_model_metadata("affine")
            outside.close()
            assert "404" in str(info.value.status())
        finally:
            client.close()
        with urllib.request.urlopen(f"http://{address}/hello", timeout=10) as response:
            assert (response.status, response.read()) == (200, b'{"hello":"world"}')
        # FastAPI's lifespan entered the KServe app's: the engine ran in the server's loop.
        assert not [t for t in threading.enumerate() if t.name == "batchkit-affine"]
    assert model.statistics().completed == 3


def test_concurrent_requests_through_the_mount_share_batches() -> None:
    api, model = build()

    async def drive(address: str) -> None:
        client = aio.InferenceServerClient(f"{address}/ml", conn_limit=32)
        try:
            rows = [infer_input(1) for _ in range(64)]
            replies = await asyncio.gather(*(client.infer("affine", [row]) for row, _ in rows))
            for reply, (_, data) in zip(replies, rows, strict=True):
                np.testing.assert_array_equal(reply.as_numpy("OUTPUT0"), data * 2 + 1)
        finally:
            await client.close()

    with running_server(api) as address:
        asyncio.run(drive(address))
    stats = model.statistics()
    assert stats.completed == 64
    assert stats.batches < 64, stats.batch_sizes  # batched across requests, not one per request
