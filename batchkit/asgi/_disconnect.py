"""Waiting for a model's outcome while watching the client: a client that goes away withdraws
its request, and a server that shuts down fails the waits it cannot finish.

ASGI servers (uvicorn) do not cancel a handler whose client disconnected: they tell it through
``receive()``, which an app stops calling once it has the body. ``call_until_disconnect`` keeps
listening while the handler waits, and cancels the wait when ``http.disconnect`` arrives, so
the engine withdraws the queued item (never computed, counted as cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from ._http import Receive

__all__ = ("ClientDisconnected", "ShutdownAbort", "Waits", "call_until_disconnect")

T = TypeVar("T")


class ClientDisconnected(ConnectionError):
    """Raised by ``call_until_disconnect`` when the client went away before the outcome; the
    call was cancelled (a queued item withdrawn, never computed)."""


class ShutdownAbort(Exception):
    """Raised by a wait that ``Waits.abort()`` ended: the server's shutdown timeout passed."""


class Waits:
    """The waits in progress, so that a server ending its shutdown can fail them all at once
    (each with ``ShutdownAbort``) instead of dropping their connections."""

    def __init__(self) -> None:
        # What cancels each wait (a cancel scope, or on asyncio the call's task): aborted?
        self._scopes: dict[anyio.CancelScope, bool] = {}
        self._tasks: dict[asyncio.Task[Any], list[str]] = {}  # task: why it was cancelled
        self.aborted = False

    def abort(self) -> int:
        """Fail every wait in progress and those that start later; return how many."""
        self.aborted = True
        for scope in self._scopes:
            self._scopes[scope] = True
            scope.cancel()
        for task, reason in self._tasks.items():
            if not reason:
                reason.append("aborted")
                task.cancel()
        return len(self._scopes) + len(self._tasks)


async def call_until_disconnect(
    receive: Receive,
    fn: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    waits: Waits | None = None,
    **kwargs: Any,
) -> T:
    """Return ``await fn(*args, **kwargs)``, cancelled if the client disconnects meanwhile.

    ``receive`` is the request's ASGI receive callable (Starlette: ``request.receive``), called
    only after the body was read. Raises ``ClientDisconnected`` when the client went away first
    (the call was cancelled: a queued item is withdrawn and counted as cancelled); otherwise
    returns what the call returns or raises what it raises. ``waits``: used by ``KServeApp``.
    """
    if waits is not None and waits.aborted:
        raise ShutdownAbort
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return await _anyio_call(receive, fn, args, kwargs, waits)
    return await _asyncio_call(receive, fn, args, kwargs, waits)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _asyncio_call(
    receive: Receive,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    waits: Waits | None,
) -> T:
    # The hot path of every infer request: one plain task, where an anyio task group would
    # cost several times more. The watcher cancels this task; it cannot once the call has
    # returned (it is cancelled below with no await in between), and if the client leaves in
    # the very step the call completes, the outcome is dropped: nobody is left to read it.
    current = asyncio.current_task()
    assert current is not None
    reason: list[str] = []

    async def watch() -> None:
        await _until_disconnect(receive)
        if not reason:  # not aborted already
            reason.append("gone")
            current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    if waits is not None:
        waits._tasks[current] = reason
    try:
        return await fn(*args, **kwargs)
    except asyncio.CancelledError:
        if not reason or (hasattr(current, "uncancel") and current.uncancel() > 0):
            raise  # (also) cancelled from outside: not ours to turn into an error
        if reason[0] == "aborted":
            raise ShutdownAbort from None
        raise ClientDisconnected("the client disconnected before the outcome") from None
    finally:
        watcher.cancel()
        if waits is not None:
            waits._tasks.pop(current, None)


async def _anyio_call(
    receive: Receive,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    waits: Waits | None,
) -> T:
    gone = False
    outcome: list[Any] = []
    error: list[BaseException] = []

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal gone
        await _until_disconnect(receive)
        gone = True
        scope.cancel()

    async with anyio.create_task_group() as tg:
        if waits is not None:
            waits._scopes[tg.cancel_scope] = False
        try:
            tg.start_soon(watch, tg.cancel_scope)
            try:
                outcome.append(await fn(*args, **kwargs))
            except Exception as exc:  # raised below, outside the task group (no group)
                error.append(exc)
            tg.cancel_scope.cancel()
        finally:
            aborted = waits._scopes.pop(tg.cancel_scope, False) if waits is not None else False
    if error:
        raise error[0]
    if outcome:
        return outcome[0]  # type: ignore[no-any-return]
    if aborted:
        raise ShutdownAbort
    if gone:
        raise ClientDisconnected("the client disconnected before the outcome")
    raise AssertionError("unreachable: the wait ended without an outcome")  # pragma: no cover
