"""``BatchedModel``: the public face of the engine, for async, sync and notebook callers."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from threading import get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.lowlevel import RunVar

from ._config import BatchOptions, Settings, check_timeout
from ._engine import Engine
from ._errors import ClosedError, ConfigurationError, WrongLoopError
from ._requests import FutureRequest, Request, ThreadRequest
from ._slot import Installed, ModelSlot, Versioned
from ._stats import DEFAULT_LATENCY_BOUNDS, Recorder, Statistics, check_bounds
from ._swap import Swapper, is_async_callable

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ("BatchedModel",)

T = TypeVar("T")
R = TypeVar("R")

# Async callers on another loop than the engine's, without asyncio, wait in worker threads.
_BRIDGE_THREADS = 256


class BatchedModel(Generic[T, R]):
    """Gather single items from many callers into batches for ``fn``, and answer each caller.

    ``fn`` takes a list of items (or, with ``collate``, whatever ``collate`` builds from that
    list) and returns one output per item, in order (after ``split``, when given). It may be a
    plain function, which runs in a worker thread (or in the thread of a ``call_sync`` caller,
    which may run its batch itself), never on the loop, or an async function, which runs on
    the engine's event loop. An output that is an exception instance is raised to that item's
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
    - ``version``: the version of ``fn``, reported with every output (``call_versioned``) and
      in statistics; ``swap()`` installs later versions.
    - ``weights_dir``: when set, ``swap()`` loads weights only from files inside it.
    - ``keep_previous``: keep the replaced model after a swap so ``rollback()`` can restore it
      (set False to release it at once, as soon as no batch uses it).

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
        **settings: Unpack[BatchOptions],
    ) -> None: ...
    @overload
    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: Callable[[list[T]], Any],
        split: Callable[[Any], Sequence[R]],
        **settings: Unpack[BatchOptions],
    ) -> None: ...
    @overload
    def __init__(
        self: BatchedModel[T, Any],
        fn: Callable[[Any], Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: Callable[[list[T]], Any],
        split: None = None,
        **settings: Unpack[BatchOptions],
    ) -> None: ...
    @overload
    def __init__(
        self,
        fn: Callable[[list[T]], Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: None = None,
        split: Callable[[Any], Sequence[R]],
        **settings: Unpack[BatchOptions],
    ) -> None: ...
    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        size_fn: Callable[[T], float] | None = None,
        collate: Callable[[list[T]], Any] | None = None,
        split: Callable[[Any], Sequence[R]] | None = None,
        **options: Unpack[BatchOptions],
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"the model must be callable, got {fn!r}")
        settings = cast("dict[str, Any]", dict(options))
        unknown = sorted(settings.keys() - BatchOptions.__annotations__.keys())
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}"
            )
        version = settings.pop("version", "1")
        name = settings.pop("name", None)
        _check_version(version)
        self.settings = Settings(
            name=name if name is not None else _name_of(fn),
            size_fn=size_fn,
            collate=collate,
            split=split,
            **settings,
        )
        self._slot = ModelSlot(Installed(fn, is_async_callable(fn), version))
        self._recorder = Recorder()
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._host: _BackgroundHost | None = None
        self._closed = False
        self._swapper = Swapper(self.settings, self._slot, self._recorder, lambda: self._engine)

    @property
    def name(self) -> str:
        """Return the model's name."""
        return self.settings.name

    @property
    def version(self) -> str:
        """Return the version of the model now serving (batches starting now run on it)."""
        return self._slot.current.version

    @property
    def model(self) -> Callable[..., Any]:
        """Return the model function (or module) now serving."""
        return self._slot.current.model

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._state()}>"

    def _state(self) -> str:
        return "closed" if self._closed else "running" if self._engine else "idle"

    def _repr_html_(self) -> str:
        """Return the model, its settings and statistics as HTML (Jupyter's rich display)."""
        from .._render import model_html  # the rendering layer, imported only when used

        return model_html(self.settings, self.statistics(), self._state())

    def __rich__(self) -> Any:
        """Return the model, its settings and statistics as a rich renderable (needs rich)."""
        from .._render import model_rich

        return model_rich(self.settings, self.statistics(), self._state())

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
        return Engine(self.settings, self._slot, self._recorder)

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
                engine.handoff.run(engine.begin_close, drain)

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
        # loop, so the caller may submit directly. With default settings: the plain path (its
        # cancelled wait withdraws the item, see PlainRequest.cancel).
        if (
            timeout is None
            and deadline is None
            and priority.__class__ is int
            and engine is not None
            and engine.plain_thread == get_ident()
        ):
            return await engine.submit_plain(item, priority)  # type: ignore[no-any-return]
        if engine is None or engine.thread_id != get_ident():
            return (await self._call_elsewhere(item, priority, timeout, deadline, True))[0]  # type: ignore[no-any-return]
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
            return (await self._call_elsewhere(item, priority, timeout, deadline, False))[0]  # type: ignore[no-any-return]
        req = self._submit_here(engine, item, priority, timeout, deadline, False)
        return await engine.outcome(req)  # type: ignore[no-any-return]

    async def call_versioned(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Versioned[R]:
        """Like ``call()``, and return the output with the version of the model that made it.

        A ``ModelError`` carries the version of the failed batch as ``error.version``.
        """
        engine = self._engine
        if engine is None or engine.thread_id != get_ident():
            value, req = await self._call_elsewhere(item, priority, timeout, deadline, True)
        else:
            req = self._submit_here(engine, item, priority, timeout, deadline, True)
            value = await engine.outcome(req)
        return req.versioned(value)

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
        return await self._call_many(items, priority, timeout, deadline, return_exceptions, False)

    async def call_many_versioned(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Versioned[R]]:
        """Like ``call_many()``, with each output paired with the version that produced it.

        With ``return_exceptions``, a failure takes its item's place as the exception itself.
        """
        return await self._call_many(items, priority, timeout, deadline, return_exceptions, True)

    async def call_many_nowait(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
    ) -> list[R]:
        """Like ``call_many()``, but raise ``QueueFull`` at once when an item finds no room.

        Without ``return_exceptions``, a full queue withdraws the items already queued, so the
        call is all or nothing (what a server wants for one request of several rows).
        """
        return await self._call_many(
            items, priority, timeout, deadline, return_exceptions, False, wait=False
        )

    async def call_many_nowait_versioned(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Versioned[R]]:
        """Like ``call_many_nowait()``, with each output paired with the version that made it."""
        return await self._call_many(
            items, priority, timeout, deadline, return_exceptions, True, wait=False
        )

    async def _call_many(
        self,
        items: Iterable[T],
        priority: float,
        timeout: float | None,
        deadline: float | None,
        return_exceptions: bool,
        versioned: bool,
        *,
        wait: bool = True,
    ) -> list[Any]:
        items = list(items)
        _check_priority(priority)
        engine = self._engine
        if engine is not None and engine.thread_id == get_ident():
            deadline = self._deadline(timeout, deadline)
            return await engine.call_many(
                items, priority, deadline, wait, return_exceptions, versioned
            )
        engine = self._ensure_engine()
        reqs = self._thread_requests(engine, items, priority, timeout, deadline, wait)
        # All or nothing, as on the engine's loop: one item refused withdraws the others.
        engine.handoff.submit(reqs, atomic=not return_exceptions)
        results: list[Any] = []
        try:
            for req in reqs:
                try:
                    value = await _await_thread_request(engine, req)
                    results.append(req.versioned(value) if versioned else value)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        finally:
            for req in reqs:
                if not req.future.done():
                    engine.handoff.cancel(req)
        return results

    async def _call_elsewhere(
        self,
        item: Any,
        priority: float,
        timeout: float | None,
        deadline: float | None,
        wait: bool,
    ) -> tuple[Any, Request]:
        _check_priority(priority)
        engine = self._ensure_engine()
        (req,) = self._thread_requests(engine, [item], priority, timeout, deadline, wait)
        engine.handoff.submit([req])
        return await _await_thread_request(engine, req), req

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
        return [engine.handoff.new_request(item, priority, timeout, wait) for item in items]

    # -- sync entry points ---------------------------------------------------------------------

    def call_sync(self, item: T, *, priority: float = 0, timeout: float | None = None) -> R:
        """Submit one item from sync code (a thread, a notebook cell) and return its output.

        Blocks the calling thread, never the engine's loop: raises ``WrongLoopError`` when called
        on the thread running the engine under ``async with``. Otherwise as ``call()``.
        """
        return self._call_sync(item, priority, timeout)[0]  # type: ignore[no-any-return]

    def call_sync_versioned(
        self, item: T, *, priority: float = 0, timeout: float | None = None
    ) -> Versioned[R]:
        """Like ``call_sync()``, and return the output with the version that produced it."""
        return Versioned(*self._call_sync(item, priority, timeout))

    def _call_sync(self, item: T, priority: float, timeout: float | None) -> tuple[Any, str]:
        """Return the output for ``item`` and the version that produced it."""
        _check_priority(priority)
        engine = self._engine_for_thread()
        inline = engine.inline
        if timeout is None and inline is not None:
            # Sync callers may run their batches themselves: no thread hand-over.
            done = inline.run(item, priority)
            if done is not None:
                return done
        (req,) = self._thread_requests(engine, [item], priority, timeout, None, True)
        engine.handoff.submit([req])
        value = engine.handoff.wait(req)
        assert req.version is not None  # set with every output
        return value, req.version

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
        engine.handoff.submit(reqs)
        results: list[Any] = []
        try:
            for req in reqs:
                try:
                    results.append(engine.handoff.wait(req))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        finally:
            for req in reqs:
                if not req.future.done():
                    engine.handoff.cancel(req)
        return results

    def _engine_for_thread(self) -> Engine:
        engine = self._ensure_engine()
        if threading.get_ident() == engine.thread_id:
            raise WrongLoopError(
                f"call_sync() on the thread running model {self.name!r} would block its event "
                "loop; use `await model.call(item)` there"
            )
        return engine

    # -- swapping ------------------------------------------------------------------------------

    async def swap(
        self,
        new: Any,
        *,
        version: str,
        in_place: bool = False,
        warmup: Sequence[T] | None = None,
        validate: Callable[[Any, Any], Any] | None = None,
        device: Any = None,
    ) -> None:
        """Replace the model with ``new`` as ``version``, between batches, losing no call.

        ``new`` is a model function (or ``torch.nn.Module``), or, when the model is a torch
        module, its new weights: a state dict, or a path to a file saved with ``torch.save``
        (loaded with ``weights_only=True``, inside ``weights_dir`` when that is set). The new
        model is prepared in a thread of its own at the lowest CPU priority: built, moved to
        ``device`` (default: the current model's), put in ``eval()`` mode, run on the
        ``warmup`` items as one batch, and checked by ``validate(new_model, old_model)`` (sync
        or async; False or an exception rejects it).
        Only then is it published: batches that start later run on it, batches already running
        finish on the old one, and queued items are kept.

        ``in_place=True`` (torch modules only, for models too big for two copies) pauses
        dispatch, waits for the running batches, copies the weights into the live module, runs
        the checks (``old_model`` is None then) and resumes; a failed check copies the old
        weights back.

        Swaps are serialized. Raises a ``SwapError`` (``WeightsNotFound``, ``ForbiddenPath``,
        ``IncompatibleWeights``, ``WarmupFailed``, ``ValidationFailed``) when the new model
        cannot be published; the old model then keeps serving.
        """
        swap = self._prepare_swap(new, version, in_place, warmup, validate, device)
        await anyio.to_thread.run_sync(partial(swap, token=anyio.lowlevel.current_token()))

    def swap_sync(
        self,
        new: Any,
        *,
        version: str,
        in_place: bool = False,
        warmup: Sequence[T] | None = None,
        validate: Callable[[Any, Any], Any] | None = None,
        device: Any = None,
    ) -> None:
        """Like ``swap()``, blocking the calling thread (not the engine's loop thread)."""
        swap = self._prepare_swap(new, version, in_place, warmup, validate, device)
        self._check_not_engine_thread("swap_sync")
        swap(token=None)

    async def rollback(self) -> str:
        """Restore the version that served before the last swap and return it.

        The restored model is the very object that served before (or, after an in-place swap,
        its weights copied back in). A second rollback goes forward again. Raises ``SwapError``
        when there is no previous version (none yet, or ``keep_previous=False``).
        """
        self._check_open()
        token = anyio.lowlevel.current_token()
        return await anyio.to_thread.run_sync(self._swapper.rollback, token)

    def rollback_sync(self) -> str:
        """Like ``rollback()``, from sync code (not the engine's loop thread)."""
        self._check_open()
        self._check_not_engine_thread("rollback_sync")
        return self._swapper.rollback(None)

    def _prepare_swap(
        self,
        new: Any,
        version: str,
        in_place: bool,
        warmup: Sequence[T] | None,
        validate: Callable[[Any, Any], Any] | None,
        device: Any,
    ) -> Callable[..., None]:
        self._check_open()
        _check_version(version)
        if validate is not None and not callable(validate):
            raise ConfigurationError(f"validate must be callable, got {validate!r}")
        if warmup is not None and (isinstance(warmup, (str, bytes)) or not _has_len(warmup)):
            raise ConfigurationError(f"warmup must be a sequence of items, got {warmup!r}")
        return partial(
            self._swapper.swap,
            new,
            version,
            in_place=in_place,
            warmup=warmup,
            validate=validate,
            device=device,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"model {self.name!r} is closed")

    def _check_not_engine_thread(self, what: str) -> None:
        engine = self._engine
        if engine is not None and threading.get_ident() == engine.thread_id:
            raise WrongLoopError(
                f"{what}() on the thread running model {self.name!r} would block its event "
                f"loop; use `await model.{what.removesuffix('_sync')}(...)` there"
            )

    # -- statistics ----------------------------------------------------------------------------

    def record_histograms(self, bounds: Sequence[float] = DEFAULT_LATENCY_BOUNDS) -> None:
        """Count every queue-wait, compute and end-to-end latency into histograms from now on.

        ``statistics().histograms`` then holds them (exporters such as Prometheus need every
        sample, not the recent window of the summaries). Costs a few tenths of a microsecond per
        item. Calling it again with the same ``bounds`` does nothing; other bounds raise
        ``ConfigurationError``, as do bounds that are not increasing numbers > 0.
        """
        self._recorder.record_histograms(check_bounds(bounds))

    def statistics(self) -> Statistics:
        """Return an immutable snapshot of counters, queue state and recent latencies."""
        engine = self._engine
        if engine is not None:
            return engine.statistics()
        return self._recorder.snapshot(
            name=self.name,
            model_version=self.version,
            queue_depth=0,
            waiting_for_room=0,
            in_flight_batches=0,
            dispatch_held=self._slot.held,
        )


async def _await_thread_request(engine: Engine, req: ThreadRequest) -> Any:
    """Wait, in an event loop other than the engine's, for a request handed over to it."""
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): wait in a worker thread
            return await anyio.to_thread.run_sync(
                engine.handoff.wait, req, abandon_on_cancel=True, limiter=_bridge_limiter()
            )
        return await asyncio.wrap_future(req.future)
    finally:
        # wrap_future cancels the future when its waiter is cancelled: withdraw the item too.
        if req.future.cancelled() or not req.future.done():
            engine.handoff.cancel(req)


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
            # Not handoff.run: a loop already tearing down (closed from inside the model, say)
            # would never answer it. The join below waits for the close to finish.
            self.engine.begin_close_soon(drain)
        # close() from inside the model (or the engine's own thread) must not wait for itself.
        inside = getattr(self.engine.in_model, "active", False)
        if inside or self._thread is threading.current_thread():
            return False
        self._thread.join()
        return True


def _check_priority(priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or math.isnan(priority):
        raise ConfigurationError(f"priority must be a number, got {priority!r}")


def _has_len(obj: object) -> bool:
    try:
        len(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _check_version(version: object) -> None:
    if not isinstance(version, str) or not version:
        raise ConfigurationError(f"version must be a non-empty string, got {version!r}")


def _name_of(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__
