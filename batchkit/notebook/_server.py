"""Serve models over HTTP from a notebook: a handle that stays open across cells.

``batchkit.asgi.serving`` is a context manager, natural in a script but awkward in a notebook,
where the server starts in one cell and stops in a later one. ``serve()`` enters it and returns
a handle whose ``stop()`` leaves it: the same uvicorn server on a background thread, on a free
loopback port, listening before ``serve()`` returns.
"""

from __future__ import annotations

import contextlib
import sys
from types import TracebackType
from typing import Any

from .._core import BatchedModel, ConfigurationError

__all__ = ("BackgroundServer", "serve")


class BackgroundServer:
    """An ASGI app served by uvicorn on a background thread; see ``serve()``."""

    def __init__(self, app: Any, *, host: str, grpc_port: int | None = None) -> None:
        self.app = app
        self._stack = contextlib.ExitStack()
        from ..asgi import serving  # imports numpy: only once a server starts

        address = self._stack.enter_context(serving(app, host=host, grpc_port=grpc_port))
        self.address: str = str(address)
        """``host:port``, as ``tritonclient`` clients take it."""
        self.grpc_address: str | None = address.grpc
        """The gRPC server's ``host:port`` (for ``tritonclient.grpc``), or None without one."""
        self.host, _, port = self.address.rpartition(":")
        self.port = int(port)
        self._running = True

    @property
    def url(self) -> str:
        """Return the base URL, ``http://host:port``."""
        return f"http://{self.address}"

    @property
    def running(self) -> bool:
        """Return whether the server runs (until ``stop()``)."""
        return self._running

    def stop(self) -> None:
        """Shut down gracefully (requests in flight finish) and wait for the server thread."""
        self._running = False
        self._stack.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BackgroundServer {self.url} {state}>"


def serve(app: Any, *, host: str = "127.0.0.1", grpc_port: int | None = None) -> BackgroundServer:
    """Serve ``app`` over HTTP on a background thread and return the running server.

    ``app`` is any ASGI app (a ``batchkit.asgi.KServeApp``, your own), or what ``KServeApp``
    takes: a ``BatchedModel``, a ``ServedModel``, or a list of them (served with the KServe v2
    protocol that ``tritonclient`` speaks). The server listens on a free port of ``host``
    before this returns: read ``server.address`` (``host:port``, for tritonclient),
    ``server.url`` or ``server.port``. Safe from a notebook cell: uvicorn runs its own event
    loop on its own thread (``batchkit-http``). Stop it with ``server.stop()`` or a ``with``
    block. ``grpc_port`` (0: a free one) also serves KServe v2 gRPC in that loop, over the
    same models: read ``server.grpc_address``.

    Raises ``ConfigurationError`` for something that is neither an app nor models,
    ``ImportError`` without uvicorn (``pip install 'batchkit[server]'``).
    """
    if _is_models(app):
        from ..asgi import KServeApp

        app = KServeApp(app)
    elif not callable(app):
        raise ConfigurationError(f"expected an ASGI app or models to serve, got {app!r}")
    return BackgroundServer(app, host=host, grpc_port=grpc_port)


def _is_models(obj: Any) -> bool:
    if isinstance(obj, BatchedModel):
        return True
    served = sys.modules.get("batchkit.asgi._served")  # loaded once a ServedModel exists
    if served is not None and isinstance(obj, served.ServedModel):
        return True
    return isinstance(obj, (list, tuple)) and bool(obj)
