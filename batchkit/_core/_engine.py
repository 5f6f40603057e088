"""The runner: the only code that awaits. It feeds batches from the queue to the model.

An engine lives in one event loop (asyncio or trio), entered with ``async with``. Within that
loop callers submit directly; other threads and loops hand their requests over thread-safely.
Everything that touches the queue or the counters runs on the engine's loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import math
import operator
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup

from ._config import Settings
from ._errors import (
    BatchSizeMismatch,
    ClosedError,
    ConfigurationError,
    ModelError,
    QueueFull,
)
from ._info import BatchInfo, batch_info
from ._ledger import Ledger
from ._plan import plan_for
from ._queue import NEW, QUEUED, BatchQueue
from ._requests import (
    EventRequest,
    FutureRequest,
    PlainRequest,
    Request,
    SyncRequest,
    ThreadRequest,
)
from ._slot import Installed, ModelSlot
from ._stats import Recorder, Statistics

__all__ = ("Engine", "run_sync_batch", "split_outputs")

# Seconds past a thread request's deadline after which its waiter stops waiting for the engine.
_DEAD_LOOP_GRACE = 5.0

# A started batch: its requests, the model's pending result, when it started, and the model
# installation it runs on (the whole batch runs on that one).
_Running = tuple["_Batch", Awaitable[Sequence[Any]], float, Installed]

# The order of waiting sync callers: priority, then arrival.
_arrival = operator.attrgetter("priority", "seq")


class _Signal:
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


class _AsyncioSignal(_Signal):
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


class _NoLock:
    """A lock for an engine only its loop's thread touches (no lane hands work to threads)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK: Any = _NoLock()


def _clock_of(loop: asyncio.AbstractEventLoop | None) -> Callable[[], float]:
    """Return the loop's clock, skipping a Python frame when it is plain ``time.monotonic``."""
    if loop is None:
        return anyio.current_time
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


class _Batch(list[Any]):
    """A batch of requests, with what happened to it outside the loop's thread.

    ``ran``: which requests the model ran (None: all); the model skips callers who left before
    it started (cancelled, expired), and ``_complete`` settles them as cancelled if the loop
    has not heard of it yet. ``begun``: a model thread took the staged batch up (under
    ``_claim``); ``closed``: closing failed its callers before that, so the thread runs none.
    """

    __slots__ = ("after", "begun", "closed", "ended", "ran")

    def __init__(self, requests: Iterable[Any] = ()) -> None:
        super().__init__(requests)
        self.ran: list[bool] | None = None
        self.begun = False
        self.closed = False
        # With several model threads, a staged batch waits in its thread for the batch before
        # it (`after`, that batch's `ended`): else it could start in an idle thread at once.
        self.after: threading.Event | None = None
        self.ended: threading.Event | None = None


