"""The engine's decisions, as pure functions of what the engine sees (sans-IO, no clock).

When a batch leaves and how big is the queue's own policy (``BatchQueue.next_dispatch_time``
and ``take``: greedy or windowed, adaptive waiting, the cost budget). The rest is here, so that
no lane decides anything by itself: it describes the engine's state to a function below and
carries out the answer. Each function is tested with Hypothesis without an event loop
(``tests/core/test_policy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ("AfterInline", "Idle", "InlineEntry", "after_inline", "inline_entry", "may_stage")


def may_stage(*, full_batch: bool, queued: int, fill: bool, held: bool, model_async: bool) -> bool:
    """Whether a worker whose batch runs in a model thread stages the next batch now.

    Only for a sync model (an async one runs on the loop), never while a swap holds the slot,
    and only with something to stage: a full batch, or, when a staged batch may keep filling
    (``fill``: greedy dispatch without a cost budget), any queued item.
    """
    if model_async or held:
        return False
    return full_batch or (fill and queued > 0)


@dataclass(frozen=True)
class Idle:
    """What a sync caller sees of the engine when it asks to run its item inline."""

    busy: bool  # callers' threads run inline batches now
    side_ok: bool  # callers may wait beside a running inline batch
    closing: bool
    in_flight: int  # batches the loop runs or has staged
    held: bool  # a swap holds the slot
    queued: int  # items in the loop's queue
    waiting_for_room: int
    model_async: bool
    with_info: bool  # the model takes a BatchInfo


class InlineEntry(Enum):
    """What a sync caller does (``inline_entry``)."""

    RUN = "run"  # run its item now, in its own thread
    WAIT = "wait"  # wait beside the running inline batch, for a later one
    QUEUE = "queue"  # go through the loop's queue (the general path)


def inline_entry(state: Idle) -> InlineEntry:
    """Decide whether a sync caller runs its item itself, waits beside, or queues it.

    It runs it only on an idle engine: no batch runs or is staged, nothing is queued or waits
    for room, no swap holds the slot, not closing, and the model is sync without BatchInfo
    (otherwise the loop's general path keeps the contract). It waits beside a running inline
    batch where the plan allows and the engine is not closing.
    """
    if state.busy:
        return InlineEntry.WAIT if state.side_ok and not state.closing else InlineEntry.QUEUE
    if (
        state.in_flight
        or state.closing
        or state.held
        or state.queued
        or state.waiting_for_room
        or state.model_async
        or state.with_info
    ):
        return InlineEntry.QUEUE
    return InlineEntry.RUN


class AfterInline(Enum):
    """What follows an inline batch (``after_inline``)."""

    LEAD = "lead"  # hand the next batch of waiting callers to one of them
    ADOPT = "adopt"  # the loop takes every waiting caller into its queue
    TELL = "tell"  # nobody waits; the loop must look now (record, wake, idle check)
    REST = "rest"  # nobody waits; the loop records the run with its next batch


def after_inline(
    *,
    waiting: int,
    queued: int,
    held: bool,
    model_async: bool,
    with_info: bool,
    idle_waiters: bool,
    closing: bool,
    records: int,
) -> AfterInline:
    """Decide what follows an inline batch, in the thread that ran it.

    With callers waiting beside it: the next batch of them runs in one of their threads, unless
    the loop has items of its own (they would starve), a swap holds the slot, or the model can
    no longer run inline (async, or BatchInfo): then the loop adopts them all. With none: the
    loop must hear now if it has queued items, a swap waits for the engine to be idle, it is
    closing, or 64 records have piled up; else the records wait for its next batch.
    """
    if waiting:
        if queued or held or model_async or with_info:
            return AfterInline.ADOPT
        return AfterInline.LEAD
    if queued or idle_waiters or closing or records >= 64:
        return AfterInline.TELL
    return AfterInline.REST
