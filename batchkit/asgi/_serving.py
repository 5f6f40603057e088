"""Serve an ASGI app with uvicorn in a background thread of this process (needs uvicorn).

For ``batchkit bench --compare``, the examples and notebooks: a real HTTP server on a free
loopback port, started and stopped by its own handle.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ("serving",)


@contextmanager
def serving(app: Any, *, host: str = "127.0.0.1", stop_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on a free port of ``host`` while the block runs; yield ``host:port``.

    The socket listens before the server thread starts, so clients may connect at once (the
    kernel queues them until uvicorn has run the app's lifespan startup and accepts).
    """
    try:
        import uvicorn
    except ImportError:
        raise ImportError("serving needs uvicorn: pip install 'batchkit[server]'") from None

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
        yield f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
        sock.close()
