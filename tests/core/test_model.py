"""BatchedModel through its public API: dispatch, order, deadlines, cancellation, backpressure,
errors, lifecycle. Every async test runs on asyncio and trio."""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
from typing import Any

import anyio
import pytest

from batchkit import (
    BatchedModel,
    BatchSizeMismatch,
    ClosedError,
    ConfigurationError,
    DeadlineExceeded,
    ModelError,
    QueueFull,
    WrongLoopError,
)
from batchkit._core import SAMPLE_WINDOW

from ..support.helpers import GatedModel

pytestmark = pytest.mark.anyio


async def settle() -> None:
    """Let every other task run until all are blocked (no sleeping)."""
    await anyio.wait_all_tasks_blocked()


async def spawn_calls(
    tg: anyio.abc.TaskGroup,
    model: BatchedModel[Any, Any],
    items: list[Any],
    results: dict[Any, Any],
    **kwargs: Any,
) -> None:
    async def one(item: Any) -> None:
        try:
            results[item] = await model.call(item, **kwargs)
        except Exception as exc:
            results[item] = exc

    for item in items:  # one at a time: trio may run tasks started together in any order
        tg.start_soon(one, item)
        await settle()


class TestDispatch:
    async def test_single_call_returns_its_output(self) -> None:
        fake = GatedModel(gated=False)
        async with BatchedModel(fake) as model:
            assert await model.call(4) == 40
        assert fake.batches == [[4]]

    async def test_items_gather_while_a_batch_runs(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=4) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, list(range(1, 10)), results)
            assert model.statistics().queue_depth == 9
            fake.open()
        assert fake.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
        assert results == {i: i * 10 for i in range(10)}

    async def test_greedy_dispatch_sends_a_lone_item_at_once(self) -> None:
        fake = GatedModel(gated=False)
        async with BatchedModel(fake, max_batch_size=64) as model:
            for i in range(3):
                assert await model.call(i) == i * 10
        assert fake.batches == [[0], [1], [2]]

    async def test_max_wait_gathers_company(self) -> None:
        fake = GatedModel(gated=False)
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=8, max_wait=0.5) as model:
            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                await spawn_calls(tg, model, [1, 2, 3], results)
                assert fake.batches == []  # waiting for company, not dispatched yet
            assert anyio.current_time() - start >= 0.5
        assert fake.batches == [[1, 2, 3]]

    async def test_max_wait_batch_leaves_at_once_when_full(self) -> None:
        fake = GatedModel(gated=False)
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=3, max_wait=60) as model:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    await spawn_calls(tg, model, [1, 2, 3], results)
        assert fake.batches == [[1, 2, 3]]

    async def test_concurrency_runs_batches_at_once(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=2, max_concurrency=3) as model:
            async with anyio.create_task_group() as tg:
                await spawn_calls(tg, model, list(range(8)), results)
                assert model.statistics().in_flight_batches == 3
                assert len(fake.batches) == 3
                fake.open()
        assert sorted(fake.seen) == list(range(8))
        assert results == {i: i * 10 for i in range(8)}

    async def test_cost_budget_limits_batches(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        model = BatchedModel(fake, max_batch_size=10, size_fn=len, max_batch_cost=6)
        async with model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, ["a"], results)
            await spawn_calls(tg, model, ["bbb", "cc", "dddd", "eeeeeeeeee", "f"], results)
            fake.open()
        assert fake.batches == [["a"], ["bbb", "cc"], ["dddd"], ["eeeeeeeeee"], ["f"]]

    async def test_sync_model_runs_in_a_worker_thread(self) -> None:
        threads: list[int] = []

        def model_fn(items: list[int]) -> list[int]:
            threads.append(threading.get_ident())
            return [i + 1 for i in items]

        async with BatchedModel(model_fn) as model:
            assert await model.call(1) == 2
        assert threads and threads[0] != threading.get_ident()

    async def test_collate_and_split(self) -> None:
        async def model_fn(batch: tuple[int, ...]) -> dict[str, list[int]]:
            return {"out": [x * 2 for x in batch]}

        model = BatchedModel(model_fn, collate=tuple, split=lambda out: out["out"])
        async with model:
            assert await model.call_many([1, 2, 3]) == [2, 4, 6]


