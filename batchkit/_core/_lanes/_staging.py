"""The staging lane: the next batch is handed to a sync model's thread while the one before runs.

What it speeds up: on the general path a worker waits for its batch to end in the model thread,
hears of it on the loop, then takes the next batch and sends it to a thread: two thread
hand-overs during which the model sits idle. Here, while a batch runs in a model thread
(``Engine._complete``), the worker takes the next batch as soon as there is one and submits it
to the model threads at once; the thread starts it the moment the batch before it ends
(``invoke``, which waits for that batch when there are several model threads).

Invariants it keeps: a staged batch runs on the installation that was serving when it was
staged, and once a swap has returned no caller joins it (``_fill_open``); a swap to an async
model stops staging (an async model runs on the loop); callers who leave before it starts are
skipped (``Invoker.run_live``); closing without drain fails the callers of a staged batch no
thread has begun, and one begun is delivered (``close`` and ``invoke`` decide under ``lock``,
this lane's own). Under greedy dispatch without a cost budget a staged batch that is not full
stays open, and callers who arrive before a thread takes it up join it (``feed``, on every
submit while ``Engine._staging`` is set).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._policy import may_stage
from .._requests import Request
from .._slot import Installed

if TYPE_CHECKING:
    from .._engine import Engine, _Running
    from .._invoke import Batch

__all__ = ("StagingLane",)


class StagingLane:
    """Batches staged into the model threads of one engine that plans this lane."""

    def __init__(self, engine: Engine, *, fill: bool) -> None:
        self._engine = engine
        self._fill = fill  # a staged batch may keep filling (greedy, no cost budget)
        self.lock = threading.Lock()
        # Workers whose batch runs in a model thread, waiting for a batch to stage.
        self._waiters: list[asyncio.Future[None]] = []
        # Batches handed to a model thread while the batch before them still runs there, and
        # the one of them that callers arriving meanwhile still join (until a thread takes it
        # up or it is full), with the installation it runs on.
        self.staged: list[Batch] = []
        self._open: Batch | None = None
        self._open_installed: Installed | None = None

    # -- on every submit, while Engine._staging is set ------------------------------------------

    def feed(self) -> None:
        """Wake the workers waiting to stage a batch, and top up the open staged batch."""
        if self._waiters:
            self._wake()
        if self._open is not None:
            self._fill_open()
        if not self._waiters and self._open is None:  # until a worker stages again
            self._engine._staging = False

    def _stageable(self) -> bool:
        engine = self._engine
        queue = engine._queue
        return may_stage(
            full_batch=queue.has_full_batch(),
            queued=len(queue),
            fill=self._fill,
            held=engine._slot.held,
            model_async=engine._slot.current.is_async,
        )

    def _fill_open(self) -> None:
        """Move queued items into the staged batch still open, up to a full batch."""
        engine = self._engine
        batch = self._open
        limit = engine.settings.max_batch_size
        with self.lock:
            if batch is None or self._open is not batch:  # the model thread took it up
                return
            if engine._slot.current is not self._open_installed:
                # A swap or rollback has returned: callers from now on run on the new model.
                self._open = None
                return
            taken, expired = engine._queue.take(engine._clock(), limit - len(batch))
            batch.extend(taken)
            if len(batch) >= limit:
                self._open = None
        for req in expired:
            engine.expire(req)

    def _wake(self) -> None:
        if self._stageable():
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    # -- the worker -----------------------------------------------------------------------------

    async def stage_next(
        self, job: asyncio.Future[Sequence[Any]], running: Batch
    ) -> _Running | None:
        """While ``job`` runs in a model thread, hand it the next batch as soon as there is one.

        Return the staged batch, started, or None if ``job`` ended first (or the model is now
        async). Under greedy dispatch without a cost budget a staged batch that is not full stays
        open (see ``feed``); otherwise only a full batch is staged.
        """
        engine = self._engine
        assert engine._loop is not None
        while not job.done():
            installed = engine._slot.current
            if installed.is_async:  # swapped for an async model: it runs on the loop, unstaged
                return None
            if self._stageable():
                batch = engine._take(engine._clock())
                if batch:
                    self.staged.append(batch)
                    if self._fill and installed.with_info is None:
                        with self.lock:  # before the thread can see the batch
                            full = len(batch) >= engine.settings.max_batch_size
                            self._open = None if full else batch
                            self._open_installed = installed
                        engine._staging = True  # submitting callers top it up
                    batch.after = running.ended
                    return engine._start(batch, installed, staged=True)
            waiter = engine._loop.create_future()
            self._waiters.append(waiter)
            engine._staging = True  # submitting callers wake it

            def wake(_: object, waiter: asyncio.Future[None] = waiter) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            job.add_done_callback(wake)
            try:
                await waiter
            finally:
                job.remove_done_callback(wake)
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return None

    def begun(self, staged: _Running, at: float) -> _Running:
        """Return a staged batch as begun at ``at``, when the batch before it ended."""
        batch, job, start, installed = staged
        self.staged.remove(batch)
        return batch, job, max(start, at), installed

    def abandon(self, staged: _Running) -> list[Request]:
        """Drop a staged batch whose worker was cancelled; return its callers to fail."""
        batch = staged[0]
        with self.lock:
            if self._open is batch:
                self._open = None
        self.staged.remove(batch)
        return list(batch)

    def close(self) -> list[Request]:
        """Close without drain: return the callers of the staged batches no thread has begun
        (the threads will run none of them); those begun run and are delivered."""
        with self.lock:
            self._open = None
            closed = [batch for batch in self.staged if not batch.begun]
            for batch in closed:
                batch.closed = True
        return [req for batch in closed for req in batch]

    # -- in the model thread --------------------------------------------------------------------

    def invoke(self, batch: Batch, installed: Installed, started: float) -> Sequence[Any]:
        """Close the staged ``batch`` to callers arriving from now on, and run it; in a thread.

        With several model threads it first waits for the batch it follows to end.
        """
        if batch.after is not None:
            batch.after.wait()
        with self.lock:
            if self._open is batch:
                self._open = None
            if batch.closed:
                batch.ran = [False] * len(batch)
                if batch.ended is not None:
                    batch.ended.set()
                return ()
            batch.begun = True
        return self._engine.invoker.run_live(batch, installed, started)
