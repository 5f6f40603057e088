"""Requests: one submitted item plus the way its caller is woken with the outcome.

One kind per way of waiting: an asyncio future (callers on an asyncio engine loop), the request
itself as an awaitable (calls with default settings there), an anyio event (callers on any other
engine loop, such as trio), a thread-safe future (sync callers in other threads, and async
callers on another loop than the engine's), and a lock (sync callers batching among themselves
in their own threads: ``SyncRequest``).

Each request gets its outcome exactly once: ``finished`` is set by whoever settles it first (the
runner, the deadline, the caller's cancellation or close) and later attempts are ignored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any

import anyio

from ._queue import NEW, QueueEntry
from ._slot import Versioned

__all__ = (
    "EventRequest",
    "FutureRequest",
    "PlainRequest",
    "Request",
    "SyncRequest",
    "ThreadRequest",
    "wake_all",
)


class Request(QueueEntry):
    """A queue entry that carries the item and delivers its outcome."""

    # ``ctx``: the submitter's request context (``_context``), set only while batches are
    # observed (never read unset: ``getattr`` with a default).
    __slots__ = ("ctx", "finished", "item", "timer", "version")

    def __init__(
        self,
        item: Any,
        priority: float,
        seq: int,
        enqueued_at: float,
        deadline: float | None,
        cost: float,
    ) -> None:
        super().__init__(priority, seq, enqueued_at, deadline, cost)
        self.item = item
        self.finished = False
        self.version: str | None = None  # of the model that produced the outcome
        # Cancelled once the request is settled: a loop timer or the cancel scope of a timer task.
        self.timer: asyncio.TimerHandle | anyio.CancelScope | None = None

    def deliver(self, value: Any) -> None:
        """Wake the caller with ``value``."""
        raise NotImplementedError

    def abandoned(self) -> bool:
        """Return whether the request is settled or its caller stopped waiting; any thread.

        The caller's side marks its future cancelled at once, before the engine's loop hears
        of it: a model thread starting a staged batch checks this to skip such callers.
        """
        return self.finished

    def versioned(self, value: Any) -> Versioned[Any]:
        """Pair ``value``, this request's output, with the version that produced it."""
        assert self.version is not None  # set with every output
        return Versioned(value, self.version)

    def deliver_error(self, exc: BaseException) -> None:
        """Wake the caller with ``exc`` to raise."""
        raise NotImplementedError


