"""Contract breaks found under long randomized load, each pinned by a small, deterministic test
through the public API (outcomes and ``statistics()`` only). Asyncio and trio.

Most of them live where a sync model runs in the engine's own threads on asyncio: there the
next batch is staged (handed to the model thread) while the one before it runs, and a staged
batch is the window most of these tests hold open with gates. Where a test needs the engine's
loop to be busy at one precise moment, it blocks that loop for a bounded time on a
``threading.Event`` (as ``test_model.py`` does for staged batches) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from batchkit import BatchedModel, ClosedError, ModelError, QueueFull, Versioned

from ..support.helpers import GatedModel

pytestmark = pytest.mark.anyio

# Bound on every wait for another thread: the tests never get near it unless they fail.
LIMIT = 10.0


async def settle() -> None:
    """Let every other task of this loop run until all are blocked (no sleeping)."""
    await anyio.wait_all_tasks_blocked()


async def until(condition: Callable[[], bool]) -> None:
    """Wait, yielding to the loop, until ``condition()`` holds (state other threads change)."""
    with anyio.fail_after(LIMIT):
        while not condition():
            await anyio.lowlevel.checkpoint()


async def wait_event(event: threading.Event) -> None:
    """Wait for a ``threading.Event`` without blocking this loop."""
    assert await anyio.to_thread.run_sync(event.wait, LIMIT), "the event never came"


def hold_loop_until(event: threading.Event) -> None:
    """Block the calling loop's thread (bounded) until another thread sets ``event``."""
    assert event.wait(LIMIT), "the event never came"


class Outcomes(dict[Any, Any]):
    """Each caller's outcome, by item: its value (``Versioned`` for versioned calls) or error."""

    def spawn(
        self,
        tg: anyio.abc.TaskGroup,
        call: Callable[..., Any],
        item: Any,
        **kwargs: Any,
    ) -> None:
        async def one() -> None:
            try:
                self[item] = await call(item, **kwargs)
            except Exception as exc:
                self[item] = exc

        tg.start_soon(one)


class HeldSyncModel:
    """A sync model (run in a worker thread) that records each batch with its version and
    holds the batches whose first item is in ``hold`` until ``release(item)``."""

    def __init__(self, version: str, batches: list[tuple[str, list[Any]]], hold: set[Any]) -> None:
        self.version = version
        self.batches = batches
        self.hold = hold
        self.started: dict[Any, threading.Event] = {}
        self.gates: dict[Any, threading.Event] = {}
        for item in hold:
            self.started[item] = threading.Event()
            self.gates[item] = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append((self.version, list(items)))
        first = items[0]
        if first in self.hold:
            self.started[first].set()
            self.gates[first].wait(LIMIT)
        return [(self.version, item) for item in items]

    def release(self, item: Any) -> None:
        self.gates[item].set()


# -- 1. swapping between a sync and an async model while batches run ---------------------------


