"""Versions and swapping through the public API: every batch on one version, nothing lost,
typed failures that leave the old model serving, rollback, statistics. Asyncio and trio."""

from __future__ import annotations

import gc
import os
import random
import threading
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from batchkit import (
    BatchedModel,
    ClosedError,
    ConfigurationError,
    ModelError,
    SwapError,
    ValidationFailed,
    Versioned,
    WarmupFailed,
    WrongLoopError,
)

from ..support.helpers import GatedModel

pytestmark = pytest.mark.anyio


class Recording:
    """Model functions that tag each output with their version and log every batch they run."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[Any]]] = []
        self.lock = threading.Lock()

    def version(self, version: str) -> Callable[[list[Any]], list[Any]]:
        def model(items: list[Any]) -> list[Any]:
            with self.lock:
                self.batches.append((version, list(items)))
            return [(version, item) for item in items]

        return model

    def version_of_item(self) -> dict[Any, str]:
        return {item: version for version, items in self.batches for item in items}


class TestVersionsInResults:
    async def test_call_versioned_reports_the_initial_version(self) -> None:
        async with BatchedModel(lambda items: [i * 2 for i in items], version="a") as model:
            result = await model.call_versioned(3)
            assert result == Versioned(6, "a")
            value, version = result
            assert (value, version) == (6, "a")
            assert await model.call_many_versioned([1, 2]) == [Versioned(2, "a"), Versioned(4, "a")]

    async def test_call_many_versioned_keeps_exceptions_in_place(self) -> None:
        def model(items: list[int]) -> list[Any]:
            return [ValueError(i) if i < 0 else i for i in items]

        async with BatchedModel(model, version="b") as m:
            results = await m.call_many_versioned([1, -1], return_exceptions=True)
        assert results[0] == Versioned(1, "b")
        assert isinstance(results[1], ValueError)

    def test_call_sync_versioned(self) -> None:
        with BatchedModel(lambda items: items, version="s") as model:
            assert model.call_sync_versioned("x") == Versioned("x", "s")

    async def test_a_failed_batch_names_its_version(self) -> None:
        fake = GatedModel(gated=False)
        fake.fail_with = RuntimeError("boom")
        async with BatchedModel(fake, version="7") as model:
            with pytest.raises(ModelError) as info:
                await model.call_versioned(1)
        assert info.value.version == "7"

    @pytest.mark.parametrize("bad", ["", 3, None])
    def test_version_must_be_a_non_empty_string(self, bad: Any) -> None:
        with pytest.raises(ConfigurationError, match="version must be a non-empty string"):
            BatchedModel(lambda items: items, version=bad)


class TestSwapBetweenBatches:
    async def test_running_batch_finishes_on_old_queued_items_run_on_new(self) -> None:
        old = GatedModel()
        rec = Recording()
        results: dict[int, Versioned[Any]] = {}
        async with BatchedModel(old, version="old") as model:

            async def call(item: int) -> None:
                results[item] = await model.call_versioned(item)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, 1)
                await old.started.wait()
                for item in (2, 3):  # one at a time: trio runs new tasks in any order
                    tg.start_soon(call, item)
                    await anyio.wait_all_tasks_blocked()
                assert model.statistics().queue_depth == 2
                await model.swap(rec.version("new"), version="new")
                assert model.version == "new"
                old.open()
        assert results == {
            1: Versioned(10, "old"),
            2: Versioned(("new", 2), "new"),
            3: Versioned(("new", 3), "new"),
        }
        assert old.batches == [[1]]
        assert rec.batches == [("new", [2, 3])]
        stats = model.statistics()
        assert (stats.completed, stats.failed, stats.swaps, stats.model_version) == (3, 0, 1, "new")
        assert stats.last_swap_seconds > 0

    async def test_preparation_runs_off_the_engine_at_the_lowest_priority(self) -> None:
        seen: list[tuple[str, int | None]] = []

        def validate(new: Any, old: Any) -> None:
            native = threading.get_native_id()
            priority = (
                os.getpriority(os.PRIO_PROCESS, native) if hasattr(os, "getpriority") else None
            )
            seen.append((threading.current_thread().name, priority))

        rec = Recording()
        async with BatchedModel(rec.version("1"), version="1", name="m") as model:
            await model.swap(rec.version("2"), version="2", validate=validate)
        assert seen[0][0] == "batchkit-m-swap"
        if seen[0][1] is not None:
            assert seen[0][1] == 19

    async def test_swap_before_the_engine_starts(self) -> None:
        rec = Recording()
        model = BatchedModel(rec.version("1"), version="1")
        await model.swap(rec.version("2"), version="2")
        async with model:
            assert await model.call_versioned(5) == Versioned(("2", 5), "2")

    def test_swap_sync_from_a_thread_with_a_background_engine(self) -> None:
        rec = Recording()
        with BatchedModel(rec.version("1"), version="1") as model:
            assert model.call_sync(1) == ("1", 1)
            model.swap_sync(rec.version("2"), version="2")
            assert model.call_sync_versioned(1) == Versioned(("2", 1), "2")
            assert model.rollback_sync() == "1"
            assert model.call_sync_versioned(1) == Versioned(("1", 1), "1")

    async def test_swap_to_an_async_model_and_back(self) -> None:
        rec = Recording()

        async def doubled(items: list[int]) -> list[int]:
            await anyio.lowlevel.checkpoint()
            return [2 * i for i in items]

        async with BatchedModel(rec.version("sync"), version="sync") as model:
            await model.swap(doubled, version="async", warmup=[1, 2])
            assert await model.call_versioned(4) == Versioned(8, "async")
            await model.rollback()
            assert await model.call_versioned(4) == Versioned(("sync", 4), "sync")

    async def test_swap_sync_on_the_engine_thread_is_refused(self) -> None:
        async with BatchedModel(lambda items: items) as model:
            with pytest.raises(WrongLoopError, match="swap_sync"):
                model.swap_sync(lambda items: items, version="2")
            with pytest.raises(WrongLoopError, match="rollback_sync"):
                model.rollback_sync()
            assert model.version == "1"

    async def test_swap_after_close_is_refused(self) -> None:
        model = BatchedModel(lambda items: items)
        await model.aclose()
        with pytest.raises(ClosedError):
            await model.swap(lambda items: items, version="2")
        with pytest.raises(ClosedError):
            await model.rollback()

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"version": ""}, "version must be a non-empty string"),
            ({"version": "2", "validate": 5}, "validate must be callable"),
            ({"version": "2", "warmup": 5}, "warmup must be a sequence"),
            ({"version": "2", "warmup": "abc"}, "warmup must be a sequence"),
        ],
    )
    async def test_bad_swap_arguments(self, kwargs: dict[str, Any], message: str) -> None:
        async with BatchedModel(lambda items: items) as model:
            with pytest.raises(ConfigurationError, match=message):
                await model.swap(lambda items: items, **kwargs)


class TestFailedSwapsLeaveTheOldModelServing:
    async def check_still_serving(self, model: BatchedModel[Any, Any], rec: Recording) -> None:
        assert model.version == "1"
        assert await model.call_versioned(9) == Versioned(("1", 9), "1")
        await model.swap(rec.version("3"), version="3")  # the next swap works
        assert await model.call_versioned(9) == Versioned(("3", 9), "3")

    async def test_warmup_that_raises(self) -> None:
        rec = Recording()

        def broken(items: list[Any]) -> list[Any]:
            raise RuntimeError("cannot warm up")

        async with BatchedModel(rec.version("1"), version="1") as model:
            with pytest.raises(WarmupFailed, match="cannot warm up") as info:
                await model.swap(broken, version="2", warmup=[1])
            assert isinstance(info.value.__cause__, RuntimeError)
            assert model.statistics().failed_swaps == 1
            await self.check_still_serving(model, rec)

    @pytest.mark.parametrize(
        ("outputs", "message"),
        [
            (lambda items: [ValueError("bad item")], "returned an error for a warm-up item"),
            (lambda items: [], "returned 0 outputs for a batch of 1"),
        ],
    )
    async def test_warmup_that_answers_wrongly(
        self, outputs: Callable[[list[Any]], list[Any]], message: str
    ) -> None:
        rec = Recording()
        async with BatchedModel(rec.version("1"), version="1") as model:
            with pytest.raises(WarmupFailed, match=message):
                await model.swap(outputs, version="2", warmup=[1])
            await self.check_still_serving(model, rec)

    async def test_validation_that_rejects(self) -> None:
        rec = Recording()
        seen: list[tuple[Any, Any]] = []

        def validate(new: Any, old: Any) -> bool:
            seen.append((new([1]), old([1])))
            return False

        async with BatchedModel(rec.version("1"), version="1") as model:
            with pytest.raises(ValidationFailed, match="rejected"):
                await model.swap(rec.version("2"), version="2", validate=validate)
            assert seen == [([("2", 1)], [("1", 1)])]
            await self.check_still_serving(model, rec)

    async def test_validation_that_raises_async(self) -> None:
        rec = Recording()

        async def validate(new: Any, old: Any) -> None:
            await anyio.lowlevel.checkpoint()
            raise AssertionError("outputs differ")

        async with BatchedModel(rec.version("1"), version="1") as model:
            with pytest.raises(ValidationFailed, match="outputs differ"):
                await model.swap(rec.version("2"), version="2", validate=validate)
            await self.check_still_serving(model, rec)

    async def test_weights_for_a_model_that_is_not_a_torch_module(self) -> None:
        rec = Recording()
        async with BatchedModel(rec.version("1"), version="1") as model:
            with pytest.raises(SwapError, match=r"needs a torch\.nn\.Module"):
                await model.swap({"weight": 1}, version="2")
            with pytest.raises(SwapError, match=r"needs a torch\.nn\.Module"):
                await model.swap("weights.pt", version="2")
            with pytest.raises(SwapError, match=r"needs a torch\.nn\.Module"):
                await model.swap(rec.version("2"), version="2", in_place=True)
            await self.check_still_serving(model, rec)


class TwoGates:
    """An async model that fails every batch; its first two batches wait for their gates."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.started = [anyio.Event(), anyio.Event()]
        self.gates = [anyio.Event(), anyio.Event()]

    async def __call__(self, items: list[Any]) -> list[Any]:
        n = len(self.batches)
        self.batches.append(list(items))
        if n < 2:
            self.started[n].set()
            await self.gates[n].wait()
        raise RuntimeError("v1 fails")


