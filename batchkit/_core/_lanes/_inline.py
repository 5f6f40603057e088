"""The inline lane: sync callers run batches in their own threads while the engine is idle.

What it speeds up: a ``call_sync`` on the general path is a ``ThreadRequest`` handed to the
loop (``Handoff.submit``), queued, taken by a worker, run in a model thread and
handed back: two thread hand-overs each way. Here, when the engine is idle (no batch runs or is
staged, nothing is queued, the slot is not held, not closing), the caller runs its item itself
at once. Sync callers arriving meanwhile wait beside it (``side``, when the plan allows); when
its batch ends, its thread hands the next batch of them (priority, then arrival) to one of them
to run, and so on, with no trip through the loop.

Invariants it keeps: while ``busy``, the loop starts no batch (``Engine._take`` checks it under
``lock``, the same lock under which a caller claims the engine, so "idle? then claim" and
"inline run? else take" exclude each other); its callers are settled in their own threads
(each once: ``finished``), and what they ran is queued in the ledger as records for the loop
to count (``Ledger.add_record``, merged by ``after``). Items that reach the loop meanwhile, a
held slot or a model that can no longer run inline make the next boundary hand every waiting
caller to the loop's queue (``adopt``). ``lock`` is this lane's own.
"""

from __future__ import annotations

import functools
import operator
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._errors import ClosedError, ModelError
from .._invoke import batch_error
from .._policy import AfterInline, Idle, InlineEntry, after_inline, inline_entry
from .._queue import NEW
from .._requests import SyncRequest
from .._slot import Installed

if TYPE_CHECKING:
    from .._engine import Engine

__all__ = ("InlineLane",)

# The order of waiting sync callers: priority, then arrival.
_arrival = operator.attrgetter("priority", "seq")


