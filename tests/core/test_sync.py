"""Sync callers: threads, a background engine thread, calls from inside a running loop."""

from __future__ import annotations

import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest

from batchkit import BatchedModel, ClosedError, DeadlineExceeded, ModelError, QueueFull

from ..support.helpers import wait_for


def double_all(items: list[int]) -> list[int]:
    return [2 * i for i in items]


def held_sync_calls(
    pool: ThreadPoolExecutor, n: int
) -> tuple[BatchedModel[int, int], threading.Event, list[Any]]:
    """Submit ``n`` sync calls, one per batch, with the first held in the model until the gate."""
    gate = threading.Event()

    def model_fn(items: list[int]) -> list[int]:
        gate.wait(10)
        return items

    model = BatchedModel(model_fn, max_batch_size=1)
    futures = []
    for i in range(n):  # one at a time, so the item order is the submission order
        futures.append(pool.submit(model.call_sync, i))
        wait_for(lambda i=i: model.statistics().submitted == i + 1)
    return model, gate, futures


def _refused(model: BatchedModel[int, int]) -> bool:
    try:
        model.call_sync(99, timeout=0.001)
    except ClosedError:
        return True
    except Exception:
        return False
    return False


def engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("batchkit-")]


class TestBackgroundEngine:
    def test_nothing_starts_until_first_use(self) -> None:
        model = BatchedModel(double_all, name="lazy")
        assert "batchkit-lazy" not in engine_threads()
        assert model.call_sync(2) == 4
        assert "batchkit-lazy" in engine_threads()
        model.close()
        assert "batchkit-lazy" not in engine_threads()

    def test_with_block_starts_and_stops_the_thread(self) -> None:
        with BatchedModel(double_all, name="ctx") as model:
            assert "batchkit-ctx" in engine_threads()
            assert model.call_many_sync([1, 2, 3]) == [2, 4, 6]
        assert "batchkit-ctx" not in engine_threads()
        with pytest.raises(ClosedError):
            model.call_sync(1)

    def test_threads_share_batches(self) -> None:
        gate = threading.Event()
        batches: list[list[int]] = []

        def model_fn(items: list[int]) -> list[int]:
            batches.append(list(items))
            gate.wait(10)
            return [i + 1 for i in items]

        with BatchedModel(model_fn, max_batch_size=64) as model, ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(model.call_sync, i) for i in range(16)]
            wait_for(lambda: model.statistics().submitted == 16)
            gate.set()
            assert [f.result(10) for f in futures] == [i + 1 for i in range(16)]
        assert sum(len(b) for b in batches) == 16
        assert len(batches) < 16

    def test_sync_timeout(self) -> None:
        release = threading.Event()

        def slow(items: list[int]) -> list[int]:
            release.wait(10)
            return items

        with BatchedModel(slow) as model, ThreadPoolExecutor(1) as pool:
            first = pool.submit(model.call_sync, 0)
            with pytest.raises(DeadlineExceeded):
                model.call_sync(1, timeout=0.05)
            release.set()
            assert first.result(10) == 0
        assert model.statistics().expired == 1

    def test_sync_errors_are_raised_in_the_calling_thread(self) -> None:
        def broken(items: list[int]) -> list[int]:
            raise ZeroDivisionError("nope")

        with BatchedModel(broken) as model:
            with pytest.raises(ModelError) as info:
                model.call_sync(1)
        assert isinstance(info.value.__cause__, ZeroDivisionError)

    def test_close_with_drain_from_sync_code(self) -> None:
        with ThreadPoolExecutor(4) as pool:
            model, gate, futures = held_sync_calls(pool, 4)
            closer = threading.Thread(target=lambda: model.close(drain=True))
            closer.start()
            wait_for(lambda: _refused(model))  # closed to new calls, queued items kept
            gate.set()
            closer.join(10)
            assert [f.result(10) for f in futures] == [0, 1, 2, 3]
        assert model.statistics().failed == 0

    def test_close_without_drain_fails_queued_sync_callers(self) -> None:
        with ThreadPoolExecutor(3) as pool:
            model, gate, futures = held_sync_calls(pool, 3)
            closer = threading.Thread(target=model.close)
            closer.start()
            wait_for(lambda: model.statistics().failed == 2)  # the queued two, at once
            gate.set()  # only now may the running batch end
            closer.join(10)
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(10))
                except ClosedError:
                    outcomes.append("closed")
        assert outcomes == [0, "closed", "closed"]

    def test_sync_nowait_rejection_through_the_background_loop(self) -> None:
        gate = threading.Event()

        def model_fn(items: list[int]) -> list[int]:
            gate.wait(10)
            return items

        async def try_nowait(model: BatchedModel[int, int]) -> Any:
            try:
                return await model.call_nowait(9)
            except QueueFull as exc:
                return exc

        with BatchedModel(model_fn, max_queue_size=1) as model, ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(model.call_sync, i) for i in range(2)]
            wait_for(lambda: model.statistics().queue_depth == 1)
            assert isinstance(anyio.run(try_nowait, model), QueueFull)
            gate.set()
            assert [f.result(10) for f in futures] == [0, 1]