class TestSwapBetweenSyncAndAsync:
    async def test_sync_to_async_swap_while_a_batch_runs_keeps_the_engine_alive(self) -> None:
        """A batch staged right after a swap to an async model must not break the engine: no
        exception escapes ``async with``, and every caller gets its output, from the new model."""
        batches: list[tuple[str, list[Any]]] = []
        old = HeldSyncModel("1", batches, hold={1})

        async def new(items: list[Any]) -> list[Any]:
            batches.append(("2", list(items)))
            await anyio.lowlevel.checkpoint()
            return [("2", item) for item in items]

        results = Outcomes()
        with anyio.fail_after(LIMIT):
            async with BatchedModel(old, version="1") as model:
                async with anyio.create_task_group() as tg:
                    results.spawn(tg, model.call_versioned, 1)
                    await wait_event(old.started[1])
                    await model.swap(new, version="2")
                    for item in (2, 3):  # arriving while the old model's batch runs
                        results.spawn(tg, model.call_versioned, item)
                        await settle()
                    old.release(1)
        assert results == {
            1: Versioned(("1", 1), "1"),
            2: Versioned(("2", 2), "2"),
            3: Versioned(("2", 3), "2"),
        }
        stats = model.statistics()
        assert (stats.submitted, stats.completed, stats.pending) == (3, 3, 0)

    async def test_sync_to_async_swap_on_the_background_engine_answers_every_caller(
        self,
    ) -> None:
        """The same on the background engine: its thread must survive, and callers without a
        timeout must be answered (they would wait forever for a dead engine)."""
        batches: list[tuple[str, list[Any]]] = []
        old = HeldSyncModel("1", batches, hold={1})

        async def new(items: list[Any]) -> list[Any]:
            batches.append(("2", list(items)))
            await anyio.lowlevel.checkpoint()
            return [("2", item) for item in items]

        model = BatchedModel(old, version="1")
        results = Outcomes()
        try:
            with anyio.move_on_after(5) as scope:
                async with anyio.create_task_group() as tg:
                    results.spawn(tg, model.call_versioned, 1)
                    await wait_event(old.started[1])
                    await model.swap(new, version="2")
                    for n in (2, 3):
                        results.spawn(tg, model.call_versioned, n)
                        await until(lambda: model.statistics().submitted == n)  # noqa: B023 (awaited here)
                    old.release(1)
            assert not scope.cancelled_caught, f"callers still waiting: {results}"
            assert results == {
                1: Versioned(("1", 1), "1"),
                2: Versioned(("2", 2), "2"),
                3: Versioned(("2", 3), "2"),
            }
        finally:
            await model.aclose()

    async def test_async_to_sync_swap_keeps_max_concurrency(self) -> None:
        """With ``max_concurrency=2``, an async batch still running from before a swap to a
        sync model and two sync batches after it must never run at the same time."""
        lock = threading.Lock()
        running = [0]
        peak = [0]
        third = threading.Event()

        def enter() -> None:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                if running[0] >= 3:
                    third.set()

        def leave() -> None:
            with lock:
                running[0] -= 1

        old_gate = anyio.Event()
        old_started = anyio.Event()

        async def old(items: list[Any]) -> list[Any]:
            enter()
            try:
                old_started.set()
                await old_gate.wait()
                return [("1", item) for item in items]
            finally:
                leave()

        new_started = threading.Event()
        new_gate = threading.Event()

        def new(items: list[Any]) -> list[Any]:
            enter()
            try:
                new_started.set()
                new_gate.wait(LIMIT)
                return [("2", item) for item in items]
            finally:
                leave()

        results = Outcomes()
        with anyio.fail_after(LIMIT):
            async with BatchedModel(old, version="1", max_concurrency=2) as model:
                async with anyio.create_task_group() as tg:
                    results.spawn(tg, model.call_versioned, 1)
                    await old_started.wait()  # batch [1] holds one slot, on the old model
                    await model.swap(new, version="2")
                    results.spawn(tg, model.call_versioned, 2)
                    await wait_event(new_started)  # batch [2] holds the other slot
                    results.spawn(tg, model.call_versioned, 3)
                    await settle()
                    # Both slots are taken: batch [3] must not start. (This bounded wait only
                    # runs out when it rightly does not.)
                    started_a_third = await anyio.to_thread.run_sync(third.wait, 0.3)
                    old_gate.set()
                    new_gate.set()
        assert not started_a_third, "three batches ran at once with max_concurrency=2"
        assert peak[0] <= 2
        assert results == {
            1: Versioned(("1", 1), "1"),
            2: Versioned(("2", 2), "2"),
            3: Versioned(("2", 3), "2"),
        }


# -- 2. cancelling call_many withdraws every item ----------------------------------------------


