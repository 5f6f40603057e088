"""``BatchedModel``: the public face of the engine, for async, sync and notebook callers."""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from threading import get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, overload

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from ._config import Settings, check_timeout
from ._engine import Engine
from ._errors import ClosedError, ConfigurationError, WrongLoopError
from ._requests import FutureRequest, Request, ThreadRequest
from ._stats import Recorder, Statistics

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ("BatchedModel",)

T = TypeVar("T")
R = TypeVar("R")

# Async callers on another loop than the engine's, without asyncio, wait in worker threads.
_BRIDGE_THREADS = 256


class _Settings(TypedDict, total=False):
    """The settings that do not depend on the item and output types (for the overloads)."""

    max_batch_size: int
    max_wait: float
    adaptive_wait: bool
    max_queue_size: int | None
    max_concurrency: int
    timeout: float | None
    max_batch_cost: float | None
    isolate_failures: bool
    name: str | None
    version: str


class BatchedModel(Generic[T, R]):
    """Gather single items from many callers into batches for ``fn``, and answer each caller.

    ``fn`` takes a list of items (or, with ``collate``, whatever ``collate`` builds from that
    list) and returns one output per item, in order (after ``split``, when given). It may be a
    plain function, which runs in a worker thread, or an async function, which runs on the
    engine's event loop. An output that is an exception instance is raised to that item's
    caller only.

    Settings (all validated here; a bad value raises ``ConfigurationError``):

    - ``max_batch_size``: most items in one batch.
    - ``max_wait``: seconds a batch that is not full may wait for company, counted from its
      oldest item. 0 (the default) dispatches greedily: whatever is queued leaves as soon as a
      batch slot is free.
    - ``adaptive_wait``: wait only while waiting has recently gathered more items (needs a
      positive ``max_wait``).
    - ``max_queue_size``: bound on queued items (None: unbounded); see ``call_nowait``.
    - ``max_concurrency``: batches running at once.
    - ``timeout``: default seconds a call may take, when the call gives none.
    - ``size_fn`` and ``max_batch_cost``: the cost of one item (tokens, rows) and the most a
      batch may hold; an item costlier than the budget runs alone.
    - ``collate`` and ``split``: build the model's input from the list of items, and turn its
      output back into one output per item.
    - ``isolate_failures``: when a batch fails, split it in halves and retry, so only the items
      that fail on their own get the error.
    - ``name``: shown in errors and statistics (default: the function's name).
    - ``version``: the model version reported in statistics.

    Nothing starts in ``__init__``. Run the engine in your event loop with ``async with model:``
    (the fast path for servers), or let the first call start it on a background thread that
    ``close()`` (or ``with model:``) stops.
    """

    @overload
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]] | Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: None = None,
        split: None = None,
        **settings: Unpack[_Settings],
    ) -> None: ...
    @overload
    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: Callable[[list[T]], Any],
        split: Callable[[Any], Sequence[R]],
        **settings: Unpack[_Settings],
    ) -> None: ...
    @overload
    def __init__(
        self: BatchedModel[T, Any],
        fn: Callable[[Any], Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: Callable[[list[T]], Any],
        split: None = None,
        **settings: Unpack[_Settings],
    ) -> None: ...
    @overload
    def __init__(
        self,
        fn: Callable[[list[T]], Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: None = None,
        split: Callable[[Any], Sequence[R]],
        **settings: Unpack[_Settings],
    ) -> None: ...
    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        max_batch_size: int = 32,
        max_wait: float = 0.0,
        adaptive_wait: bool = False,
        max_queue_size: int | None = None,
        max_concurrency: int = 1,
        timeout: float | None = None,
        size_fn: Callable[[T], float] | None = None,
        max_batch_cost: float | None = None,
        collate: Callable[[list[T]], Any] | None = None,
        split: Callable[[Any], Sequence[R]] | None = None,
        isolate_failures: bool = False,
        name: str | None = None,
        version: str = "1",
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"the model must be callable, got {fn!r}")
        self.settings = Settings(
            name=name if name is not None else _name_of(fn),
            max_batch_size=max_batch_size,
            max_wait=max_wait,
            adaptive_wait=adaptive_wait,
            max_queue_size=max_queue_size,
            max_concurrency=max_concurrency,
            timeout=timeout,
            size_fn=size_fn,
            max_batch_cost=max_batch_cost,
            collate=collate,
            split=split,
            isolate_failures=isolate_failures,
        )
        self._fn: Callable[[Any], Any] = fn
        self._is_async = _is_async_callable(fn)
        self._version = str(version)
        self._recorder = Recorder()
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._host: _BackgroundHost | None = None
        self._closed = False

    @property
    def name(self) -> str:
        """Return the model's name."""
        return self.settings.name

    @property
    def version(self) -> str:
        """Return the version of the model now serving."""
        return self._version

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._engine else "idle"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> BatchedModel[T, R]:
        with self._lock:
            if self._closed:
                raise ClosedError(f"model {self.name!r} is closed")
            if self._host is not None:
                raise WrongLoopError(
                    f"model {self.name!r} already runs on its own background thread (started by "
                    "a call made outside `async with`); keep using it that way, or give "
                    "`async with` a model that has not been called yet"
                )
            if self._engine is not None:
                raise WrongLoopError(
                    f"model {self.name!r} already runs under another `async with`; "
                    "a model runs in one event loop at a time"
                )
            self._engine = self._new_engine()
        try:
            await self._engine.__aenter__()
        except BaseException:
            self._engine = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine = self._engine
        assert engine is not None
        try:
            await engine.__aexit__(exc_type, exc, tb)
        finally:
            self._engine = None

    def __enter__(self) -> BatchedModel[T, R]:
        self._ensure_engine()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _new_engine(self) -> Engine:
        return Engine(
            self.settings, self._fn, self._is_async, lambda: self._version, self._recorder
        )

    def _ensure_engine(self) -> Engine:
        with self._lock:
            if self._closed:
                raise ClosedError(f"model {self.name!r} is closed")
            if self._engine is None:
                host = _BackgroundHost(self._new_engine())
                host.start()
                self._host, self._engine = host, host.engine
            return self._engine

    def close(self, *, drain: bool = False) -> None:
        """Close the model for good; calls made afterwards raise ``ClosedError``.

        Queued items fail with ``ClosedError``, or with ``drain=True`` still run. Batches already
        running finish. A background engine is stopped and its thread joined; an engine running
        under ``async with`` in another loop stops when that block exits.
        """
        with self._lock:
            self._closed = True
            engine, host = self._engine, self._host
        if host is not None:
            if host.stop(drain):
                with self._lock:
                    self._engine = self._host = None
        elif engine is not None:
            if threading.get_ident() == engine.thread_id:
                engine.begin_close(drain)
            else:
                engine.run_in_loop(engine.begin_close, drain)

    async def aclose(self, *, drain: bool = False) -> None:
        """Close the model for good, like ``close()``, and wait until its batches finished."""
        engine = self._engine
        if engine is not None and engine.in_current_loop():
            with self._lock:
                self._closed = True
            engine.begin_close(drain)
            await engine.wait_stopped()
        else:
            await anyio.to_thread.run_sync(lambda: self.close(drain=drain))

    # -- async entry points --------------------------------------------------------------------

    async def call(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> R:
        """Submit one item and return its output.

        Lower ``priority`` numbers are served first; equal priorities in arrival order.
        ``timeout`` (seconds) or ``deadline`` (absolute, on ``anyio.current_time()``) bound the
        whole call; without either, the model's default ``timeout`` applies. A full bounded queue
        makes the call wait for room, within that bound. Cancelling the call withdraws a queued
        item; if its batch already runs, only this caller misses the output.

        Raises ``DeadlineExceeded`` when the bound passes first, ``ModelError`` when the model
        failed for the whole batch, the item's own exception when the model returned one in its
        slot, and ``ClosedError`` when the model is or gets closed.
        """
        engine = self._engine
        # A thread runs one event loop at a time: a coroutine on the engine's thread runs in its
        # loop, so the caller may submit directly.
        if engine is None or engine.thread_id != get_ident():
            return await self._call_elsewhere(item, priority, timeout, deadline, True)  # type: ignore[no-any-return]
        req = self._submit_here(engine, item, priority, timeout, deadline, True)
        if req.__class__ is FutureRequest:  # the hottest path in batchkit: inlined
            try:
                return await req.future  # type: ignore[no-any-return]
            finally:
                if not req.finished:
                    engine.cancel(req)
        return await engine.outcome(req)  # type: ignore[no-any-return]

    async def call_nowait(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> R:
        """Like ``call()``, but raise ``QueueFull`` at once instead of waiting for room."""
        engine = self._engine
        if engine is None or engine.thread_id != get_ident():
            return await self._call_elsewhere(item, priority, timeout, deadline, False)  # type: ignore[no-any-return]
        req = self._submit_here(engine, item, priority, timeout, deadline, False)
        return await engine.outcome(req)  # type: ignore[no-any-return]

    def _submit_here(
        self,
        engine: Engine,
        item: Any,
        priority: float,
        timeout: float | None,
        deadline: float | None,
        wait: bool,
    ) -> Request:
        if priority.__class__ is not int:
            _check_priority(priority)
        if timeout is not None or deadline is not None or self.settings.timeout is not None:
            deadline = self._deadline(timeout, deadline)
        return engine.submit(item, priority, deadline, wait)

    async def call_many(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
    ) -> list[R]:
        """Submit all ``items`` at once and return their outputs in order.

        The first failure is raised and the items not yet answered are withdrawn, unless
        ``return_exceptions`` is true: then each failure takes its item's place in the list.
        """
        items = list(items)
        _check_priority(priority)
        engine = self._engine
        if engine is not None and engine.thread_id == get_ident():
            deadline = self._deadline(timeout, deadline)
            return await engine.call_many(items, priority, deadline, True, return_exceptions)
        engine = self._ensure_engine()
        reqs = self._thread_requests(engine, items, priority, timeout, deadline, True)
        engine.submit_threadsafe(reqs)
        results: list[Any] = []
        try:
            for req in reqs:
                try:
                    results.append(await _await_thread_request(engine, req))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        finally:
            for req in reqs:
                if not req.future.done():
                    engine.cancel_threadsafe(req)
        return results

    async def _call_elsewhere(
        self,
        item: Any,
        priority: float,
        timeout: float | None,
        deadline: float | None,
        wait: bool,
    ) -> Any:
        _check_priority(priority)
        engine = self._ensure_engine()
        (req,) = self._thread_requests(engine, [item], priority, timeout, deadline, wait)
        engine.submit_threadsafe([req])
        return await _await_thread_request(engine, req)

    def _deadline(self, timeout: float | None, deadline: float | None) -> float | None:
        check_timeout(timeout, deadline)
        if deadline is not None:
            return deadline
        if timeout is None:
            timeout = self.settings.timeout
        return None if timeout is None else anyio.current_time() + timeout

    def _thread_requests(
        self,
        engine: Engine,
        items: list[Any],
        priority: float,
        timeout: float | None,
        deadline: float | None,
        wait: bool,
    ) -> list[ThreadRequest]:
        check_timeout(timeout, deadline)
        if deadline is not None:  # absolute on the caller's loop clock: make it relative
            timeout = max(0.0, deadline - anyio.current_time())
        elif timeout is None:
            timeout = self.settings.timeout
        return [engine.new_thread_request(item, priority, timeout, wait) for item in items]

    # -- sync entry points ---------------------------------------------------------------------

    def call_sync(self, item: T, *, priority: float = 0, timeout: float | None = None) -> R:
        """Submit one item from sync code (a thread, a notebook cell) and return its output.

        Blocks the calling thread, never the engine's loop: raises ``WrongLoopError`` when called
        on the thread running the engine under ``async with``. Otherwise as ``call()``.
        """
        _check_priority(priority)
        engine = self._engine_for_thread()
        (req,) = self._thread_requests(engine, [item], priority, timeout, None, True)
        engine.submit_threadsafe([req])
        return engine.wait_threadsafe(req)  # type: ignore[no-any-return]

    def call_many_sync(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[R]:
        """Submit all ``items`` at once from sync code and return their outputs in order.

        As ``call_many()``, blocking the calling thread.
        """
        _check_priority(priority)
        engine = self._engine_for_thread()
        reqs = self._thread_requests(engine, list(items), priority, timeout, None, True)
        engine.submit_threadsafe(reqs)
        results: list[Any] = []
        try:
            for req in reqs:
                try:
                    results.append(engine.wait_threadsafe(req))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        finally:
            for req in reqs:
                if not req.future.done():
                    engine.cancel_threadsafe(req)
        return results

    def _engine_for_thread(self) -> Engine:
        engine = self._ensure_engine()
        if threading.get_ident() == engine.thread_id:
            raise WrongLoopError(
                f"call_sync() on the thread running model {self.name!r} would block its event "
                "loop; use `await model.call(item)` there"
            )
        return engine

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        """Return an immutable snapshot of counters, queue state and recent latencies."""
        engine = self._engine
        if engine is not None:
            return engine.statistics()
        return self._recorder.snapshot(
            name=self.name,
            model_version=self._version,
            queue_depth=0,
            waiting_for_room=0,
            in_flight_batches=0,
        )


async def _await_thread_request(engine: Engine, req: ThreadRequest) -> Any:
    """Wait, in an event loop other than the engine's, for a request handed over to it."""
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): wait in a worker thread
            return await anyio.to_thread.run_sync(
                engine.wait_threadsafe, req, abandon_on_cancel=True, limiter=_bridge_limiter()
            )
        return await asyncio.wrap_future(req.future)
    finally:
        # wrap_future cancels the future when its waiter is cancelled: withdraw the item too.
        if req.future.cancelled() or not req.future.done():
            engine.cancel_threadsafe(req)


_bridge_limiters: RunVar[anyio.CapacityLimiter] = RunVar("batchkit_bridge_limiter")


def _bridge_limiter() -> anyio.CapacityLimiter:
    # A limiter belongs to one event loop: keep one per running loop.
    try:
        return _bridge_limiters.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_BRIDGE_THREADS)
        _bridge_limiters.set(limiter)
        return limiter


class _BackgroundHost:
    """An engine on an asyncio event loop in a daemon thread, owned by one model."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"batchkit-{engine.settings.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            anyio.run(self._serve, backend="asyncio")
        except BaseException as exc:  # reported to start(); the thread ends either way
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with self.engine:
            self._ready.set()
            await self.engine.wait_closing()

    def stop(self, drain: bool) -> bool:
        """Close the engine; return whether its thread was joined (not from inside the model)."""
        if self._thread.is_alive():
            try:
                self.engine.run_in_loop(self.engine.begin_close, drain)
            except (ClosedError, RuntimeError):  # its loop has just ended
                pass
        # close() from inside the model (or the engine's own thread) must not wait for itself.
        inside = getattr(self.engine.in_model, "active", False)
        if inside or self._thread is threading.current_thread():
            return False
        self._thread.join()
        return True


def _check_priority(priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or math.isnan(priority):
        raise ConfigurationError(f"priority must be a number, got {priority!r}")


def _is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _name_of(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__