class RecordingModel:
    """A sync model that records each batch, the thread it ran in and the most batches that
    ran at once; the test may hold the first batch until ``gate`` opens."""

    def __init__(self, *, gated: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.threads: list[str] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self._lock = threading.Lock()
        self._running = 0
        self.most_at_once = 0

    def __call__(self, items: list[Any]) -> list[Any]:
        with self._lock:
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            self.batches.append(list(items))
            self.threads.append(threading.current_thread().name)
        try:
            self.started.set()
            self.gate.wait(10)
            return [item if isinstance(item, Exception) else 2 * item for item in items]
        finally:
            with self._lock:
                self._running -= 1


@pytest.mark.lane("inline")
class TestLoneSyncCaller:
    """An idle engine lets a sync caller run its item in its own thread: no hand-over."""

    def test_runs_in_the_callers_thread_and_is_counted(self) -> None:
        fake = RecordingModel()
        with BatchedModel(fake, version="3") as model:
            assert model.call_sync(4) == 8
            versioned = model.call_sync_versioned(5)
            assert (versioned.value, versioned.version) == (10, "3")
            stats = model.statistics()
        assert fake.threads == [threading.current_thread().name] * 2
        assert (stats.submitted, stats.completed, stats.pending) == (2, 2, 0)
        assert (stats.batches, dict(stats.batch_sizes)) == (2, {1: 2})

    def test_errors_reach_the_caller_and_the_engine_keeps_serving(self) -> None:
        def model_fn(items: list[Any]) -> list[Any]:
            if "boom" in items:
                raise ValueError("boom")
            return [KeyError(i) if i == "bad" else i for i in items]

        with BatchedModel(model_fn, version="2") as model:
            with pytest.raises(ModelError) as info:
                model.call_sync("boom")
            assert isinstance(info.value.__cause__, ValueError)
            assert (info.value.batch_size, info.value.version) == (1, "2")
            with pytest.raises(KeyError):
                model.call_sync("bad")
            assert model.call_sync("ok") == "ok"
            stats = model.statistics()
        assert (stats.submitted, stats.completed, stats.failed) == (3, 1, 2)

    def test_callers_arriving_meanwhile_wait_and_are_batched_after_it(self) -> None:
        fake = RecordingModel(gated=True)
        with BatchedModel(fake, max_batch_size=8) as model, ThreadPoolExecutor(3) as pool:
            first = pool.submit(model.call_sync, 1)  # runs inline, held at the gate
            assert fake.started.wait(10)
            stats = model.statistics()
            assert (stats.in_flight_batches, stats.pending) == (1, 1)
            rest = [pool.submit(model.call_sync, i) for i in (2, 3)]
            wait_for(lambda: model.statistics().queue_depth == 2)
            fake.gate.set()
            assert [f.result(10) for f in (first, *rest)] == [2, 4, 6]
        assert fake.batches == [[1], [2, 3]]
        assert fake.threads[0] != fake.threads[1]
        # The second batch ran in one of its callers' threads, not in the engine's.
        assert fake.threads[1].startswith("ThreadPoolExecutor")

    def test_a_call_with_a_timeout_goes_through_the_engine(self) -> None:
        fake = RecordingModel()
        with BatchedModel(fake) as model:
            assert model.call_sync(1, timeout=5) == 2
        assert fake.threads[0].startswith("batchkit-")

    def test_never_more_batches_at_once_than_max_concurrency(self) -> None:
        fake = RecordingModel()
        with BatchedModel(fake, max_batch_size=4) as model, ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(model.call_sync, i) for i in range(400)]
            assert [f.result(30) for f in calls] == [2 * i for i in range(400)]
            stats = model.statistics()
        assert fake.most_at_once == 1
        assert sorted(i for batch in fake.batches for i in batch) == list(range(400))
        assert (stats.submitted, stats.completed, stats.pending) == (400, 400, 0)


def gated_inline_run(
    pool: ThreadPoolExecutor, model: BatchedModel[Any, Any], fake: RecordingModel
) -> Any:
    """Start a sync call that runs inline, held in the model until ``fake.gate`` opens."""
    first = pool.submit(model.call_sync, 0)
    assert fake.started.wait(10)
    return first


