"""Tests for ``batchkit/_core/_queue.py``: the sans-IO queue and batching policy.

Everything here is synchronous with an explicit ``now``: no event loop, no sleeps. First a
Hypothesis state machine checks the queue against a reference model written with plain lists;
then examples pin down each behaviour by name.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from batchkit import QueueFull
from batchkit._core._queue import BatchQueue, QueueEntry


class Entry(QueueEntry):
    """A queue entry that can be weakly referenced and prints readably in failure reports."""

    __slots__ = ("__weakref__",)

    def __repr__(self) -> str:
        return (
            f"Entry(p={self.priority}, seq={self.seq}, at={self.enqueued_at}, "
            f"deadline={self.deadline}, cost={self.cost})"
        )


class Feed:
    """Push entries into a queue with increasing ``seq``, as the engine does."""

    def __init__(self, queue: BatchQueue[Entry]) -> None:
        self.queue = queue
        self._seq = itertools.count()

    def make(
        self,
        *,
        at: float = 0.0,
        priority: float = 0,
        deadline: float | None = None,
        cost: float = 1.0,
    ) -> Entry:
        return Entry(priority, next(self._seq), at, deadline, cost)

    def push(
        self,
        *,
        at: float = 0.0,
        priority: float = 0,
        deadline: float | None = None,
        cost: float = 1.0,
        wait: bool = True,
    ) -> Entry:
        entry = self.make(at=at, priority=priority, deadline=deadline, cost=cost)
        self.queue.push(entry, wait=wait)
        return entry


def _order(entry: QueueEntry) -> tuple[float, int]:
    return (entry.priority, entry.seq)


# == The state machine =========================================================================

# Final outcomes; "queued" and "waiting" are the two live ones.
QUEUED, WAITING = "queued", "waiting"
TAKEN, REMOVED, EXPIRED, REJECTED, REMOVED_ALL = (
    "taken",
    "removed",
    "expired",
    "rejected",
    "remove_all",
)

# Dyadic values only, so that every sum of times and costs is exact in binary floating point.
PRIORITIES = (0, 1, 2, 0.5, -1.5)
COSTS = (1.0, 0.5, 2.0, 5.0)
DEADLINE_OFFSETS = (-1.0, 0.0, 0.5, 1.0, 3.0)
CLOCK_STEPS = (0.0, 0.25, 0.5, 1.0, 2.0)


class QueueMachine(RuleBasedStateMachine):
    """Drive a ``BatchQueue`` and a list-based reference model side by side."""

    entries = Bundle("entries")
    queue: BatchQueue[Entry]

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.seq = itertools.count()
        # The reference model: queued entries in admission order, waiting entries in FIFO order.
        self.queued: list[Entry] = []
        self.waiting: list[Entry] = []
        self.outcome: dict[Entry, str] = {}

    @initialize(
        max_batch_size=st.integers(1, 4),
        max_queue_size=st.none() | st.integers(1, 4),
        max_batch_cost=st.none() | st.sampled_from([2.0, 4.0]),
        max_wait=st.sampled_from([0.0, 1.5]),
        adaptive_wait=st.booleans(),
    )
    def configure(
        self,
        max_batch_size: int,
        max_queue_size: int | None,
        max_batch_cost: float | None,
        max_wait: float,
        adaptive_wait: bool,
    ) -> None:
        self.queue = BatchQueue(
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            max_batch_cost=max_batch_cost,
            max_wait=max_wait,
            adaptive_wait=adaptive_wait,
        )

    # -- the reference model ---------------------------------------------------------------------

    def model_full(self) -> bool:
        limit = self.queue.max_queue_size
        return limit is not None and (len(self.queued) >= limit or bool(self.waiting))

    def model_admit(self) -> None:
        limit = self.queue.max_queue_size
        while self.waiting and (limit is None or len(self.queued) < limit):
            entry = self.waiting.pop(0)
            self.queued.append(entry)
            self.outcome[entry] = QUEUED

    def settle(self, entries: list[Entry], outcome: str) -> None:
        """Record that the queue handed ``entries`` back with ``outcome``: each exactly once."""
        assert len({id(e) for e in entries}) == len(entries), "an entry was handed back twice"
        for entry in entries:
            before = self.outcome.get(entry)
            assert before in (QUEUED, WAITING), f"{entry} handed back as {outcome}, was {before}"
            (self.queued if before == QUEUED else self.waiting).remove(entry)
            self.outcome[entry] = outcome

    def model_expire(self) -> list[Entry]:
        live = self.queued + self.waiting
        return [e for e in live if e.deadline is not None and e.deadline <= self.now]

    def model_batch(self) -> list[Entry]:
        size = self.queue.max_batch_size
        budget = self.queue.max_batch_cost
        batch: list[Entry] = []
        cost = 0.0
        for entry in sorted(self.queued, key=_order):
            if len(batch) == size or (budget is not None and batch and cost + entry.cost > budget):
                break
            batch.append(entry)
            cost += entry.cost
        return batch

    def check_expired(self, expired: list[Entry]) -> None:
        expected = self.model_expire()
        assert len(expired) == len(expected)
        assert {id(e) for e in expired} == {id(e) for e in expected}
        self.settle(expired, EXPIRED)
        self.model_admit()

    def push_one(
        self, priority: float, deadline_in: float | None, cost: float, wait: bool
    ) -> Entry:
        deadline = None if deadline_in is None else self.now + deadline_in
        if self.queue.max_batch_cost is None:
            cost = 1.0
        entry = Entry(priority, next(self.seq), self.now, deadline, cost)
        full = self.model_full()
        if full and not wait:
            with pytest.raises(QueueFull):
                self.queue.push(entry, wait=False)
            self.outcome[entry] = REJECTED
            assert self.queue.remove(entry) is False  # a rejected entry left nothing behind
        else:
            self.queue.push(entry, wait=wait)
            if full:
                self.waiting.append(entry)
                self.outcome[entry] = WAITING
            else:
                self.queued.append(entry)
                self.outcome[entry] = QUEUED
        return entry

    # -- rules -----------------------------------------------------------------------------------

    @rule(
        target=entries,
        pushes=st.lists(
            st.tuples(
                st.sampled_from(PRIORITIES),
                st.none() | st.sampled_from(DEADLINE_OFFSETS),
                st.sampled_from(COSTS),
                st.booleans(),
            ),
            min_size=1,
            max_size=4,
        ),
    )
    def push(self, pushes: list[tuple[float, float | None, float, bool]]) -> MultipleResults[Entry]:
        # Several arrivals at the same instant, so that batches have something to gather.
        return multiple(*(self.push_one(*spec) for spec in pushes))

    @rule(entry=entries)
    def remove(self, entry: Entry) -> None:
        live = self.outcome[entry] in (QUEUED, WAITING)
        assert self.queue.remove(entry) is live
        if live:
            self.settle([entry], REMOVED)
            self.model_admit()

    @rule(step=st.sampled_from(CLOCK_STEPS))
    def advance(self, step: float) -> None:
        self.now += step

    @precondition(lambda self: self.queued or self.waiting)
    @rule()
    def take(self) -> None:
        batch, expired = self.queue.take(self.now)
        self.check_expired(expired)
        expected = self.model_batch()
        # Exactly the prefix the model predicts: no entry skipped over, none pulled forward.
        assert [id(e) for e in batch] == [id(e) for e in expected], (batch, expected)
        # The contract stated directly, as well as through the model.
        assert batch == sorted(batch, key=_order)
        assert len(batch) <= self.queue.max_batch_size
        budget = self.queue.max_batch_cost
        if budget is not None and len(batch) > 1:
            assert sum(e.cost for e in batch) <= budget
        assert all(e.deadline is None or e.deadline > self.now for e in batch)
        self.settle(batch, TAKEN)
        self.model_admit()

    @precondition(lambda self: self.queued or self.waiting)
    @rule()
    def expire(self) -> None:
        self.check_expired(self.queue.expire(self.now))

    @rule(dice=st.integers(0, 15))
    def remove_all(self, dice: int) -> None:
        if dice:  # rarely: most runs should keep their queue
            return
        self.check_remove_all()

    @invariant()
    def dispatch_time_matches_the_model(self) -> None:
        when = self.queue.next_dispatch_time(self.now)
        if not self.queued:
            assert when is None
            return
        queue = self.queue
        budget = queue.max_batch_cost
        if (
            queue.max_wait <= 0
            or len(self.queued) >= queue.max_batch_size
            or (budget is not None and sum(e.cost for e in self.queued) >= budget)
        ):
            assert when is not None
            assert when <= self.now
            return
        oldest = min(e.enqueued_at for e in self.queued) + queue.max_wait
        if queue.adaptive_wait:
            assert when in (self.now, oldest)
        else:
            assert when == oldest

    def check_remove_all(self) -> None:
        entries = self.queue.remove_all()
        expected = sorted(self.queued, key=_order) + self.waiting
        assert [id(e) for e in entries] == [id(e) for e in expected]
        self.settle(entries, REMOVED_ALL)
        assert not self.queued
        assert not self.waiting

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def sizes_match_the_model(self) -> None:
        assert len(self.queue) == len(self.queued)
        assert self.queue.waiting_for_room == len(self.waiting)
        assert self.queue.full is self.model_full()

    @invariant()
    def every_entry_has_exactly_one_outcome(self) -> None:
        # `outcome` gives each pushed entry one state; `settle` only moves live entries to a
        # final one. Here the live states agree with the model's lists, which
        # `sizes_match_the_model` ties to the queue: nothing lost, nothing counted twice.
        for state, entries in ((QUEUED, self.queued), (WAITING, self.waiting)):
            ids = [id(e) for e in entries]
            assert len(set(ids)) == len(ids)
            assert set(ids) == {id(e) for e, o in self.outcome.items() if o == state}

    def teardown(self) -> None:
        # Drain what is left: then every pushed entry has a final outcome, nothing is lost.
        if hasattr(self, "queue"):
            self.check_remove_all()
            assert all(o not in (QUEUED, WAITING) for o in self.outcome.values())
            # A final outcome is final: no entry can be removed (or counted) a second time.
            assert not any(self.queue.remove(entry) for entry in self.outcome)
            assert len(self.queue) == 0
            assert self.queue.waiting_for_room == 0
            assert self.queue.next_dispatch_time(self.now) is None


QueueMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_queue_state_machine = QueueMachine.TestCase


# == Greedy dispatch (max_wait 0) ===============================================================


class TestGreedyDispatch:
    def test_empty_queue_has_no_dispatch_time(self) -> None:
        queue = BatchQueue(max_batch_size=4)
        assert queue.next_dispatch_time(5.0) is None
        assert queue.take(5.0) == ([], [])

    def test_a_single_entry_leaves_at_once(self) -> None:
        queue = BatchQueue(max_batch_size=4)
        entry = Feed(queue).push(at=1.0)
        assert queue.next_dispatch_time(1.0) == 1.0
        assert queue.take(1.0) == ([entry], [])
        assert len(queue) == 0

    def test_takes_whatever_is_queued_up_to_max_batch_size(self) -> None:
        queue = BatchQueue(max_batch_size=3)
        feed = Feed(queue)
        entries = [feed.push() for _ in range(5)]
        batch, _ = queue.take(0.0)
        assert batch == entries[:3]
        assert queue.next_dispatch_time(0.0) == 0.0  # the rest leaves at once too
        batch, _ = queue.take(0.0)
        assert batch == entries[3:]
        assert queue.next_dispatch_time(0.0) is None


# == Waiting for company (max_wait > 0) =========================================================


class TestMaxWait:
    def test_waits_max_wait_from_the_oldest_entry(self) -> None:
        queue = BatchQueue(max_batch_size=4, max_wait=2.0)
        feed = Feed(queue)
        feed.push(at=1.0)
        assert queue.next_dispatch_time(1.0) == 3.0
        feed.push(at=2.5)  # a later arrival does not extend the wait
        assert queue.next_dispatch_time(2.5) == 3.0
        assert queue.next_dispatch_time(3.0) == 3.0

    def test_the_next_oldest_sets_the_time_after_the_oldest_leaves(self) -> None:
        queue = BatchQueue(max_batch_size=4, max_wait=2.0)
        feed = Feed(queue)
        oldest = feed.push(at=1.0)
        feed.push(at=2.0)
        assert queue.remove(oldest)
        assert queue.next_dispatch_time(2.0) == 4.0

    def test_the_oldest_counts_whatever_its_priority(self) -> None:
        queue = BatchQueue(max_batch_size=4, max_wait=2.0)
        feed = Feed(queue)
        feed.push(at=1.0, priority=9)
        feed.push(at=2.0, priority=0)
        assert queue.next_dispatch_time(2.0) == 3.0

    def test_take_ignores_the_timer(self) -> None:
        # The runner decides when to call take; take itself always hands out a batch.
        queue = BatchQueue(max_batch_size=4, max_wait=2.0)
        entry = Feed(queue).push(at=1.0)
        assert queue.take(1.5) == ([entry], [])

    def test_an_admitted_waiting_entry_keeps_its_arrival_time(self) -> None:
        queue = BatchQueue(max_batch_size=4, max_queue_size=1, max_wait=2.0)
        feed = Feed(queue)
        first = feed.push(at=0.0)
        feed.push(at=1.0)  # waits for room
        assert queue.remove(first)
        assert queue.next_dispatch_time(5.0) == 3.0  # overdue: it has waited since 1.0


class TestFullBatchLeavesAtOnce:
    def test_full_by_count(self) -> None:
        queue = BatchQueue(max_batch_size=3, max_wait=10.0)
        feed = Feed(queue)
        feed.push(at=0.0)
        feed.push(at=1.0)
        assert queue.next_dispatch_time(1.0) == 10.0
        feed.push(at=2.0)
        assert queue.next_dispatch_time(2.0) == 2.0

    def test_full_by_cost(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_wait=10.0, max_batch_cost=4.0)
        feed = Feed(queue)
        feed.push(cost=2.0)
        assert queue.next_dispatch_time(0.0) == 10.0
        feed.push(cost=2.0)
        assert queue.next_dispatch_time(0.0) == 0.0

    def test_an_oversize_entry_leaves_at_once(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_wait=10.0, max_batch_cost=4.0)
        Feed(queue).push(cost=7.0)
        assert queue.next_dispatch_time(0.0) == 0.0

    def test_no_longer_full_after_a_removal(self) -> None:
        queue = BatchQueue(max_batch_size=2, max_wait=10.0)
        feed = Feed(queue)
        feed.push(at=0.0)
        second = feed.push(at=1.0)
        assert queue.next_dispatch_time(1.0) == 1.0
        assert queue.remove(second)
        assert queue.next_dispatch_time(1.0) == 10.0


# == Cost budget ================================================================================


def _costs(batch: list[Entry]) -> list[float]:
    return [e.cost for e in batch]


class TestCostBudget:
    def test_fills_up_to_the_budget(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_batch_cost=4.0)
        feed = Feed(queue)
        for cost in (2.0, 2.0, 1.0):
            feed.push(cost=cost)
        assert _costs(queue.take(0.0)[0]) == [2.0, 2.0]
        assert _costs(queue.take(0.0)[0]) == [1.0]

    def test_an_oversize_entry_leaves_alone(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_batch_cost=4.0)
        feed = Feed(queue)
        for cost in (1.0, 7.0, 1.0):
            feed.push(cost=cost)
        assert _costs(queue.take(0.0)[0]) == [1.0]
        assert _costs(queue.take(0.0)[0]) == [7.0]
        assert _costs(queue.take(0.0)[0]) == [1.0]

    def test_an_oversize_entry_first_in_line_is_not_joined_by_a_free_one(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_batch_cost=4.0)
        feed = Feed(queue)
        feed.push(cost=7.0)
        feed.push(cost=0.0)
        assert _costs(queue.take(0.0)[0]) == [7.0]
        assert _costs(queue.take(0.0)[0]) == [0.0]

    def test_a_smaller_later_entry_does_not_jump_the_line(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_batch_cost=4.0)
        feed = Feed(queue)
        for cost in (3.0, 2.0, 1.0):
            feed.push(cost=cost)
        assert _costs(queue.take(0.0)[0]) == [3.0]  # the 1.0 would fit, but 2.0 is next
        assert _costs(queue.take(0.0)[0]) == [2.0, 1.0]

    def test_count_limit_still_applies_under_the_budget(self) -> None:
        queue = BatchQueue(max_batch_size=2, max_batch_cost=100.0)
        feed = Feed(queue)
        for _ in range(3):
            feed.push(cost=1.0)
        assert len(queue.take(0.0)[0]) == 2


# == Order ======================================================================================


class TestOrder:
    def test_lower_priority_number_first_ties_by_arrival(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        feed = Feed(queue)
        a = feed.push(priority=2)
        b = feed.push(priority=0)
        c = feed.push(priority=1)
        d = feed.push(priority=0)
        assert queue.take(0.0)[0] == [b, d, c, a]

    def test_float_priorities(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        feed = Feed(queue)
        a = feed.push(priority=0.5)
        b = feed.push(priority=-1.0)
        c = feed.push(priority=0.25)
        d = feed.push(priority=0.5)
        e = feed.push(priority=1)
        assert queue.take(0.0)[0] == [b, c, a, d, e]

    @pytest.mark.parametrize(("first", "second"), [(1, 1.0), (0.0, -0.0), (-0.0, 0)])
    def test_equal_priorities_of_different_spelling_keep_arrival_order(
        self, first: float, second: float
    ) -> None:
        queue = BatchQueue(max_batch_size=10)
        feed = Feed(queue)
        a = feed.push(priority=first)
        b = feed.push(priority=second)
        c = feed.push(priority=first)
        assert queue.take(0.0)[0] == [a, b, c]

    def test_ties_use_seq_not_arrival_at_the_queue(self) -> None:
        # seq is the tiebreak even if entries reach the queue out of seq order.
        queue = BatchQueue(max_batch_size=10)
        late = Entry(0, 5, 0.0)
        early = Entry(0, 1, 0.0)
        queue.push(late)
        queue.push(early)
        assert queue.remove_all() == [early, late]

    def test_order_holds_across_batches(self) -> None:
        queue = BatchQueue(max_batch_size=2)
        feed = Feed(queue)
        low = [feed.push(priority=5) for _ in range(2)]
        high = [feed.push(priority=1) for _ in range(3)]
        assert queue.take(0.0)[0] == high[:2]
        late_high = feed.push(priority=1)
        assert queue.take(0.0)[0] == [high[2], late_high]
        assert queue.take(0.0)[0] == low

    def test_a_later_higher_priority_entry_overtakes(self) -> None:
        queue = BatchQueue(max_batch_size=1)
        feed = Feed(queue)
        first = feed.push(priority=1)
        urgent = feed.push(priority=0)
        assert queue.take(0.0)[0] == [urgent]
        assert queue.take(0.0)[0] == [first]


# == Removal (cancellation) =====================================================================


class TestRemove:
    def test_remove_a_queued_entry(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        feed = Feed(queue)
        a, b, c = feed.push(), feed.push(), feed.push()
        assert queue.remove(b) is True
        assert len(queue) == 2
        assert queue.take(0.0)[0] == [a, c]

    def test_remove_twice(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        entry = Feed(queue).push()
        assert queue.remove(entry) is True
        assert queue.remove(entry) is False
        assert len(queue) == 0
        assert queue.next_dispatch_time(0.0) is None

    def test_remove_an_entry_never_pushed(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=2)
        feed = Feed(queue)
        assert queue.remove(feed.make()) is False
        assert (len(queue), queue.waiting_for_room) == (0, 0)
        entry = feed.push()
        assert queue.take(0.0)[0] == [entry]

    def test_removed_entries_behind_a_starving_level_are_released(self) -> None:
        queue: BatchQueue[Entry] = BatchQueue(max_batch_size=1)
        feed = Feed(queue)
        feed.push(priority=0)
        refs = []
        for _ in range(1000):  # callers at a lower priority give up before being served
            entry = feed.push(priority=5)
            refs.append(weakref.ref(entry))
            assert queue.remove(entry) is True
            del entry
        assert sum(ref() is not None for ref in refs) <= 130
        assert len(queue) == 1

    def test_remove_a_taken_entry(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        entry = Feed(queue).push()
        queue.take(0.0)
        assert queue.remove(entry) is False
        assert len(queue) == 0

    def test_remove_an_expired_entry(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        entry = Feed(queue).push(deadline=1.0)
        assert queue.expire(1.0) == [entry]
        assert queue.remove(entry) is False

    def test_remove_a_waiting_entry(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1)
        feed = Feed(queue)
        queued = feed.push()
        waiting = feed.push()
        assert queue.remove(waiting) is True
        assert queue.waiting_for_room == 0
        assert queue.full  # the queued entry still fills it
        assert queue.take(0.0)[0] == [queued]
        assert len(queue) == 0  # the removed entry is never admitted
        assert queue.take(0.0)[0] == []

    def test_removing_a_queued_entry_admits_the_first_waiting(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1)
        feed = Feed(queue)
        queued = feed.push()
        waiting = feed.push()
        assert queue.remove(queued) is True
        assert len(queue) == 1
        assert queue.waiting_for_room == 0
        assert queue.take(0.0)[0] == [waiting]

    def test_removing_a_rejected_entry_changes_nothing(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1)
        feed = Feed(queue)
        queued = feed.push()
        rejected = feed.make()
        with pytest.raises(QueueFull):
            queue.push(rejected, wait=False)
        assert queue.remove(rejected) is False
        assert queue.waiting_for_room == 0
        assert queue.take(0.0)[0] == [queued]
        # The queue still admits new entries normally afterwards.
        later = feed.push()
        assert len(queue) == 1
        assert queue.take(0.0)[0] == [later]


# == Backpressure ===============================================================================


class TestBackpressure:
    def test_full_queue_rejects_a_non_waiting_push(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=2)
        feed = Feed(queue)
        feed.push()
        assert not queue.full
        feed.push()
        assert queue.full
        with pytest.raises(QueueFull, match="2"):
            feed.push(wait=False)
        assert len(queue) == 2
        assert queue.waiting_for_room == 0

    def test_full_queue_parks_a_waiting_push(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=2)
        feed = Feed(queue)
        feed.push()
        feed.push()
        feed.push(wait=True)
        assert len(queue) == 2
        assert queue.waiting_for_room == 1
        assert queue.full

    def test_waiting_entries_are_admitted_in_fifo_order(self) -> None:
        queue = BatchQueue(max_batch_size=1, max_queue_size=1)
        feed = Feed(queue)
        first = feed.push(priority=5)
        w1 = feed.push(priority=9)
        w2 = feed.push(priority=0)  # more urgent, but it arrived later: it still waits its turn
        w3 = feed.push(priority=0)
        assert queue.waiting_for_room == 3
        assert queue.take(0.0)[0] == [first]
        assert (len(queue), queue.waiting_for_room) == (1, 2)
        assert queue.take(0.0)[0] == [w1]
        assert queue.take(0.0)[0] == [w2]
        assert queue.take(0.0)[0] == [w3]
        assert not queue.full

    def test_once_admitted_priority_applies(self) -> None:
        queue = BatchQueue(max_batch_size=3, max_queue_size=3)
        feed = Feed(queue)
        blockers = [feed.push(priority=5) for _ in range(3)]
        low = feed.push(priority=9)
        high = feed.push(priority=0)
        assert queue.take(0.0)[0] == blockers
        assert queue.take(0.0)[0] == [high, low]

    def test_a_non_waiting_push_does_not_overtake_waiting_ones(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1)
        feed = Feed(queue)
        feed.push()
        feed.push()  # waiting
        assert queue.full
        with pytest.raises(QueueFull):
            feed.push(wait=False)

    def test_a_take_makes_room_for_as_many_as_it_took(self) -> None:
        queue = BatchQueue(max_batch_size=2, max_queue_size=3)
        feed = Feed(queue)
        for _ in range(6):
            feed.push()
        assert (len(queue), queue.waiting_for_room) == (3, 3)
        queue.take(0.0)
        assert (len(queue), queue.waiting_for_room) == (3, 1)
        assert queue.full
        queue.take(0.0)
        assert (len(queue), queue.waiting_for_room) == (2, 0)
        assert not queue.full

    def test_unbounded_queue_is_never_full(self) -> None:
        queue = BatchQueue(max_batch_size=1)
        feed = Feed(queue)
        for _ in range(100):
            feed.push(wait=False)
        assert not queue.full
        assert len(queue) == 100


# == Deadlines ==================================================================================


class TestExpire:
    def test_expires_at_the_deadline_not_before(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        entry = Feed(queue).push(deadline=2.0)
        assert queue.expire(1.5) == []
        assert queue.expire(2.0) == [entry]
        assert len(queue) == 0
        assert queue.expire(3.0) == []

    def test_only_entries_past_their_deadline(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        feed = Feed(queue)
        soon = feed.push(deadline=1.0)
        feed.push(deadline=5.0)
        feed.push()
        assert queue.expire(2.0) == [soon]
        assert len(queue) == 2

    def test_take_returns_expired_entries_apart_from_the_batch(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        feed = Feed(queue)
        a = feed.push(deadline=3.0)
        b = feed.push(deadline=1.0)
        c = feed.push()
        batch, expired = queue.take(3.0)  # a's deadline is exactly now: it is not taken
        assert batch == [c]
        assert {id(e) for e in expired} == {id(a), id(b)}

    def test_expired_waiting_entry_is_never_admitted(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1)
        feed = Feed(queue)
        queued = feed.push()
        waiting = feed.push(deadline=1.0)
        assert queue.expire(1.0) == [waiting]
        assert queue.waiting_for_room == 0
        assert queue.take(1.0) == ([queued], [])
        assert len(queue) == 0

    def test_expiring_a_queued_entry_admits_a_waiting_one(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1)
        feed = Feed(queue)
        feed.push(deadline=1.0)
        waiting = feed.push()
        batch, expired = queue.take(1.0)
        assert len(expired) == 1
        assert batch == [waiting]  # admitted in time to join this batch

    def test_a_taken_entry_is_not_expired_later(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        entry = Feed(queue).push(deadline=2.0)
        assert queue.take(1.0) == ([entry], [])
        assert queue.expire(5.0) == []

    def test_a_deadline_already_past_at_push(self) -> None:
        queue = BatchQueue(max_batch_size=10)
        entry = Feed(queue).push(at=5.0, deadline=4.0)
        assert queue.take(5.0) == ([], [entry])

    def test_next_deadline_skips_entries_that_left(self) -> None:
        queue = BatchQueue(max_batch_size=1)
        feed = Feed(queue)
        assert queue.next_deadline() is None
        first = feed.push(deadline=2.0)
        feed.push(deadline=3.0)
        feed.push()
        assert queue.next_deadline() == 2.0
        assert queue.take(0.0)[0] == [first]
        assert queue.next_deadline() == 3.0


# == remove_all =================================================================================


class TestRemoveAll:
    def test_returns_queued_in_dispatch_order_then_waiting_in_fifo_order(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=3)
        feed = Feed(queue)
        q1 = feed.push(priority=2)
        q2 = feed.push(priority=0)
        q3 = feed.push(priority=1)
        w1 = feed.push(priority=9)
        w2 = feed.push(priority=0)
        assert queue.remove_all() == [q2, q3, q1, w1, w2]

    def test_empties_the_queue(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=1, max_wait=1.0)
        feed = Feed(queue)
        queued = feed.push(deadline=5.0)
        waiting = feed.push(deadline=5.0)
        queue.remove_all()
        assert len(queue) == 0
        assert queue.waiting_for_room == 0
        assert not queue.full
        assert queue.next_dispatch_time(0.0) is None
        assert queue.next_deadline() is None
        assert queue.take(10.0) == ([], [])
        assert queue.remove(queued) is False
        assert queue.remove(waiting) is False

    def test_skips_entries_that_already_left(self) -> None:
        queue = BatchQueue(max_batch_size=1)
        feed = Feed(queue)
        taken = feed.push()
        removed = feed.push()
        kept = feed.push()
        assert queue.take(0.0)[0] == [taken]
        queue.remove(removed)
        assert queue.remove_all() == [kept]

    def test_the_queue_works_normally_afterwards(self) -> None:
        queue = BatchQueue(max_batch_size=10, max_queue_size=2, max_wait=1.0)
        feed = Feed(queue)
        for _ in range(4):
            feed.push()
        queue.remove_all()
        fresh = feed.push(at=3.0)
        assert queue.next_dispatch_time(3.0) == 4.0
        assert queue.take(4.0) == ([fresh], [])


# == Adaptive wait ==============================================================================


def _sequential_caller(feed: Feed, calls: int, *, start: float = 0.0) -> list[bool]:
    """One caller that sends its next item only after the previous one left; return who waited."""
    queue = feed.queue
    now = start
    waited = []
    for _ in range(calls):
        feed.push(at=now)
        due = queue.next_dispatch_time(now)
        assert due is not None
        waited.append(due > now)
        now = max(now, due)
        batch, _ = queue.take(now)
        assert len(batch) == 1
        now += 1.0  # the caller works on the result, then calls again
    return waited


def _open_loop(feed: Feed, arrivals: list[float]) -> list[tuple[float, int]]:
    """Dispatch like the runner for items arriving at ``arrivals``; return (time, size) batches."""
    queue = feed.queue
    pending = deque(sorted(arrivals))
    batches: list[tuple[float, int]] = []
    now = 0.0
    while pending or len(queue):
        due = queue.next_dispatch_time(now)
        if due is not None and due <= now:
            batch, _ = queue.take(now)
            batches.append((now, len(batch)))
            continue
        now = min(pending[0] if pending else math.inf, math.inf if due is None else due)
        while pending and pending[0] <= now:
            feed.push(at=pending.popleft())
    return batches


def _bursts(count: int, *, start: float = 0.0, size: int = 4) -> list[float]:
    """Bursts of ``size`` items spread over 0.3 s, one burst every 10 s."""
    return [start + 10.0 * b + 0.1 * i for b in range(count) for i in range(size)]


class TestAdaptiveWait:
    def test_without_adaptive_wait_a_lone_caller_always_pays_the_wait(self) -> None:
        queue = BatchQueue(max_batch_size=8, max_wait=0.5)
        assert all(_sequential_caller(Feed(queue), 30))

    def test_a_lone_sequential_caller_stops_paying_the_wait(self) -> None:
        queue = BatchQueue(max_batch_size=8, max_wait=0.5, adaptive_wait=True)
        waited = _sequential_caller(Feed(queue), 60)
        assert waited[0]  # it starts out waiting: it cannot know yet
        assert waited.index(False) <= 6  # it gives up after a few fruitless waits
        assert not any(waited[6:12])
        # Occasional probes are allowed, but most calls go straight through.
        assert sum(waited) <= 12

    def test_a_bursty_load_keeps_waiting(self) -> None:
        queue = BatchQueue(max_batch_size=8, max_wait=0.5, adaptive_wait=True)
        batches = _open_loop(Feed(queue), _bursts(30))
        assert [size for _, size in batches] == [4] * 30  # each burst gathered into one batch
        assert all(at == 10.0 * b + 0.5 for b, (at, _) in enumerate(batches))

    def test_waiting_resumes_when_bursts_return_after_a_quiet_spell(self) -> None:
        queue = BatchQueue(max_batch_size=8, max_wait=0.5, adaptive_wait=True)
        feed = Feed(queue)
        assert not all(_sequential_caller(feed, 10))
        batches = _open_loop(feed, _bursts(40, start=1000.0))
        sizes = [size for _, size in batches]
        # At first the bursts go out item by item, then a probe finds they gather again.
        assert sizes[0] == 1
        assert sizes[-10:] == [4] * 10

    def test_a_full_batch_leaves_at_once_whatever_the_score(self) -> None:
        queue = BatchQueue(max_batch_size=2, max_wait=0.5, adaptive_wait=True)
        feed = Feed(queue)
        feed.push(at=0.0)
        feed.push(at=0.0)
        assert queue.next_dispatch_time(0.0) == 0.0


# == Memory: entries that left are not kept alive ==============================================


@pytest.mark.parametrize("starving", [False, True], ids=["fifo", "starving-low-priority"])
def test_taken_entries_are_released_under_sustained_load(starving: bool) -> None:
    # Under a load that keeps every batch full, the queue must not hold on to entries it
    # handed out (the engine's entries carry the caller's item and future).
    queue = BatchQueue(max_batch_size=4, max_wait=1.0)
    feed = Feed(queue)
    if starving:
        feed.push(priority=9)  # never served while the urgent load lasts
    refs = []
    for step in range(500):
        for _ in range(4):
            refs.append(weakref.ref(feed.push(at=float(step))))
        assert queue.next_dispatch_time(float(step)) == float(step)
        batch, _ = queue.take(float(step))
        assert len(batch) == 4
        del batch
    alive = sum(ref() is not None for ref in refs)
    assert alive < len(refs) // 10, f"{alive} of {len(refs)} taken entries still alive"