_CALLER: contextvars.ContextVar[int] = contextvars.ContextVar("caller")


class TestCallerContext:
    async def test_each_caller_resumes_in_its_own_context(self) -> None:
        # Callers of one batch are resumed together; each must still see its own context.
        fake = GatedModel()
        seen: dict[int, int] = {}

        async def caller(n: int) -> None:
            _CALLER.set(n)
            assert await model.call(n) == 10 * n
            seen[n] = _CALLER.get()

        model = BatchedModel(fake, max_batch_size=16)
        async with model, anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(caller, n)
            await settle()
            fake.open()
        assert seen == {n: n for n in range(8)}


class TestOrder:
    async def test_lower_priority_number_first_then_arrival(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=100) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            for item, priority in [(1, 5), (2, 1), (3, 5), (4, -2), (5, 1), (6, 0.5)]:
                await spawn_calls(tg, model, [item], results, priority=priority)
            fake.open()
        assert fake.batches == [[0], [4, 6, 2, 5, 1, 3]]

    async def test_priority_must_be_a_number(self) -> None:
        async with BatchedModel(GatedModel(gated=False)) as model:
            with pytest.raises(ConfigurationError, match="priority"):
                await model.call(1, priority=math.nan)
            with pytest.raises(ConfigurationError, match="priority"):
                await model.call(1, priority="high")  # type: ignore[arg-type]


class TestDeadlines:
    async def test_queued_item_expires_at_its_deadline_and_is_never_run(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            start = anyio.current_time()
            with pytest.raises(DeadlineExceeded) as info:
                await model.call(1, timeout=0.05)
            assert anyio.current_time() - start >= 0.05
            assert isinstance(info.value, TimeoutError)
            fake.open()
        assert fake.seen == [0]
        assert model.statistics().expired == 1

    async def test_absolute_deadline(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            with pytest.raises(DeadlineExceeded):
                await model.call(1, deadline=anyio.current_time() + 0.02)
            fake.open()
        assert fake.seen == [0]

    async def test_past_deadline_is_never_dispatched(self) -> None:
        fake = GatedModel(gated=False)
        async with BatchedModel(fake) as model:
            with pytest.raises(DeadlineExceeded):
                await model.call(1, timeout=0)
            assert await model.call(2) == 20
        assert fake.seen == [2]

    async def test_model_default_timeout(self) -> None:
        fake = GatedModel()
        async with BatchedModel(fake, timeout=0.02) as model:
            with pytest.raises(DeadlineExceeded):
                await model.call(1)
            fake.open()

    async def test_timeout_and_deadline_together_is_an_error(self) -> None:
        async with BatchedModel(GatedModel(gated=False)) as model:
            with pytest.raises(ConfigurationError, match="not both"):
                await model.call(1, timeout=1, deadline=anyio.current_time() + 1)
            with pytest.raises(ConfigurationError, match="timeout"):
                await model.call(1, timeout=-1)


class TestCancellation:
    async def test_cancelled_while_queued_is_never_computed(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            with anyio.CancelScope() as scope:
                tg.start_soon(lambda: _cancel_when_blocked(scope))
                await model.call(1)
            assert scope.cancelled_caught
            await spawn_calls(tg, model, [2], results)
            fake.open()
        assert fake.seen == [0, 2]
        stats = model.statistics()
        assert (stats.cancelled, stats.completed) == (1, 2)

    async def test_cancelled_while_running_does_not_disturb_the_batch(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=8) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1, 2], results)
            with anyio.CancelScope() as scope:
                tg.start_soon(lambda: _cancel_when_blocked(scope))
                await model.call(3)
            fake.open()
        assert fake.batches == [[0], [1, 2]]
        assert results == {0: 0, 1: 10, 2: 20}

    async def test_caller_cancelled_during_its_batch(self) -> None:
        first_gate, gate, running = anyio.Event(), anyio.Event(), anyio.Event()
        batches: list[list[int]] = []

        async def model_fn(items: list[int]) -> list[int]:
            batches.append(list(items))
            if 0 in items:
                await first_gate.wait()
            else:
                running.set()
                await gate.wait()
            return [i * 10 for i in items]

        results: dict[Any, Any] = {}
        model = BatchedModel(model_fn, max_batch_size=8)
        async with model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0, 1], results)
            with anyio.CancelScope() as scope:
                tg.start_soon(lambda: _cancel_when_running(scope, running))
                tg.start_soon(lambda: _open_when_blocked(first_gate))
                await model.call(2)
            assert scope.cancelled_caught
            gate.set()
        assert batches == [[0], [1, 2]]
        assert results == {0: 0, 1: 10}
        stats = model.statistics()
        assert (stats.completed, stats.cancelled) == (2, 1)