class TestIsolationRetries:
    async def test_retries_run_on_the_version_that_failed(self) -> None:
        old = TwoGates()
        rec = Recording()
        results: dict[int, Any] = {}
        async with BatchedModel(old, version="1", isolate_failures=True) as model:

            async def call(item: int) -> None:
                try:
                    results[item] = await model.call_versioned(item)
                except ModelError as exc:
                    results[item] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, 0)
                await old.started[0].wait()
                for item in (1, 2):  # one at a time: trio runs new tasks in any order
                    tg.start_soon(call, item)
                    await anyio.wait_all_tasks_blocked()
                old.gates[0].set()
                await old.started[1].wait()  # the batch [1, 2] runs on v1
                await model.swap(rec.version("2"), version="2")
                old.gates[1].set()  # it fails: its halves are retried
        assert old.batches == [[0], [1, 2], [1], [2]]
        assert rec.batches == []
        assert all(isinstance(r, ModelError) and r.version == "1" for r in results.values())


class TestRollback:
    async def test_rollback_goes_back_and_forth(self) -> None:
        rec = Recording()
        async with BatchedModel(rec.version("1"), version="1") as model:
            with pytest.raises(SwapError, match="no previous version"):
                await model.rollback()
            await model.swap(rec.version("2"), version="2")
            assert await model.rollback() == "1"
            assert await model.call_versioned(0) == Versioned(("1", 0), "1")
            assert await model.rollback() == "2"
            assert await model.call_versioned(0) == Versioned(("2", 0), "2")
            assert model.statistics().swaps == 3

    async def test_keep_previous_false_releases_the_old_model(self) -> None:
        rec = Recording()
        first = rec.version("1")
        ref = weakref.ref(first)
        model = BatchedModel(first, version="1", keep_previous=False)
        del first
        async with model:
            await model.call(0)
            await model.swap(rec.version("2"), version="2")
            await model.call(0)
        gc.collect()
        assert ref() is None
        with pytest.raises(SwapError, match="no previous version"):
            await model.rollback()


