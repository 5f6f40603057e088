"""The pipe server: request lines in on one file descriptor, response lines out on another.

One task reads; each inference request becomes a task that awaits its model and hands its
response line to the one writer task. A line counts as in flight from the moment it is read
until its response line is written, and the reader takes no new line while ``max_in_flight``
are in flight: a consumer that stops reading our output, or a model that stops answering, stops
us reading input, and the writer of our input blocks instead of us buffering without limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from .._core import (
    BatchedModel,
    BatchkitError,
    ConfigurationError,
    Deployment,
    FailureLog,
    ModelError,
    Versioned,
    WrongLoopError,
    new_context,
    request_context,
)
from .._target import Tensor, routed_models_of
from .._version import __version__
from ._protocol import (
    PROTOCOL_VERSION,
    Control,
    Infer,
    LineSplitter,
    RequestError,
    TooLong,
    check_declared,
    error_line,
    exception_line,
    output_line,
    parse_line,
    recover_id,
    response_line,
    statistics_to_json,
)

__all__ = ("serve",)

log = logging.getLogger("batchkit.pipe")
# Model failures: logged once per failed batch, with the id of a line it failed, rate-limited.
_failures = FailureLog(log)

_CHUNK = 1 << 16
# Writing at most this much once a pipe polls writable never blocks (POSIX: PIPE_BUF is atomic).
_WRITE_SLICE = getattr(select, "PIPE_BUF", 512)
# After the grace period, how long the responses already made may take to be written.
_FLUSH_AFTER_GRACE = 5.0

DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
DEFAULT_GRACE = 30.0


async def serve(
    models: Any,
    *,
    input_fd: int = 0,
    output_fd: int = 1,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    grace: float = DEFAULT_GRACE,
    handle_signals: bool = False,
) -> int:
    """Serve ``models`` over newline-delimited JSON until end of input; return an exit status.

    ``models`` takes the forms ``batchkit pipe MODULE:ATTR`` accepts: a ``BatchedModel``, a
    mapping of names to models, a collection of models, or a factory returning one of those.
    Requests are read from ``input_fd`` and responses written to ``output_fd`` (see
    ``docs/pipe.md`` for the protocol). Each model runs in this event loop (``async with``)
    while serving.

    At end of input every request read is answered before this returns 0. With
    ``handle_signals`` (main thread only), SIGTERM or SIGINT stops reading at once and the
    requests in flight get ``grace`` seconds to finish; past that (or at a second signal)
    they are answered with ``Cancelled`` errors and this returns 1. It also returns 1 when
    the output is closed under it.

    Raises ``ConfigurationError`` for a bad setting or for ``models`` holding no model.
    """
    _check_positive_int("max_in_flight", max_in_flight)
    _check_positive_int("max_line_bytes", max_line_bytes)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise ConfigurationError(f"grace must be a number of seconds >= 0, got {grace!r}")
    inputs: dict[str, tuple[Tensor, ...]] = {}
    served = routed_models_of(models, inputs=inputs)
    server = _PipeServer(
        served, inputs, input_fd, output_fd, max_in_flight, max_line_bytes, float(grace)
    )
    return await server.run(handle_signals)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")


class _Fd:
    """Non-blocking use of a blocking file descriptor: wait until ready, then one syscall.

    The descriptor's flags are left alone (it may be shared with the parent, a terminal say).
    A descriptor the event loop cannot watch (a regular file, /dev/null) is always ready.
    """

    def __init__(self, fd: int, events: int) -> None:
        self.fd = fd
        self._events = events
        self._poll: Any = None
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(fd, events)

    def _ready(self) -> bool:
        return self._poll is None or bool(self._poll.poll(0))

    async def _wait(self) -> None:
        try:
            if self._events == select.POLLIN:
                await anyio.wait_readable(self.fd)
            else:
                await anyio.wait_writable(self.fd)
        except PermissionError:  # epoll refuses files that are always ready
            self._poll = None

    async def read(self) -> bytes:
        """Return the next bytes available (b"" at end of input)."""
        while True:
            if not self._ready():
                await self._wait()
            try:
                return os.read(self.fd, _CHUNK)
            except BlockingIOError:  # someone else made it non-blocking: wait again
                pass

    async def write_all(self, data: bytes) -> None:
        """Write all of ``data``; raise ``OSError`` (BrokenPipeError...) if the reader left."""
        view = memoryview(data)
        while view:
            if not self._ready():
                await self._wait()
            size = len(view) if self._poll is None else _WRITE_SLICE
            try:
                view = view[os.write(self.fd, view[:size]) :]
            except BlockingIOError:
                pass


class _Line:
    """One inference line in flight, as a cancel request naming it finds it."""

    __slots__ = ("cancelled", "scope", "started", "task")

    def __init__(self) -> None:
        self.cancelled = False
        self.started = False
        self.task: asyncio.Task[None] | None = None  # on asyncio
        self.scope: anyio.CancelScope | None = None  # elsewhere, once started

    def cancel(self) -> None:
        """Stop the line's task, which answers ``Cancelled`` (it must have started)."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()
        elif self.scope is not None:
            self.scope.cancel()