class TestCancelledCallMany:
    async def test_cancelling_call_many_withdraws_every_queued_item(self) -> None:
        gated = GatedModel()
        async with BatchedModel(gated, max_batch_size=8) as model:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await gated.started.wait()
                with anyio.CancelScope() as scope:
                    tg.start_soon(lambda: _cancel_when_blocked(scope))
                    await model.call_many([1, 2, 3])  # queued behind the running batch
                assert scope.cancelled_caught
                gated.open()
        assert gated.seen == [0], "the model computed items of a cancelled call_many"
        stats = model.statistics()
        assert (stats.submitted, stats.completed, stats.cancelled) == (4, 1, 3)
        assert stats.batch_sizes == {1: 1}

    async def test_cancelling_call_many_from_another_loop_withdraws_every_item(self) -> None:
        """The same with the engine on its background thread and the caller on this loop."""
        gate = threading.Event()
        started = threading.Event()
        seen: list[Any] = []

        def fn(items: list[Any]) -> list[Any]:
            seen.extend(items)
            started.set()
            gate.wait(LIMIT)
            return [item * 10 for item in items]

        model = BatchedModel(fn, max_batch_size=8)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await wait_event(started)
                with anyio.CancelScope() as scope:
                    tg.start_soon(_cancel_once, scope, model, 4)
                    await model.call_many([1, 2, 3])
                assert scope.cancelled_caught
                gate.set()
        finally:
            await model.aclose()
        assert seen == [0]
        stats = model.statistics()
        assert (stats.submitted, stats.completed, stats.cancelled) == (4, 1, 3)


async def _cancel_when_blocked(scope: anyio.CancelScope) -> None:
    await settle()
    scope.cancel()


async def _cancel_once(scope: anyio.CancelScope, model: BatchedModel[Any, Any], n: int) -> None:
    await until(lambda: model.statistics().submitted == n)
    scope.cancel()


# -- 3. a call made after swap() or rollback() returned runs on the new version ----------------


class TestCallsAfterASwapRunOnTheNewVersion:
    async def test_a_call_after_swap_returned_runs_on_the_new_version(self) -> None:
        batches: list[tuple[str, list[Any]]] = []
        old = HeldSyncModel("1", batches, hold={1})
        new = HeldSyncModel("2", batches, hold=set())
        results = Outcomes()
        async with BatchedModel(old, version="1") as model:
            async with anyio.create_task_group() as tg:
                results.spawn(tg, model.call_versioned, 1)
                await wait_event(old.started[1])
                results.spawn(tg, model.call_versioned, 2)  # queued behind [1], before the swap
                await settle()
                await model.swap(new, version="2")
                assert model.version == "2"
                results.spawn(tg, model.call_versioned, 3)  # made after swap() returned
                await settle()
                old.release(1)
        assert results[1] == Versioned(("1", 1), "1")
        assert results[3] == Versioned(("2", 3), "2"), f"batches run: {batches}"

    async def test_a_call_after_rollback_returned_runs_on_the_restored_version(self) -> None:
        batches: list[tuple[str, list[Any]]] = []
        first = HeldSyncModel("1", batches, hold=set())
        second = HeldSyncModel("2", batches, hold={1})
        results = Outcomes()
        async with BatchedModel(first, version="1") as model:
            await model.swap(second, version="2")
            async with anyio.create_task_group() as tg:
                results.spawn(tg, model.call_versioned, 1)
                await wait_event(second.started[1])
                results.spawn(tg, model.call_versioned, 2)
                await settle()
                assert await model.rollback() == "1"
                results.spawn(tg, model.call_versioned, 3)  # made after rollback() returned
                await settle()
                second.release(1)
        assert results[1] == Versioned(("2", 1), "2")
        assert results[3] == Versioned(("1", 3), "1"), f"batches run: {batches}"

    async def test_a_sync_call_after_swap_sync_returned_runs_on_the_new_version(self) -> None:
        """The same with the background engine, every call from a thread."""
        batches: list[tuple[str, list[Any]]] = []
        old = HeldSyncModel("1", batches, hold={1})
        new = HeldSyncModel("2", batches, hold=set())
        model = BatchedModel(old, version="1")
        results: dict[Any, Any] = {}

        def call(item: Any) -> None:
            # With a timeout the item goes through the engine's queue (no inline run).
            results[item] = model.call_sync_versioned(item, timeout=LIMIT)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, call, 1)
                await wait_event(old.started[1])
                tg.start_soon(anyio.to_thread.run_sync, call, 2)
                await until(lambda: model.statistics().submitted == 2)
                await anyio.to_thread.run_sync(lambda: model.swap_sync(new, version="2"))
                tg.start_soon(anyio.to_thread.run_sync, call, 3)
                await until(lambda: model.statistics().submitted == 3)
                old.release(1)
        finally:
            await model.aclose()
        assert results[3] == Versioned(("2", 3), "2"), f"batches run: {batches}"


