"""The inline lane (``batchkit/_core/_lanes/_inline.py``): a batch handed on between sync
callers' threads runs only the callers still waiting when it starts.

The window between a hand-on and the model call is too short to hold open from outside, so the
test drives the lane's own steps (claim, wait beside, hand on, give up, lead) on a real engine
and reads the outcome through the public API.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from batchkit import BatchedModel, ClosedError
from batchkit._core._requests import SyncRequest


@pytest.mark.lane("inline")
@pytest.mark.lane("side")
def test_a_caller_who_left_after_the_hand_on_is_not_run() -> None:
    seen: list[list[Any]] = []

    def fn(items: list[Any]) -> list[Any]:
        seen.append(list(items))
        return [item * 10 for item in items]

    with BatchedModel(fn, name="inline-left") as model:
        assert model.call_sync(0) == 0  # the engine runs, idle
        engine = model._engine
        assert engine is not None and engine.inline is not None
        lane = engine.inline
        leader = SyncRequest(1, 0, 10**6, time.monotonic())
        other = SyncRequest(2, 0, 10**6 + 1, time.monotonic())
        with lane.lock:  # as if a caller's thread ran a batch, with these two beside it
            lane.busy = True
            lane.side = [leader, other]
            follow, tell = lane._hand_on()
        assert follow is leader and tell is None
        lane._give_up(other)  # interrupted after the hand-on, before the batch started
        lane._lead(leader)
        assert leader.outcome() == 10
        assert seen == [[0], [1]]
        stats = model.statistics()
    assert (stats.completed, stats.cancelled) == (2, 1)


@pytest.mark.lane("inline")
@pytest.mark.lane("side")
def test_callers_handed_to_a_stopped_engine_are_answered() -> None:
    """A caller's thread hands the callers waiting beside it to the loop (``adopt``) just as
    the engine stops: no worker will take them, so they get ``ClosedError``; and once the
    engine has stopped nothing more is handed to its loop."""
    model = BatchedModel(lambda items: items, name="inline-stopped")
    assert model.call_sync(1) == 1
    engine = model._engine
    assert engine is not None and engine.inline is not None
    lane = engine.inline
    model.close()
    assert engine.stopped
    assert not engine.handoff.call_soon(lambda: None)
    waiting = SyncRequest(2, 0, 10**6, time.monotonic())
    with lane.lock:
        lane.busy = True
        lane.side = [waiting]
    lane.adopt()  # as the loop would run it, had it been handed over before the end
    with pytest.raises(ClosedError):
        waiting.outcome()
    stats = model.statistics()
    assert (stats.submitted, stats.completed, stats.failed) == (2, 1, 1)
