"""Hand-written asyncio batchers: the references the dispatch benchmark compares batchkit with.

``QueueBatcher`` is what a careful engineer writes in twenty lines when they need batching and no
library: an ``asyncio.Queue`` of ``(item, future)`` pairs and one worker task. The worker waits
for one pair, takes whatever else is already queued (up to ``max_batch_size`` in all) without
waiting, runs the model once, and sets each caller's future. It has none of batchkit's features
(priorities, deadlines, cancellation bookkeeping, bounded queue, statistics, sync callers). It is
deliberately not slowed down, and deliberately not micro-optimised beyond the obvious either.

``MinimalBatcher`` is the floor: the least an asyncio batcher can do per item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ("MinimalBatcher", "QueueBatcher")


class QueueBatcher:
    """Batch calls to the async ``fn`` over an ``asyncio.Queue``; use as ``async with``."""

    def __init__(
        self,
        fn: Callable[[list[Any]], Awaitable[Sequence[Any]]],
        *,
        max_batch_size: int = 64,
    ) -> None:
        self._fn = fn
        self._max_batch_size = max_batch_size
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.batch_sizes: dict[int, int] = {}

    async def __aenter__(self) -> QueueBatcher:
        self._worker = asyncio.get_running_loop().create_task(self._work())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._worker is not None
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass

    async def call(self, item: Any) -> Any:
        """Queue ``item`` and return its output."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _work(self) -> None:
        queue = self._queue
        limit = self._max_batch_size
        while True:
            batch = [await queue.get()]
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            n = len(batch)
            self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
            try:
                outputs = await self._fn([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), output in zip(batch, outputs, strict=True):
                if not future.done():  # its caller may have been cancelled
                    future.set_result(output)


class MinimalBatcher:
    """The least an asyncio batcher can do per item: a context for the dispatch figures.

    Callers append ``(item, future)`` to a list and wake the worker only if it sleeps; the
    worker takes slices of the list. No queue class, no features. Every batcher that answers
    each caller through a future pays at least this much per item (creating the future, setting
    it, and the event loop resuming the caller's task), so it shows what part of a per-item
    figure is the event loop's own cost on the machine at hand.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Awaitable[Sequence[Any]]],
        *,
        max_batch_size: int = 64,
    ) -> None:
        self._fn = fn
        self._max_batch_size = max_batch_size
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._wake: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MinimalBatcher:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._worker is not None
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass

    async def call(self, item: Any) -> Any:
        """Queue ``item`` and return its output."""
        future = self._loop.create_future()
        self._pending.append((item, future))
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)
        return await future

    async def _work(self) -> None:
        limit = self._max_batch_size
        while True:
            if not self._pending:
                self._wake = self._loop.create_future()
                await self._wake
            batch = self._pending[:limit]
            del self._pending[:limit]
            outputs = await self._fn([item for item, _ in batch])
            for (_, future), output in zip(batch, outputs, strict=True):
                if not future.done():
                    future.set_result(output)