# -- 4. closing without drain delivers what is already computed --------------------------------


class TestCloseWithoutDrainDeliversRunningBatches:
    @pytest.mark.parametrize("how", ["close", "exit"])
    @pytest.mark.parametrize("stage", ["running", "finished"])
    async def test_a_batch_the_model_runs_or_ran_is_delivered(self, how: str, stage: str) -> None:
        """Close (or leave ``async with``) while the model runs the batch of item 2, or has
        just finished it: item 2 must get its output, not ``ClosedError``."""
        batches: list[tuple[str, list[Any]]] = []
        hold = {1, 2} if stage == "running" else {1}
        fake = HeldSyncModel("1", batches, hold=hold)
        finished = threading.Event()

        def model_fn(items: list[Any]) -> list[Any]:
            try:
                return fake(items)
            finally:
                if items[0] == 2:
                    finished.set()

        results = Outcomes()
        model = BatchedModel(model_fn)
        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as tg:
                async with model:
                    results.spawn(tg, model.call, 1)
                    await wait_event(fake.started[1])
                    results.spawn(tg, model.call, 2)  # queued behind [1]
                    await settle()
                    # Where [2] was staged (handed to the model thread while [1] runs: a sync
                    # model on asyncio), the model thread starts it without the loop: hold this
                    # loop (the engine's) until the model runs [2], or ran it. Where it waits in
                    # the queue, the loop starts it: wait without blocking.
                    staged = model.statistics().in_flight_batches == 2
                    fake.release(1)
                    event = fake.started[2] if stage == "running" else finished
                    if staged:
                        hold_loop_until(event)
                    else:
                        await wait_event(event)
                    assert batches == [("1", [1]), ("1", [2])]
                    if how == "close":
                        model.close(drain=False)
                    if stage == "running":
                        fake.release(2)
        assert results[1] == ("1", 1)
        assert results[2] == ("1", 2), f"a batch the model ran was failed: {results[2]!r}"
        stats = model.statistics()
        assert (stats.completed, stats.failed, stats.pending) == (2, 0, 0)


# -- 5. a caller on another loop cancelled while queued is never computed ---------------------


class TestCancelledFromAnotherLoop:
    async def test_an_async_model_never_computes_a_withdrawn_item(self) -> None:
        """The engine runs on its background thread; the caller is this test's loop. The
        caller of item 2 is cancelled while 2 is queued, just as the batch before it ends."""
        gate = threading.Event()
        blocking = threading.Event()
        release = threading.Event()
        seen: list[Any] = []

        async def fn(items: list[Any]) -> list[Any]:
            seen.extend(items)
            if items == [1]:
                await anyio.to_thread.run_sync(gate.wait, LIMIT)
                # Keep the engine's loop busy while the caller withdraws 2: it hears of that
                # only once this batch has ended.
                blocking.set()
                release.wait(LIMIT)
            return [item * 10 for item in items]

        model = BatchedModel(fn)
        results = Outcomes()
        try:
            async with anyio.create_task_group() as tg:
                results.spawn(tg, model.call, 1)
                await until(lambda: model.statistics().in_flight_batches == 1)
                with anyio.CancelScope() as scope:
                    withdrawn = anyio.Event()

                    async def leave_when_queued() -> None:
                        await until(lambda: model.statistics().queue_depth == 1)
                        gate.set()
                        await wait_event(blocking)
                        scope.cancel()
                        withdrawn.set()

                    tg.start_soon(leave_when_queued)
                    await model.call(2)
                assert scope.cancelled_caught
                await withdrawn.wait()
                release.set()
        finally:
            await model.aclose()
        assert results == {1: 10}
        assert seen == [1], "the model computed an item whose caller had left"
        stats = model.statistics()
        assert (stats.submitted, stats.completed, stats.cancelled) == (2, 1, 1)


# -- 6. batch sizes count only the items the model was called with -----------------------------


