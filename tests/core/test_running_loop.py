"""Notebook cells: sync and async calls with the kernel's asyncio loop running on this thread.

A Jupyter kernel runs each cell inside its own running asyncio event loop. These tests do the
same with ``asyncio.run`` (one "cell" per coroutine, or several on one loop), on asyncio only,
since that is the loop ipykernel runs. ``tests/notebook/test_notebooks.py`` runs the real thing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from batchkit import BatchedModel, WrongLoopError, batched


def double_all(items: list[int]) -> list[int]:
    return [2 * i for i in items]


async def async_double_all(items: list[int]) -> list[int]:
    await asyncio.sleep(0)
    return [2 * i for i in items]


@pytest.mark.parametrize("fn", [double_all, async_double_all], ids=["sync fn", "async fn"])
def test_sync_calls_in_a_running_loop_neither_fail_nor_deadlock(fn: object) -> None:
    async def cell() -> tuple[int, list[int]]:
        asyncio.get_running_loop()  # the loop runs, as in a kernel
        model = BatchedModel(fn, max_batch_size=8)  # type: ignore[call-overload]
        try:
            return model.call_sync(21), model.call_many_sync(range(20))
        finally:
            model.close()

    one, many = asyncio.run(cell())
    assert one == 42
    assert many == [2 * i for i in range(20)]


def test_many_items_from_a_cell_form_full_batches() -> None:
    async def cell() -> dict[int, int]:
        with BatchedModel(double_all, max_batch_size=8) as model:
            model.call_many_sync(range(20))  # all 20 submitted at once
            return dict(model.statistics().batch_sizes)

    assert asyncio.run(cell()) == {8: 2, 4: 1}


def test_cells_share_one_model_across_a_long_running_loop() -> None:
    """The kernel's loop outlives each cell; a model made in one cell serves the next ones."""

    @batched(max_batch_size=4)
    def predict(items: list[int]) -> list[int]:
        return [i + 1 for i in items]

    loop = asyncio.new_event_loop()
    try:

        async def cell_1() -> int:
            return predict(1)  # a plain call: blocks the cell until its batch has run

        async def cell_2() -> list[int]:
            return [await predict.call(2), *await asyncio.gather(*map(predict.call, [3, 4]))]

        async def cell_3() -> list[int]:
            return predict.call_many_sync([5, 6])

        assert loop.run_until_complete(cell_1()) == 2
        assert loop.run_until_complete(cell_2()) == [3, 4, 5]
        assert loop.run_until_complete(cell_3()) == [6, 7]
        assert predict.statistics().completed == 6
    finally:
        predict.close()
        loop.close()


def test_a_sync_call_while_an_awaiting_task_waits_on_the_same_loop() -> None:
    """A cell blocks the kernel's loop in call_sync while a task on that loop awaits the model.

    The engine runs on its own thread, so the blocked loop holds nothing up: the sync call
    returns, and the task completes once the loop runs again.
    """

    async def cell() -> tuple[int, int]:
        model = BatchedModel(double_all)
        try:
            task = asyncio.ensure_future(model.call(5))
            await asyncio.sleep(0)  # the task submits its item, then awaits
            blocked = model.call_sync(7)  # blocks this loop (and the task) until answered
            return blocked, await task
        finally:
            await model.aclose()

    assert asyncio.run(cell()) == (14, 10)


def test_sync_call_on_the_loop_running_the_engine_is_refused_not_deadlocked() -> None:
    """``async with model`` in a cell runs the engine on the kernel's loop: call_sync there
    would block that loop forever, so it raises and says what to do instead."""

    async def cell() -> None:
        async with BatchedModel(double_all, name="net") as model:
            with pytest.raises(WrongLoopError, match=r"use `await model.call\(item\)` there"):
                model.call_sync(1)
            assert await model.call(1) == 2

    asyncio.run(cell())


def test_swap_rollback_and_statistics_from_a_running_loop() -> None:
    def plus_one(items: list[int]) -> list[int]:
        return [i + 1 for i in items]

    async def cell() -> list[object]:
        model = BatchedModel(double_all, version="1")
        try:
            before = model.call_sync_versioned(3)
            model.swap_sync(plus_one, version="2", warmup=[0])
            after = model.call_sync_versioned(3)
            restored = model.rollback_sync()
            return [tuple(before), tuple(after), restored, model.statistics().swaps]
        finally:
            model.close()

    assert asyncio.run(cell()) == [(6, "1"), (4, "2"), "1", 2]


def test_close_from_a_cell_stops_the_engine_thread() -> None:
    async def cell() -> list[str]:
        model = BatchedModel(double_all, name="closing")
        model.call_sync(1)
        model.close()
        return [t.name for t in threading.enumerate()]

    assert "batchkit-closing" not in asyncio.run(cell())