async def _open_when_blocked(event: anyio.Event) -> None:
    await anyio.wait_all_tasks_blocked()
    event.set()


async def _cancel_when_running(scope: anyio.CancelScope, running: anyio.Event) -> None:
    await running.wait()
    scope.cancel()


async def _cancel_when_blocked(scope: anyio.CancelScope) -> None:
    await anyio.wait_all_tasks_blocked()
    scope.cancel()


class TestBackpressure:
    async def test_call_nowait_raises_when_full(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_queue_size=2) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)  # running
            await spawn_calls(tg, model, [1, 2], results)  # queued: full
            with pytest.raises(QueueFull) as info:
                await model.call_nowait(3)
            assert info.value.retry_after > 0
            assert model.statistics().rejected == 1
            fake.open()
        assert sorted(fake.seen) == [0, 1, 2]

    async def test_waiting_call_gets_room_in_order(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_queue_size=2, max_batch_size=2) as model:
            async with anyio.create_task_group() as tg:
                await spawn_calls(tg, model, [0], results)
                await spawn_calls(tg, model, [1, 2, 3, 4], results)
                stats = model.statistics()
                assert (stats.queue_depth, stats.waiting_for_room) == (2, 2)
                fake.open()
        assert results == {i: i * 10 for i in range(5)}
        assert fake.batches == [[0], [1, 2], [3, 4]]

    async def test_waiting_for_room_respects_the_deadline(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_queue_size=1) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1], results)
            with pytest.raises(DeadlineExceeded):
                await model.call(2, timeout=0.02)
            fake.open()
        assert fake.seen == [0, 1]


class TestErrors:
    async def test_model_exception_fails_its_batch_only(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=8) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1, 2], results)
            fake.fail_with = RuntimeError("boom")
            fake.open()
            await settle()
            fake.fail_with = None
            assert await model.call(3) == 30
        for item in (0, 1, 2):
            error = results[item]
            assert isinstance(error, ModelError)
            assert isinstance(error.__cause__, RuntimeError)
            assert "boom" in str(error)
        assert (results[0].batch_size, results[1].batch_size) == (1, 2)
        assert model.statistics().failed == 3

    async def test_exception_instance_in_a_slot_fails_that_caller_only(self) -> None:
        fake = GatedModel()
        bad = KeyError("no such item")
        fake.outputs[2] = bad
        results: dict[Any, Any] = {}
        async with BatchedModel(fake, max_batch_size=8) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1, 2, 3], results)
            fake.open()
        assert results[2] is bad
        assert [results[i] for i in (0, 1, 3)] == [0, 10, 30]

    async def test_wrong_number_of_outputs(self) -> None:
        async def short(items: list[int]) -> list[int]:
            return items[:-1]

        async with BatchedModel(short) as model:
            with pytest.raises(BatchSizeMismatch, match="1 items") as info:
                await model.call(1)
        assert (info.value.expected, info.value.got) == (1, 0)

    async def test_output_without_length(self) -> None:
        async def scalar(items: list[int]) -> int:
            return 3

        async with BatchedModel(scalar) as model:  # type: ignore[arg-type]
            with pytest.raises(ModelError, match="no length"):
                await model.call(1)

    async def test_isolate_failures_lets_healthy_items_succeed(self) -> None:
        gate = anyio.Event()
        batches: list[list[int]] = []

        async def picky(items: list[int]) -> list[int]:
            batches.append(list(items))
            if 0 in items:
                await gate.wait()
            if 13 in items:
                raise ValueError("13 is unlucky")
            return [i * 2 for i in items]

        results: dict[Any, Any] = {}
        model = BatchedModel(picky, max_batch_size=8, isolate_failures=True)
        async with model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1, 2, 13, 4, 5], results)
            gate.set()
        assert type(results[13]) is ModelError
        assert isinstance(results[13].__cause__, ValueError)
        assert {i: results[i] for i in (0, 1, 2, 4, 5)} == {0: 0, 1: 2, 2: 4, 4: 8, 5: 10}
        assert batches[1] == [1, 2, 13, 4, 5]
        assert [13] in batches
        assert model.statistics().failed == 1

    async def test_without_isolation_the_whole_batch_fails(self) -> None:
        async def picky(items: list[int]) -> list[int]:
            if 13 in items:
                raise ValueError("13 is unlucky")
            return items

        async with BatchedModel(picky) as model:
            results = await model.call_many([1, 13], return_exceptions=True)
        assert all(isinstance(r, ModelError) for r in results)


