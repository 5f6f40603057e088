"""Helpers for the ASGI tests: an in-process ASGI client, a real uvicorn server, fake models."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import numpy as np

from batchkit import BatchedModel
from batchkit.asgi import ASGIApp, ServedModel, Tensor


class Reply:
    """An HTTP response as the ASGI app sent it."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}
        self.body = body

    def json(self) -> Any:
        size = self.headers.get("inference-header-content-length")
        return json.loads(self.body if size is None else self.body[: int(size)])

    @property
    def error(self) -> str:
        payload = json.loads(self.body)
        assert set(payload) == {"error"}, payload
        return str(payload["error"])


async def request(
    app: ASGIApp,
    method: str,
    path: str,
    body: bytes | Any = b"",
    *,
    headers: dict[str, str] | None = None,
    chunks: int = 1,
    root_path: str = "",
) -> Reply:
    """Send one HTTP request straight to ``app`` (a JSON-able ``body`` is encoded as JSON)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    parts = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    if chunks > 1:  # split into consecutive pieces, not interleaved
        size = -(-len(body) // chunks)
        parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []
    responded = anyio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        # As servers do: once the body is in, the next message is the disconnect that comes
        # after the response (a client that waits for its response does not go away).
        await responded.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            responded.set()

    scope = {
        "type": "http",
        "method": method,
        "path": root_path + path,
        "root_path": root_path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "query_string": b"",
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    return Reply(start["status"], start["headers"], b"".join(m["body"] for m in bodies))


def infer_body(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"inputs": inputs, **extra}


def identity(items: list[Any]) -> list[Any]:
    return items


def identity_model(datatype: str, shape: Sequence[int] = (3,), **settings: Any) -> ServedModel:
    """A model answering each item with itself, declared as ``datatype`` of ``shape``."""
    name = settings.pop("name", f"id_{datatype.lower()}")
    model = BatchedModel(identity, name=name, **settings)
    return ServedModel(
        model,
        inputs=[Tensor("X", datatype, shape)],
        outputs=[Tensor("Y", datatype, shape)],
    )


def sample(datatype: str, rows: int = 2, width: int = 3) -> np.ndarray[Any, Any]:
    """Sample data of ``datatype``, shape (rows, width), with the type's extreme values."""
    n = rows * width
    if datatype == "BOOL":
        values: Any = np.arange(n) % 2 == 0
    elif datatype == "BYTES":
        values = np.array([f"é{i}".encode() if i else b"\x00\xff" for i in range(n)], dtype=object)
    elif datatype in ("FP16", "FP32", "FP64"):
        values = (np.arange(n) - 2.5).astype(datatype.replace("FP", "float"))
    elif datatype == "BF16":
        values = (np.arange(n) - 2.5).astype(np.float32)  # exact in bfloat16
    else:
        dtype = np.dtype(datatype.lower())
        info = np.iinfo(dtype)
        values = np.resize(np.array([info.min, info.max, 0, 1], dtype=dtype), n)
    return np.asarray(values).reshape(rows, width)


DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip


@contextmanager
def running_server(app: ASGIApp, *, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield ``host:port``.

    The socket is bound and listening before the thread starts, so clients may connect at once
    (the kernel queues them until uvicorn accepts, after its lifespan startup). Stopped by
    its own handle, bounded by ``timeout``.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", http="httptools"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test")
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        assert not thread.is_alive(), "the uvicorn server did not stop"
