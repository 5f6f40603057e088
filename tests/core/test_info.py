"""The BatchInfo seam: a model that defines ``call_with_info`` learns each batch's most urgent
priority and earliest deadline; every other model is called as before. asyncio and trio."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from batchkit import BatchedModel, BatchInfo, SupportsBatchInfo, batched

from ..support.helpers import GatedModel

pytestmark = pytest.mark.anyio


class InfoModel(GatedModel):
    """A gated async model that records the BatchInfo of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[BatchInfo] = []
        self.plain_calls = 0

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.plain_calls += 1
        return await super().__call__(items)

    async def call_with_info(self, items: list[Any], info: BatchInfo) -> list[Any]:
        self.infos.append(info)
        return await GatedModel.__call__(self, items)


class SyncInfoModel:
    """A sync model with ``call_with_info``: runs in a worker thread like any sync model."""

    def __init__(self) -> None:
        self.infos: list[BatchInfo] = []
        self.threads: set[int] = set()

    def __call__(self, items: list[Any]) -> list[Any]:
        raise AssertionError("the engine must call call_with_info")

    def call_with_info(self, items: list[Any], info: BatchInfo) -> list[Any]:
        self.infos.append(info)
        self.threads.add(threading.get_ident())
        return [item * 2 for item in items]


async def queue_behind_a_running_batch(
    model: BatchedModel[Any, Any], fake: InfoModel, calls: list[dict[str, Any]]
) -> list[Any]:
    """Run one batch, queue ``calls`` behind it (each a call's kwargs), then let all finish."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, kwargs: dict[str, Any]) -> None:
        results[i] = await model.call(i, **kwargs)

    async with anyio.create_task_group() as tg:
        tg.start_soon(model.call, 100)
        await fake.started.wait()
        for i, kwargs in enumerate(calls):
            tg.start_soon(one, i, kwargs)
            await anyio.wait_all_tasks_blocked()
        fake.open()
    return results


async def test_the_protocol_is_recognised() -> None:
    assert isinstance(InfoModel(), SupportsBatchInfo)
    assert isinstance(SyncInfoModel(), SupportsBatchInfo)
    assert not isinstance(GatedModel(), SupportsBatchInfo)


async def test_a_batch_reports_its_most_urgent_priority_and_earliest_deadline() -> None:
    fake = InfoModel()
    async with BatchedModel(fake, max_batch_size=8) as model:
        now = anyio.current_time()
        calls = [
            {"priority": 3, "timeout": 50.0},
            {"priority": -2},
            {"priority": 5, "deadline": now + 20.0},
        ]
        assert await queue_behind_a_running_batch(model, fake, calls) == [0, 10, 20]
    first, second = fake.infos
    assert (first.size, first.priority, first.deadline, first.timeout) == (1, 0, None, None)
    assert second.size == 3
    assert second.priority == -2
    assert second.deadline == now + 20.0
    assert second.timeout is not None
    assert 0 < second.timeout <= 20.0
    assert second.started <= anyio.current_time()
    assert fake.plain_calls == 0


async def test_a_model_without_the_method_is_called_with_items_only() -> None:
    fake = GatedModel(gated=False)
    async with BatchedModel(fake) as model:
        assert await model.call(2, priority=-1, timeout=10) == 20
    assert fake.batches == [[2]]


async def test_a_sync_model_gets_its_info_in_a_worker_thread() -> None:
    fake = SyncInfoModel()
    async with BatchedModel(fake) as model:
        assert await model.call(4, priority=7, timeout=30) == 8
    (info,) = fake.infos
    assert info.priority == 7
    assert info.timeout is not None
    assert 0 < info.timeout <= 30
    assert threading.get_ident() not in fake.threads


async def test_collated_batches_reach_call_with_info() -> None:
    seen: list[Any] = []

    class Collated:
        def __call__(self, batch: tuple[int, ...]) -> dict[str, Any]:
            raise AssertionError("the engine must call call_with_info")

        def call_with_info(self, batch: tuple[int, ...], info: BatchInfo) -> dict[str, Any]:
            seen.append((batch, info.size))
            return {"out": [x + 1 for x in batch]}

    model = BatchedModel(Collated(), collate=tuple, split=lambda out: out["out"])
    async with model:
        assert await model.call(3) == 4
    assert seen == [((3,), 1)]


async def test_swapping_in_and_out_of_the_protocol() -> None:
    plain = GatedModel(gated=False)
    async with BatchedModel(plain) as model:
        aware = InfoModel()
        aware.open()
        await model.swap(aware, version="2")
        assert await model.call(1, priority=4) == 10
        await model.swap(plain, version="3")
        assert await model.call(2) == 20
    assert [info.priority for info in aware.infos] == [4]
    assert plain.seen == [2]


def test_sync_callers() -> None:
    fake = SyncInfoModel()
    with BatchedModel(fake) as wrapped:
        assert wrapped.call_sync(5, priority=2) == 10
    assert fake.infos[-1].priority == 2


def test_the_decorator_takes_a_model_object() -> None:
    fake = SyncInfoModel()
    model = batched(max_batch_size=4)(fake)
    try:
        assert model(6) == 12
    finally:
        model.close()
    assert fake.infos[-1].size == 1
