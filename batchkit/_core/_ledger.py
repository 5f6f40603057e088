"""The ledger: the only code that settles a request and counts it.

Every outcome a caller gets goes through here, on the engine's loop thread: ``cancel``,
``expire`` and ``fail`` settle one request and return False when it was settled already (so
"exactly one outcome per caller" is one check, in one place); ``deliver_batch`` settles a batch
the model answered. Each settlement counts once in the recorder, so the counters add up:
``completed + failed + expired + cancelled`` is the number of requests settled.

Batches that callers' own threads ran (the inline lane) are settled in those threads, where the
callers wait; what they did is queued here as records (``add_record``) and merged into the
counters by one function, ``merge``, which the loop calls to record them for good and
``statistics()`` calls on a copy to show them at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

from ._errors import DeadlineExceeded
from ._requests import FutureRequest, Request, wake_all
from ._stats import Recorder, Statistics

__all__ = ("InlineRecord", "Ledger")

# A batch run in a caller's thread, for the loop to record: start, end, its items' submit
# times, how many failed, how many callers left while it ran.
InlineRecord = tuple[float, float, list[float], int, int]


class Ledger:
    """Settle one engine's requests and count every settlement once."""

    def __init__(self, name: str, recorder: Recorder) -> None:
        self._name = name
        self.rec = recorder
        # The engine's own kind of plain request (asyncio), settled inline by deliver_batch.
        self.plain_request: type[Request] | None = None
        self.call_soon: Callable[..., Any] | None = None
        # Records of batches callers' threads ran, and callers who left before theirs ran;
        # written under the engine's claim lock, merged by the loop.
        self.records: list[InlineRecord] = []
        self.left = 0
        # Bumped (under the lane's lock) whenever counts move between the lane's state and
        # the recorder: a reader in another thread that saw it change reads again.
        self.generation = 0

    # -- one request -----------------------------------------------------------------------------

    def cancel(self, req: Request) -> bool:
        """Settle ``req`` as cancelled (its caller stopped waiting); False if already settled."""
        if not self._settle(req):
            return False
        self.rec.cancelled += 1
        return True

    def expire(self, req: Request) -> bool:
        """Fail ``req`` with ``DeadlineExceeded``; False if already settled."""
        if not self._settle(req):
            return False
        self.rec.expired += 1
        req.deliver_error(
            DeadlineExceeded(f"the deadline passed before model {self._name!r} answered")
        )
        return True

    def fail(self, req: Request, exc: BaseException) -> bool:
        """Fail ``req`` with ``exc``; False if already settled."""
        if not self._settle(req):
            return False
        self.rec.failed += 1
        req.deliver_error(exc)
        return True

    @staticmethod
    def _settle(req: Request) -> bool:
        """Mark ``req`` settled and stop its timer; False if it was already (the one check)."""
        if req.finished:
            return False
        req.finished = True
        if req.timer is not None:
            req.timer.cancel()
        return True

    def refuse(self, req: Request, exc: BaseException) -> None:
        """Answer ``req``, which never entered the engine (closed, or no room), with ``exc``.

        Not counted as settled: it was not submitted (a full queue counts it as rejected).
        """
        req.finished = True
        req.deliver_error(exc)

    # -- a batch ----------------------------------------------------------------------------------

    def deliver_batch(
        self,
        batch: Sequence[Request],
        outputs: Sequence[Any],
        start: float,
        end: float,
        version: str,
        *,
        now: bool = False,
    ) -> None:
        """Settle the callers of a batch the model answered with ``outputs``, in order.

        An output that is an exception fails its caller only; callers settled meanwhile
        (cancelled, expired) are skipped. Also records the items' latencies. Plain-lane callers
        given a value resume from one loop callback; with ``now`` (called from a loop callback,
        not a task) from this call itself, once everything is counted.
        """
        failed = settled = 0
        mixed = False
        plain_request = self.plain_request
        # The other callers are answered once the batch is counted: a caller in another thread
        # wakes the moment it is answered, and its next statistics() must show its call.
        later: list[tuple[Request, Any]] = []
        for req, out in zip(batch, outputs, strict=True):
            if req.__class__ is plain_request and not req.finished:  # the common case, inlined
                req.finished = True
                # Not finished, so not cancelled either (its cancel() withdraws it).
                if isinstance(out, Exception):
                    failed += 1
                    req.deliver_error(out)
                else:
                    req.outcome = 1  # type: ignore[attr-defined]
                    req.value = out  # type: ignore[attr-defined]
                continue
            mixed = True
            if req.finished:
                settled += 1
                continue
            req.finished = True
            req.version = version
            if req.timer is not None:
                req.timer.cancel()
            if isinstance(out, Exception):
                failed += 1
            later.append((req, out))
        rec = self.rec
        rec.completed += len(batch) - failed - settled
        rec.failed += failed
        rec.record_items(start, end, [req.enqueued_at for req in batch])
        for req, out in later:
            if isinstance(out, Exception):
                req.deliver_error(out)
            elif req.__class__ is FutureRequest:  # the common case, inlined
                try:
                    req.future.set_result(out)
                except asyncio.InvalidStateError:
                    pass  # its task was cancelled and has yet to withdraw it
            else:
                req.deliver(out)
        if self.call_soon is not None:
            # Resume the callers given a value above (those not are skipped: see wake_all).
            plain = [r for r in batch if r.__class__ is plain_request] if mixed else batch
            if plain:
                if now:
                    wake_all(plain)
                else:
                    self.call_soon(wake_all, plain)

    def record_batch(self, n: int, start: float, end: float) -> None:
        """Count a batch of ``n`` items the model ran from ``start`` to ``end``."""
        rec = self.rec
        rec.batches += 1
        rec.batch_sizes[n] += 1
        rec.compute.append(end - start)
        if rec.histograms is not None:
            rec.histograms["compute"].observe(end - start)

    # -- records from callers' threads ------------------------------------------------------------

    def add_record(self, record: InlineRecord) -> None:
        """Queue what a caller's thread ran (under the engine's claim lock)."""
        self.records.append(record)

    def add_left(self) -> None:
        """Count a caller who left before its inline batch ran (under the claim lock)."""
        self.left += 1

    def merge(self) -> None:
        """Count the queued records for good (on the loop thread, under the claim lock)."""
        records, self.records = self.records, []
        left, self.left = self.left, 0
        self.generation += 1
        _count(self.rec, records, left, self.record_batch)

    def unmerged(self) -> tuple[int, list[InlineRecord], int]:
        """Return (``generation``, the records not merged yet, callers who left): under the
        lane's lock."""
        return self.generation, list(self.records), self.left

    def with_records(
        self,
        stats: Statistics,
        running: int,
        waiting: int,
        records: list[InlineRecord],
        left: int,
    ) -> Statistics:
        """Return ``stats`` with ``records`` and ``left`` (not merged yet when it was taken)
        counted in, and ``running`` items in an inline batch and ``waiting`` callers beside it
        as submitted (any thread)."""
        if not records and not running and not waiting and not left:
            return stats
        copy = Recorder()
        _count(copy, records, left, lambda n, start, end: copy.batch_sizes.update((n,)))
        sizes = dict(stats.batch_sizes)
        for size, count in copy.batch_sizes.items():
            sizes[size] = sizes.get(size, 0) + count
        return dataclasses.replace(
            stats,
            submitted=stats.submitted + copy.submitted + running + waiting,
            completed=stats.completed + copy.completed,
            failed=stats.failed + copy.failed,
            cancelled=stats.cancelled + copy.cancelled,
            batches=stats.batches + len(records),
            batch_sizes=MappingProxyType(dict(sorted(sizes.items()))),
        )


def _count(
    rec: Recorder,
    records: list[InlineRecord],
    left: int,
    record_batch: Callable[[int, float, float], None],
) -> None:
    """Add ``records`` and ``left`` callers who left to ``rec``: the one merge of both uses."""
    for start, end, enqueued, failed, gone in records:
        n = len(enqueued)
        rec.submitted += n
        rec.failed += failed
        rec.cancelled += gone
        rec.completed += n - failed - gone
        record_batch(n, start, end)
        rec.record_items(start, end, enqueued)
    rec.submitted += left
    rec.cancelled += left
