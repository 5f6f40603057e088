"""Request ids and the access log of the HTTP app.

A request's id is, first found: its ``X-Request-ID`` header, the KServe ``id`` of its infer
body, a new random id. A W3C ``traceparent`` header continues the caller's trace; this server's
span gets a new id. The response carries both back (``X-Request-ID``, ``traceparent``), and an
infer response's body its ``id``. One access line per request goes to ``batchkit.access``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .._core import RequestContext, current_context, new_context

__all__ = ("access_line", "context_of", "current_request_id", "response_headers")

access_logger = logging.getLogger("batchkit").getChild("access")  # a logger, not a module


def context_of(headers: Mapping[str, str]) -> RequestContext:
    """Return the context of a request with these (lower-case) ``headers``."""
    return new_context(headers.get("x-request-id"), headers.get("traceparent"))


def response_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """Return the headers that give the request's ids back to the client."""
    return [
        (b"x-request-id", ctx.request_id.encode("latin-1", "replace")),
        (b"traceparent", ctx.traceparent().encode()),
    ]


def access_line(
    ctx: RequestContext,
    method: str,
    path: str,
    status: int,
    model: str | None,
    version: str | None,
    seconds: float,
) -> None:
    """Log one access line about a finished request (INFO on ``batchkit.access``)."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    notes = ctx.notes
    ms = round(seconds * 1000, 3)
    queue_ms = _ms(notes.get("queue_s"))
    compute_ms = _ms(notes.get("compute_s"))
    batch_size = notes.get("batch_size")
    access_logger.info(
        '"%s %s" %d model=%s version=%s rows=%s ms=%.3f queue_ms=%s compute_ms=%s batch=%s',
        method,
        path,
        status,
        model or "-",
        version or "-",
        notes.get("rows", "-"),
        ms,
        "-" if queue_ms is None else f"{queue_ms:.3f}",
        "-" if compute_ms is None else f"{compute_ms:.3f}",
        "-" if batch_size is None else batch_size,
        extra={
            **ctx.log_extra(),
            "method": method,
            "path": path,
            "status": status,
            "model": model,
            "version": version,
            "rows": notes.get("rows"),
            "duration_ms": ms,
            "queue_ms": queue_ms,
            "compute_ms": compute_ms,
            "batch_size": batch_size,
        },
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def current_request_id() -> str | None:
    """Return the id of the request this task serves, or None."""
    ctx = current_context()
    return None if ctx is None else ctx.request_id
