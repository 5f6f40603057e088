"""``call_many_nowait`` and ``call_many_nowait_versioned``: all or nothing on a full queue."""

from __future__ import annotations

import anyio
import pytest

from batchkit import BatchedModel, QueueFull

from ..support.helpers import GatedModel

pytestmark = pytest.mark.anyio


async def test_a_full_queue_withdraws_every_item_of_the_call() -> None:
    gated = GatedModel()
    model = BatchedModel(gated, max_batch_size=1, max_queue_size=2)
    async with model:
        with pytest.raises(QueueFull):
            await model.call_many_nowait([1, 2, 3])
        stats = model.statistics()
        assert (stats.rejected, stats.cancelled, stats.queue_depth) == (1, 2, 0)
        gated.open()
        assert await model.call_many_nowait([4, 5]) == [40, 50]
        versioned = await model.call_many_nowait_versioned([6])
        assert [(v.value, v.version) for v in versioned] == [(60, "1")]
    assert gated.seen == [4, 5, 6]


def test_from_another_loop_it_uses_the_background_engine() -> None:
    model = BatchedModel(lambda xs: [x + 1 for x in xs])
    try:
        assert anyio.run(model.call_many_nowait, [1, 2]) == [2, 3]
    finally:
        model.close()