# Builds a request without running ``__init__``: ``submit_plain`` sets every slot itself.
_new_request = object.__new__


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Engine:
    """Run one model's batches in the current event loop while entered."""

    def __init__(
        self,
        settings: Settings,
        slot: ModelSlot,
        recorder: Recorder,
    ) -> None:
        self.settings = settings
        self._slot = slot
        self._queue: BatchQueue[Request] = BatchQueue(
            max_batch_size=settings.max_batch_size,
            max_queue_size=settings.max_queue_size,
            max_wait=settings.max_wait,
            max_batch_cost=settings.max_batch_cost,
            adaptive_wait=settings.adaptive_wait,
        )
        self._rec = recorder
        self._ledger = Ledger(settings.name, recorder)
        # The queue's priority levels, for the one step of `submit_plain` that inlines it.
        self._levels = self._queue._levels
        self._seq = itertools.count()
        self._in_flight = 0
        self._closing = False
        # The engine loop's thread while calls with default settings may take `submit_plain`
        # (see __aenter__), else -1: a caller compares it with its own thread's id.
        self.plain_thread = -1
        self._plain_request: type[PlainRequest] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self.thread_id = -1
        self._tg: TaskGroup | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._abandoned = False  # a batch was left running when the host cancelled the engine
        self.in_model = threading.local()  # `active` while this thread runs the sync model
        self._limiter: anyio.CapacityLimiter | None = None
        # While the slot is held (an in-place swap), no batch starts; the idle futures resolve
        # once every worker is parked, that is when no batch runs.
        self._parked = 0
        self._idle_waiters: list[concurrent.futures.Future[None]] = []
        # Workers whose batch runs in a model thread, waiting for a batch to stage.
        self._stage_waiters: list[asyncio.Future[None]] = []
        # Batches handed to a model thread while the batch before them still runs there, and
        # the one of them that callers arriving meanwhile still join (until the thread takes
        # it up or it is full; `_claim` guards that hand-off).
        self._staged: list[_Batch] = []
        self._open: _Batch | None = None
        self._open_installed: Installed | None = None  # the installation the open batch runs on
        self._staging = False  # there may be stage waiters or an open staged batch
        self._fill_ok = False
        # A sync caller may run its item itself while the engine is idle (`run_inline`), and
        # sync callers arriving meanwhile wait beside it (`_side`) for the batches it hands on.
        # The lock makes "idle? then claim" atomic against the loop's "inline run? else take a
        # batch"; the inline batches' statistics wait in the ledger for the loop to record.
        self._claim = threading.Lock()
        self._inline_ok = False
        self._side_ok = False
        self._inline_busy = False  # callers' threads run the batches; the loop takes none
        self._inline_running = 0  # items in the batch a caller's thread runs now
        self._side: list[SyncRequest] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._signal = _AsyncioSignal(self._loop) if self._loop else _Signal()
        settings = self.settings
        self.plan = plan = plan_for(settings, self._loop)
        if self._loop is not None:
            # The engine's own kind of request: its loop and engine are class attributes.
            self._plain_request = type(
                "PlainRequest",
                (PlainRequest,),
                {"__slots__": (), "_loop": self._loop, "_engine": self},
            )
        self._ledger.plain_request = self._plain_request
        self._ledger.call_soon = None if self._loop is None else self._loop.call_soon
        self._inline_ok = plan.inline
        self._side_ok = plan.side
        if not plan.locks:  # only the loop's thread touches the batches: the general path
            self._claim = _NO_LOCK
        # A staged batch may keep filling only under greedy dispatch without a cost budget;
        # otherwise only a full batch is staged.
        self._fill_ok = settings.max_wait <= 0 and settings.max_batch_cost is None
        self._clock = _clock_of(self._loop)
        self._token = anyio.lowlevel.current_token()
        self.thread_id = threading.get_ident()
        self.plain_thread = self.thread_id if plan.plain else -1
        self._closing_event = anyio.Event()
        self._limiter = anyio.CapacityLimiter(self.settings.max_concurrency)
        # A sync model on asyncio runs in the engine's own threads: handing a batch over is one
        # queue put, with no checkpoints, so the next batch starts while results go out.
        self._executor = None
        self._own_threads = self._loop is not None
        self._workers = self.settings.max_concurrency
        self._prefetch = self._own_threads and plan.staging
        self._stopped = anyio.Event()
        self._rec.count_queue(self._queue)  # it counts the items submitted to it
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for _ in range(self._workers):
            self._tg.start_soon(self._worker)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closing:  # else an earlier close() chose whether to drain
            self.begin_close(drain=False)
        assert self._tg is not None
        # The workers never raise, and the body's own exception is not theirs: wait for them as
        # if the body ended normally, so that exception propagates as it is (not in a group).
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            with self._claim:  # the last inline batches ended; the loop may not have heard
                self._ledger.merge()
                self._rec.retire_queue()
            self._own_threads = self._prefetch = False
            if self._executor is not None:
                # Normally every batch has ended and this returns at once; after the host was
                # cancelled mid-batch, do not block the loop on a model still running.
                self._executor.shutdown(wait=not self._abandoned)

    def begin_close(self, drain: bool) -> None:
        """Stop accepting items; fail the queued ones unless ``drain``. Call on the loop thread."""
        self.plain_thread = -1
        if not self._closing:
            self._closing = True
            self._closing_event.set()
        if not drain:
            # A staged batch has not begun: its callers are failed like queued ones, and the
            # model thread skips them. So are sync callers waiting beside an inline batch.
            with self._claim:  # statistics() counts `_side` as submitted: move them at once
                self._open = None
                side, self._side = self._side, []
                self._rec.submitted += len(side)
                # A staged batch no model thread has taken up has not begun: fail its callers
                # (the thread will run none). One taken up runs: its outputs are delivered.
                closed = [batch for batch in self._staged if not batch.begun]
                for batch in closed:
                    batch.closed = True
            staged = [req for batch in closed for req in batch]
            for req in [*staged, *side, *self._queue.remove_all()]:
                self._fail(req, ClosedError(f"model {self.settings.name!r} was closed"))
        self._signal.set()

    def begin_close_soon(self, drain: bool) -> None:
        """Have the engine's asyncio loop call ``begin_close(drain)``; from any other thread,
        without waiting. Nothing happens if the loop has ended (the engine is closed)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self.begin_close, drain)
        except RuntimeError:
            pass

    async def wait_stopped(self) -> None:
        """Return once closing finished: every worker has returned."""
        await self._stopped.wait()

    async def wait_closing(self) -> None:
        """Return once ``begin_close`` was called."""
        await self._closing_event.wait()

    @property
    def token(self) -> anyio.lowlevel.EventLoopToken | None:
        """Return the token of the engine's loop (for ``anyio.from_thread``)."""
        return self._token

    def when_idle(self) -> concurrent.futures.Future[None]:
        """Return a future that resolves once no batch runs (while the slot is held, that
        lasts). Call on the loop thread."""
        idle: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._idle_waiters.append(idle)
        self._check_idle()
        return idle

    def wake(self) -> None:
        """Let the workers look at the queue again (the slot was released). On the loop thread."""
        self._signal.set()

    def _check_idle(self) -> None:
        with self._claim:
            inline = self._inline_busy
        if self._idle_waiters and self._parked >= self._workers and not inline:
            waiters, self._idle_waiters = self._idle_waiters, []
            for idle in waiters:
                if not idle.done():
                    idle.set_result(None)

    def in_current_loop(self) -> bool:
        """Return whether the calling code runs in this engine's event loop."""
        if self._loop is not None:
            try:
                return asyncio.get_running_loop() is self._loop
            except RuntimeError:
                return False
        try:
            return anyio.lowlevel.current_token() == self._token
        except Exception:
            return False

    # -- submitting ----------------------------------------------------------------------------

    def submit(self, item: Any, priority: float, deadline: float | None, wait: bool) -> Request:
        """Queue ``item`` for a caller on the engine's loop and return its request.

        The caller awaits ``outcome(request)`` (or, on asyncio, ``request.future`` and then
        ``cancel(request)`` if it stopped waiting first). Raises ``ClosedError`` when closing,
        ``QueueFull`` when full and not ``wait``.
        """
        cost = 1.0 if self.settings.size_fn is None else self._cost(item)
        req: Request
        if self._loop is not None:
            future: asyncio.Future[Any] = asyncio.Future(loop=self._loop)
            req = FutureRequest(
                future, item, priority, next(self._seq), self._clock(), deadline, cost
            )
        else:
            req = EventRequest(item, priority, next(self._seq), self._clock(), deadline, cost)
        self._submit(req, wait)
        return req

    def submit_plain(self, item: Any, priority: int) -> PlainRequest:
        """Queue ``item`` without deadline for a caller on the engine's asyncio loop; only while
        ``plain_thread`` is that loop's thread (no default timeout, size function, bounded queue
        or wait window, asyncio, not closing), else the caller takes ``submit``.

        The per-item path of calls with default settings: what ``submit`` does in that case,
        without its checks, and with a request that is its own awaitable (``PlainRequest``,
        of the engine's own subclass, which knows the engine and its loop).
        """
        req = _new_request(self._plain_request)  # type: ignore[arg-type]  # set while plain
        req.item = item
        req.priority = priority
        req.seq = next(self._seq)
        req.enqueued_at = self._clock()
        req.finished = False
        req.outcome = 0
        req.callback = None
        # `self._queue.enqueue(req)`, inlined for a priority that has queued items already:
        # the queue's `_append` without its frame. `_entered` counts it submitted.
        queue = self._queue
        queue._entered += 1
        level = self._levels.get(priority)
        if level is None:
            queue.enqueue(req)
        else:
            req.state = QUEUED
            level.append(req)
            queue._queued += 1
        # `_wake_for_items`, inlined:
        if self._signal.waiting:
            self._signal.set()
        if self._staging:
            self._feed_staging()
        return req

    def _cost(self, item: Any) -> float:
        size_fn = self.settings.size_fn
        if size_fn is None:
            return 1.0
        cost = size_fn(item)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
            raise ConfigurationError(f"size_fn must return a number >= 0, got {cost!r}")
        return float(cost)

    def _submit(self, req: Request, wait: bool) -> None:
        if self._closing:
            raise ClosedError(f"model {self.settings.name!r} is closed")
        try:
            self._queue.push(req, wait=wait)
        except QueueFull as exc:
            self._rec.rejected += 1
            exc.retry_after = self._retry_after()
            raise
        deadline = req.deadline
        if deadline is not None:
            if self._loop is not None:
                req.timer = self._loop.call_at(deadline, self.expire, req)
            elif isinstance(req, ThreadRequest):
                assert self._tg is not None
                self._tg.start_soon(self._expire_at_deadline, req)
        self._wake_for_items()

    def _wake_for_items(self) -> None:
        """Tell whoever waits for queued items: idle workers, stagers, the open staged batch.

        ``submit_plain`` inlines these lines (the per-item path of default calls).
        """
        if self._signal.waiting:
            self._signal.set()
        if self._staging:
            self._feed_staging()

    def _feed_staging(self) -> None:
        """Wake the workers waiting to stage a batch, and top up the open staged batch."""
        if self._stage_waiters:
            self._wake_stagers()
        if self._open is not None:
            self._fill_open()
        if not self._stage_waiters and self._open is None:  # until a worker stages again
            self._staging = False

    def _stageable(self) -> bool:
        queue = self._queue
        return queue.has_full_batch() or (self._fill_ok and len(queue) > 0)

    def _fill_open(self) -> None:
        """Move queued items into the staged batch still open, up to a full batch."""
        batch = self._open
        limit = self.settings.max_batch_size
        with self._claim:
            if batch is None or self._open is not batch:  # the model thread took it up
                return
            if self._slot.current is not self._open_installed:
                # A swap or rollback has returned: callers from now on run on the new model.
                self._open = None
                return
            taken, expired = self._queue.take(self._clock(), limit - len(batch))
            batch.extend(taken)
            if len(batch) >= limit:
                self._open = None
        for req in expired:
            self.expire(req)

    def _wake_stagers(self) -> None:
        if self._stageable():
            waiters, self._stage_waiters = self._stage_waiters, []
            for waiter in waiters:
                _wake(waiter)

    async def _expire_at_deadline(self, req: Request) -> None:
        # The timer of a thread request on a loop without timer handles (trio).
        with anyio.CancelScope() as scope:
            req.timer = scope
            if not req.finished:
                assert req.deadline is not None
                await anyio.sleep_until(req.deadline)
                self.expire(req)

    async def outcome(self, req: Request) -> Any:
        """Wait for the outcome of ``req``, submitted on this loop; withdraw it if cancelled."""
        try:
            if isinstance(req, FutureRequest):
                return await req.future
            assert isinstance(req, EventRequest)
            if req.deadline is None:
                await req.event.wait()
            else:
                with anyio.CancelScope(deadline=req.deadline):
                    await req.event.wait()
                if not req.finished:
                    self.expire(req)
            return req.outcome()
        finally:
            if not req.finished:
                self.cancel(req)

    async def call_many(
        self,
        items: Sequence[Any],
        priority: float,
        deadline: float | None,
        wait: bool,
        return_exceptions: bool,
        versioned: bool = False,
    ) -> list[Any]:
        """Submit all ``items`` at once and return their results (``Versioned``) in order.

        With ``return_exceptions``, an item the full queue refuses (``QueueFull``, not
        ``wait``) gets the error in its place, as from any other loop; without it, the error
        is raised and the items queued so far are withdrawn. So are the items not yet answered
        when the caller is cancelled or one fails.
        """
        reqs: list[Request | QueueFull] = []
        try:
            for item in items:
                try:
                    reqs.append(self.submit(item, priority, deadline, wait))
                except QueueFull as exc:
                    if not return_exceptions:
                        raise
                    reqs.append(exc)
            results: list[Any] = []
            for req in reqs:
                if isinstance(req, QueueFull):
                    results.append(req)
                    continue
                try:
                    value = await self.outcome(req)
                    results.append(req.versioned(value) if versioned else value)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
            return results
        finally:
            for req in reqs:
                if isinstance(req, Request) and not req.finished:
                    self.cancel(req)
            for req in reqs:  # an error nobody awaited: asyncio must not log it as lost
                future = req.future if isinstance(req, FutureRequest) else None
                if future is not None and future.done() and not future.cancelled():
                    future.exception()

    # -- from other threads --------------------------------------------------------------------

    def new_thread_request(
        self, item: Any, priority: float, timeout: float | None, wait: bool
    ) -> ThreadRequest:
        """Build a request in any thread; ``submit_threadsafe`` hands it to the loop."""
        cost = self._cost(item)
        return ThreadRequest(
            concurrent.futures.Future(), timeout, wait, item, priority, 0, 0.0, None, cost
        )

    def submit_threadsafe(self, reqs: list[ThreadRequest]) -> None:
        """Hand ``reqs`` to the engine's loop from another thread, without waiting."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._submit_external, reqs)
            except RuntimeError:  # the loop has stopped
                self._reject_closed(reqs)
        else:
            self.run_in_loop(self._submit_external, reqs)

    def _reject_closed(self, reqs: list[ThreadRequest]) -> None:
        for req in reqs:
            req.deliver_error(ClosedError(f"model {self.settings.name!r} is closed"))

    def _submit_external(self, reqs: list[ThreadRequest]) -> None:
        now = self._clock()
        for req in reqs:
            req.seq = next(self._seq)
            req.enqueued_at = now
            if req.timeout is not None:
                req.deadline = now + req.timeout
            try:
                self._submit(req, req.wait_for_room)
            except (ClosedError, QueueFull) as exc:
                req.finished = True
                req.deliver_error(exc)

    def run_in_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine's loop from another thread and return its result."""
        try:
            return anyio.from_thread.run_sync(fn, *args, token=self._token)
        except anyio.RunFinishedError:
            raise ClosedError(f"model {self.settings.name!r} is closed") from None

    def wait_threadsafe(self, req: ThreadRequest) -> Any:
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
                raise ClosedError(
                    f"model {self.settings.name!r} stopped without answering"
                ) from None
        finally:
            if not req.future.done():
                self.cancel_threadsafe(req)

    def cancel_threadsafe(self, req: ThreadRequest) -> None:
        """Withdraw ``req`` from another thread (its caller stopped waiting)."""
        req.future.cancel()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.cancel, req)
            except RuntimeError:
                pass
        else:
            try:
                self.run_in_loop(self.cancel, req)
            except ClosedError:
                pass

    # -- settling ------------------------------------------------------------------------------

    def cancel(self, req: Request) -> None:
        """Settle ``req`` as cancelled: its caller stopped waiting. Queued, it is never run."""
        if self._ledger.cancel(req):
            self._queue.remove(req)

    def expire(self, req: Request) -> None:
        """Fail ``req`` with DeadlineExceeded if it has no outcome yet."""
        if self._ledger.expire(req):
            self._queue.remove(req)

    def _fail(self, req: Request, exc: BaseException) -> None:
        self._ledger.fail(req, exc)

    # -- running batches -----------------------------------------------------------------------

    async def _worker(self) -> None:
        try:
            await self._work()
        finally:
            self._workers -= 1
            if not self._workers:
                self._stopped.set()
            self._check_idle()

    async def _work(self) -> None:
        running = None
        while True:
            if running is None:
                batch = await self._next_batch()
                if batch is None:
                    return
                running = self._start(batch)
            running = await self._complete(running, prefetch=self._prefetch)

    async def _next_batch(self) -> _Batch | None:
        """Wait until the policy releases a batch and take it; None once closed and empty."""
        self._parked += 1
        try:
            if self._idle_waiters:
                self._check_idle()
            return await self._wait_for_batch()
        finally:
            self._parked -= 1

    async def _wait_for_batch(self) -> _Batch | None:
        queue = self._queue
        while True:
            if self._slot.held or self._inline_busy:
                await self._signal.wait()
                continue
            now = self._clock()
            when = queue.next_dispatch_time(now)
            if when is None:
                if self._closing:
                    return None
                await self._signal.wait()
            elif when > now and not self._closing:
                await self._signal.wait(when)
            else:
                batch = self._take(now)
                if batch:
                    return batch

    def _take(self, now: float) -> _Batch:
        """Take the next batch and count it in flight; none while a caller runs inline."""
        with self._claim:
            if self._inline_busy:
                return _Batch()
            if self._ledger.records:
                self._ledger.merge()
            taken, expired = self._queue.take(now)
            if taken:
                self._in_flight += 1
        for req in expired:
            self.expire(req)
        return _Batch(taken)

    def _start(
        self, batch: _Batch, installed: Installed | None = None, *, staged: bool = False
    ) -> _Running:
        """Start the model on ``batch``: in the engine's thread pool, or as a coroutine.

        The batch runs on ``installed``, by default the one in the slot now. The caller counted
        it in ``_in_flight``; ``_complete`` uncounts it. A ``staged`` batch (in a model thread)
        closes ``_open`` when the thread takes it up. The callers who left before the model
        starts are not run (``_Batch.ran``).
        """
        if installed is None:
            installed = self._slot.current
        started = self._clock()
        job: Awaitable[Sequence[Any]] | None = None
        if self._own_threads and not installed.is_async:
            assert self._loop is not None
            run = self._invoke_staged if staged else self._invoke_live
            if self.settings.max_concurrency > 1 and self._prefetch:
                batch.ended = threading.Event()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.settings.max_concurrency,
                    thread_name_prefix=f"batchkit-{self.settings.name}-model",
                )
            try:
                job = self._loop.run_in_executor(self._executor, run, batch, installed, started)
            except RuntimeError:  # the pool refuses work (interpreter shutdown): use anyio's
                self._own_threads = self._prefetch = False
        if job is None:
            job = self._invoke(batch, installed, started)
        return batch, job, started, installed

    def _start_ready(self) -> _Running | None:
        """Start the next batch now if the policy releases one now."""
        now = self._clock()
        when = self._queue.next_dispatch_time(now)
        if when is None or when > now or self._slot.held:
            return None
        batch = self._take(now)
        return self._start(batch) if batch else None

    async def _complete(self, running: _Running, *, prefetch: bool) -> _Running | None:
        """Await a started batch and settle its callers; return the next batch if started.

        With ``prefetch``, the next batch is started before this one's callers are woken, so a
        model in a worker thread computes while the loop hands out results.
        """
        batch, job, start, installed = running
        # Only a model in the engine's threads computes while the loop works.
        threaded = prefetch and not installed.is_async
        ahead = None
        try:
            if threaded:
                ahead = await self._stage_next(job, batch)  # type: ignore[arg-type]
            outputs = await job
        except Exception as exc:
            live = self._ran(batch)  # now: callers may join a staged batch until it is taken up
            n = len(live)
            end = self._clock()
            if n:
                self._ledger.record_batch(n, start, end)
            # Output errors (wrong count, no length) are the model's bug, not a poison item's.
            if self.settings.isolate_failures and n > 1 and not isinstance(exc, ModelError):
                if ahead is not None:  # a batch runs on one installation: finish that one first
                    ahead = await self._complete(self._begun(ahead, end), prefetch=False)
                await self._retry_halves(live, installed)  # uncounts this batch at its end
                return ahead
            self._in_flight -= 1
            for req in live:
                self._fail(req, self._batch_error(exc, n, installed.version))
            return None if ahead is None else self._begun(ahead, end)
        except BaseException:
            # The host cancelled the engine mid-batch: nobody else will settle these callers.
            self._in_flight -= 1
            self._abandoned = True
            self._fail_all(batch)
            if ahead is not None:
                with self._claim:
                    if self._open is ahead[0]:
                        self._open = None
                self._staged.remove(ahead[0])
                self._fail_all(ahead[0])
            raise
        self._in_flight -= 1
        live = self._ran(batch)
        n = len(live)
        end = self._clock()
        if n:
            self._ledger.record_batch(n, start, end)
        if ahead is not None:
            ahead = self._begun(ahead, end)
        elif threaded:
            ahead = self._start_ready()
        if live:
            self._ledger.deliver_batch(live, outputs, start, end, installed.version)
        return ahead

    def _ran(self, batch: _Batch) -> list[Request]:
        """Return the requests of ``batch`` the model ran; settle the others as cancelled."""
        ran = batch.ran
        if ran is None:
            return batch
        for req, kept in zip(batch, ran, strict=True):
            if not kept:
                self.cancel(req)
        return [req for req, kept in zip(batch, ran, strict=True) if kept]

    def _begun(self, staged: _Running, at: float) -> _Running:
        """Return a staged batch as begun at ``at``, when the batch before it ended."""
        batch, job, start, installed = staged
        self._staged.remove(batch)
        return batch, job, max(start, at), installed

    async def _stage_next(
        self, job: asyncio.Future[Sequence[Any]], running: _Batch
    ) -> _Running | None:
        """While ``job`` runs in a model thread, hand it the next batch as soon as there is one.

        The thread takes the staged batch up the moment ``job`` ends, with no round trip through
        the loop in between. Under greedy dispatch without a cost budget, a staged batch that is
        not full stays open: callers who arrive before the thread takes it up join it, so it
        holds what greedy dispatch would have taken when ``job`` ended (in arrival order, not
        priority order). Otherwise only a full batch is staged. Callers who leave a staged batch
        are skipped (``_invoke_live``). Return the staged batch, or None if ``job`` ended first.
        """
        assert self._loop is not None
        while not job.done():
            installed = self._slot.current
            if installed.is_async:  # swapped for an async model: it runs on the loop, unstaged
                return None
            if self._stageable() and not self._slot.held:
                batch = self._take(self._clock())
                if batch:
                    self._staged.append(batch)
                    if self._fill_ok and installed.with_info is None:
                        with self._claim:  # before the thread can see the batch
                            full = len(batch) >= self.settings.max_batch_size
                            self._open = None if full else batch
                            self._open_installed = installed
                        self._staging = True  # submitting callers top it up
                    batch.after = running.ended
                    return self._start(batch, installed, staged=True)
            waiter = self._loop.create_future()
            self._stage_waiters.append(waiter)
            self._staging = True  # submitting callers wake it

            def wake(_: object, waiter: asyncio.Future[None] = waiter) -> None:
                _wake(waiter)

            job.add_done_callback(wake)
            try:
                await waiter
            finally:
                job.remove_done_callback(wake)
                if waiter in self._stage_waiters:
                    self._stage_waiters.remove(waiter)
        return None

    async def _retry_halves(self, batch: list[Request], installed: Installed) -> None:
        """Run the halves of the failed ``batch`` one after the other, then uncount ``batch``.

        ``batch`` stays counted in flight meanwhile, so no caller runs inline in between.
        """
        half = len(batch) // 2
        try:
            for part in (batch[:half], batch[half:]):
                # Callers that gave up (cancelled, expired) meanwhile are not run again.
                live = _Batch(req for req in part if not req.finished)
                if live:
                    # On the installation that failed: a batch runs on one version.
                    self._in_flight += 1
                    await self._complete(self._start(live, installed), prefetch=False)
        except BaseException:  # cancelled mid-retry: settle the half not yet run
            self._fail_all(batch)
            raise
        finally:
            self._in_flight -= 1

    def _fail_all(self, batch: list[Request]) -> None:
        for req in batch:
            self._fail(req, ClosedError(f"model {self.settings.name!r} was closed mid-batch"))

    def _retry_after(self) -> float:
        """Estimate the seconds until the queue has room: full batches ahead per slot, times
        the recent compute time of one batch."""
        compute = self._rec.compute
        if not compute:
            return 1.0
        recent = list(compute)[-16:]
        per_batch = sum(recent) / len(recent)
        settings = self.settings
        batches_ahead = len(self._queue) / (settings.max_batch_size * settings.max_concurrency)
        return min(60.0, max(0.001, per_batch * max(1.0, batches_ahead)))

    def _batch_error(self, exc: Exception, n: int, version: str) -> ModelError:
        if isinstance(exc, BatchSizeMismatch):
            error: ModelError = BatchSizeMismatch(expected=exc.expected, got=exc.got)
        elif isinstance(exc, ModelError):  # raised here about the output: a copy per caller
            error = ModelError(str(exc), batch_size=exc.batch_size)
        else:
            error = ModelError(
                f"model {self.settings.name!r} raised {type(exc).__name__}: {exc}", batch_size=n
            )
        error.version = version
        error.__cause__ = exc
        return error

    async def _invoke(self, batch: _Batch, installed: Installed, started: float) -> Sequence[Any]:
        """Run the model on the callers of ``batch`` who still wait; outputs for those."""
        if not installed.is_async:
            return await anyio.to_thread.run_sync(
                self._invoke_live, batch, installed, started, limiter=self._limiter
            )
        live = _still_waiting(batch)
        if not live:
            return ()
        items = [req.item for req in live]
        collate = self.settings.collate
        model_input = collate(items) if collate is not None else items
        if installed.with_info is None:
            out = await installed.model(model_input)
        else:
            out = await installed.with_info(model_input, batch_info(live, started))
        return split_outputs(self.settings, out, len(items))

    # -- sync callers running their own item ----------------------------------------------------

    def run_inline(self, item: Any, priority: float) -> tuple[Any, str] | None:
        """Run ``item`` in the calling (non-loop) thread, batched with other sync callers.

        If the engine is idle (no batch runs or is staged, nothing is queued, the slot is not
        held, not closing), the caller runs its item itself at once: a lone sync caller skips
        the two thread hand-overs a queued item costs. Sync callers arriving while such a batch
        runs wait beside it; when it ends, its thread hands the next batch of them (priority,
        then arrival order) to one of them to run, and so on, with no trip through the loop.
        While callers' threads run batches, the loop starts none: its own items wait for the
        running batch to end, and then every waiting item is handed to the loop's queue.

        The engine must be on asyncio, with no default timeout and no wait window, and the
        model sync (without ``BatchInfo``); waiting beside a batch also needs no cost budget,
        no bounded queue, no failure isolation and ``max_concurrency`` 1.

        Return ``(output, version)``, raise the item's error (as a batch would), or return
        None when the engine cannot take the item this way: the caller then queues it as usual.
        """
        if not self._inline_ok:
            return None
        with self._claim:
            queue = self._queue
            if self._inline_busy:
                if not self._side_ok or self._closing:
                    return None
                me = SyncRequest(item, priority, next(self._seq), time.monotonic())
                self._side.append(me)
            elif (
                self._in_flight
                or self._closing
                or self._slot.held
                or len(queue)
                or queue.waiting_for_room
            ):
                return None
            else:
                installed = self._slot.current
                if installed.is_async or installed.with_info is not None:
                    return None
                self._inline_busy = True
                self._inline_running = 1
                me = None
        if me is None:
            return self._run_alone(item, installed)
        try:
            me.wait()
        except BaseException:  # interrupted (KeyboardInterrupt in the main thread, say)
            self._give_up(me)
            raise
        if me.lead is not None:
            self._lead(me)
        value = me.outcome()
        assert me.version is not None  # set with every output
        return value, me.version

    def _run_alone(self, item: Any, installed: Installed) -> tuple[Any, str]:
        """Run ``item`` as a batch of its own in the calling thread, then hand on."""
        # Not the loop's clock, which belongs to the loop's thread; durations only.
        start = time.monotonic()
        try:
            value = self._invoke_sync([item], installed, None)[0]
        except BaseException as exc:
            self._end_inline(start, [start], 1, 0)
            if isinstance(exc, Exception):
                raise self._batch_error(exc, 1, installed.version) from exc
            raise
        failed = isinstance(value, Exception)
        self._end_inline(start, [start], failed, 0)
        if failed:
            raise value
        return value, installed.version

    def _lead(self, me: SyncRequest) -> None:
        """Run the batch handed to ``me``'s thread, hand on what follows, settle its callers."""
        assert me.lead is not None
        batch, installed = me.lead
        me.lead = None
        n = len(batch)
        start = time.monotonic()
        error: BaseException | None = None
        outputs: Sequence[Any] = [None] * n
        try:
            outputs = self._invoke_sync([req.item for req in batch], installed, None)
        except BaseException as exc:  # settle every caller first; re-raised below if not ours
            error = exc
        # Callers who left while it ran (interrupted) count as cancelled, as on the loop.
        left = sum(req.gave_up for req in batch)
        if error is not None:
            failed = n - left
        else:
            failed = sum(
                isinstance(out, Exception) and not req.gave_up
                for req, out in zip(batch, outputs, strict=True)
            )
        self._end_inline(start, [req.enqueued_at for req in batch], failed, left)
        version = installed.version
        for req, out in zip(batch, outputs, strict=True):
            req.finished = True
            req.version = version
            if error is None:
                req.deliver_error(out) if isinstance(out, Exception) else req.deliver(out)
            elif isinstance(error, Exception):
                req.deliver_error(self._batch_error(error, n, version))
            else:
                failure = ModelError(
                    f"model {self.settings.name!r} was interrupted: {type(error).__name__}",
                    batch_size=n,
                )
                failure.version = version
                req.deliver_error(failure)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _end_inline(self, start: float, enqueued: list[float], failed: int, left: int) -> None:
        """Record the batch a caller's thread ran, and hand on what follows it."""
        end = time.monotonic()
        with self._claim:
            self._ledger.add_record((start, end, enqueued, failed, left))
            follow, tell = self._hand_on()
        if follow is not None:
            follow.wake_to_lead()
        elif tell is not None:
            self._tell_loop(tell)

    def _hand_on(self) -> tuple[SyncRequest | None, Callable[[], None] | None]:
        """Pick what follows an inline batch; with ``_claim`` held, in a caller's thread.

        Return the waiting caller whose thread runs the next batch (its ``lead`` set), if any;
        else what the loop must run, if anything: ``_adopt`` when it must take the waiting
        callers over (its queue has items, the slot is held, or the model can no longer run
        inline; ``_inline_busy`` stays set until it has), ``_after_inline``
        when it must look now (callers queued there, a swap waits for the engine to be idle,
        or it is closing and its workers wait for the inline batches to end). Otherwise the
        records wait for the loop's next batch (or pile up to 64); statistics() counts them.
        """
        self._inline_running = 0
        side = self._side
        if not side:
            self._inline_busy = False
            wake = (
                len(self._queue)
                or self._idle_waiters
                or self._closing
                or len(self._ledger.records) >= 64
            )
            return None, self._after_inline if wake else None
        installed = self._slot.current
        if (
            len(self._queue)
            or self._slot.held
            or installed.is_async
            or installed.with_info is not None
        ):
            return None, self._adopt
        side.sort(key=_arrival)
        limit = self.settings.max_batch_size
        batch, self._side = side[:limit], side[limit:]
        follow = batch[0]
        follow.lead = (batch, installed)
        self._inline_running = len(batch)
        return follow, None

    def _tell_loop(self, tell: Callable[[], None]) -> None:
        """Have the loop run ``tell`` (from ``_hand_on``); from a caller's thread."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(tell)
        except RuntimeError:  # the loop has ended: statistics() still counts the runs
            if tell == self._adopt:
                with self._claim:
                    side, self._side = self._side, []
                    self._inline_busy = False
                for req in side:
                    req.finished = True
                    req.deliver_error(ClosedError(f"model {self.settings.name!r} is closed"))

    def _give_up(self, me: SyncRequest) -> None:
        """Withdraw ``me``, whose caller stopped waiting; hand on a batch it was to run."""
        follow = tell = None
        with self._claim:
            me.gave_up = True
            if me.lead is not None:  # woken to run a batch: the next caller in it runs it
                batch, installed = me.lead
                me.lead = None
                me.finished = True
                self._ledger.add_left()
                rest = [req for req in batch if req is not me]
                if rest:
                    follow = rest[0]
                    follow.lead = (rest, installed)
                    self._inline_running = len(rest)
                else:
                    follow, tell = self._hand_on()
            elif me in self._side:
                self._side.remove(me)
                me.finished = True
                self._ledger.add_left()
            elif me.state != NEW and not me.finished:  # handed to the loop's queue
                tell = functools.partial(self.cancel, me)
            # else its batch runs: it is counted as cancelled when that ends
        if follow is not None:
            follow.wake_to_lead()
        elif tell is not None:
            self._tell_loop(tell)

    def _adopt(self) -> None:
        """Take the sync callers waiting beside the inline batches into the queue; on the loop
        thread. (Closing without drain has failed them already; with drain, they run.)"""
        with self._claim:
            side, self._side = self._side, []
            self._inline_busy = False
        for req in side:  # the queue orders them (and counts them submitted)
            self._queue.push(req)
        self._after_inline()  # no batch runs or is staged meanwhile: the workers take them

    def _after_inline(self) -> None:
        """Record the inline runs' statistics and let the workers look at the queue again."""
        with self._claim:
            self._ledger.merge()
        self._signal.set()
        self._check_idle()

    def _invoke_staged(
        self, batch: _Batch, installed: Installed, started: float
    ) -> Sequence[Any]:
        """Close the staged ``batch`` to callers arriving from now on, and run it; in a thread.

        Closing without drain fails the callers of a staged batch no thread has taken up; one
        taken up runs, and its outputs are delivered (``_claim`` makes the two exclusive).
        """
        if batch.after is not None:
            batch.after.wait()
        with self._claim:
            if self._open is batch:
                self._open = None
            if batch.closed:
                batch.ran = [False] * len(batch)
                if batch.ended is not None:
                    batch.ended.set()
                return ()
            batch.begun = True
        return self._invoke_live(batch, installed, started)

    def _invoke_live(self, batch: _Batch, installed: Installed, started: float) -> Sequence[Any]:
        """Run the sync model on the items of ``batch`` whose callers still wait; in a thread.

        A staged batch waits for the one before it: callers that left meanwhile (cancelled,
        expired) are not run; ``_complete`` settles them as cancelled if the loop has not heard
        of their cancellation yet. Return the outputs of the callers run.
        """
        try:
            live = _still_waiting(batch)
            if not live:
                return ()
            info = None if installed.with_info is None else batch_info(live, started)
            return self._invoke_sync([req.item for req in live], installed, info)
        finally:
            if batch.ended is not None:
                batch.ended.set()

    def _invoke_sync(
        self, items: list[Any], installed: Installed, info: BatchInfo | None
    ) -> Sequence[Any]:
        self.in_model.active = True
        try:
            if info is None:
                return run_sync_batch(self.settings, installed.model, items)
            with_info = installed.with_info
            assert with_info is not None
            return run_sync_batch(self.settings, lambda batch: with_info(batch, info), items)
        finally:
            self.in_model.active = False

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        """Return a snapshot of the counters; safe from any thread."""
        with self._claim:
            running, waiting = self._inline_running, len(self._side)
            stats = self._rec.snapshot(
                name=self.settings.name,
                model_version=self._slot.current.version,
                queue_depth=len(self._queue) + waiting,
                waiting_for_room=self._queue.waiting_for_room,
                in_flight_batches=self._in_flight + bool(running),
                dispatch_held=self._slot.held,
            )
            # What callers' threads did that the loop has yet to record: counted here, so a
            # caller's own call shows at once.
            return self._ledger.with_records(stats, running, waiting)


