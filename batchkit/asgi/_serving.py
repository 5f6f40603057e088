"""Serve an ASGI app with uvicorn in a background thread of this process (needs uvicorn).

For ``batchkit bench --compare``, the examples and notebooks: a real HTTP server on a free
loopback port, started and stopped by its own handle, with gRPC beside it when asked.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

__all__ = ("ServingAddress", "open_grpc_server", "serving")


class ServingAddress(str):
    """The HTTP server's ``host:port`` (a ``str``), with ``grpc``: the gRPC server's
    ``host:port``, or None when it serves no gRPC."""

    grpc: str | None = None


@contextmanager
def serving(
    app: Any,
    *,
    host: str = "127.0.0.1",
    stop_timeout: float = 30.0,
    grpc_port: int | None = None,
    grpc_max_message_size: int | None = None,
) -> Iterator[ServingAddress]:
    """Serve ``app`` on a free port of ``host`` while the block runs; yield ``host:port``.

    The socket listens before the server thread starts, so clients may connect at once (the
    kernel queues them until uvicorn has run the app's lifespan startup and accepts).

    ``grpc_port`` (0: a free port) also serves the KServe v2 gRPC protocol on ``host``, in the
    same event loop over the same models (``app`` must be a ``KServeApp``); the block starts
    once it listens, and the address yielded has its ``host:port`` as ``.grpc``.
    ``grpc_max_message_size`` bounds one gRPC message (default: the app's ``max_body_size``).
    Raises ``RuntimeError`` when the gRPC server fails to start (the log says why).
    """
    try:
        import uvicorn
    except ImportError:
        raise ImportError("serving needs uvicorn: pip install 'batchkit[server]'") from None

    beside = None
    if grpc_port is not None:
        from ._grpc import GRPCBeside

        beside = app = GRPCBeside(
            app, host=host, port=grpc_port, max_message_size=grpc_max_message_size
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="batchkit-http", daemon=True
    )
    thread.start()
    try:
        address = ServingAddress(
            f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        )
        if beside is not None:
            beside.started.wait(stop_timeout)
            if beside.server is None:
                raise RuntimeError("the gRPC server did not start; the log says why")
            address.grpc = beside.server.address
        yield address
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
        sock.close()


def open_grpc_server(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_size: int | None = None,
    grace: float = 5.0,
    credentials: Any = None,
) -> AbstractAsyncContextManager[Any]:
    """Serve ``app``'s models over KServe v2 gRPC in the running asyncio loop for the block.

    Independent of the ASGI lifespan: ``async with open_grpc_server(app, port=0) as server``
    serves Triton's ``inference.GRPCInferenceService`` and ``grpc.health.v1`` on ``server.address``
    (``host:port``), over the same models and engines as the HTTP app ``app`` (a ``KServeApp``),
    whose engines run for the block unless its lifespan already runs them. ``max_message_size``
    bounds one request or response in bytes (default: ``app.max_body_size``); RPCs in flight
    get ``grace`` seconds on exit; ``credentials`` (``grpc.ssl_server_credentials(...)``) serves
    TLS instead of plaintext. Needs grpcio, grpcio-health-checking and tritonclient[grpc]
    (``pip install 'batchkit[server]'``); asyncio only (grpc.aio).

    Raises ``ConfigurationError`` for bad settings, ``RuntimeError`` outside asyncio,
    ``OSError`` when the address cannot be bound.
    """
    from ._grpc import open_grpc_server as _open

    return _open(
        app,
        host=host,
        port=port,
        max_message_size=max_message_size,
        grace=grace,
        credentials=credentials,
    )