class TestBatchSizesCountWhatTheModelRan:
    async def test_callers_who_left_before_the_model_was_called_are_not_counted(self) -> None:
        seen: list[list[Any]] = []
        started = threading.Event()
        gate = threading.Event()

        def fn(items: list[Any]) -> list[Any]:
            seen.append(list(items))
            if items == [1]:
                started.set()
                gate.wait(LIMIT)
                return [item * 10 for item in items]
            raise RuntimeError("boom")

        results = Outcomes()
        async with BatchedModel(fn, max_batch_size=8) as model:
            async with anyio.create_task_group() as tg:
                results.spawn(tg, model.call, 1)
                await wait_event(started)
                for item in (2, 3, 4):  # queued behind [1]
                    results.spawn(tg, model.call, item)
                    await settle()
                with anyio.CancelScope() as scope:
                    tg.start_soon(lambda: _cancel_when_blocked(scope))
                    await model.call(5)  # leaves before its batch starts
                assert scope.cancelled_caught
                await until(lambda: model.statistics().cancelled == 1)
                gate.set()
        assert seen == [[1], [2, 3, 4]]
        errors = [results[item] for item in (2, 3, 4)]
        assert all(isinstance(e, ModelError) for e in errors), errors
        sizes = [e.batch_size for e in errors]
        assert sizes == [3, 3, 3], f"ModelError.batch_size {sizes[0]} for a model call of 3"
        stats = model.statistics()
        assert dict(stats.batch_sizes) == {1: 1, 3: 1}, f"batch_sizes {dict(stats.batch_sizes)}"
        assert (stats.completed, stats.failed, stats.cancelled) == (1, 3, 1)


# -- 7. monotonic counters stay monotonic while the model closes -------------------------------


class TestStatisticsWhileClosing:
    async def test_submitted_never_goes_down_during_close_without_drain(self) -> None:
        """A thread reads ``statistics()`` in a loop while the model closes without draining
        many queued items: ``submitted`` must never be counted twice, nor go down."""
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often, so the reader sees every step
        try:
            for _ in range(40):  # it shows in most attempts; stop at the first
                seen = await self._close_under_observation(queued=2000)
                drops = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
                assert not drops and max(seen) <= 2001, (
                    f"submitted went {drops[0][0]} -> {drops[0][1]} (max {max(seen)}, "
                    "2001 submitted)"
                    if drops
                    else f"submitted read as {max(seen)}, 2001 submitted"
                )
        finally:
            sys.setswitchinterval(old_interval)

    async def _close_under_observation(self, queued: int) -> list[int]:
        gated = GatedModel()
        model = BatchedModel(gated, max_batch_size=1)
        seen: list[int] = []
        stop = threading.Event()
        reading = threading.Event()

        def read() -> None:
            while not stop.is_set():
                seen.append(model.statistics().submitted)
                reading.set()

        reader = threading.Thread(target=read, daemon=True)
        async with model:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_ignore_errors, model.call(0))
                await gated.started.wait()
                # With a timeout each, so that closing has more to clear: a wider window.
                items = range(1, queued + 1)
                tg.start_soon(_ignore_errors, model.call_many(items, timeout=60))
                await settle()
                reader.start()
                await wait_event(reading)
                model.close(drain=False)
                await settle()
                gated.open()
        stop.set()
        await anyio.to_thread.run_sync(reader.join, LIMIT)
        seen.append(model.statistics().submitted)
        return seen


async def _ignore_errors(awaitable: Any) -> None:
    try:
        await awaitable
    except ClosedError:
        pass


# -- 8. call_many_nowait(return_exceptions=True): one behaviour on every loop ------------------