def _still_waiting(batch: _Batch) -> list[Request]:
    """Return the requests of ``batch`` whose callers still wait, marking the rest in
    ``batch.ran`` for the loop to settle; called as the model starts, in any thread."""
    keep = [not req.abandoned() for req in batch]
    if all(keep):
        return batch
    batch.ran = keep
    return [req for req, kept in zip(batch, keep, strict=True) if kept]


def run_sync_batch(settings: Settings, fn: Callable[[Any], Any], items: list[Any]) -> Sequence[Any]:
    """Run the sync model ``fn`` on ``items`` (collated) and return one output per item."""
    collate = settings.collate
    try:
        out = fn(collate(items) if collate is not None else items)
    except StopIteration as exc:  # an asyncio future cannot carry it: it would never finish
        raise RuntimeError(f"the model raised StopIteration: {exc!r}") from exc
    return split_outputs(settings, out, len(items))


def split_outputs(settings: Settings, out: Any, n: int) -> Sequence[Any]:
    """Turn the model's output for ``n`` items into one output per item, checking the count."""
    split = settings.split
    outputs = split(out) if split is not None else out
    try:
        got = len(outputs)
    except TypeError:
        raise ModelError(
            f"model {settings.name!r} returned {type(outputs).__name__}, "
            "which has no length; return one output per item",
            batch_size=n,
        ) from None
    if got != n:
        raise BatchSizeMismatch(expected=n, got=got)
    return outputs