_CANCELLED_BY_REQUEST = "cancelled by a cancel request"


class _Requests:
    """The tasks that each await one item's outcome and emit its response line.

    On asyncio they are plain tasks on the loop: starting one through an anyio task group costs
    more than the item's whole trip through the engine, and halves the lines per second. On
    other backends they run in an anyio task group. ``cancel()`` cancels them all, either way.
    """

    def __init__(self, tg: TaskGroup) -> None:
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._tg = tg
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self, fn: Callable[[Infer, _Line], Coroutine[Any, Any, None]], request: Infer, line: _Line
    ) -> None:
        if self._loop is None:
            self._tg.start_soon(fn, request, line)
            return
        task = self._loop.create_task(fn(request, line))
        line.task = task  # before it runs: a cancel request may name it at once
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        self._tg.cancel_scope.cancel()
        for task in self._tasks:
            task.cancel()


class _PipeServer:
    def __init__(
        self,
        models: dict[str, BatchedModel[Any, Any] | Deployment[Any, Any]],
        inputs: dict[str, tuple[Tensor, ...]],
        input_fd: int,
        output_fd: int,
        max_in_flight: int,
        max_line_bytes: int,
        grace: float,
    ) -> None:
        self._models = models
        self._declared = inputs  # the declared inputs of the models that have them, by name
        self._input = _Fd(input_fd, select.POLLIN)
        self._output = _Fd(output_fd, select.POLLOUT)
        self._max_in_flight = max_in_flight
        self._grace_seconds = grace
        self._splitter = LineSplitter(max_line_bytes)
        # Lines read whose response is not written yet: the one number backpressure looks at.
        self._in_flight = 0
        self._peak_in_flight = 0
        self._lines = 0
        self._protocol_errors = 0
        self._progress = anyio.Event()  # fired (and replaced) whenever responses are written
        self._outbox: list[bytes] = []
        self._wake_writer = anyio.Event()
        self._output_closing = False
        self._writer_done = anyio.Event()
        self._eof = False
        self._stopping: str | None = None
        self._read_scope: anyio.CancelScope | None = None
        self._grace = anyio.CancelScope()
        self._service: anyio.CancelScope | None = None
        self._broken: OSError | None = None
        self._requests: _Requests | None = None
        self._inferring: dict[Any, _Line] = {}  # the inference lines in flight, by id

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, handle_signals: bool) -> int:
        with anyio.CancelScope() as hard_stop:
            async with AsyncExitStack() as stack:
                await self._enter_models(stack)
                stack.callback(self._cancel_requests)  # none is left, unless we were cancelled
                log.info(
                    "batchkit %s pipe protocol %d: serving %s",
                    __version__,
                    PROTOCOL_VERSION,
                    ", ".join(
                        f"{name!r} (version {m.version})" for name, m in self._models.items()
                    ),
                )
                await self._serve(handle_signals)
                if any(_in_flight(m) for m in self._models.values()):
                    # Every line is answered: the batches still running have no caller left
                    # (they timed out, or were cancelled). Leave them rather than wait on them.
                    log.info("leaving the batches still running: no caller waits for them")
                    hard_stop.cancel()
        expired = self._grace.cancelled_caught
        if expired:
            log.warning("the grace period ended: requests still in flight were cancelled")
        log.info("%d lines answered; exiting", self._lines)
        return 1 if expired or self._broken is not None else 0

    async def _enter_models(self, stack: AsyncExitStack) -> None:
        seen: set[int] = set()
        for model in self._models.values():
            if id(model) in seen:
                continue
            seen.add(id(model))
            try:
                await stack.enter_async_context(model)
            except WrongLoopError as exc:  # already running elsewhere: calls still reach it
                log.warning("%s; serving it where it runs", exc)

    async def _serve(self, handle_signals: bool) -> None:
        async with anyio.create_task_group() as service:
            self._service = service.cancel_scope
            service.start_soon(self._write_loop)
            if handle_signals:
                service.start_soon(self._watch_signals)
            async with anyio.create_task_group() as tg:
                self._requests = _Requests(tg)
                with self._grace:
                    await self._read_loop()
                    await self._wait_answered()
                if self._grace.cancelled_caught:
                    self._cancel_unanswered()
            if self._grace.cancelled_caught:
                with anyio.move_on_after(_FLUSH_AFTER_GRACE):
                    await self._wait_answered()  # the Cancelled lines, written
            self._output_closing = True
            self._wake_writer.set()
            with anyio.move_on_after(_FLUSH_AFTER_GRACE):
                await self._writer_done.wait()
            service.cancel_scope.cancel()

    def stop(self, reason: str) -> None:
        """Stop reading input; give the requests in flight the grace period (none if repeated)."""
        now = anyio.current_time()
        if self._stopping is None:
            self._stopping = reason
            self._grace.deadline = min(self._grace.deadline, now + self._grace_seconds)
            log.info(
                "%s: reading no more input; draining %d requests in flight (grace %gs)",
                reason,
                self._in_flight,
                self._grace_seconds,
            )
        else:
            self._grace.deadline = now
            log.info("%s again: cancelling the requests in flight", reason)
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.stop(signal.Signals(signum).name)

    async def _wait_answered(self) -> None:
        if self._in_flight:
            log.debug("end of input: draining %d requests in flight", self._in_flight)
        while self._in_flight:
            await self._progress.wait()

    def _cancel_unanswered(self) -> None:
        # Complete lines read but not yet taken: each still gets its one response.
        while (line := self._splitter.next_line()) is not None:
            self._count_line()
            self._emit(error_line(_id_of(line), "Cancelled", "the server stopped first"))
        for id_, entry in list(self._inferring.items()):
            if not entry.started:  # a task cancelled before it starts never runs: answer here
                entry.cancelled = True
                del self._inferring[id_]
                self._emit(error_line(id_, "Cancelled", "the server stopped first"))
        self._cancel_requests()

    def _cancel_requests(self) -> None:
        if self._requests is not None:
            self._requests.cancel()

    # -- input ---------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            await self._wait_room()
            line = self._splitter.next_line()
            if line is not None:
                self._accept(line)
                continue
            if self._eof:
                return
            if self._stopping is not None:
                dropped = self._splitter.discard_partial()
                if dropped:
                    log.warning("dropped %d bytes of an unterminated line at shutdown", dropped)
                return
            with anyio.CancelScope() as self._read_scope:
                chunk = await self._input.read()
            if self._read_scope.cancelled_caught:
                continue
            if chunk:
                self._splitter.feed(chunk)
            else:
                self._eof = True
                self._splitter.end()
            await anyio.lowlevel.checkpoint()  # a burst of ready input must not starve the rest

    async def _wait_room(self) -> None:
        if self._in_flight < self._max_in_flight:
            return
        log.debug("input paused: %d requests in flight (max_in_flight)", self._in_flight)
        while self._in_flight >= self._max_in_flight:
            await self._progress.wait()
        log.debug("input resumed")

    def _count_line(self) -> None:
        self._lines += 1
        self._in_flight += 1
        if self._in_flight > self._peak_in_flight:
            self._peak_in_flight = self._in_flight

    def _accept(self, line: bytes | TooLong) -> None:
        self._count_line()
        try:
            request = parse_line(line, self._models)
            if isinstance(request, Infer) and request.model in self._declared:
                check_declared(request, self._declared[request.model])
        except RequestError as exc:
            self._protocol_errors += 1
            self._emit(error_line(exc.id, exc.type, exc.message))
            return
        except Exception:  # a bug here must cost this line its answer, never the server
            log.exception("a request line could not be handled")
            self._protocol_errors += 1
            self._emit(_internal_error(_id_of(line)))
            return
        if isinstance(request, Control):
            try:
                response = self._control(request)
            except Exception:
                log.exception("the %s request %r could not be answered", request.op, request.id)
                response = _internal_error(request.id)
            self._emit(response)
            return
        assert self._requests is not None
        # Registered now, not when the task starts: a cancel request in the same chunk of input
        # may come before the task runs.
        entry = self._inferring[request.id] = _Line()
        self._requests.start(self._infer, request, entry)

    async def _infer(self, request: Infer, line: _Line) -> None:
        if line.cancelled:
            return  # cancelled before it started: the cancel request answered for it
        line.started = True
        try:
            with request_context(new_context(request.id)):  # the line's id in its log lines
                response = await self._outcome_line(request, line)
        except anyio.get_cancelled_exc_class():
            if not line.cancelled:
                self._emit(error_line(request.id, "Cancelled", "the server stopped first"))
                raise
            # Its own task, cancelled by a cancel request (asyncio): it ends here, answered.
            response = error_line(request.id, "Cancelled", _CANCELLED_BY_REQUEST)
        finally:
            if self._inferring.get(request.id) is line:
                del self._inferring[request.id]
        self._emit(response)

    async def _outcome_line(self, request: Infer, line: _Line) -> bytes:
        model = self._models[request.model]
        try:
            outcome = await self._outcome(model, request, line)
        except Exception as exc:
            return _exception_line(request.id, exc)
        if isinstance(outcome, bytes):
            return outcome
        try:
            return output_line(request.id, outcome.value, outcome.version, binary=request.binary)
        except Exception:
            log.exception("the output of line %r could not be written", request.id)
            return _internal_error(request.id)

    async def _outcome(
        self, model: BatchedModel[Any, Any] | Deployment[Any, Any], request: Infer, line: _Line
    ) -> Versioned[Any] | bytes:
        try:
            route = _route(request, model)
            if line.task is not None:  # a cancel request cancels the task itself
                result = await model.call_versioned(
                    request.item, priority=request.priority, timeout=request.timeout, **route
                )
            else:
                with anyio.CancelScope() as line.scope:
                    result = await model.call_versioned(
                        request.item, priority=request.priority, timeout=request.timeout, **route
                    )
                if line.scope.cancelled_caught:
                    return error_line(request.id, "Cancelled", _CANCELLED_BY_REQUEST)
        except Exception as exc:
            if isinstance(exc, ModelError) or not isinstance(exc, BatchkitError):
                try:
                    _failures.report(request.model, exc, version=model.version)
                except Exception:  # an exception that cannot be printed, say: log, go on
                    log.exception("the failure of line %r could not be logged", request.id)
            return _exception_line(request.id, exc)
        return result

    def _control(self, request: Control) -> bytes:
        if request.op == "cancel":
            line = self._inferring.pop(request.target, None)
            if line is not None:
                if line.started:
                    line.cancel()
                else:  # it will not run: answer for it now
                    line.cancelled = True
                    self._emit(error_line(request.target, "Cancelled", _CANCELLED_BY_REQUEST))
            return response_line({"id": request.id, "cancelled": line is not None})
        if request.op == "ping":
            versions = {name: model.version for name, model in self._models.items()}
            pong = {"protocol": PROTOCOL_VERSION, "batchkit": __version__, "models": versions}
            return response_line({"id": request.id, "pong": pong})
        names = [request.model] if request.model is not None else sorted(self._models)
        stats = {name: _stats_json(self._models[name]) for name in names}
        pipe = {
            "lines": self._lines,
            "in_flight": self._in_flight,
            "peak_in_flight": self._peak_in_flight,
            "max_in_flight": self._max_in_flight,
            "protocol_errors": self._protocol_errors,
        }
        return response_line({"id": request.id, "stats": {"models": stats, "pipe": pipe}})

    # -- output --------------------------------------------------------------------------------

    def _emit(self, line: bytes) -> None:
        self._outbox.append(line)
        self._wake_writer.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                self._wake_writer = anyio.Event()
                if not self._outbox:
                    if self._output_closing:
                        return
                    await self._wake_writer.wait()
                    continue
                lines, self._outbox = self._outbox, []
                try:
                    await self._output.write_all(b"".join(lines))
                except OSError as exc:
                    self._output_broken(exc)
                    return
                self._in_flight -= len(lines)
                self._progress.set()
                self._progress = anyio.Event()
        finally:
            self._writer_done.set()

    def _output_broken(self, exc: OSError) -> None:
        self._broken = exc
        log.error("the output was closed (%s): stopping", exc)
        assert self._service is not None
        self._service.cancel()  # the reader, the writer, everything but the models' exit
        self._cancel_requests()


