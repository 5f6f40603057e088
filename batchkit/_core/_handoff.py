"""The hand-off: callers in other threads and event loops reach an engine's loop through here.

Everything that touches the queue or the counters runs on the engine's loop thread (see
``_engine.py``). A caller elsewhere builds a ``ThreadRequest`` in its own thread, hands it to
the loop without waiting (``submit``), and blocks on the request's future (``wait``), or awaits
it from its own loop through a worker thread (``BatchedModel``). Its cancellation and every other
message to the loop go the same way (``call_soon``): asyncio's ``call_soon_threadsafe``, trio's
``run_sync_soon``, else anyio's ``from_thread``. Once the loop has ended, nothing is handed over
and the callers get ``ClosedError``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread

from ._errors import ClosedError, QueueFull
from ._requests import ThreadRequest

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ("Handoff",)

# Seconds past a thread request's deadline after which its waiter stops waiting for the engine.
_DEAD_LOOP_GRACE = 5.0


class Handoff:
    """The thread-safe entry points of one engine, for callers outside its loop's thread."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # Set on the loop's thread once the engine has stopped (``end``). A message handed over
        # before that reaches the loop while it still runs; none is handed over after.
        self._lock = threading.Lock()
        self._ended = False

    def end(self) -> None:
        """Hand nothing more to the loop; on its thread, once the engine has stopped. What was
        handed over already runs in the loop's next iterations: it finds the engine closed."""
        with self._lock:
            self._ended = True

    def new_request(
        self, item: Any, priority: float, timeout: float | None, wait: bool
    ) -> ThreadRequest:
        """Build a request in any thread; ``submit`` hands it to the loop."""
        cost = self._engine._cost(item)
        return ThreadRequest(
            concurrent.futures.Future(), timeout, wait, item, priority, 0, 0.0, None, cost
        )

    def submit(self, reqs: list[ThreadRequest], *, atomic: bool = False) -> None:
        """Hand ``reqs`` to the engine's loop from another thread, without waiting.

        With ``atomic``, all or nothing: when one is refused (closed, or no room), the ones
        queued before it are withdrawn (counted cancelled, as ``Engine.call_many`` does on its
        own loop) and every one of them gets that error; the rest are never submitted.
        """
        if not self.call_soon(self._submit_on_loop, reqs, atomic):
            for req in reqs:
                req.deliver_error(self._closed("is closed"))

    def _submit_on_loop(self, reqs: list[ThreadRequest], atomic: bool) -> None:
        engine = self._engine
        now = engine._clock()
        for n, req in enumerate(reqs):
            req.seq = next(engine._seq)
            req.enqueued_at = now
            if req.timeout is not None:
                req.deadline = now + req.timeout
            try:
                engine._submit(req, req.wait_for_room)
            except (ClosedError, QueueFull) as exc:
                req.finished = True
                req.deliver_error(exc)
                if atomic:
                    for queued in reqs[:n]:
                        engine.cancel(queued)
                    for other in [*reqs[:n], *reqs[n + 1 :]]:
                        other.finished = True
                        other.deliver_error(exc)
                    return

    def wait(self, req: ThreadRequest) -> Any:
        """Block the calling (non-loop) thread until ``req`` has its outcome."""
        try:
            if req.timeout is None:
                return req.future.result()
            try:
                # The engine's timer settles it at the deadline; waiting longer means the
                # engine's loop died under us (a BaseException from the model, say).
                return req.future.result(timeout=req.timeout + _DEAD_LOOP_GRACE)
            except concurrent.futures.TimeoutError:
                if req.future.done():  # DeadlineExceeded is a TimeoutError too: the real outcome
                    raise
                raise self._closed("stopped without answering") from None
        finally:
            if not req.future.done():
                self.cancel(req)

    def cancel(self, req: ThreadRequest) -> None:
        """Withdraw ``req`` from another thread (its caller stopped waiting)."""
        req.future.cancel()
        self.call_soon(self._engine.cancel, req)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine's loop from another thread and return its result."""
        try:
            return anyio.from_thread.run_sync(fn, *args, token=self._engine.token)
        except anyio.RunFinishedError:
            raise self._closed("is closed") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Have the engine's loop call ``fn(*args)`` soon, from any thread (one running an event
        loop of its own too), without waiting; return False if that loop has ended."""
        engine = self._engine
        loop = engine._loop
        if loop is not None:
            with self._lock:  # else it could land in a loop that never runs again
                if self._ended:
                    return False
                try:
                    loop.call_soon_threadsafe(fn, *args)
                except RuntimeError:  # the loop has stopped
                    return False
            return True
        token = engine.token
        assert token is not None
        run_sync_soon = getattr(token.native_token, "run_sync_soon", None)
        if run_sync_soon is not None:  # trio: a TrioToken
            try:
                run_sync_soon(fn, *args)
            except RuntimeError:  # trio.RunFinishedError
                return False
            return True
        try:
            self.run(fn, *args)
        except ClosedError:
            return False
        return True

    def _closed(self, what: str) -> ClosedError:
        return ClosedError(f"model {self._engine.settings.name!r} {what}")
