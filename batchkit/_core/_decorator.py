"""``@batched``: turn a function over a list of items into a function over one item."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, overload

from ._model import BatchedModel
from ._swap import is_async_callable

__all__ = ("AsyncBatched", "SyncBatched", "batched")

T = TypeVar("T")
R = TypeVar("R")


class SyncBatched(BatchedModel[T, R]):
    """A batched sync function: calling it with one item blocks and returns that item's output.

    Also a ``BatchedModel``: ``await f.call(item)`` and every other entry point work. On a class,
    each instance gets its own engine (``obj.method`` is that instance's model).
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        super().__init__(fn, **options)
        self._options = options
        self._attr: str | None = None
        self._slot_models: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, fn)

    def __call__(self, item: T, *, priority: float = 0, timeout: float | None = None) -> R:
        """Return the output for ``item`` (see ``call_sync``)."""
        return self.call_sync(item, priority=priority, timeout=timeout)

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> SyncBatched[T, R]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> SyncBatched[T, R]: ...
    def __get__(self, instance: object, owner: type | None = None) -> SyncBatched[T, R]:
        if instance is None:
            return self
        return _bound(self, instance)  # type: ignore[no-any-return]


class AsyncBatched(BatchedModel[T, R]):
    """A batched async function: ``await f(item)`` returns that item's output.

    Also a ``BatchedModel``; on a class, each instance gets its own engine.
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        super().__init__(fn, **options)
        self._options = options
        self._attr: str | None = None
        self._slot_models: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, fn)

    async def __call__(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> R:
        """Return the output for ``item`` (see ``call``)."""
        return await self.call(item, priority=priority, timeout=timeout, deadline=deadline)

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> AsyncBatched[T, R]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> AsyncBatched[T, R]: ...
    def __get__(self, instance: object, owner: type | None = None) -> AsyncBatched[T, R]:
        if instance is None:
            return self
        return _bound(self, instance)  # type: ignore[no-any-return]


def _bound(model: SyncBatched[Any, Any] | AsyncBatched[Any, Any], instance: object) -> Any:
    """Return ``instance``'s own model for ``model`` used as a method, creating it once."""
    key = model._attr or f"_batchkit_{id(model)}"
    cache: dict[str, Any] | None = getattr(instance, "__dict__", None)
    if cache is not None:
        found = cache.get(key)
        if found is None:
            found = cache[key] = _rebind(model, instance)
        return found
    found = model._slot_models.get(instance)
    if found is None:
        found = model._slot_models[instance] = _rebind(model, instance)
    return found


def _rebind(model: Any, instance: object) -> Any:
    options = dict(model._options)
    options.setdefault("name", model.name)
    return type(model)(functools.partial(model.__wrapped__, instance), **options)


class _Decorator:
    """What ``batched(...)`` with settings returns: apply it to the function."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options

    @overload
    def __call__(
        self, fn: Callable[[list[T]], Awaitable[Sequence[R]]], /
    ) -> AsyncBatched[T, R]: ...
    @overload
    def __call__(
        self, fn: Callable[[Any, list[T]], Awaitable[Sequence[R]]], /
    ) -> AsyncBatched[T, R]: ...
    @overload
    def __call__(self, fn: Callable[[list[T]], Sequence[R]], /) -> SyncBatched[T, R]: ...
    @overload
    def __call__(self, fn: Callable[[Any, list[T]], Sequence[R]], /) -> SyncBatched[T, R]: ...
    @overload
    def __call__(self, fn: Callable[..., Awaitable[Any]], /) -> AsyncBatched[Any, Any]: ...
    @overload
    def __call__(self, fn: Callable[..., Any], /) -> SyncBatched[Any, Any]: ...
    def __call__(self, fn: Callable[..., Any], /) -> Any:
        if is_async_callable(fn):
            return AsyncBatched(fn, **self._options)
        return SyncBatched(fn, **self._options)


@overload
def batched(fn: Callable[[list[T]], Awaitable[Sequence[R]]], /) -> AsyncBatched[T, R]: ...
@overload
def batched(fn: Callable[[Any, list[T]], Awaitable[Sequence[R]]], /) -> AsyncBatched[T, R]: ...
@overload
def batched(fn: Callable[[list[T]], Sequence[R]], /) -> SyncBatched[T, R]: ...
@overload
def batched(fn: Callable[[Any, list[T]], Sequence[R]], /) -> SyncBatched[T, R]: ...
@overload
def batched(
    *,
    max_batch_size: int = 32,
    max_wait: float = 0.0,
    adaptive_wait: bool = False,
    max_queue_size: int | None = None,
    max_concurrency: int = 1,
    timeout: float | None = None,
    size_fn: Callable[[Any], float] | None = None,
    max_batch_cost: float | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    split: Callable[[Any], Sequence[Any]] | None = None,
    isolate_failures: bool = False,
    name: str | None = None,
    version: str = "1",
) -> _Decorator: ...
def batched(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Batch calls to ``fn``, a function (or method) from a list of items to a list of outputs.

    Use bare (``@batched``) or with the settings of ``BatchedModel`` (``@batched(max_wait=0.002)``).
    A sync function becomes a ``SyncBatched``, called as ``f(item)``; an async function becomes
    an ``AsyncBatched``, called as ``await f(item)``. Both are ``BatchedModel``s. On a method,
    each instance gets its own model and engine, through the descriptor protocol.
    """
    decorator = _Decorator(options)
    if fn is None:
        return decorator
    return decorator(fn)