class TestConcurrentSwaps:
    async def test_swaps_are_serialized(self) -> None:
        inside = 0
        most_inside = 0
        guard = threading.Lock()

        def validate(new: Any, old: Any) -> None:
            nonlocal inside, most_inside
            with guard:
                inside += 1
                most_inside = max(most_inside, inside)
            try:
                for _ in range(20):  # give another swap every chance to overlap this one
                    threading.Event().wait(0.0005)
            finally:
                with guard:
                    inside -= 1

        rec = Recording()
        async with BatchedModel(rec.version("0"), version="0") as model:
            async with anyio.create_task_group() as tg:
                for n in range(1, 9):
                    tg.start_soon(
                        lambda n=n: model.swap(
                            rec.version(str(n)), version=str(n), validate=validate
                        )
                    )
            assert most_inside == 1
            assert model.statistics().swaps == 8
            assert model.version in {str(n) for n in range(1, 9)}


class TestSwapsUnderLoad:
    """At least 50 swaps back and forth while async callers and sync threads keep calling."""

    SWAPS = 60
    TASKS = 24
    THREADS = 4

    async def test_nothing_lost_nothing_mixed_no_leak(self) -> None:
        rec = Recording()
        refs: list[weakref.ref[Any]] = []

        def model_for(n: int) -> Callable[[list[Any]], list[Any]]:
            fn = rec.version(f"v{n}")
            refs.append(weakref.ref(fn))
            return fn

        results: list[tuple[Any, Versioned[Any]]] = []
        errors: list[BaseException] = []
        done = threading.Event()
        counter = iter(range(10**9))
        rng = random.Random(7)

        model = BatchedModel(model_for(0), version="v0", max_batch_size=16)

        async def async_caller() -> None:
            while not done.is_set():
                item = next(counter)
                try:
                    results.append((item, await model.call_versioned(item, priority=rng.random())))
                except Exception as exc:
                    errors.append(exc)

        def thread_caller() -> None:
            while not done.is_set():
                item = next(counter)
                try:
                    results.append((item, model.call_sync_versioned(item)))
                except Exception as exc:
                    errors.append(exc)

        async def swapper() -> None:
            try:
                for n in range(1, self.SWAPS + 1):
                    await model.call(-n)  # load reaches every version
                    await model.swap(model_for(n), version=f"v{n}", warmup=[-1])
                    if n % 10 == 0:
                        await model.rollback()
                        await model.swap(model_for(n), version=f"v{n}")
            finally:
                done.set()

        async with model:
            async with anyio.create_task_group() as tg:
                for _ in range(self.TASKS):
                    tg.start_soon(async_caller)
                for _ in range(self.THREADS):
                    tg.start_soon(anyio.to_thread.run_sync, thread_caller)
                tg.start_soon(swapper)

        assert errors == []
        stats = model.statistics()
        assert stats.swaps >= self.SWAPS and stats.failed_swaps == 0
        assert stats.failed == stats.expired == stats.cancelled == 0
        assert stats.completed == stats.submitted
        # Every output matches the version it reports and the version of the batch that ran it.
        ran_on = rec.version_of_item()
        for item, result in results:
            assert result.value == (result.version, item)
            assert ran_on[item] == result.version
        assert len({item for item, _ in results}) == len(results)  # each caller answered once
        assert len({version for version, _ in rec.batches}) > self.SWAPS // 2
        assert stats.mean_batch_size > 1
        # Only the serving model and the one kept for rollback are still alive.
        gc.collect()
        alive = [ref() for ref in refs if ref() is not None]
        assert len(alive) == 2
        assert model.model in alive
