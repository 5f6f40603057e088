"""``@batched``: turn a function over a list of items into a function over one item."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from ._config import BatchOptions
from ._model import BatchedModel
from ._swap import is_async_callable

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = ("AsyncBatched", "SyncBatched", "batched")

T = TypeVar("T")
R = TypeVar("R")


class _Method(BatchedModel[T, R]):
    """A batched function that is also a descriptor: on a class, each instance gets its own
    model and engine (``obj.method`` is that instance's model, created on first access).

    The one descriptor implementation of ``SyncBatched`` and ``AsyncBatched``.
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        super().__init__(fn, **options)
        self._options = options
        self._attr: str | None = None
        self._instance_models: weakref.WeakKeyDictionary[Any, Self] = weakref.WeakKeyDictionary()
        # Callable through the subclasses' __call__: carry fn's name, docstring, __wrapped__.
        functools.update_wrapper(cast("Callable[..., Any]", self), fn)

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    def __get__(self, instance: object, owner: type | None = None) -> Self:
        if instance is None:
            return self
        return self._bound(instance)

    def _bound(self, instance: object) -> Self:
        """Return ``instance``'s own model for this method, creating it once."""
        key = self._attr or f"_batchkit_{id(self)}"
        cache: dict[str, Any] | None = getattr(instance, "__dict__", None)
        if cache is not None:
            found = cache.get(key)
            if found is None:
                found = cache[key] = self._rebind(instance)
            return cast("Self", found)
        model = self._instance_models.get(instance)
        if model is None:
            model = self._instance_models[instance] = self._rebind(instance)
        return model

    def _rebind(self, instance: object) -> Self:
        options = dict(self._options)
        options.setdefault("name", self.name)
        return type(self)(functools.partial(self.__wrapped__, instance), **options)  # type: ignore[attr-defined]


class SyncBatched(_Method[T, R]):
    """A batched sync function: calling it with one item blocks and returns that item's output.

    Also a ``BatchedModel``: ``await f.call(item)`` and every other entry point work. On a class,
    each instance gets its own engine (``obj.method`` is that instance's model).
    """

    def __call__(self, item: T, *, priority: float = 0, timeout: float | None = None) -> R:
        """Return the output for ``item`` (see ``call_sync``)."""
        return self.call_sync(item, priority=priority, timeout=timeout)


class AsyncBatched(_Method[T, R]):
    """A batched async function: ``await f(item)`` returns that item's output.

    Also a ``BatchedModel``; on a class, each instance gets its own engine.
    """

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
    size_fn: Callable[[Any], float] | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    split: Callable[[Any], Sequence[Any]] | None = None,
    **options: Unpack[BatchOptions],
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
