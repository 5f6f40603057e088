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
from contextlib import AbstractContextManager
from typing import Any

import anyio
import anyio.to_thread

from ._config import Settings
from ._errors import BatchSizeMismatch, ModelError
from ._info import BatchInfo, batch_info
from ._requests import Request
from ._slot import Installed

__all__ = (
    "Batch",
    "Invoker",
    "batch_error",
    "run_sync_batch",
    "split_outputs",
    "still_waiting",
)


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

    __slots__ = (
        "after",
        "began_at",
        "begun",
        "called",
        "closed",
        "ended",
        "ran",
        "recorded",
        "settled",
    )

    def __init__(self, requests: Iterable[Any] = ()) -> None:
        super().__init__(requests)
        self.ran: list[bool] | None = None
        self.begun = False
        self.closed = False
        self.settled = False
        self.began_at = 0.0
        self.called = False  # the model was called on it (a host cancel may come first)
        self.recorded = False  # counted in the statistics as a batch the model ran
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


def run_sync_batch(
    settings: Settings,
    fn: Callable[[Any], Any],
    items: list[Any],
    inference: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Sequence[Any]:
    """Run the sync model ``fn`` on ``items`` (collated) and return one output per item.

    ``inference``: the context the model's library runs a batch in (``Installed.inference``),
    entered here, in the thread that calls the model, around collate, call and split.
    """
    if inference is None:
        return _run_sync_batch(settings, fn, items)
    with inference():
        return _run_sync_batch(settings, fn, items)


def _run_sync_batch(
    settings: Settings, fn: Callable[[Any], Any], items: list[Any]
) -> Sequence[Any]:
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


class Invoker:
    """Runs one engine's model on a batch: a sync model in a thread (the engine's own, anyio's,
    or a sync caller's), an async one as a coroutine on the loop; only the callers still
    waiting when it starts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.in_model = threading.local()  # `active` while this thread runs the sync model
        # Set as the engine is entered: the limit on anyio's threads, the engine's own kind of
        # plain request, and the loop's clock when any thread may read it (asyncio).
        self.limiter: anyio.CapacityLimiter | None = None
        self.plain: type[Request] | None = None
        self.clock: Callable[[], float] | None = None

    async def run(self, batch: Batch, installed: Installed, started: float) -> Sequence[Any]:
        """Run the model on the callers of ``batch`` who still wait; outputs for those."""
        if not installed.is_async:
            return await anyio.to_thread.run_sync(
                self.run_live, batch, installed, started, limiter=self.limiter
            )
        live = still_waiting(batch, self.plain)
        if not live:
            return ()
        items = [req.item for req in live]
        collate = self.settings.collate
        model_input = collate(items) if collate is not None else items
        batch.called = True
        try:
            if installed.with_info is None:
                out = await installed.model(model_input)
            else:
                out = await installed.with_info(model_input, batch_info(live, started))
        except asyncio.CancelledError as exc:
            if _cancelled_from_outside():
                raise
            # The model raised it itself: its error, not the engine's cancellation.
            raise RuntimeError(f"the model raised {type(exc).__name__}: {exc!r}") from exc
        return split_outputs(self.settings, out, len(items))

    def run_live(self, batch: Batch, installed: Installed, started: float) -> Sequence[Any]:
        """Run the sync model on the items of ``batch`` whose callers still wait; in a thread.

        A staged batch waits for the one before it: callers that left meanwhile (cancelled,
        expired) are not run; the engine settles them as cancelled if the loop has not heard
        of their cancellation yet. Return the outputs of the callers run.
        """
        try:
            if self.clock is not None:
                batch.began_at = self.clock()
            live = still_waiting(batch, self.plain)
            if not live:
                return ()
            info = None if installed.with_info is None else batch_info(live, started)
            batch.called = True
            return self.run_sync([req.item for req in live], installed, info)
        finally:
            if batch.ended is not None:
                batch.ended.set()

    def run_sync(
        self, items: list[Any], installed: Installed, info: BatchInfo | None
    ) -> Sequence[Any]:
        """Run the sync model on ``items`` in the calling thread; one output per item."""
        self.in_model.active = True
        try:
            if info is None:
                return run_sync_batch(self.settings, installed.model, items, installed.inference)
            with_info = installed.with_info
            assert with_info is not None
            return run_sync_batch(
                self.settings, lambda batch: with_info(batch, info), items, installed.inference
            )
        finally:
            self.in_model.active = False


def _cancelled_from_outside() -> bool:
    """Whether the current task (on asyncio) is being cancelled by someone else."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    # Python 3.10 has no Task.cancelling(): take every CancelledError as a cancellation.
    return cancelling is None or cancelling() > 0