class InlineLane:
    """Sync callers running batches in their own threads; one per engine that plans it."""

    def __init__(self, engine: Engine, *, side: bool) -> None:
        self._engine = engine
        self.side_ok = side  # callers may wait beside a running inline batch
        self.lock = threading.Lock()
        self.busy = False  # callers' threads run the batches; the loop takes none
        self.running = 0  # items in the batch a caller's thread runs now
        self.side: list[SyncRequest] = []

    def run(self, item: Any, priority: float) -> tuple[Any, str] | None:
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
        engine = self._engine
        with self.lock:
            queue = engine._queue
            installed = engine._slot.current
            entry = inline_entry(
                Idle(
                    busy=self.busy,
                    side_ok=self.side_ok,
                    closing=engine._closing,
                    in_flight=engine._in_flight,
                    held=engine._slot.held,
                    queued=len(queue),
                    waiting_for_room=queue.waiting_for_room,
                    model_async=installed.is_async,
                    with_info=installed.with_info is not None,
                )
            )
            if entry is InlineEntry.QUEUE:
                return None
            if entry is InlineEntry.WAIT:
                me = SyncRequest(item, priority, next(engine._seq), time.monotonic())
                self.side.append(me)
            else:
                self.busy = True
                self.running = 1
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
        engine = self._engine
        # Not the loop's clock, which belongs to the loop's thread; durations only.
        start = time.monotonic()
        try:
            value = engine.invoker.run_sync([item], installed, None)[0]
        except BaseException as exc:
            self._end_inline(start, [start], 1, 0)
            if isinstance(exc, Exception):
                raise batch_error(engine.settings, exc, 1, installed.version) from exc
            raise
        failed = isinstance(value, Exception)
        self._end_inline(start, [start], failed, 0)
        if failed:
            raise value
        return value, installed.version

    def _lead(self, me: SyncRequest) -> None:
        """Run the batch handed to ``me``'s thread, hand on what follows, settle its callers."""
        engine = self._engine
        assert me.lead is not None
        batch, installed = me.lead
        me.lead = None
        with self.lock:  # callers who left since the batch was handed on are not run
            if any(req.gave_up for req in batch):
                for req in batch:
                    if req.gave_up and not req.finished:
                        req.finished = True
                        engine._ledger.add_left()
                batch = [req for req in batch if not req.gave_up]
        n = len(batch)
        start = time.monotonic()
        error: BaseException | None = None
        outputs: Sequence[Any] = [None] * n
        try:
            outputs = engine.invoker.run_sync([req.item for req in batch], installed, None)
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
                req.deliver_error(batch_error(engine.settings, error, n, version))
            else:
                failure = ModelError(
                    f"model {engine.settings.name!r} was interrupted: {type(error).__name__}",
                    batch_size=n,
                )
                failure.version = version
                req.deliver_error(failure)
        if error is not None and not isinstance(error, Exception):
            raise error

    def _end_inline(self, start: float, enqueued: list[float], failed: int, left: int) -> None:
        """Record the batch a caller's thread ran, and hand on what follows it."""
        engine = self._engine
        end = time.monotonic()
        with self.lock:
            engine._ledger.add_record((start, end, enqueued, failed, left))
            follow, tell = self._hand_on()
        if follow is not None:
            follow.wake_to_lead()
        elif tell is not None:
            self._tell_loop(tell)

    def _hand_on(self) -> tuple[SyncRequest | None, Callable[[], None] | None]:
        """Carry out what follows an inline batch (``_policy.after_inline`` decides); with
        ``lock`` held, in a caller's thread.

        Return the waiting caller whose thread runs the next batch (its ``lead`` set), if any;
        else what the loop must run, if anything: ``adopt`` when it must take the waiting
        callers over (``busy`` stays set until it has), ``after`` when it must look now.
        Otherwise the records wait for the loop's next batch; statistics() counts them.
        """
        engine = self._engine
        self.running = 0
        side = self.side
        installed = engine._slot.current
        then = after_inline(
            waiting=len(side),
            queued=len(engine._queue),
            held=engine._slot.held,
            model_async=installed.is_async,
            with_info=installed.with_info is not None,
            idle_waiters=bool(engine._idle_waiters),
            closing=engine._closing,
            records=len(engine._ledger.records),
        )
        if then is AfterInline.REST or then is AfterInline.TELL:
            self.busy = False
            return None, self.after if then is AfterInline.TELL else None
        if then is AfterInline.ADOPT:
            return None, self.adopt
        side.sort(key=_arrival)
        limit = engine.settings.max_batch_size
        batch, self.side = side[:limit], side[limit:]
        follow = batch[0]
        follow.lead = (batch, installed)
        self.running = len(batch)
        return follow, None

    def _tell_loop(self, tell: Callable[[], None]) -> None:
        """Have the loop run ``tell`` (from ``_hand_on``); from a caller's thread."""
        engine = self._engine
        # If the loop has ended, statistics() still counts the runs; callers waiting to be
        # adopted are answered here.
        if not engine.handoff.call_soon(tell) and tell == self.adopt:
            with self.lock:
                side, self.side = self.side, []
                self.busy = False
            for req in side:
                req.finished = True
                req.deliver_error(ClosedError(f"model {engine.settings.name!r} is closed"))

    def _give_up(self, me: SyncRequest) -> None:
        """Withdraw ``me``, whose caller stopped waiting; hand on a batch it was to run."""
        engine = self._engine
        follow = tell = None
        with self.lock:
            me.gave_up = True
            if me.lead is not None:  # woken to run a batch: the next caller in it runs it
                batch, installed = me.lead
                me.lead = None
                me.finished = True
                engine._ledger.add_left()
                rest = [req for req in batch if req is not me]
                if rest:
                    follow = rest[0]
                    follow.lead = (rest, installed)
                    self.running = len(rest)
                else:
                    follow, tell = self._hand_on()
            elif me in self.side:
                self.side.remove(me)
                me.finished = True
                engine._ledger.add_left()
            elif me.state != NEW and not me.finished:  # handed to the loop's queue
                tell = functools.partial(engine.cancel, me)
            # else its batch runs: it is counted as cancelled when that ends
        if follow is not None:
            follow.wake_to_lead()
        elif tell is not None:
            self._tell_loop(tell)

    def adopt(self) -> None:
        """Take the sync callers waiting beside the inline batches into the queue; on the loop
        thread. (Closing without drain has failed them already; with drain, they run.)"""
        engine = self._engine
        with self.lock:  # moved at once: statistics() counts them in the lane, then the queue
            side, self.side = self.side, []
            self.busy = False
            stopped = engine.stopped
            if stopped:  # handed over as the engine stopped: counted, as closing counts them
                engine._rec.submitted += len(side)
            else:
                for req in side:  # the queue orders them (and counts them submitted)
                    engine._queue.push(req)
            engine._ledger.generation += 1
        if stopped:  # no worker would take them
            for req in side:
                engine._fail(req, ClosedError(f"model {engine.settings.name!r} is closed"))
            return
        self.after()  # no batch runs or is staged meanwhile: the workers take them

    def after(self) -> None:
        """Record the inline runs' statistics and let the workers look at the queue again."""
        engine = self._engine
        with self.lock:
            engine._ledger.merge()
        engine._signal.set()
        engine._check_idle()