class TestCallManyNowaitReturnExceptions:
    """docs/api.md: ``return_exceptions=True`` puts each failure in its item's place; only
    without it is ``call_many_nowait`` all or nothing. So ``QueueFull`` takes the refused
    item's place, whether the caller runs on the engine's loop or not."""

    async def test_on_the_engine_loop_queue_full_takes_the_item_place(self) -> None:
        gated = GatedModel()
        outcome: list[Any] = []
        async with BatchedModel(gated, max_batch_size=1, max_queue_size=2) as model:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await gated.started.wait()

                async def many() -> None:
                    try:
                        outcome.append(
                            await model.call_many_nowait([1, 2, 3], return_exceptions=True)
                        )
                    except Exception as exc:
                        outcome.append(exc)

                tg.start_soon(many)
                await settle()
                gated.open()
        assert not isinstance(outcome[0], QueueFull), "QueueFull raised, not in its slot"
        values = outcome[0]
        assert values[:2] == [10, 20]
        assert isinstance(values[2], QueueFull)
        assert gated.seen == [0, 1, 2]

    async def test_from_another_loop_queue_full_takes_the_item_place(self) -> None:
        gate = threading.Event()
        started = threading.Event()

        def fn(items: list[Any]) -> list[Any]:
            started.set()
            gate.wait(LIMIT)
            return [item * 10 for item in items]

        model = BatchedModel(fn, max_batch_size=1, max_queue_size=2)
        outcome: list[Any] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await wait_event(started)

                async def many() -> None:
                    try:
                        outcome.append(
                            await model.call_many_nowait([1, 2, 3], return_exceptions=True)
                        )
                    except Exception as exc:
                        outcome.append(exc)

                tg.start_soon(many)
                await until(lambda: model.statistics().rejected == 1)
                gate.set()
        finally:
            await model.aclose()
        assert not isinstance(outcome[0], QueueFull), "QueueFull raised, not in its slot"
        values = outcome[0]
        assert values[:2] == [10, 20]
        assert isinstance(values[2], QueueFull)


class TestCallManyNowaitIsAllOrNothing:
    """Without ``return_exceptions`` a refused item withdraws the others: none is computed,
    and ``QueueFull`` is raised, whether the caller runs on the engine's loop or not."""

    async def test_on_the_engine_loop(self) -> None:
        gated = GatedModel()
        outcome: list[Any] = []
        async with BatchedModel(gated, max_batch_size=1, max_queue_size=2) as model:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await gated.started.wait()
                try:
                    await model.call_many_nowait([1, 2, 3])
                except QueueFull as exc:
                    outcome.append(exc)
                gated.open()
            stats = model.statistics()
        assert len(outcome) == 1
        assert gated.seen == [0]
        assert (stats.rejected, stats.cancelled, stats.completed) == (1, 2, 1)

    async def test_from_another_loop(self) -> None:
        gate = threading.Event()
        started = threading.Event()
        seen: list[Any] = []

        def fn(items: list[Any]) -> list[Any]:
            seen.extend(items)
            started.set()
            gate.wait(LIMIT)
            return [item * 10 for item in items]

        model = BatchedModel(fn, max_batch_size=1, max_queue_size=2)
        outcome: list[Any] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await wait_event(started)
                try:
                    await model.call_many_nowait([1, 2, 3])
                except QueueFull as exc:
                    outcome.append(exc)
                gate.set()
            stats = model.statistics()
        finally:
            await model.aclose()
        assert len(outcome) == 1
        assert seen == [0]
        assert (stats.rejected, stats.cancelled, stats.completed) == (1, 2, 1)


# -- found by a randomized soak (second round) ---------------------------------------------------


class TestHostCancelledAfterADrainingClose:
    async def test_every_queued_caller_is_answered(self) -> None:
        model = GatedModel()
        batched = BatchedModel(model, max_batch_size=1)
        outcomes: dict[int, Any] = {}
        answered = anyio.Event()

        async def caller(i: int) -> None:
            try:
                outcomes[i] = await batched.call(i)
            except Exception as exc:
                outcomes[i] = type(exc).__name__
            if len(outcomes) == 3:
                answered.set()

        async with anyio.create_task_group() as callers:
            with anyio.CancelScope() as host:
                async with batched, anyio.create_task_group() as inner:
                    for i in range(3):
                        callers.start_soon(caller, i)
                    await model.started.wait()  # 0 runs; 1 and 2 are queued
                    await settle()
                    inner.start_soon(partial(batched.aclose, drain=True))
                    await settle()  # closing, draining
                    host.cancel()
            with anyio.fail_after(LIMIT):  # before the fix, 1 and 2 waited forever
                await answered.wait()
        assert outcomes == {0: "ClosedError", 1: "ClosedError", 2: "ClosedError"}


