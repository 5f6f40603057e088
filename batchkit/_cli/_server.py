"""The uvicorn server of ``batchkit serve``, with the lifecycle a load balancer needs.

On SIGTERM: readiness turns 503 at once (``KServeApp.start_draining``) while the server keeps
accepting and serving for ``drain_delay`` seconds, so load balancers see the replica leave;
then uvicorn stops accepting and waits for the requests in flight. ``shutdown_timeout``
seconds later, the requests still waiting for a model get 503 (``KServeApp.abort_waits``)
rather than a dropped connection. The process exits 0. A second SIGTERM, or SIGINT (Ctrl-C),
skips what is left of the drain delay.

Imports uvicorn: imported by ``_serve.run`` only.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from .._version import __version__

__all__ = ("Server",)

log = logging.getLogger("batchkit").getChild("serve")  # a logger, not a module

# uvicorn's own backstop after the shutdown timeout: requests still in flight are cancelled
# (the app has answered those waiting for a model already).
_BACKSTOP = 1.0


class Server(uvicorn.Server):
    """A uvicorn server that drains on SIGTERM and bounds its shutdown (see the module)."""

    def __init__(
        self, config: uvicorn.Config, app: Any, *, drain_delay: float, shutdown_timeout: float
    ) -> None:
        config.timeout_graceful_shutdown = int(shutdown_timeout + _BACKSTOP + 0.999)
        super().__init__(config)
        self.kserve = app if hasattr(app, "start_draining") else None
        self.drain_delay = drain_delay
        self.shutdown_timeout = shutdown_timeout
        self._drain_until: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (on_tick logs). The signal is not re-raised after
        # the shutdown (uvicorn would): a drained server exits 0.
        if sig == signal.SIGTERM and self._drain_until is None and not self.should_exit:
            self._drain_until = time.monotonic() + self.drain_delay
            if self.kserve is not None:
                self.kserve.start_draining()
            return
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None:
            if not self._drain_logged:
                self._drain_logged = True
                log.info(
                    "SIGTERM: draining for %gs (ready answers 503, requests are still served), "
                    "then shutting down within %gs",
                    self.drain_delay,
                    self.shutdown_timeout,
                )
            if time.monotonic() >= self._drain_until:
                self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        addresses = _addresses(self.servers)
        models = getattr(self.kserve, "models", [])
        log.info(
            "batchkit %s serving %s on %s",
            __version__,
            ", ".join(f"{s.name!r} (version {s.version})" for s in models) or "an ASGI app",
            ", ".join(addresses),
            extra={
                "models": [{"name": s.name, "version": s.version} for s in models],
                "addresses": addresses,
            },
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.shutdown_timeout, self._abort)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
        log.info("shutdown complete")

    def _abort(self) -> None:
        if self.kserve is None:
            return
        n = self.kserve.abort_waits()
        if n:
            log.warning(
                "the shutdown timeout (%gs) passed: %d requests still waiting for a model get 503",
                self.shutdown_timeout,
                n,
            )


def _addresses(servers: Sequence[Any]) -> list[str]:
    found = []
    for server in servers:
        for sock in getattr(server, "sockets", None) or ():
            name = sock.getsockname()
            if isinstance(name, tuple):
                host = f"[{name[0]}]" if ":" in name[0] else name[0]
                found.append(f"http://{host}:{name[1]}")
            else:
                found.append(f"unix:{name}")
    return found
