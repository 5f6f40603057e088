"""Running the model on one batch: collate, call, split, check the count, and the errors.

The runner (``_engine.py``) and the lanes call these; ``_swap.py`` runs warm-up batches with
them. A batch (``Batch``) also carries what happened to it outside the loop's thread: which of
its callers the model ran, and, for a staged batch, whether a thread began it or closing
failed it first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._config import Settings
from ._errors import BatchSizeMismatch, ModelError
from ._requests import Request

__all__ = ("Batch", "batch_error", "run_sync_batch", "split_outputs", "still_waiting")


class Batch(list[Any]):
    """A batch of requests, with what happened to it outside the loop's thread.

    ``ran``: which requests the model ran (None: all); the model skips callers who left before
    it started (cancelled, expired), and ``_complete`` settles them as cancelled if the loop
    has not heard of it yet. ``begun``: a model thread took the staged batch up (under the
    staging lane's lock); ``closed``: closing failed its callers before that, so the thread
    runs none. ``settled``: the loop has counted the batch and settled its callers (on the
    loop's thread: the model thread's hand-over of its outputs, or the worker, whichever came
    first); ``began_at``: when a model thread started it.
    """

    __slots__ = ("after", "began_at", "begun", "closed", "ended", "ran", "settled")

    def __init__(self, requests: Iterable[Any] = ()) -> None:
        super().__init__(requests)
        self.ran: list[bool] | None = None
        self.begun = False
        self.closed = False
        self.settled = False
        self.began_at = 0.0
        # With several model threads, a staged batch waits in its thread for the batch before
        # it (`after`, that batch's `ended`): else it could start in an idle thread at once.
        self.after: threading.Event | None = None
        self.ended: threading.Event | None = None


def still_waiting(batch: Batch, plain: type[Request] | None = None) -> list[Request]:
    """Return the requests of ``batch`` whose callers still wait, marking the rest in
    ``batch.ran`` for the loop to settle; called as the model starts, in any thread.

    A request of the engine's ``plain`` class is settled the moment its caller cancels
    (``PlainRequest.cancel``), so ``finished`` alone tells: no call per item on the hot path.
    """
    for req in batch:
        if req.finished or (req.__class__ is not plain and req.abandoned()):
            break
    else:
        return batch
    keep = [not req.abandoned() for req in batch]
    batch.ran = keep
    return [req for req, kept in zip(batch, keep, strict=True) if kept]


def batch_error(settings: Settings, exc: Exception, n: int, version: str) -> ModelError:
    """Return the error every caller of a failed batch of ``n`` items gets: a ``ModelError``
    (a copy per caller) with ``exc`` as its cause and ``version`` the version that ran it."""
    if isinstance(exc, BatchSizeMismatch):
        error: ModelError = BatchSizeMismatch(expected=exc.expected, got=exc.got)
    elif isinstance(exc, ModelError):  # raised here about the output: a copy per caller
        error = ModelError(str(exc), batch_size=exc.batch_size)
    else:
        error = ModelError(
            f"model {settings.name!r} raised {type(exc).__name__}: {exc}", batch_size=n
        )
    error.version = version
    error.__cause__ = exc
    return error


def run_sync_batch(settings: Settings, fn: Callable[[Any], Any], items: list[Any]) -> Sequence[Any]:
    """Run the sync model ``fn`` on ``items`` (collated) and return one output per item."""
    collate = settings.collate
    try:
        out = fn(collate(items) if collate is not None else items)
    except StopIteration as exc:  # an asyncio future cannot carry it: it would never finish
        raise RuntimeError(f"the model raised StopIteration: {exc!r}") from exc
    except (concurrent.futures.CancelledError, asyncio.CancelledError) as exc:
        # asyncio would turn it into its own CancelledError, which reads as the engine being
        # cancelled: it is the model's error, like any other.
        raise RuntimeError(f"the model raised {type(exc).__name__}: {exc!r}") from exc
    return split_outputs(settings, out, len(items))


def split_outputs(settings: Settings, out: Any, n: int) -> Sequence[Any]:
    """Turn the model's output for ``n`` items into one output per item, checking the count."""
    split = settings.split
    outputs = split(out) if split is not None else out
    try:
        got = len(outputs)
    except TypeError:
        raise ModelError(
            f"model {settings.name!r} returned {type(outputs).__name__}, "
            "which has no length; return one output per item",
            batch_size=n,
        ) from None
    if got != n:
        raise BatchSizeMismatch(expected=n, got=got)
    return outputs
