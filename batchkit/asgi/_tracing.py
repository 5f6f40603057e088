"""OpenTelemetry spans for the HTTP app (optional: ``pip install 'batchkit[otel]'``).

Imports ``opentelemetry`` only when an app is created with ``tracing=True``. Each request gets
a SERVER span, a child of the caller's ``traceparent`` when it sent one; the request context
takes the span's ids, so the response's ``traceparent`` and the log lines name that span. Each
batch the model runs gets an INTERNAL span of its own, linked to the spans of the requests it
served (the core tells ``Tracer.batch``: the ``BatchObserver`` seam).
Spans go to the global tracer provider: configure its exporter as OpenTelemetry documents
(the SDK, or ``opentelemetry-instrument``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .._core import ConfigurationError, RequestContext

__all__ = ("Tracer",)

NS = "batchkit."  # the namespace of the span attributes batchkit sets


class Tracer:
    """Start one span per request on ``provider`` (None: the global tracer provider)."""

    def __init__(self, provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError:
            raise ConfigurationError(
                "tracing=True needs OpenTelemetry: pip install 'batchkit[otel]'"
            ) from None
        self._trace = trace
        self._tracer = trace.get_tracer("batchkit", tracer_provider=provider)

    @contextmanager
    def span(self, ctx: RequestContext, method: str, path: str) -> Iterator[Any]:
        """Run the block in a span for the request of ``ctx``; give ``ctx`` the span's ids."""
        trace = self._trace
        parent = None
        if ctx.parent_id is not None:
            remote = trace.SpanContext(
                int(ctx.trace_id, 16),
                int(ctx.parent_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(1 if ctx.sampled else 0),
            )
            parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        with self._tracer.start_as_current_span(
            f"{method} {path}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                f"{NS}request_id": ctx.request_id,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            own = span.get_span_context()
            ctx.observer = self  # the batches that serve it get spans linked to this one
            if own.is_valid:
                ctx.trace_id = format(own.trace_id, "032x")
                ctx.span_id = format(own.span_id, "016x")
                ctx.sampled = bool(own.trace_flags & 1)
            yield span

    def finish(
        self, span: Any, ctx: RequestContext, status: int, model: str | None, version: str | None
    ) -> None:
        """Record the outcome of the request on its ``span``."""
        span.set_attribute("http.response.status_code", status)
        span.set_attribute(f"{NS}request_id", ctx.request_id)
        if model is not None:
            span.set_attribute(f"{NS}model", model)
            span.set_attribute(f"{NS}model_version", version or "")
        rows = ctx.notes.get("rows")
        if rows is not None:
            span.set_attribute(f"{NS}rows", rows)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        for key in ("queue_s", "compute_s"):
            if key in ctx.notes:
                span.set_attribute(f"{NS}{key[:-2]}_ms", ctx.notes[key] * 1000)
        if "batch_size" in ctx.notes:
            span.set_attribute(f"{NS}batch_size", ctx.notes["batch_size"])

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
        """Record a batch as a span linked to the spans of the requests it served."""
        trace = self._trace
        # The engine's clock is monotonic; called as the batch ends, so now is about ``end``.
        now_ns = time.time_ns()
        links = [
            trace.Link(
                trace.SpanContext(
                    int(ctx.trace_id, 16),
                    int(ctx.span_id, 16),
                    is_remote=False,
                    trace_flags=trace.TraceFlags(1 if ctx.sampled else 0),
                )
            )
            for ctx in contexts
        ]
        span = self._tracer.start_span(
            f"batch {model}",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: no request's child
            kind=trace.SpanKind.INTERNAL,
            links=links,
            start_time=now_ns - round((end - start) * 1e9),
            attributes={
                f"{NS}model": model,
                f"{NS}model_version": version,
                f"{NS}batch_size": size,
            },
        )
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}"))
        span.end(end_time=now_ns)