class TestLifecycle:
    async def test_close_fails_queued_items(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1, 2], results)
            close = anyio.Event()

            async def closer() -> None:
                await model.aclose()
                close.set()

            tg.start_soon(closer)
            await settle()
            assert isinstance(results[1], ClosedError)
            assert isinstance(results[2], ClosedError)
            fake.open()
            await close.wait()
        assert results[0] == 0
        assert fake.seen == [0]
        with pytest.raises(ClosedError):
            await model.call(5)

    async def test_close_with_drain_runs_queued_items(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}
        async with BatchedModel(fake) as model, anyio.create_task_group() as tg:
            await spawn_calls(tg, model, [0], results)
            await spawn_calls(tg, model, [1, 2], results)
            tg.start_soon(lambda: model.aclose(drain=True))
            await settle()
            with pytest.raises(ClosedError):
                await model.call(3)
            fake.open()
        assert results == {0: 0, 1: 10, 2: 20}

    async def test_exit_fails_queued_items_and_finishes_running_ones(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}

        async def open_when_blocked() -> None:
            await settle()
            fake.open()

        async with anyio.create_task_group() as tg:
            async with BatchedModel(fake) as model:
                await spawn_calls(tg, model, [0], results)
                await spawn_calls(tg, model, [1], results)
                tg.start_soon(open_when_blocked)
        assert results[0] == 0
        assert isinstance(results[1], ClosedError)
        assert fake.seen == [0]

    async def test_host_cancelled_mid_batch_fails_callers_instead_of_hanging(self) -> None:
        fake = GatedModel()
        outcome: list[BaseException] = []
        async with anyio.create_task_group() as outer:
            model = BatchedModel(fake)

            async def caller() -> None:
                try:
                    await model.call(1)
                except ClosedError as exc:
                    outcome.append(exc)

            with anyio.CancelScope() as host:
                async with model:
                    outer.start_soon(caller)
                    await fake.started.wait()
                    host.cancel()
        assert len(outcome) == 1

    async def test_model_can_be_entered_again_after_exit(self) -> None:
        fake = GatedModel(gated=False)
        model = BatchedModel(fake)
        async with model:
            assert await model.call(1) == 10
        async with model:
            assert await model.call(2) == 20
        assert model.statistics().completed == 2

    async def test_entering_twice_is_an_error(self) -> None:
        model = BatchedModel(GatedModel(gated=False))
        async with model:
            with pytest.raises(WrongLoopError):
                await model.__aenter__()

    async def test_sync_call_on_the_engine_thread_is_refused(self) -> None:
        async with BatchedModel(GatedModel(gated=False)) as model:
            with pytest.raises(WrongLoopError, match="await"):
                model.call_sync(1)


class TestMany:
    async def test_call_many_batches_together_and_keeps_order(self) -> None:
        fake = GatedModel(gated=False)
        async with BatchedModel(fake, max_batch_size=4) as model:
            assert await model.call_many(range(6)) == [0, 10, 20, 30, 40, 50]
        assert fake.batches == [[0, 1, 2, 3], [4, 5]]

    async def test_call_many_return_exceptions(self) -> None:
        fake = GatedModel(gated=False)
        bad = ValueError("bad")
        fake.outputs[1] = bad
        async with BatchedModel(fake) as model:
            assert await model.call_many([0, 1, 2], return_exceptions=True) == [0, bad, 20]
            with pytest.raises(ValueError, match="bad"):
                await model.call_many([0, 1, 2])


