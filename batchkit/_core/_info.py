"""What a model may learn about the batch it runs: its most urgent priority and earliest deadline.

The seam is opt-in. A model object whose type defines ``call_with_info(batch, info)`` is called
that way by the engine, with a ``BatchInfo``; every other model is called as ``model(batch)``.
Which of the two applies is decided once per installation (at construction and at each swap),
so an ordinary model pays nothing per batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ("BatchInfo", "SupportsBatchInfo", "batch_info", "info_method")

B = TypeVar("B", contravariant=True)


@dataclass(frozen=True)
class BatchInfo:
    """Facts about one batch, computed from its items' calls when the batch starts.

    ``priority`` is the most urgent (lowest) priority among the batch's items. ``deadline`` is
    the earliest deadline among them, absolute on the engine loop's clock
    (``anyio.current_time()`` inside the engine's loop), or None when no item has one.
    ``started`` is that clock's time when the batch started; ``size`` the number of items.
    """

    size: int
    priority: float
    deadline: float | None
    started: float

    @property
    def timeout(self) -> float | None:
        """Return the seconds left before ``deadline`` when the batch started (None: none)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.started)


@runtime_checkable
class SupportsBatchInfo(Protocol[B]):
    """A model that wants the ``BatchInfo`` of each batch it runs.

    The engine calls ``call_with_info(batch, info)`` instead of ``model(batch)``; ``batch`` is
    what ``model(batch)`` would have received (the list of items, or the collated batch). It may
    be a plain method (run in a worker thread) or an async one (run on the engine's loop), and
    returns what ``model(batch)`` would. Elsewhere (swap warm-ups, direct use) the model is
    still called as ``model(batch)``.
    """

    def call_with_info(self, batch: B, info: BatchInfo) -> Sequence[Any] | Awaitable[Any]: ...


def info_method(model: object) -> Callable[[Any, BatchInfo], Any] | None:
    """Return ``model.call_with_info`` when ``model``'s type defines it, else None."""
    if getattr(type(model), "call_with_info", None) is None:
        return None
    method = model.call_with_info  # type: ignore[attr-defined]
    return method if callable(method) else None


def batch_info(requests: Sequence[Any], started: float) -> BatchInfo:
    """Return the ``BatchInfo`` of the batch of ``requests`` (queue entries), started then."""
    priority = min(req.priority for req in requests)
    deadlines = [req.deadline for req in requests if req.deadline is not None]
    return BatchInfo(len(requests), priority, min(deadlines) if deadlines else None, started)
