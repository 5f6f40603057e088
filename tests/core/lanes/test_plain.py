"""The plain lane (``batchkit/_core/_lanes/_asyncio.py``) against the general code it inlines.

The same calls, in the same order, with the lane on and off: the model sees the same batches
in the same order and every caller gets the same outcome. (``call()`` with default arguments
on asyncio takes the lane; with it off, the general ``submit`` + ``outcome``.)
"""

from __future__ import annotations

from typing import Any

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from batchkit import BatchedModel
from batchkit._core._plan import lanes_off

from ...support.helpers import GatedModel


def run(calls: list[tuple[int, int]], max_batch_size: int) -> tuple[list[list[Any]], list[Any]]:
    """Make ``calls`` (item, priority) behind a held first batch; return (batches, outcomes)."""
    model = GatedModel()
    model.outputs = {item: ValueError(item) for item, _ in calls if item % 5 == 4}
    outcomes: list[Any] = [None] * len(calls)

    async def main() -> None:
        batched = BatchedModel(model, max_batch_size=max_batch_size)
        async with batched, anyio.create_task_group() as tg:

            async def call(i: int, item: int, priority: int) -> None:
                try:
                    outcomes[i] = await batched.call(item, priority=priority)
                except ValueError as exc:
                    outcomes[i] = repr(exc)

            tg.start_soon(call, 0, -1, 0)
            await model.started.wait()  # the first batch holds the model
            for i, (item, priority) in enumerate(calls):
                tg.start_soon(call, i, item, priority)
                await anyio.wait_all_tasks_blocked()  # queued in this order
            model.open()

    anyio.run(main, backend="asyncio")
    return model.batches, outcomes


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 99), st.integers(-2, 2)), min_size=1, max_size=20),
    st.integers(1, 8),
)
def test_the_lane_gives_what_the_general_path_gives(
    calls: list[tuple[int, int]], max_batch_size: int
) -> None:
    with lanes_off():
        with_lane = run(calls, max_batch_size)
    with lanes_off("plain"):
        without = run(calls, max_batch_size)
    assert with_lane == without
    assert sorted(item for batch in with_lane[0][1:] for item in batch) == sorted(
        item for item, _ in calls
    )
