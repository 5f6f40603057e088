"""Serve models over HTTP from a notebook (or any code) on a background thread with uvicorn.

``serve()`` binds a socket (a free port by default), runs uvicorn on its own thread and event
loop, and returns once the app's lifespan has started, so the server answers at once. The
models' engines run in the server's loop, as under ``batchkit serve``. ``stop()`` (or leaving
the ``with`` block) shuts the server down gracefully and joins its thread.
"""

from __future__ import annotations

import socket
import sys
import threading
from types import TracebackType
from typing import Any

from ._core._errors import ConfigurationError
from ._core._model import BatchedModel

__all__ = ("BackgroundServer", "serve")


class BackgroundServer:
    """A uvicorn server running an ASGI app on a background thread; see ``serve()``."""

    def __init__(self, app: Any, *, host: str, port: int, log_level: str) -> None:
        try:
            import uvicorn
        except ImportError:
            raise ImportError("serve() needs uvicorn: pip install 'batchkit[server]'") from None
        self.app = app
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self._sock.bind((host, port))
            self._sock.listen(2048)
        except OSError as exc:
            self._sock.close()
            raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self._ready = threading.Event()
        ready = self._ready

        class _Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                try:
                    await super().startup(sockets)
                finally:
                    ready.set()

        config = uvicorn.Config(app, log_level=log_level, lifespan="auto")
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._run, name=f"batchkit-server-{self.port}", daemon=True
        )

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._ready.set()  # startup failed before it could say so

    def start(self) -> BackgroundServer:
        """Start serving; return once the server accepts requests."""
        self._thread.start()
        self._ready.wait()
        if not self._server.started:
            self._thread.join()
            self._sock.close()
            raise RuntimeError("the server failed to start (see the log above)")
        return self

    @property
    def address(self) -> str:
        """Return ``host:port``, as ``tritonclient`` clients take it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """Return the base URL, ``http://host:port``."""
        return f"http://{self.address}"

    @property
    def running(self) -> bool:
        """Return whether the server thread runs."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Shut down gracefully (requests in flight finish) and wait for the server thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join()
        self._sock.close()

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


def serve(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
) -> BackgroundServer:
    """Serve ``app`` over HTTP on a background thread and return the running server.

    ``app`` is any ASGI app (a ``batchkit.asgi.KServeApp``, your own), or what ``KServeApp``
    takes: a ``BatchedModel``, a ``ServedModel``, or a list of them (served with the KServe v2
    protocol that ``tritonclient`` speaks). ``port=0`` picks a free port: read it from
    ``server.port``, ``server.address`` (for tritonclient) or ``server.url``. Safe from a
    notebook cell: the server runs its own event loop on its own thread. Stop it with
    ``server.stop()`` or a ``with`` block.

    Raises ``ConfigurationError`` when the address cannot be bound, ``ImportError`` without
    uvicorn (``pip install 'batchkit[server]'``).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be an int in 0..65535, got {port!r}")
    if _is_models(app):
        from .asgi import KServeApp

        app = KServeApp(app)
    elif not callable(app):
        raise ConfigurationError(f"expected an ASGI app or models to serve, got {app!r}")
    return BackgroundServer(app, host=host, port=port, log_level=log_level).start()


def _is_models(obj: Any) -> bool:
    if isinstance(obj, BatchedModel):
        return True
    served = sys.modules.get("batchkit._asgi._served")  # loaded once a ServedModel exists
    if served is not None and isinstance(obj, served.ServedModel):
        return True
    return isinstance(obj, (list, tuple)) and bool(obj)