class TestTheModelsOwnCancelledError:
    @staticmethod
    def raises_cancelled(items: list[str]) -> list[str]:
        if "bad" in items:
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            future.cancel()
            future.result()  # raises concurrent.futures.CancelledError: an Exception
        return items

    async def test_a_sync_model_raising_it_fails_its_batch_only(self) -> None:
        model = BatchedModel(self.raises_cancelled)
        async with model:
            with pytest.raises(ModelError) as info:
                await model.call("bad")
            assert isinstance(info.value.__cause__, RuntimeError)
            assert await model.call("good") == "good"  # the engine keeps running

    async def test_an_async_model_raising_it_fails_its_batch_only(self, anyio_backend: str) -> None:
        if anyio_backend != "asyncio":
            pytest.skip("asyncio's CancelledError")

        async def model_fn(items: list[str]) -> list[str]:
            if "bad" in items:
                raise asyncio.CancelledError("the model's own")
            return items

        model = BatchedModel(model_fn)
        async with model:
            with pytest.raises(ModelError):
                await model.call("bad")
            assert await model.call("good") == "good"


class TestTrioCallersOfATrioEngineInAnotherThread:
    def test_a_trio_loop_in_another_thread_can_call(self) -> None:
        model = BatchedModel(lambda xs: [2 * x for x in xs], name="double")
        entered, done = threading.Event(), threading.Event()

        async def serve() -> None:
            async with model:
                entered.set()
                await anyio.to_thread.run_sync(done.wait)

        server = threading.Thread(target=anyio.run, args=(serve,), kwargs={"backend": "trio"})
        server.start()
        try:
            assert entered.wait(LIMIT)

            async def client() -> list[Any]:
                with anyio.fail_after(LIMIT):
                    one = await model.call(21)
                    many = await model.call_many([1, 2])
                    with anyio.move_on_after(0):  # a cancelled call is withdrawn, not stuck
                        await model.call(5)
                    return [one, many]

            for backend in ("trio", "asyncio"):
                assert anyio.run(client, backend=backend) == [42, [2, 4]]
        finally:
            done.set()
            server.join(LIMIT)
        stats = model.statistics()
        assert stats.submitted == stats.completed + stats.cancelled


class TestStatisticsFromAnotherThreadAreConsistent:
    async def test_pending_is_never_negative(self) -> None:
        model = GatedModel()
        batched = BatchedModel(model, max_batch_size=1)
        read_submitted, reader_may_go = threading.Event(), threading.Event()
        snapshots: list[Any] = []

        def hold(frame: Any, event: str, arg: Any) -> None:
            # The reading thread loses its turn right after it has read `submitted`.
            if event == "return" and frame.f_code.co_name == "submitted_now":
                read_submitted.set()
                reader_may_go.wait(LIMIT)

        def reader() -> None:
            sys.setprofile(hold)
            try:
                snapshots.append(batched.statistics())
            finally:
                sys.setprofile(None)

        async with batched, anyio.create_task_group() as tg:
            tg.start_soon(batched.call, 0)
            await model.started.wait()
            thread = threading.Thread(target=reader)
            thread.start()
            await anyio.to_thread.run_sync(read_submitted.wait, LIMIT)
            async with anyio.create_task_group() as leaving:  # five calls submitted and
                for i in range(1, 6):  # cancelled while queued, meanwhile
                    leaving.start_soon(batched.call, i)
                await settle()
                leaving.cancel_scope.cancel()
            reader_may_go.set()
            await anyio.to_thread.run_sync(thread.join, LIMIT)
            model.open()
        (stats,) = snapshots
        assert stats.pending >= 0, (stats.submitted, stats.cancelled)