def _route(request: Infer, model: BatchedModel[Any, Any] | Deployment[Any, Any]) -> dict[str, Any]:
    """Return how ``request`` reaches ``model``'s versions: pinned (``version``), keyed."""
    if isinstance(model, Deployment):
        if request.version is not None and request.version not in model.versions:
            raise UnknownVersion(
                f"model {request.model!r} has no version {request.version!r}; it has "
                f"{list(model.versions)}"
            )
        return {"version": request.version, "key": request.key}
    if request.version is not None and request.version != model.version:
        raise UnknownVersion(
            f"model {request.model!r} serves version {model.version!r}, not {request.version!r}"
        )
    return {}


class UnknownVersion(ConfigurationError):
    """A request named a version its model does not have (an error line, by this name)."""


def _in_flight(model: BatchedModel[Any, Any] | Deployment[Any, Any]) -> int:
    if isinstance(model, Deployment):
        return model.statistics().total.in_flight_batches
    return model.statistics().in_flight_batches


def _stats_json(model: BatchedModel[Any, Any] | Deployment[Any, Any]) -> dict[str, Any]:
    if isinstance(model, Deployment):
        stats = model.statistics()
        return {**statistics_to_json(stats.total), "deployment": stats.summary()}
    return statistics_to_json(model.statistics())


def _id_of(line: bytes | TooLong) -> Any:
    try:
        return parse_line(line, ()).id
    except RequestError as exc:
        if exc.id is not None:
            return exc.id
    except Exception:  # the id is all we want here: fall back to the leading one
        pass
    return recover_id(line.prefix if isinstance(line, TooLong) else line)


def _exception_line(id_: Any, exc: BaseException) -> bytes:
    try:
        return exception_line(id_, exc)
    except Exception:  # the exception's own __str__ failed, say
        log.exception("the error of line %r could not be written", id_)
        return _internal_error(id_)


def _internal_error(id_: Any) -> bytes:
    return error_line(
        id_, "InternalError", "the server failed to handle this line (its log says why)"
    )