class FutureRequest(Request):
    """Woken through an asyncio future of the engine's loop."""

    __slots__ = ("future",)

    def __init__(
        self,
        future: asyncio.Future[Any],
        item: Any,
        priority: float,
        seq: int,
        enqueued_at: float,
        deadline: float | None,
        cost: float,
    ) -> None:
        # The hottest constructor in batchkit: set every slot here rather than up the chain.
        self.future = future
        self.item = item
        self.priority = priority
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.cost = cost
        self.state = NEW
        self.finished = False
        self.timer = None
        self.version = None

    def deliver(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def abandoned(self) -> bool:
        return self.finished or self.future.cancelled()

    def deliver_error(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


# PlainRequest outcome states.
_PENDING, _RESULT, _ERROR, _CANCELLED = 0, 1, 2, 3


class PlainRequest(Request):
    """A call with default settings on an asyncio engine; the request is its own awaitable.

    It speaks asyncio's future protocol (the ``_asyncio_future_blocking`` marker that
    ``asyncio.isfuture`` documents, ``add_done_callback``, ``result``, ``cancel``), so the
    caller's task awaits it directly: one object per call instead of a request and a future.
    The engine settles a whole batch of them and resumes their tasks from one loop callback
    (``wake_all``), where asyncio futures would cost a loop callback per caller. Touched only on
    the engine's loop thread, except ``abandoned()``.
    """

    __slots__ = (
        "_asyncio_future_blocking",
        "callback",
        "context",
        "error",
        "outcome",
        "value",
    )

    # Class attributes of each engine's own subclass: the loop (the name asyncio reads when
    # there is no get_loop()) and the engine (``Engine``), which a cancelled wait withdraws from.
    _loop: asyncio.AbstractEventLoop
    _engine: Any
    outcome: int  # _PENDING, _RESULT, _ERROR or _CANCELLED
    value: Any
    error: BaseException
    callback: Callable[..., Any] | None
    context: contextvars.Context
    _asyncio_future_blocking: bool

    # Never set for such calls: class constants instead of per-call slots (read-only here).
    deadline = None
    cost = 1.0
    timer = None
    version = None

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        # Only the caller's task awaits a request: one callback at most.
        if self.outcome:
            self._loop.call_soon(fn, self, context=context)
        else:
            self.callback, self.context = fn, context

    def remove_done_callback(self, fn: Any) -> int:
        if self.callback is not None and self.callback == fn:
            self.callback = None
            return 1
        return 0

    def done(self) -> bool:
        return self.outcome != _PENDING

    def cancelled(self) -> bool:
        return self.outcome == _CANCELLED

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the wait (the caller's task is being cancelled) and withdraw the item: queued,
        it is never run; if its batch runs, only this caller misses the output."""
        if self.outcome:
            return False
        self.outcome = _CANCELLED
        self.error = asyncio.CancelledError(msg)
        self._schedule()
        self._engine.cancel(self)
        return True

    def result(self) -> Any:
        if self.outcome == _RESULT:
            return self.value
        if self.outcome == _PENDING:
            raise asyncio.InvalidStateError("the result is not set yet")
        raise self.error

    def exception(self) -> BaseException | None:
        if self.outcome == _PENDING:
            raise asyncio.InvalidStateError("the result is not set yet")
        if self.outcome == _CANCELLED:
            raise self.error
        return self.error if self.outcome == _ERROR else None

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.outcome:
            self._asyncio_future_blocking = True
            yield self  # the task adds its wake-up callback, and resumes us through it
        if self.outcome == _RESULT:
            return self.value
        raise self.error

    __iter__ = __await__

    def _schedule(self) -> None:
        callback = self.callback
        if callback is not None:
            self.callback = None
            self._loop.call_soon(callback, self, context=self.context)

    def deliver(self, value: Any) -> None:
        if not self.outcome:
            self.outcome, self.value = _RESULT, value
            self._schedule()

    def deliver_error(self, exc: BaseException) -> None:
        if not self.outcome:
            self.outcome, self.error = _ERROR, exc
            self._schedule()

    def abandoned(self) -> bool:
        return self.finished or self.outcome == _CANCELLED


def wake_all(requests: Iterable[Any]) -> None:
    """Resume the tasks awaiting ``requests`` (``PlainRequest``), all from one loop callback.

    Only those given a value since their task awaited them still hold its callback: every
    other way of settling one (an error, the caller's cancellation) schedules the callback
    itself and clears it.
    """
    remaining = iter(requests)
    try:
        for req in remaining:
            callback = req.callback
            if callback is not None:  # settled: no other path calls it again
                req.context.run(callback, req)
    except BaseException:
        for req in remaining:  # the others still wake, each from its own callback
            req._schedule()
        raise


class EventRequest(Request):
    """Woken through an anyio event; the outcome is kept on the request."""

    __slots__ = ("error", "event", "value")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.event = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def deliver(self, value: Any) -> None:
        self.value = value
        self.event.set()

    def deliver_error(self, exc: BaseException) -> None:
        self.error = exc
        self.event.set()

    def outcome(self) -> Any:
        """Return the value, or raise the error, delivered to this request."""
        if self.error is not None:
            raise self.error
        return self.value


class ThreadRequest(Request):
    """Woken through a ``concurrent.futures.Future``, from any thread."""

    __slots__ = ("future", "timeout", "wait_for_room")

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        timeout: float | None,
        wait_for_room: bool,
        *args: Any,
    ) -> None:
        super().__init__(*args)
        self.future = future
        self.timeout = timeout
        self.wait_for_room = wait_for_room

    def deliver(self, value: Any) -> None:
        try:
            self.future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # the waiting side gave up (cancelled) first

    def abandoned(self) -> bool:
        return self.finished or self.future.cancelled()

    def deliver_error(self, exc: BaseException) -> None:
        try:
            self.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


class SyncRequest(Request):
    """A sync caller's item, the caller blocked in its own thread on a lock.

    While a caller's thread runs a batch itself (``Engine.run_inline``), sync callers arriving
    meanwhile wait beside it; when the batch ends, that thread hands the next batch of them to
    one of them to run (``lead``), so batches pass from thread to thread without the engine's
    loop. Handed over to the loop, it is settled there like any other request.

    The lock is held from the start: ``deliver``, ``deliver_error`` and ``wake_to_lead`` release
    it, ``wait`` takes it.
    """

    __slots__ = ("_lock", "error", "gave_up", "lead", "value")

    def __init__(self, item: Any, priority: float, seq: int, enqueued_at: float) -> None:
        super().__init__(item, priority, seq, enqueued_at, None, 1.0)
        self._lock = threading.Lock()
        self._lock.acquire()
        self.value: Any = None
        self.error: BaseException | None = None
        # The batch this caller's thread is to run, and on which installation (set by the
        # thread that hands it over, under the engine's claim lock).
        self.lead: tuple[list[SyncRequest], Any] | None = None
        self.gave_up = False  # the caller stopped waiting (interrupted)

    def deliver(self, value: Any) -> None:
        self.value = value
        self._lock.release()

    def deliver_error(self, exc: BaseException) -> None:
        self.error = exc
        self._lock.release()

    def wake_to_lead(self) -> None:
        """Wake the caller to run the batch in ``lead``."""
        self._lock.release()

    def wait(self) -> None:
        """Block until woken with an outcome or a batch to run."""
        self._lock.acquire()

    def abandoned(self) -> bool:
        return self.finished or self.gave_up

    def outcome(self) -> Any:
        """Return the value, or raise the error, delivered to this request."""
        if self.error is not None:
            raise self.error
        return self.value
