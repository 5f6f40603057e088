"""The request context: a request's id and W3C trace ids, for every log line about it.

Transport-neutral: the HTTP app, the gRPC servicer and the pipe each build a
``RequestContext`` from what their request carries (an id, a ``traceparent``) and run the
request's work inside ``request_context(ctx)``; log lines written meanwhile (by batchkit or by
the model's own code on that task) carry its ids through ``ContextFilter``. Model failures are
logged through ``FailureLog``: once per failed batch, rate-limited.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._errors import ModelError

__all__ = (
    "BatchObserver",
    "ContextFilter",
    "FailureLog",
    "RequestContext",
    "current_context",
    "new_context",
    "observe_batches",
    "parse_traceparent",
    "request_context",
)

_TRACEPARENT = re.compile(r"\A([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
# The longest request id kept from a client; longer ones are cut (they end up in every log line).
MAX_ID_LENGTH = 128
_UNSET = object()
# Ids need to be unique, not secret: a PRNG seeded from the OS is a fraction of the cost of
# os.urandom per id.
_random = random.Random(os.urandom(16))


def _hex(bits: int) -> str:
    return f"{_random.getrandbits(bits):0{bits // 4}x}"


@dataclass(eq=False)
class RequestContext:
    """A request's ids: ``request_id`` (the client's, or ``generated``), the W3C ``trace_id``
    (the caller's trace, or a new one), ``span_id`` (this server's span, always new) and
    ``parent_id`` (the caller's span, None when it sent no ``traceparent``). ``notes``: what
    the adapter learns about the request on the way (rows, model), for its access log.
    """

    request_id: str
    trace_id: str
    span_id: str
    parent_id: str | None = None
    sampled: bool = True
    generated: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    # Told of the batches that serve this request (the adapter's tracer), or None.
    observer: BatchObserver | None = None

    def adopt_id(self, request_id: Any) -> None:
        """Take ``request_id`` (found later in the request, e.g. its body) if the id so far was
        generated."""
        if self.generated and request_id is not None and request_id != "":
            self.request_id = clean_id(request_id)
            self.generated = False

    def traceparent(self) -> str:
        """Return the ``traceparent`` header naming this server's span."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def log_extra(self) -> dict[str, Any]:
        """Return the fields a log record about this request carries (``extra=``)."""
        return {"request_id": self.request_id, "trace_id": self.trace_id, "span_id": self.span_id}


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """Return ``(trace_id, parent_id, sampled)`` of a W3C ``traceparent`` header, or None when
    it is absent or malformed (the spec says: then start a new trace)."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"}:
        return None
    if set(parent_id) == {"0"}:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def new_context(request_id: Any = None, traceparent: str | None = None) -> RequestContext:
    """Return the context of a new request: ``request_id`` as given (a string, cut to 128
    characters, control characters replaced), else a new random id; the trace of
    ``traceparent`` continued, else a new trace; a new span id either way."""
    parent = parse_traceparent(traceparent)
    if parent is None:
        trace_id, parent_id, sampled = _hex(128), None, True
    else:
        trace_id, parent_id, sampled = parent[0], parent[1], parent[2]
    generated = request_id is None or request_id == ""
    rid = _hex(128) if generated else clean_id(request_id)
    return RequestContext(rid, trace_id, _hex(64), parent_id, sampled, generated)


def clean_id(request_id: Any) -> str:
    """Return ``request_id`` as a log-safe string: at most 128 characters, each printable."""
    return "".join(c if c.isprintable() else "?" for c in str(request_id)[:MAX_ID_LENGTH])


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "batchkit_request_context", default=None
)


def current_context() -> RequestContext | None:
    """Return the context of the request this task serves, or None."""
    return _current.get()


@contextmanager
def request_context(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` the current request context for the duration of the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


# -- batches ------------------------------------------------------------------------------------


class BatchObserver(Protocol):
    """Told of every batch a model ran for callers with a request context (the tracing seam:
    ``asgi/_tracing.py`` implements it; the core never imports it)."""

    def batch(
        self,
        model: str,
        version: str,
        contexts: Sequence[RequestContext],
        start: float,
        end: float,
        size: int,
        error: BaseException | None,
    ) -> None:
        """``start`` and ``end`` are on the engine's clock (``time.monotonic`` scale)."""


# Off (the default): the engine's only cost is one check per batch. On: each call's context
# is kept on its requests, and each batch writes its timing into their contexts' notes.
observing = False


def observe_batches() -> None:
    """Record each request's queue and compute time and batch size in its context's notes
    (``queue_s``, ``compute_s``, ``batch_size``) from now on, and tell each context's
    ``observer`` of the batches that served it. For the process's lifetime."""
    global observing
    observing = True


def tag_requests(requests: Sequence[Any]) -> None:
    """Give ``requests`` (just submitted) the caller's request context, if it has one."""
    ctx = _current.get()
    if ctx is not None:
        for req in requests:
            req.ctx = ctx


def batch_ran(
    model: str,
    version: str,
    requests: Sequence[Any],
    start: float,
    end: float,
    error: BaseException | None = None,
) -> None:
    """Note a batch the model ran from ``start`` to ``end`` in its requests' contexts: per
    context, the longest its rows queued, the time of the batches that ran them (added up) and
    the largest such batch; then tell the observers (called as the batch ends)."""
    contexts: dict[int, RequestContext] = {}
    n = len(requests)
    for req in requests:
        ctx = getattr(req, "ctx", None)
        if ctx is None:
            continue
        notes = ctx.notes
        notes["queue_s"] = max(notes.get("queue_s", 0.0), start - req.enqueued_at)
        if id(ctx) not in contexts:
            contexts[id(ctx)] = ctx
            notes["compute_s"] = notes.get("compute_s", 0.0) + (end - start)
            notes["batch_size"] = max(notes.get("batch_size", 0), n)
    by_observer: dict[int, tuple[BatchObserver, list[RequestContext]]] = {}
    for ctx in contexts.values():
        if ctx.observer is not None:
            by_observer.setdefault(id(ctx.observer), (ctx.observer, []))[1].append(ctx)
    for observer, served in by_observer.values():
        observer.batch(model, version, served, start, end, n, error)


class ContextFilter(logging.Filter):
    """A handler filter that gives every record ``request_id``, ``trace_id`` and ``span_id``:
    the current request's, or ``"-"`` outside a request. Fields set by the caller stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        for key in ("request_id", "trace_id", "span_id"):
            if not hasattr(record, key):
                setattr(record, key, getattr(ctx, key) if ctx is not None else "-")
        return True


class FailureLog:
    """Log model failures to ``logger``: once per failed batch, at most ``burst`` tracebacks
    per ``period`` seconds per model; the rest are counted and reported in one line when the
    next traceback is allowed.

    Every caller of a failed batch gets its own ``ModelError`` with the model's exception as
    ``__cause__``; the first caller to report it logs it, with its request's ids.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 5, period: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._windows: dict[str, tuple[float, int, int]] = {}  # model: (start, logged, dropped)

    def report(self, model: str, exc: BaseException, *, version: str | None = None) -> bool:
        """Log ``exc`` (a ``ModelError``, or a row's own exception) raised for ``model``,
        unless its batch was logged already or the rate limit holds it back; return whether a
        line was written."""
        cause = exc.__cause__ if isinstance(exc, ModelError) and exc.__cause__ else exc
        # Marked with its traceback: a model that raises one exception object again (a new
        # raise, a new traceback head) is a new failure.
        if getattr(cause, "_batchkit_logged", _UNSET) is cause.__traceback__:
            return False
        try:
            cause._batchkit_logged = cause.__traceback__  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__: logged per caller
            pass
        now = time.monotonic()
        start, logged, dropped = self._windows.get(model, (now, 0, 0))
        if now - start >= self.period:
            start, logged = now, 0
        if logged >= self.burst:
            self._windows[model] = (start, logged, dropped + 1)
            return False
        self._windows[model] = (start, logged + 1, 0)
        if isinstance(exc, ModelError):
            version = exc.version if exc.version is not None else version
            size: int | str = exc.batch_size
        else:
            size = "-"
        extra: dict[str, Any] = {"model": model, "version": version, "batch_size": size}
        ctx = _current.get()
        if ctx is not None:
            extra.update(ctx.log_extra())
        if dropped:
            self.logger.error(
                "model %r: %d more failures were not logged (at most %d tracebacks per %gs)",
                model,
                dropped,
                self.burst,
                self.period,
                extra=dict(extra, suppressed=dropped),
            )
        self.logger.error(
            "model %r version %s failed on a batch of %s: %s: %s",
            model,
            version,
            size,
            type(cause).__name__,
            cause,
            exc_info=(type(cause), cause, cause.__traceback__),
            extra=extra,
        )
        return True
