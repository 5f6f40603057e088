"""The queue and the batching policy: plain synchronous code, time passed in by the caller.

Nothing here awaits or reads a clock, so the whole policy can be driven step by step by tests.

Invariants:
- an entry is in exactly one state: new (not pushed), waiting for room, queued, taken, removed;
- entries leave in priority order (lower number first), ties in arrival (``seq``) order;
- a batch never holds more than ``max_batch_size`` entries, nor more than ``max_batch_cost``
  total cost unless a single entry alone exceeds it (it then leaves alone);
- an entry whose deadline is at or before ``now`` is never taken: ``take`` returns it as expired.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

from ._errors import QueueFull

__all__ = ("BatchQueue", "QueueEntry")

# Entry states. Ints, compared by identity of value, to keep the per-item path cheap.
NEW = -1  # not pushed yet
WAITING = 0  # waiting for room in a bounded queue
QUEUED = 1
TAKEN = 2  # handed to the runner in a batch
REMOVED = 3  # cancelled, expired or failed by close: it will never be taken


class QueueEntry:
    """One submitted item as the queue sees it."""

    __slots__ = ("cost", "deadline", "enqueued_at", "priority", "seq", "state")

    def __init__(
        self,
        priority: float,
        seq: int,
        enqueued_at: float,
        deadline: float | None = None,
        cost: float = 1.0,
    ) -> None:
        self.priority = priority
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.cost = cost
        self.state = NEW


E = TypeVar("E", bound=QueueEntry)


class BatchQueue(Generic[E]):
    """Priority queue of entries that hands out batches according to the batching policy.

    ``max_wait`` 0 is greedy: a batch leaves as soon as it is asked for. A positive ``max_wait``
    holds a batch that is not full until its oldest entry has waited that long. With
    ``adaptive_wait``, the queue waits only while waiting has recently paid off (entries arrived
    during the wait); otherwise it behaves greedily, and probes every ``_PROBE_EVERY`` batches.
    """

    _PROBE_EVERY = 16

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_queue_size: int | None = None,
        max_wait: float = 0.0,
        max_batch_cost: float | None = None,
        adaptive_wait: bool = False,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_wait = max_wait
        self.max_batch_cost = max_batch_cost
        self.adaptive_wait = adaptive_wait
        # priority -> FIFO of entries (a list: a batch is cut off its front in one slice);
        # `_levels_heap` holds each priority present exactly once.
        self._levels: dict[float, list[E]] = {}
        self._levels_heap: list[float] = []
        self._arrivals: deque[E] = deque()  # only kept when max_wait > 0
        self._deadlines: list[tuple[float, int, E]] = []
        self._waiting: deque[E] = deque()
        self._queued = 0
        self._queued_cost = 0.0
        self._waiting_count = 0
        self._removed = 0  # removals since the last compaction
        # Entries ever pushed or enqueued: one counter, so a reader in another thread never
        # sees it between two updates (a sum of the counters below could be torn).
        self._entered = 0
        if max_wait <= 0 and max_batch_cost is None:
            self.enqueue = self._append  # type: ignore[method-assign]
        # Adaptive wait: a score in [0, 1] of how often recent waits gathered more entries.
        self._wait_score = 1.0
        self._batches_since_wait = 0
        self._window_seq = -1
        self._window_base = 0
        self._window_waits = True

    # -- sizes ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Return the number of queued entries (not counting those waiting for room)."""
        return self._queued

    @property
    def entered(self) -> int:
        """Return how many entries were ever queued or parked waiting for room (any thread)."""
        return self._entered

    @property
    def waiting_for_room(self) -> int:
        """Return the number of entries waiting for room in a full queue."""
        return self._waiting_count

    @property
    def full(self) -> bool:
        """Return whether a new entry would have to wait for room."""
        limit = self.max_queue_size
        return limit is not None and (self._queued >= limit or self._waiting_count > 0)

    # -- entering and leaving ----------------------------------------------------------------

    def push(self, entry: E, *, wait: bool = True) -> None:
        """Queue ``entry``, or park it until there is room.

        Raises ``QueueFull`` when the queue is full and ``wait`` is false.
        """
        limit = self.max_queue_size
        if limit is not None and (self._queued >= limit or self._waiting_count):
            if not wait:
                entry.state = REMOVED  # refused: a later remove() must not count it
                raise QueueFull(f"the queue is full ({limit} items)")
            entry.state = WAITING
            self._waiting.append(entry)
            self._waiting_count += 1
        else:
            self.enqueue(entry)
        self._entered += 1
        if entry.deadline is not None:
            heapq.heappush(self._deadlines, (entry.deadline, entry.seq, entry))

    def enqueue(self, entry: E) -> None:
        """Queue ``entry`` at once, past the size bound, without indexing its deadline.

        ``push`` calls it once there is room. Called directly, it is the per-item path of calls
        with default settings: valid for an entry without deadline in an unbounded queue; the
        caller then counts it in ``_entered`` (``push`` does that for the entries it takes).
        """
        self._append(entry)
        if self.max_wait > 0:
            self._arrive(entry)
        if self.max_batch_cost is not None:  # the only reader of the queued cost
            self._queued_cost += entry.cost

    def _append(self, entry: E) -> None:
        # Queue `entry` at the end of its priority's level. Without a wait window or a cost
        # budget (the defaults) it is all `enqueue` does, and __init__ makes it `enqueue`.
        # Engine.submit_plain inlines its common case (the priority's level exists already).
        entry.state = QUEUED
        level = self._levels.get(entry.priority)
        if level is None:
            level = self._levels[entry.priority] = []
            heapq.heappush(self._levels_heap, entry.priority)
        level.append(entry)
        self._queued += 1

    def _arrive(self, entry: E) -> None:
        arrivals = self._arrivals
        arrivals.append(entry)
        # Entries that left are trimmed lazily by `_oldest`, which a full batch never calls:
        # compact now and then, so sustained load does not keep every taken entry alive.
        if len(arrivals) > 2 * self._queued + 64:
            self._arrivals = deque(e for e in arrivals if e.state == QUEUED)

    def remove(self, entry: E) -> bool:
        """Remove a queued or waiting ``entry``; return whether it was there.

        The entry stays in the internal structures, marked removed, and is skipped later.
        """
        state = entry.state
        if state == QUEUED:
            self._queued -= 1
            if self.max_batch_cost is not None:
                self._queued_cost -= entry.cost
            if self._queued == 0:
                self._queued_cost = 0.0  # keep float drift from accumulating
        elif state == WAITING:
            self._waiting_count -= 1
        else:
            return False
        entry.state = REMOVED
        self._removed += 1
        if self._removed > 64 and self._removed > self._queued + self._waiting_count:
            self._compact()
        self._admit_waiting()
        return True

    def _compact(self) -> None:
        # Removed entries are skipped lazily; when they outnumber the live ones (many callers
        # gave up behind a starving priority level or in a full queue), drop them for good.
        for priority, level in list(self._levels.items()):
            live = [e for e in level if e.state == QUEUED]
            if live:
                self._levels[priority] = live
            else:
                del self._levels[priority]
        self._levels_heap = sorted(self._levels)
        self._waiting = deque(e for e in self._waiting if e.state == WAITING)
        self._arrivals = deque(e for e in self._arrivals if e.state == QUEUED)
        self._deadlines = [d for d in self._deadlines if d[2].state < TAKEN]
        heapq.heapify(self._deadlines)
        self._removed = 0

    def _admit_waiting(self) -> None:
        limit = self.max_queue_size
        waiting = self._waiting
        while waiting and (limit is None or self._queued < limit):
            entry = waiting.popleft()
            if entry.state == WAITING:
                self._waiting_count -= 1
                self.enqueue(entry)

    def expire(self, now: float) -> list[E]:
        """Remove and return the queued or waiting entries whose deadline is <= ``now``."""
        expired: list[E] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            entry = heapq.heappop(deadlines)[2]
            if self.remove(entry):
                expired.append(entry)
        return expired

    def next_deadline(self) -> float | None:
        """Return the earliest deadline among queued and waiting entries, or None."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].state >= TAKEN:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def remove_all(self) -> list[E]:
        """Remove and return every queued and waiting entry, in dispatch order."""
        entries = [e for e in self._iter_queued() if e.state == QUEUED]
        entries.sort(key=_order_key)
        entries.extend(e for e in self._waiting if e.state == WAITING)
        for entry in entries:
            entry.state = REMOVED
        self._levels.clear()
        self._levels_heap.clear()
        self._arrivals.clear()
        self._deadlines.clear()
        self._waiting.clear()
        self._queued = self._waiting_count = 0
        self._queued_cost = 0.0
        return entries

    def _iter_queued(self) -> Iterator[E]:
        for level in self._levels.values():
            yield from level

    # -- the policy ----------------------------------------------------------------------------

    def has_full_batch(self) -> bool:
        """Return whether the queued entries fill a batch (by count, or by cost budget)."""
        if self._queued >= self.max_batch_size:
            return True
        budget = self.max_batch_cost
        return budget is not None and self._queued_cost >= budget

    def _oldest(self) -> E:
        arrivals = self._arrivals
        while arrivals[0].state != QUEUED:
            arrivals.popleft()
        return arrivals[0]

    def next_dispatch_time(self, now: float) -> float | None:
        """Return when the next batch should leave: ``now`` or earlier means at once.

        Returns None when nothing is queued.
        """
        if not self._queued:
            return None
        if self.max_wait <= 0 or self.has_full_batch():
            return now
        oldest = self._oldest()
        if self.adaptive_wait:
            if oldest.seq != self._window_seq:  # a new wait window opens
                self._window_seq = oldest.seq
                self._window_base = self._queued
                self._window_waits = (
                    self._wait_score >= 0.25 or self._batches_since_wait >= self._PROBE_EVERY
                )
            if not self._window_waits:
                return now
        return oldest.enqueued_at + self.max_wait

    def take(self, now: float, limit: int | None = None) -> tuple[list[E], list[E]]:
        """Remove and return ``(batch, expired)``: the next batch, and entries found expired.

        The batch follows priority then arrival order and respects the size and cost limits;
        ``limit`` lowers the size limit (to top up a batch that already holds some entries).
        """
        expired = self.expire(now) if self._deadlines else []
        batch: list[E] = []
        limit = self.max_batch_size if limit is None else min(limit, self.max_batch_size)
        budget = self.max_batch_cost
        cost = 0.0
        levels = self._levels
        heap = self._levels_heap
        while heap and len(batch) < limit:
            priority = heap[0]
            level = levels[priority]
            if budget is None:  # the common case: count only, a slice off the front
                front = level[: limit - len(batch)]
                del level[: len(front)]
                skipped = False
                for entry in front:
                    if entry.state == QUEUED:
                        entry.state = TAKEN
                    else:  # removed meanwhile
                        skipped = True
                batch += [e for e in front if e.state == TAKEN] if skipped else front
            else:
                used = 0  # entries of `level` taken or skipped
                for entry in level:
                    if entry.state != QUEUED:
                        used += 1
                        continue
                    if batch and (len(batch) >= limit or cost + entry.cost > budget):
                        limit = len(batch)  # the next entry does not fit: the batch is complete
                        break
                    used += 1
                    entry.state = TAKEN
                    batch.append(entry)
                    cost += entry.cost
                del level[:used]
            if not level:
                heapq.heappop(heap)
                del levels[priority]
        self._queued -= len(batch)
        self._queued_cost = self._queued_cost - cost if self._queued else 0.0
        if self.adaptive_wait and batch:
            self._score_window(len(batch))
        self._admit_waiting()
        return batch, expired

    def _score_window(self, size: int) -> None:
        if self._window_seq >= 0 and self._window_waits:
            gained = size > self._window_base
            self._wait_score = 0.7 * self._wait_score + (0.3 if gained else 0.0)
            self._batches_since_wait = 0
        else:
            self._batches_since_wait += 1
        self._window_seq = -1


def _order_key(entry: QueueEntry) -> tuple[float, int]:
    return (entry.priority, entry.seq)
