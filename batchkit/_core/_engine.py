"""The runner: the only code that awaits. It feeds batches from the queue to the model.

An engine lives in one event loop (asyncio or trio), entered with ``async with``. Within that
loop callers submit directly; other threads and loops hand their requests over thread-safely.
Everything that touches the queue or the counters runs on the engine's loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup

from . import _context
from ._config import Settings
from ._errors import (
    ClosedError,
    ConfigurationError,
    ModelError,
    QueueFull,
)
from ._handoff import Handoff
from ._invoke import Batch, Invoker, batch_error
from ._lanes._asyncio import PlainLane
from ._lanes._inline import InlineLane
from ._lanes._staging import StagingLane
from ._ledger import Ledger
from ._plan import plan_for
from ._queue import BatchQueue
from ._requests import (
    EventRequest,
    FutureRequest,
    PlainRequest,
    Request,
    SyncRequest,
    ThreadRequest,
)
from ._signal import NO_LOCK, AsyncioSignal, Signal, clock_of
from ._slot import Installed, ModelSlot
from ._stats import Recorder, Statistics

__all__ = ("Engine",)

# A started batch: its requests, the model's pending result, when it started, and the model
# installation it runs on (the whole batch runs on that one).
_Running = tuple["Batch", Awaitable[Sequence[Any]], float, Installed]


def _no_plain(item: Any, priority: int) -> PlainRequest:
    raise AssertionError("the plain lane is off: calls take Engine.submit")


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
        self.handoff = Handoff(self)  # for callers outside the loop's thread
        self._ledger = Ledger(settings.name, recorder)
        self._seq = itertools.count()
        self._in_flight = 0
        self._closing = False
        # The engine loop's thread while calls with default settings may take `submit_plain`
        # (see __aenter__), else -1: a caller compares it with its own thread's id.
        self.plain_thread = -1
        # The plain lane (asyncio calls with default arguments), when planned: calls take
        # `submit_plain`, its `submit`, while `plain_thread` is theirs.
        self.plain: PlainLane | None = None
        self.submit_plain: Callable[[Any, int], PlainRequest] = _no_plain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self.thread_id = -1
        self._tg: TaskGroup | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._abandoned = False  # a batch was left running when the host cancelled the engine
        self.invoker = Invoker(settings)
        self.in_model = self.invoker.in_model  # `active` while this thread runs the sync model
        # While the slot is held (an in-place swap), no batch starts; the idle futures resolve
        # once every worker is parked, that is when no batch runs.
        self._parked = 0
        self._idle_waiters: list[concurrent.futures.Future[None]] = []
        # The staging lane (batches handed to a sync model's threads ahead), when planned;
        # `_staging` is set while submits must feed it (checked on every submit).
        self.staging: StagingLane | None = None
        self._staging = False
        # The inline lane (sync callers running batches in their threads), when planned.
        self.inline: InlineLane | None = None
        self._inline_lock: Any = NO_LOCK

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._signal = AsyncioSignal(self._loop) if self._loop else Signal()
        settings = self.settings
        self.plan = plan = plan_for(settings, self._loop)
        self._clock = clock_of(self._loop)
        if plan.plain:
            assert self._loop is not None
            self.plain = PlainLane(self, self._loop)
            self.submit_plain = self.plain.submit
            self._ledger.plain_request = self.plain.request
        self._ledger.call_soon = None if self._loop is None else self._loop.call_soon
        self.inline = InlineLane(self, side=plan.side) if plan.inline else None
        self._inline_lock = NO_LOCK if self.inline is None else self.inline.lock
        # A staged batch may keep filling only under greedy dispatch without a cost budget;
        # otherwise only a full batch is staged.
        fill = settings.max_wait <= 0 and settings.max_batch_cost is None
        self.staging = StagingLane(self, fill=fill) if plan.staging else None
        self._token = anyio.lowlevel.current_token()
        self.thread_id = threading.get_ident()
        self.plain_thread = self.thread_id if plan.plain else -1
        self._closing_event = anyio.Event()
        invoker = self.invoker
        invoker.limiter = anyio.CapacityLimiter(self.settings.max_concurrency)
        invoker.plain = self._ledger.plain_request
        # asyncio's clock reads in any thread: a model thread stamps when its batch began.
        invoker.clock = self._clock if self._loop is not None else None
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
            # Cancelled while draining (or before a worker took them): nobody runs what is
            # left any more. Its callers get ClosedError, as a close without drain gives them.
            self.begin_close(drain=False)
            with self._inline_lock:  # the last inline batches ended; the loop may not know
                self._ledger.merge()
            self._rec.retire_queue()
            self.handoff.end()
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
            side: list[SyncRequest] = []
            if self.inline is not None:
                with self.inline.lock:  # statistics() counts them as submitted: move at once
                    side, self.inline.side = self.inline.side, []
                    self._rec.submitted += len(side)
                    self._ledger.generation += 1
            # A staged batch no model thread has taken up has not begun: fail its callers
            # (the thread will run none). One taken up runs: its outputs are delivered.
            staged = [] if self.staging is None else self.staging.close()
            for req in [*staged, *side, *self._queue.remove_all()]:
                self._fail(req, ClosedError(f"model {self.settings.name!r} was closed"))
        self._signal.set()

    def begin_close_soon(self, drain: bool) -> None:
        """Have the engine's loop call ``begin_close(drain)``; from any other thread, without
        waiting. Nothing happens if the loop has ended (the engine is closed)."""
        self.handoff.call_soon(self.begin_close, drain)

    @property
    def stopped(self) -> bool:
        """Whether every worker has returned: the engine runs no more batches."""
        return self._stopped.is_set()

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
        inline = self.inline is not None and self.inline.busy
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

        The plain lane's ``submit`` inlines these lines (the per-item path of default calls).
        """
        if self._signal.waiting:
            self._signal.set()
        if self._staging:
            self.staging.feed()  # type: ignore[union-attr]  # set only with the lane

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
            if _context.observing:
                _context.tag_requests([r for r in reqs if isinstance(r, Request)])
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

    async def _next_batch(self) -> Batch | None:
        """Wait until the policy releases a batch and take it; None once closed and empty."""
        self._parked += 1
        try:
            if self._idle_waiters:
                self._check_idle()
            return await self._wait_for_batch()
        finally:
            self._parked -= 1

    async def _wait_for_batch(self) -> Batch | None:
        queue = self._queue
        while True:
            if self._slot.held or (self.inline is not None and self.inline.busy):
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

    def _take(self, now: float) -> Batch:
        """Take the next batch and count it in flight; none while a caller runs inline."""
        inline = self.inline
        # Against a caller claiming the idle engine (a no-op lock without the inline lane).
        with self._inline_lock:
            if inline is not None and inline.busy:
                return Batch()
            if self._ledger.records:
                self._ledger.merge()
            taken, expired = self._queue.take(now)
            if taken:
                self._in_flight += 1
        for req in expired:
            self.expire(req)
        return Batch(taken)

    def _start(
        self,
        batch: Batch,
        installed: Installed | None = None,
        *,
        staged: bool = False,
        direct: bool = True,
    ) -> _Running:
        """Start the model on ``batch``: in the engine's thread pool, or as a coroutine.

        The batch runs on ``installed``, by default the one in the slot now. The caller counted
        it in ``_in_flight``; ``_complete`` uncounts it, or, in the engine's own threads and
        ``direct``, the thread's hand-over of the outputs (``_run_threaded``). A ``staged``
        batch runs through the staging lane, which closes it to joining callers when a thread
        takes it up. The callers who left before the model starts are not run (``Batch.ran``).
        """
        if installed is None:
            installed = self._slot.current
        started = self._clock()
        job: Awaitable[Sequence[Any]] | None = None
        if self._own_threads and not installed.is_async:
            assert self._loop is not None
            run = self.invoker.run_live
            if staged:
                assert self.staging is not None
                run = self.staging.invoke
            if self.settings.max_concurrency > 1 and self._prefetch:
                batch.ended = threading.Event()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.settings.max_concurrency,
                    thread_name_prefix=f"batchkit-{self.settings.name}-model",
                )
            try:
                if direct:
                    job = self._loop.run_in_executor(
                        self._executor, self._run_threaded, run, batch, installed, started
                    )
                else:
                    job = self._loop.run_in_executor(self._executor, run, batch, installed, started)
            except RuntimeError:  # the pool refuses work (interpreter shutdown): use anyio's
                self._own_threads = self._prefetch = False
        if job is None:
            job = self.invoker.run(batch, installed, started)
        return batch, job, started, installed

    def _run_threaded(
        self,
        run: Callable[[Batch, Installed, float], Sequence[Any]],
        batch: Batch,
        installed: Installed,
        started: float,
    ) -> Sequence[Any]:
        """Run ``batch`` with ``run`` in one of the engine's threads and hand its outputs to the
        loop at once (``_delivered``): its callers resume from that one loop callback, before the
        worker hears, a few loop iterations later, that the job ended."""
        outputs = run(batch, installed, started)
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._delivered, batch, outputs, installed)
        except RuntimeError:  # the loop has stopped: nobody waits any more
            pass
        return outputs

    def _delivered(self, batch: Batch, outputs: Sequence[Any], installed: Installed) -> None:
        """Count ``batch``, which a model thread ran, and settle its callers; on the loop, in a
        callback of its own (not a task), so callers waiting on the plain lane resume from it."""
        if batch.settled:  # the host cancelled its worker first, which settled it
            if batch.called and not batch.recorded:  # ...before this thread began the model
                n = len(batch) if batch.ran is None else sum(batch.ran)
                if n:
                    batch.recorded = True
                    self._ledger.record_batch(n, batch.began_at, self._clock())
            return
        batch.settled = True
        self._in_flight -= 1
        live = self._ran(batch)
        if live:
            start, end = batch.began_at, self._clock()
            self._ledger.record_batch(len(live), start, end)
            if _context.observing:
                _context.batch_ran(self.settings.name, installed.version, live, start, end)
            self._ledger.deliver_batch(live, outputs, start, end, installed.version, now=True)

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
                assert self.staging is not None  # prefetch only with the lane
                ahead = await self.staging.stage_next(job, batch)  # type: ignore[arg-type]
            outputs = await job
        except Exception as exc:
            batch.settled = True  # the model thread, when there was one, handed nothing over
            live = self._ran(batch)  # now: callers may join a staged batch until it is taken up
            n = len(live)
            end = self._clock()
            if n:
                self._ledger.record_batch(n, start, end)
                if _context.observing:
                    _context.batch_ran(self.settings.name, installed.version, live, start, end, exc)
            # Output errors (wrong count, no length) are the model's bug, not a poison item's.
            if self.settings.isolate_failures and n > 1 and not isinstance(exc, ModelError):
                if ahead is not None:  # a batch runs on one installation: finish that one first
                    ahead = await self._complete(self._begun(ahead, end), prefetch=False)
                await self._retry_halves(live, installed)  # uncounts this batch at its end
                return ahead
            self._in_flight -= 1
            for req in live:
                self._fail(req, batch_error(self.settings, exc, n, installed.version))
            return None if ahead is None else self._begun(ahead, end)
        except BaseException:
            # The host cancelled the engine mid-batch: nobody else will settle these callers.
            # If the model was called, the batch counts, with the callers it ran.
            self._abandoned = True
            if not batch.settled:
                batch.settled = True
                self._in_flight -= 1
                live = self._ran(batch)
                if live and batch.called:
                    batch.recorded = True
                    self._ledger.record_batch(len(live), start, self._clock())
                self._fail_all(live)
            if ahead is not None:
                assert self.staging is not None
                self._fail_all(self.staging.abandon(ahead))
            raise
        end = self._clock()
        live = []
        if not batch.settled:  # else its model thread handed it over (``_delivered``)
            batch.settled = True
            self._in_flight -= 1
            live = self._ran(batch)
            if live:
                self._ledger.record_batch(len(live), start, end)
                if _context.observing:
                    _context.batch_ran(self.settings.name, installed.version, live, start, end)
        if ahead is not None:
            ahead = self._begun(ahead, end)
        elif threaded:
            ahead = self._start_ready()
        if live:
            self._ledger.deliver_batch(live, outputs, start, end, installed.version)
        return ahead

    def _ran(self, batch: Batch) -> list[Request]:
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
        assert self.staging is not None
        return self.staging.begun(staged, at)

    async def _retry_halves(self, batch: list[Request], installed: Installed) -> None:
        """Run the halves of the failed ``batch`` one after the other, then uncount ``batch``.

        ``batch`` stays counted in flight meanwhile, so no caller runs inline in between.
        """
        half = len(batch) // 2
        try:
            for part in (batch[:half], batch[half:]):
                # Callers that gave up (cancelled, expired) meanwhile are not run again.
                live = Batch(req for req in part if not req.finished)
                if live:
                    # On the installation that failed: a batch runs on one version.
                    self._in_flight += 1
                    # Settled by this worker (not ``direct``), which then uncounts ``batch``.
                    running = self._start(live, installed, direct=False)
                    await self._complete(running, prefetch=False)
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

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        """Return a snapshot of the counters; safe from any thread."""
        inline = self.inline
        if inline is None:
            return self._snapshot(0, 0)
        # What callers' threads did that the loop has yet to record is counted in, so a
        # caller's own call shows at once. The lane's lock is held only to copy that, never
        # while the counters are read (a preempted reader must not hold up the loop); a merge
        # (or callers moved out of the lane) meanwhile would count them twice or not at all, so
        # the reader then tries again.
        ledger = self._ledger
        for _ in range(3):
            with inline.lock:
                generation, records, left = ledger.unmerged()
                running, waiting = inline.running, len(inline.side)
            stats = self._snapshot(running, waiting)
            with inline.lock:
                if ledger.generation == generation:
                    return ledger.with_records(stats, running, waiting, records, left)
        with inline.lock:  # the loop keeps moving counts: read under the lock this once
            _, records, left = ledger.unmerged()
            running, waiting = inline.running, len(inline.side)
            stats = self._snapshot(running, waiting)
            return ledger.with_records(stats, running, waiting, records, left)

    def _snapshot(self, running: int, waiting: int) -> Statistics:
        return self._rec.snapshot(
            name=self.settings.name,
            model_version=self._slot.current.version,
            queue_depth=len(self._queue) + waiting,
            waiting_for_room=self._queue.waiting_for_room,
            in_flight_batches=self._in_flight + bool(running),
            dispatch_held=self._slot.held,
        )
