"""The engine's decisions (``batchkit/_core/_policy.py``), without an event loop: each answer
is checked against the contract it protects, for every state Hypothesis builds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batchkit._core._policy import (
    AfterInline,
    Idle,
    InlineEntry,
    after_inline,
    inline_entry,
    may_stage,
)

counts = st.integers(0, 3)


@given(st.booleans(), counts, st.booleans(), st.booleans(), st.booleans())
def test_staging_needs_a_sync_model_a_free_slot_and_something_to_stage(
    full: bool, queued: int, fill: bool, held: bool, model_async: bool
) -> None:
    staged = may_stage(
        full_batch=full, queued=queued, fill=fill, held=held, model_async=model_async
    )
    if staged:
        assert not model_async  # an async model runs on the loop: never in a model thread
        assert not held  # a swap holds the slot: nothing starts, nothing is staged
        assert full or (fill and queued > 0)  # only a full batch, unless it may keep filling
    elif not model_async and not held:
        assert not full and not (fill and queued)


idle_states = st.builds(
    Idle,
    busy=st.booleans(),
    side_ok=st.booleans(),
    closing=st.booleans(),
    in_flight=counts,
    held=st.booleans(),
    queued=counts,
    waiting_for_room=counts,
    model_async=st.booleans(),
    with_info=st.booleans(),
)


@given(idle_states)
def test_a_caller_runs_inline_only_on_an_idle_engine(state: Idle) -> None:
    entry = inline_entry(state)
    if entry is InlineEntry.RUN:
        # Nothing the loop runs, stages or queues could be overtaken, and no swap or close
        # is under way; the model runs in a caller's thread only if it is sync and plain.
        assert not state.busy and not state.in_flight and not state.queued
        assert not state.waiting_for_room and not state.held and not state.closing
        assert not state.model_async and not state.with_info
    elif entry is InlineEntry.WAIT:
        assert state.busy and state.side_ok and not state.closing
    else:
        idle = not (
            state.busy
            or state.in_flight
            or state.queued
            or state.waiting_for_room
            or state.held
            or state.closing
            or state.model_async
            or state.with_info
        )
        assert not idle  # an idle engine never sends a caller the long way
        assert not (state.busy and state.side_ok and not state.closing)


@given(counts, counts, st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.booleans(), st.integers(0, 100))  # fmt: skip
def test_what_follows_an_inline_batch_keeps_the_loops_items_and_swaps_first(
    waiting: int,
    queued: int,
    held: bool,
    model_async: bool,
    with_info: bool,
    idle_waiters: bool,
    closing: bool,
    records: int,
) -> None:
    then = after_inline(
        waiting=waiting,
        queued=queued,
        held=held,
        model_async=model_async,
        with_info=with_info,
        idle_waiters=idle_waiters,
        closing=closing,
        records=records,
    )
    if then is AfterInline.LEAD:
        # Another inline batch only if the loop's own items would not starve behind it, no
        # swap waits, and the model can still run in a caller's thread.
        assert waiting and not queued and not held and not model_async and not with_info
    elif then is AfterInline.ADOPT:
        assert waiting  # there are callers to hand over
        assert queued or held or model_async or with_info
    else:
        assert not waiting  # a waiting caller is never left behind
        if then is AfterInline.REST:
            # The loop may hear later only if nothing needs it now.
            assert not queued and not idle_waiters and not closing and records < 64