def wait_beside(
    pool: ThreadPoolExecutor, model: BatchedModel[Any, Any], calls: list[tuple[Any, float]]
) -> list[Any]:
    """Make sync calls ``(item, priority)`` one after another, each waiting beside the running
    batch before the next starts (so their arrival order is the list's)."""
    futures = []
    depth = model.statistics().queue_depth
    for item, priority in calls:
        futures.append(pool.submit(lambda i=item, p=priority: model.call_sync(i, priority=p)))
        depth += 1
        wait_for(lambda d=depth: model.statistics().queue_depth == d)
    return futures


@pytest.mark.lane("inline")
@pytest.mark.lane("side")
class TestSyncCallersBatchTogether:
    """Sync callers arriving while a caller's thread runs a batch wait beside it; the batches
    that follow run in their own threads, in priority order, without the engine's loop."""

    def test_batches_follow_in_priority_then_arrival_order_up_to_max_batch_size(self) -> None:
        fake = RecordingModel(gated=True)
        with BatchedModel(fake, max_batch_size=2) as model, ThreadPoolExecutor(6) as pool:
            first = gated_inline_run(pool, model, fake)
            rest = wait_beside(pool, model, [(1, 5), (2, 0), (3, 5), (4, 1), (5, 0)])
            stats = model.statistics()
            assert (stats.queue_depth, stats.in_flight_batches, stats.pending) == (5, 1, 6)
            fake.gate.set()
            assert [f.result(10) for f in (first, *rest)] == [0, 2, 4, 6, 8, 10]
            stats = model.statistics()
        assert fake.batches == [[0], [2, 5], [4, 1], [3]]
        assert not any(name.startswith("batchkit-") for name in fake.threads)
        assert (stats.submitted, stats.completed, stats.pending) == (6, 6, 0)
        assert (stats.batches, dict(stats.batch_sizes)) == (4, {1: 2, 2: 2})
        assert stats.queue_depth == stats.in_flight_batches == 0

    def test_a_failing_batch_fails_each_of_its_callers_with_its_own_error(self) -> None:
        gate, started = threading.Event(), threading.Event()

        def model_fn(items: list[Any]) -> list[Any]:
            started.set()
            gate.wait(10)
            if "boom" in items:
                raise ValueError("boom")
            return [KeyError(i) if i == "bad" else i for i in items]

        with BatchedModel(model_fn, version="7") as model, ThreadPoolExecutor(4) as pool:
            first = pool.submit(model.call_sync, "first")
            assert started.wait(10)
            failing = wait_beside(pool, model, [("boom", 0), ("x", 0)])
            gate.set()
            assert first.result(10) == "first"
            errors = [f.exception(10) for f in failing]
            for error in errors:
                assert isinstance(error, ModelError)
                assert isinstance(error.__cause__, ValueError)
                assert (error.batch_size, error.version) == (2, "7")
            assert errors[0] is not errors[1]
            gate.clear()
            started.clear()
            first = pool.submit(model.call_sync, "ok")
            assert started.wait(10)
            mixed = wait_beside(pool, model, [("bad", 0), ("good", 0)])
            gate.set()
            assert isinstance(mixed[0].exception(10), KeyError)  # only that caller
            assert [first.result(10), mixed[1].result(10)] == ["ok", "good"]
            stats = model.statistics()
        assert (stats.submitted, stats.completed, stats.failed) == (6, 3, 3)

    def test_items_queued_on_the_loop_meanwhile_take_the_waiting_callers_along(self) -> None:
        fake = RecordingModel(gated=True)
        with BatchedModel(fake, max_batch_size=8) as model, ThreadPoolExecutor(4) as pool:
            first = gated_inline_run(pool, model, fake)
            (beside,) = wait_beside(pool, model, [(1, 1)])
            # A call with a timeout goes through the engine's loop, and queues there.
            queued = pool.submit(lambda: model.call_sync(2, priority=0, timeout=10))
            wait_for(lambda: model.statistics().queue_depth == 2)
            fake.gate.set()
            assert [f.result(10) for f in (first, beside, queued)] == [0, 2, 4]
        # The loop ran them as one batch, in priority order, in its model thread.
        assert fake.batches == [[0], [2, 1]]
        assert fake.threads[1].startswith("batchkit-")

    def test_a_batch_after_a_swap_runs_on_the_new_version(self) -> None:
        fake = RecordingModel(gated=True)

        def tripled(items: list[int]) -> list[int]:
            return [3 * i for i in items]

        with BatchedModel(fake, version="1") as model, ThreadPoolExecutor(3) as pool:
            first = pool.submit(model.call_sync_versioned, 1)
            assert fake.started.wait(10)
            beside = pool.submit(model.call_sync_versioned, 2)
            wait_for(lambda: model.statistics().queue_depth == 1)
            model.swap_sync(tripled, version="2")
            fake.gate.set()
            done = [first.result(10), beside.result(10)]
        assert [(v.value, v.version) for v in done] == [(2, "1"), (6, "2")]

    @pytest.mark.parametrize("drain", [False, True])
    def test_close_fails_the_waiting_callers_unless_draining(self, drain: bool) -> None:
        fake = RecordingModel(gated=True)
        model = BatchedModel(fake, max_batch_size=8)
        with ThreadPoolExecutor(4) as pool:
            first = gated_inline_run(pool, model, fake)
            rest = wait_beside(pool, model, [(1, 0), (2, 0)])
            closing = pool.submit(model.close, drain=drain)
            if not drain:
                for f in rest:
                    assert isinstance(f.exception(10), ClosedError)
            assert not closing.done()  # waits for the running batch
            fake.gate.set()
            closing.result(10)
            assert first.result(10) == 0
            if drain:
                assert [f.result(10) for f in rest] == [2, 4]
        stats = model.statistics()
        assert stats.submitted == 3
        assert (stats.completed, stats.failed) == ((3, 0) if drain else (1, 2))

    def test_a_caller_interrupted_while_waiting_is_withdrawn(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            pytest.skip("only the main thread receives SIGINT")
        fake = RecordingModel(gated=True)
        main = threading.get_ident()
        with BatchedModel(fake) as model, ThreadPoolExecutor(3) as pool:
            first = gated_inline_run(pool, model, fake)
            (other,) = wait_beside(pool, model, [(1, 0)])

            def interrupt_main_once_it_waits() -> None:
                wait_for(lambda: model.statistics().queue_depth == 2)
                signal.pthread_kill(main, signal.SIGINT)

            interrupter = pool.submit(interrupt_main_once_it_waits)
            with pytest.raises(KeyboardInterrupt):
                model.call_sync(2)
            interrupter.result(10)
            assert model.statistics().queue_depth == 1
            fake.gate.set()
            assert [first.result(10), other.result(10)] == [0, 2]
            stats = model.statistics()
        assert fake.batches == [[0], [1]]  # the withdrawn item never ran
        assert (stats.submitted, stats.completed, stats.cancelled) == (3, 2, 1)


class TestInsideARunningLoop:
    """What a notebook cell does: sync calls with the kernel's loop running on this thread."""

    def test_call_sync_inside_running_asyncio_loop(self) -> None:
        async def cell() -> list[int]:
            with BatchedModel(double_all) as model:
                return [model.call_sync(1), *model.call_many_sync([2, 3])]

        assert asyncio.run(cell()) == [2, 4, 6]

    def test_await_without_async_with_uses_the_background_engine(self) -> None:
        async def cell() -> list[int]:
            model = BatchedModel(double_all)
            try:
                return [await model.call(1), *await model.call_many([2, 3])]
            finally:
                await model.aclose()

        assert asyncio.run(cell()) == [2, 4, 6]


@pytest.mark.anyio
class TestForeignLoops:
    async def test_async_callers_on_another_loop_than_the_engine(self) -> None:
        model = BatchedModel(double_all, max_batch_size=8)
        try:
            results: list[int] = []
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(lambda i=i: _append(results, model.call(i)))
            assert sorted(results) == [2 * i for i in range(20)]
        finally:
            await model.aclose()

    async def test_timeout_on_another_loop(self) -> None:
        gate = threading.Event()

        def model_fn(items: list[int]) -> list[int]:
            gate.wait(10)
            return items

        model = BatchedModel(model_fn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(DeadlineExceeded):
                    await model.call(1, timeout=0.05)
                gate.set()
        finally:
            await model.aclose()

    async def test_cancelled_caller_on_another_loop_withdraws_its_item(self) -> None:
        gate, running = threading.Event(), threading.Event()
        seen: list[int] = []

        def model_fn(items: list[int]) -> list[int]:
            seen.extend(items)
            running.set()
            gate.wait(10)
            return items

        model = BatchedModel(model_fn)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(model.call, 0)
                await anyio.to_thread.run_sync(running.wait, 10)
                with anyio.move_on_after(0.05):
                    await model.call(1)
                # The withdrawal reaches the engine's loop before the batch's end does.
                gate.set()
            assert seen == [0]
            assert model.statistics().cancelled == 1
        finally:
            await model.aclose()


async def _append(results: list[int], awaitable: Any) -> None:
    results.append(await awaitable)


def test_close_from_inside_the_model_does_not_deadlock() -> None:
    def model_fn(items: list[str]) -> list[str]:
        if "stop" in items:
            model.close()
        return items

    model = BatchedModel(model_fn)
    assert model.call_sync("stop", timeout=5) == "stop"
    with pytest.raises(ClosedError):
        model.call_sync("again")
    model.close()  # idempotent: joins the engine thread, which has ended