class TestStatistics:
    async def test_counts_add_up(self) -> None:
        fake = GatedModel(gated=False)
        fake.outputs[3] = ValueError("x")
        async with BatchedModel(fake, name="m", version="7") as model:
            await model.call_many(range(5), return_exceptions=True)
            stats = model.statistics()
        assert (stats.name, stats.model_version) == ("m", "7")
        assert (stats.submitted, stats.completed, stats.failed) == (5, 4, 1)
        assert stats.pending == 0
        assert sum(size * n for size, n in stats.batch_sizes.items()) == 5
        assert stats.end_to_end.count == 5
        assert 0 <= stats.queue_wait.p50 <= stats.queue_wait.p99 <= stats.queue_wait.max
        assert stats.end_to_end.p50 >= stats.queue_wait.p50
        with pytest.raises(AttributeError):
            stats.completed = 0  # type: ignore[misc]
        with pytest.raises(TypeError):
            stats.batch_sizes[1] = 3  # type: ignore[index]

    async def test_latency_percentiles_cover_the_most_recent_items(self) -> None:
        async def ident(items: list[int]) -> list[int]:
            return items

        async with BatchedModel(ident, max_batch_size=64) as model:
            await model.call_many(range(SAMPLE_WINDOW + 1000))
            stats = model.statistics()
        assert stats.completed == SAMPLE_WINDOW + 1000
        assert stats.queue_wait.count == stats.end_to_end.count == SAMPLE_WINDOW
        assert 0 <= stats.queue_wait.p50 <= stats.queue_wait.max <= stats.end_to_end.max


