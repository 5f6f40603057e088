"""The plain lane: ``call()`` with default arguments on an asyncio engine, in one frame.

What it speeds up: on the general path a call builds a ``FutureRequest`` with an asyncio future
(``Engine.submit``), checks the closing flag, the queue bound and the deadline (``_submit``,
``BatchQueue.push``), then awaits the future and withdraws the item if cancelled
(``Engine.outcome``). Here, where the plan allows (no default timeout, no size function, no
bounded queue, greedy dispatch), the request is its own awaitable (``PlainRequest``, of this
engine's own subclass, which knows the loop and the engine): ``submit`` sets its slots and
appends it to its priority's level, inlining ``BatchQueue._append`` and
``Engine._wake_for_items``. A cancelled wait withdraws the item itself
(``PlainRequest.cancel``), and the ledger settles these requests inline (``deliver_batch``).

Invariants it keeps: the engine routes a call here only while ``Engine.plain_thread`` is the
calling thread (its loop's, not closing), so nothing checked on the general path can fail; the
queue's state after ``submit`` is what ``BatchQueue.enqueue`` leaves (a differential test in
``tests/core/lanes/test_plain.py`` runs the same calls with the lane on and off).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .._queue import QUEUED
from .._requests import PlainRequest

if TYPE_CHECKING:
    from .._engine import Engine

__all__ = ("PlainLane",)

# Builds a request without running ``__init__``: ``submit`` sets every slot itself.
_new_request = object.__new__


class PlainLane:
    """The per-item path of calls with default settings, for one asyncio engine."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        # The engine's own kind of request: its loop and engine are class attributes.
        self.request: type[PlainRequest] = type(
            "PlainRequest", (PlainRequest,), {"__slots__": (), "_loop": loop, "_engine": engine}
        )
        # Bound once: every one of them lives as long as the engine's entry.
        self._queue = engine._queue
        self._levels = engine._queue._levels
        self._seq = engine._seq
        self._clock = engine._clock
        self._signal = engine._signal

    def submit(self, item: Any, priority: int) -> PlainRequest:
        """Queue ``item`` without deadline and return its request, which the caller awaits."""
        req = _new_request(self.request)
        req.item = item
        req.priority = priority
        req.seq = next(self._seq)
        req.enqueued_at = self._clock()
        req.finished = False
        req.outcome = 0
        req.callback = None
        # `BatchQueue.enqueue(req)`, inlined for a priority that has queued items already: the
        # queue's `_append` without its frame. `_entered` counts it submitted.
        queue = self._queue
        queue._entered += 1
        level = self._levels.get(priority)
        if level is None:
            queue.enqueue(req)
        else:
            req.state = QUEUED
            level.append(req)
            queue._queued += 1
        # `Engine._wake_for_items`, inlined:
        if self._signal.waiting:
            self._signal.set()
        engine = self._engine
        if engine._staging:
            engine.staging.feed()  # type: ignore[union-attr]  # set only with that lane
        return req
