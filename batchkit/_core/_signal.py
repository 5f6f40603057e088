"""The engine's small loop tools: a signal its workers wait on, a no-op lock, the loop's clock."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ("NO_LOCK", "AsyncioSignal", "NoLock", "Signal", "clock_of")


class Signal:
    """Wake every task waiting on it; waits may carry a deadline on the loop clock."""

    __slots__ = ("_count", "_event", "waiting")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._count = 0
        self.waiting = False  # whether a task waits: checked on every submit, so no property

    def set(self) -> None:
        if self._count:
            self._event.set()
            self._event = anyio.Event()

    async def wait(self, until: float = math.inf) -> None:
        event = self._event
        self._count += 1
        self.waiting = True
        try:
            with anyio.CancelScope(deadline=until):
                await event.wait()
        finally:
            self._count -= 1
            self.waiting = self._count > 0


class AsyncioSignal(Signal):
    """The same on asyncio, with bare futures and timer handles (no cancel scopes)."""

    __slots__ = ("_futures", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._futures: list[asyncio.Future[None]] = []
        self.waiting = False

    def set(self) -> None:
        futures, self._futures = self._futures, []
        self.waiting = False
        for future in futures:
            if not future.done():
                future.set_result(None)

    async def wait(self, until: float = math.inf) -> None:
        future = self._loop.create_future()
        self._futures.append(future)
        self.waiting = True
        timer = None if until == math.inf else self._loop.call_at(until, _wake, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()


class NoLock:
    """A lock for an engine only its loop's thread touches (no lane hands work to threads)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NO_LOCK: Any = NoLock()


def clock_of(loop: asyncio.AbstractEventLoop | None) -> Callable[[], float]:
    """Return the loop's clock, skipping a Python frame when it is plain ``time.monotonic``."""
    if loop is None:
        return anyio.current_time
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