class TestReviewedEdges:
    async def test_body_exception_propagates_unwrapped_and_running_batch_finishes(self) -> None:
        fake = GatedModel()
        results: dict[Any, Any] = {}

        async def open_when_blocked() -> None:
            await settle()
            fake.open()

        async with anyio.create_task_group() as tg:
            with pytest.raises(KeyError, match="from the body"):
                async with BatchedModel(fake) as model:
                    await spawn_calls(tg, model, [1], results)
                    tg.start_soon(open_when_blocked)
                    raise KeyError("from the body")
            await settle()  # let the caller task pick up the outcome delivered at exit
            assert results == {1: 10}

    async def test_call_many_failure_leaves_no_unretrieved_exception(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        import gc

        async def broken(items: list[int]) -> list[int]:
            raise RuntimeError("whole batch")

        async with BatchedModel(broken, max_batch_size=4) as model:
            with pytest.raises(ModelError):
                await model.call_many(range(4))
        gc.collect()
        assert "never retrieved" not in caplog.text

    async def test_isolation_does_not_rerun_callers_that_gave_up(self) -> None:
        first_gate, gave_up = anyio.Event(), anyio.Event()
        batches: list[list[int]] = []

        async def model_fn(items: list[int]) -> list[int]:
            batches.append(list(items))
            if 0 in items:
                await first_gate.wait()
            elif len(items) > 1:
                await gave_up.wait()
            if 13 in items:
                raise ValueError("poison")
            return items

        results: dict[Any, Any] = {}
        model = BatchedModel(model_fn, max_batch_size=8, isolate_failures=True)
        async with model, anyio.create_task_group() as tg:

            async def impatient() -> None:
                try:
                    await model.call(2, timeout=0.05)
                except DeadlineExceeded:
                    gave_up.set()

            await spawn_calls(tg, model, [0, 13], results)  # 0 holds the model; 13 queues
            tg.start_soon(impatient)
            tg.start_soon(_open_when_blocked, first_gate)
        assert batches == [[0], [13, 2], [13]]
        assert isinstance(results[13], ModelError)

    async def test_output_without_length_is_not_wrapped_twice_nor_isolated(self) -> None:
        calls: list[list[int]] = []

        async def scalar(items: list[int]) -> int:
            calls.append(items)
            return 3

        model = BatchedModel(scalar, isolate_failures=True)  # type: ignore[arg-type]
        async with model:
            results = await model.call_many(range(4), return_exceptions=True)
        assert len(calls) == 1
        for error in results:
            assert isinstance(error, ModelError)
            assert "raised ModelError" not in str(error)
            assert "no length" in str(error)

    async def test_async_with_after_background_use_explains_itself(self) -> None:
        async def times_ten(items: list[int]) -> list[int]:
            return [i * 10 for i in items]

        model = BatchedModel(times_ten)
        try:
            assert await model.call(1) == 10  # no `async with`: starts the background engine
            with pytest.raises(WrongLoopError, match="background thread"):
                await model.__aenter__()
        finally:
            await model.aclose()

    async def test_second_async_with_explains_itself(self) -> None:
        model = BatchedModel(GatedModel(gated=False))
        async with model:
            with pytest.raises(WrongLoopError, match="another `async with`"):
                await model.__aenter__()


async def _store(results: dict[Any, Any], key: Any, awaitable: Any) -> None:
    try:
        results[key] = await awaitable
    except Exception as exc:
        results[key] = exc


def test_adaptive_wait_needs_a_wait() -> None:
    with pytest.raises(ConfigurationError, match="adaptive_wait needs a max_wait > 0"):
        BatchedModel(GatedModel(), adaptive_wait=True)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("max_batch_size", 0, "max_batch_size must be >= 1, got 0"),
        ("max_batch_size", 2.5, "max_batch_size must be an int, got 2.5"),
        ("max_concurrency", 0, "max_concurrency must be >= 1, got 0"),
        ("max_queue_size", 0, "max_queue_size must be >= 1, got 0"),
        ("max_wait", -1, "max_wait must be >= 0, got -1"),
        ("max_wait", math.nan, "max_wait must be >= 0, got nan"),
        ("timeout", 0, "timeout must be > 0, got 0"),
        ("max_batch_cost", 5, "size_fn and max_batch_cost go together"),
        ("collate", 3, "collate must be callable, got 3"),
        ("name", "", "name must be a non-empty string"),
    ],
)
def test_bad_settings_name_the_setting_and_value(setting: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BatchedModel(GatedModel(), **{setting: value})
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_model_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        BatchedModel(42)  # type: ignore[arg-type]


class TestWorkerThreadEdges:
    async def test_sync_model_raising_stopiteration_fails_the_batch_and_keeps_serving(
        self,
    ) -> None:
        def model_fn(items: list[int]) -> list[int]:
            if 0 in items:
                raise StopIteration
            return items

        async with BatchedModel(model_fn) as model:
            with anyio.fail_after(10):
                with pytest.raises(ModelError) as info:
                    await model.call(0)
                assert isinstance(info.value.__cause__, RuntimeError)
                assert await model.call(1) == 1

    async def test_host_cancelled_during_isolation_retry_settles_every_caller(self) -> None:
        second_attempt = anyio.Event()
        attempts: list[list[int]] = []

        async def model_fn(items: list[int]) -> list[int]:
            attempts.append(list(items))
            if len(attempts) > 1:
                second_attempt.set()
                await anyio.sleep_forever()
            raise ValueError("poison somewhere")

        outcomes: list[Any] = []

        async def caller(model: BatchedModel[int, int]) -> None:
            outcomes.extend(await model.call_many([1, 2, 3, 4], return_exceptions=True))

        model = BatchedModel(model_fn, max_batch_size=4, isolate_failures=True)
        async with anyio.create_task_group() as outer:
            with anyio.CancelScope() as host:
                async with model:
                    outer.start_soon(caller, model)
                    await second_attempt.wait()
                    host.cancel()
        assert attempts == [[1, 2, 3, 4], [1, 2]]
        assert len(outcomes) == 4
        assert all(isinstance(o, ClosedError) for o in outcomes)


async def call_many_into(
    model: BatchedModel[Any, Any], items: list[Any], results: dict[Any, Any]
) -> None:
    """Submit ``items`` together and store each one's outcome in ``results``."""
    outcomes = await model.call_many(items, return_exceptions=True)
    results.update(zip(items, outcomes, strict=True))


class GatedSyncModel:
    """A sync model (it runs in a worker thread) that records each batch and holds the first
    until the test opens the gate; items in ``poison`` fail the batch they are in."""

    def __init__(self, poison: tuple[int, ...] = ()) -> None:
        self.batches: list[list[int]] = []
        self.first_started = threading.Event()
        self.gate = threading.Event()
        self.poison = poison

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.first_started.set()
        self.gate.wait(10)
        if any(item in self.poison for item in items):
            raise ValueError("poison")
        return [item * 10 for item in items]

    async def wait_started(self) -> None:
        await anyio.to_thread.run_sync(self.first_started.wait, 10)


async def start_first_batch(
    tg: anyio.abc.TaskGroup, model: BatchedModel[Any, Any], fake: GatedSyncModel, results: Any
) -> None:
    """Submit 0 and 1 as one batch and return once the model thread holds it at the gate."""
    tg.start_soon(call_many_into, model, [0, 1], results)
    await fake.wait_started()


async def behind_a_failing_batch(fake: GatedSyncModel, **settings: Any) -> dict[Any, Any]:
    """Run [0, 1] (which fails), queue 2 and 3 behind it, and return every outcome."""
    results: dict[Any, Any] = {}
    model = BatchedModel(fake, max_batch_size=2, **settings)
    async with model, anyio.create_task_group() as tg:
        await start_first_batch(tg, model, fake, results)
        await spawn_calls(tg, model, [2, 3], results)
        fake.gate.set()
    return results


@pytest.mark.lane("staging")
class TestStagedBatches:
    """A sync model on asyncio: a full batch queued while one runs is handed to the model
    thread at once, so it starts the moment the running batch ends. On trio it stays queued
    until then. Either way every caller gets the outcome the contract says."""

    async def test_a_caller_who_leaves_a_staged_batch_is_not_run(self, anyio_backend: str) -> None:
        fake = GatedSyncModel()
        results: dict[Any, Any] = {}
        model = BatchedModel(fake, max_batch_size=2)
        async with model, anyio.create_task_group() as tg:
            await start_first_batch(tg, model, fake, results)
            await spawn_calls(tg, model, [2], results)
            with anyio.CancelScope() as scope:
                tg.start_soon(lambda: _cancel_when_blocked(scope))
                await model.call(3)  # fills the batch: staged on asyncio
            assert scope.cancelled_caught
            await spawn_calls(tg, model, [4], results)
            if anyio_backend == "asyncio":
                stats = model.statistics()
                assert (stats.in_flight_batches, stats.queue_depth) == (2, 1)
            fake.gate.set()
        assert results == {0: 0, 1: 10, 2: 20, 4: 40}
        staged = [[0, 1], [2], [4]] if anyio_backend == "asyncio" else [[0, 1], [2, 4]]
        assert fake.batches == staged
        stats = model.statistics()
        assert (stats.completed, stats.cancelled, stats.in_flight_batches) == (4, 1, 0)

    async def test_callers_arriving_behind_a_running_batch_join_the_next_one(
        self, anyio_backend: str
    ) -> None:
        fake = GatedSyncModel()
        results: dict[Any, Any] = {}
        model = BatchedModel(fake, max_batch_size=4)
        async with model, anyio.create_task_group() as tg:
            await start_first_batch(tg, model, fake, results)
            await spawn_calls(tg, model, [2, 3], results)
            stats = model.statistics()
            # asyncio: 2 was staged alone and 3 joined it; trio: both wait in the queue.
            staged = (2, 0) if anyio_backend == "asyncio" else (1, 2)
            assert (stats.in_flight_batches, stats.queue_depth) == staged
            fake.gate.set()
        assert results == {0: 0, 1: 10, 2: 20, 3: 30}
        assert fake.batches == [[0, 1], [2, 3]]

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])  # staging is asyncio's
    async def test_a_caller_cancelled_as_its_staged_batch_starts_is_not_run(self) -> None:
        first_running, gate, second_running = (threading.Event() for _ in range(3))
        batches: list[list[int]] = []

        def model_fn(items: list[int]) -> list[int]:
            batches.append(list(items))
            if len(batches) == 1:
                first_running.set()
                gate.wait(10)
            else:
                second_running.set()
            return items

        model = BatchedModel(model_fn, max_batch_size=4)
        async with model:
            first = asyncio.ensure_future(model.call(0))
            await anyio.to_thread.run_sync(first_running.wait, 10)
            leaving = asyncio.ensure_future(model.call(1))
            staying = asyncio.ensure_future(model.call(2))
            await settle()  # 1 and 2 are staged behind 0
            leaving.cancel()  # its future is cancelled now; its task withdraws it later
            gate.set()
            # Hold the loop (no task runs) until the model thread has started the next batch.
            assert second_running.wait(10)
            assert (await first, await staying) == (0, 2)
            with pytest.raises(asyncio.CancelledError):
                await leaving
            stats = model.statistics()
        assert batches == [[0], [2]]
        assert (stats.completed, stats.cancelled) == (2, 1)

    async def test_a_staged_batch_runs_after_the_batch_before_it_fails(self) -> None:
        fake = GatedSyncModel(poison=(1,))
        results = await behind_a_failing_batch(fake)
        assert isinstance(results.pop(0), ModelError)
        assert isinstance(results.pop(1), ModelError)
        assert results == {2: 20, 3: 30}

    async def test_isolation_retries_a_failed_batch_with_a_staged_one_behind_it(self) -> None:
        fake = GatedSyncModel(poison=(1,))
        results = await behind_a_failing_batch(fake, isolate_failures=True)
        assert isinstance(results.pop(1), ModelError)
        assert results == {0: 0, 2: 20, 3: 30}
        assert sorted(map(tuple, fake.batches)) == [(0,), (0, 1), (1,), (2, 3)]

    async def test_close_without_drain_fails_a_staged_batch(self) -> None:
        fake = GatedSyncModel()
        results: dict[Any, Any] = {}
        model = BatchedModel(fake, max_batch_size=2)
        async with model, anyio.create_task_group() as tg:
            await start_first_batch(tg, model, fake, results)
            await spawn_calls(tg, model, [2, 3], results)
            model.close()  # on the engine's own loop: fails what has not begun
            await settle()
            fake.gate.set()
        assert (results[0], results[1]) == (0, 10)
        assert isinstance(results[2], ClosedError) and isinstance(results[3], ClosedError)
        assert fake.batches == [[0, 1]]