class TestAHostCancelMidBatchCountsTheBatch:
    async def test_the_batch_the_model_ran_is_in_the_statistics(self) -> None:
        model = GatedModel()
        batched = BatchedModel(model)
        async with anyio.create_task_group() as callers:
            with anyio.CancelScope() as host:
                async with batched:
                    for i in range(2):
                        callers.start_soon(_quiet_call, batched, i)
                    await model.started.wait()
                    host.cancel()
        stats = batched.statistics()
        assert stats.batches == len(model.batches) == 1
        assert dict(stats.batch_sizes) == {len(model.batches[0]): 1}


async def _quiet_call(model: BatchedModel[Any, Any], item: Any) -> None:
    try:
        await model.call(item)
    except Exception:
        pass

    async def test_a_sync_batch_ending_after_the_cancel_is_counted_once(self) -> None:
        """A sync model's thread that ends after its engine's host was cancelled hands its
        outputs over to a settled batch: nothing is delivered or counted twice."""
        batches: list[tuple[str, list[Any]]] = []
        model = HeldSyncModel("1", batches, hold={0})
        batched = BatchedModel(model, name="held-host-cancel")
        outcomes = Outcomes()
        async with anyio.create_task_group() as callers:
            with anyio.CancelScope() as host:
                async with batched:
                    outcomes.spawn(callers, batched.call, 0)
                    await wait_event(model.started[0])
                    host.cancel()
        model.release(0)
        for thread in threading.enumerate():  # its thread hands over, then ends
            if thread.name.startswith("batchkit-held-host-cancel-model"):
                thread.join(LIMIT)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        assert isinstance(outcomes[0], ClosedError)
        stats = batched.statistics()
        assert (stats.batches, dict(stats.batch_sizes)) == (1, {1: 1})
        assert (stats.submitted, stats.completed, stats.failed) == (1, 0, 1)


# -- a caller resumed with its output sees its call counted ------------------------------------


class TestACallerSeesItsCallCounted:
    """The outputs of a batch a model thread ran go to its callers straight from that thread's
    hand-over: by then the batch is counted and no longer in flight."""

    @pytest.mark.parametrize("kind", ["sync", "async"])
    async def test_each_caller_sees_its_own_call_in_the_next_snapshot(self, kind: str) -> None:
        def sync_model(items: list[Any]) -> list[Any]:
            return [item * 2 for item in items]

        async def async_model(items: list[Any]) -> list[Any]:
            await anyio.lowlevel.checkpoint()
            return [item * 2 for item in items]

        batched = BatchedModel(sync_model if kind == "sync" else async_model, max_batch_size=4)
        seen: list[tuple[int, int, int]] = []

        async def caller(item: int) -> None:
            assert await batched.call(item) == item * 2
            stats = batched.statistics()
            seen.append((stats.completed, stats.batches, stats.in_flight_batches))

        async with batched:
            await caller(0)
            assert seen == [(1, 1, 0)]
            async with anyio.create_task_group() as tg:
                for item in range(1, 9):
                    tg.start_soon(caller, item)
            stats = batched.statistics()
        completed = [done for done, _, _ in seen]
        assert completed == sorted(completed) and completed[-1] == 9
        # Each caller's snapshot counts its own call and the batch that carried it.
        assert all(done >= n for n, (done, _, _) in enumerate(seen, start=1))
        assert all(batches >= 1 for _, batches, _ in seen)
        assert (stats.completed, stats.in_flight_batches, stats.queue_depth) == (9, 0, 0)
        assert sum(size * n for size, n in stats.batch_sizes.items()) == 9

    async def test_a_caller_on_another_loop_or_thread_sees_its_call_counted(self) -> None:
        """Callers in other threads wake the moment they are answered: the batch is counted
        before that, so their next snapshot shows their call (every time, not by luck)."""
        model = BatchedModel(lambda items: [item + 1 for item in items], max_wait=0.0001)
        try:
            for n in range(1, 101):  # from this loop: the engine runs on its own thread
                assert await model.call(n) == n + 1
                stats = model.statistics()
                assert (stats.completed, stats.in_flight_batches) == (n, 0)

            def sync_calls() -> None:
                for n in range(101, 201):  # a thread of its own
                    assert model.call_sync(n) == n + 1
                    assert model.statistics().completed == n

            await anyio.to_thread.run_sync(sync_calls)
        finally:
            await model.aclose()