class TestHistograms:
    async def test_off_by_default(self) -> None:
        async with BatchedModel(GatedModel(gated=False)) as model:
            await model.call(1)
        assert dict(model.statistics().histograms) == {}

    async def test_every_sample_is_counted(self) -> None:
        fake = GatedModel()
        model = BatchedModel(fake, max_batch_size=4)
        model.record_histograms((0.5, 1000.0))
        model.record_histograms([0.5, 1000.0])  # again, same bounds: nothing changes
        results: dict[Any, Any] = {}
        async with model:
            async with anyio.create_task_group() as tg:
                await spawn_calls(tg, model, list(range(10)), results)
                fake.open()
        stats = model.statistics()
        hist = stats.histograms
        assert set(hist) == {"queue_wait", "compute", "end_to_end"}
        assert hist["queue_wait"].count == hist["end_to_end"].count == 10
        assert hist["compute"].count == stats.batches
        assert hist["queue_wait"].bounds == (0.5, 1000.0)
        assert hist["end_to_end"].cumulative()[-1] == (math.inf, 10)
        assert hist["end_to_end"].sum >= hist["queue_wait"].sum > 0

    @pytest.mark.parametrize("bounds", [(), (1, 1), (2, 1), (0, 1), (True,), ("1",)])
    def test_bad_bounds(self, bounds: Any) -> None:
        with pytest.raises(ConfigurationError, match="increasing numbers > 0"):
            BatchedModel(lambda items: items).record_histograms(bounds)

    def test_other_bounds_later_are_refused(self) -> None:
        model = BatchedModel(lambda items: items)
        model.record_histograms((1.0,))
        with pytest.raises(ConfigurationError, match="already recorded"):
            model.record_histograms((2.0,))
