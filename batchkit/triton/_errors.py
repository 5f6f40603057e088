"""tritonclient's exceptions, translated at the edge into batchkit's own."""

from __future__ import annotations

import asyncio

import aiohttp
from tritonclient.utils import InferenceServerException

from .._core import (
    DeadlineExceeded,
    RemoteError,
    RemoteInvalidInput,
    RemoteRejected,
    RemoteUnavailable,
)

__all__ = ("is_transient", "translate")

# gRPC status codes (as tritonclient spells them) and HTTP statuses, by what they mean here.
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "503", "404"}
_REJECTED = {"StatusCode.RESOURCE_EXHAUSTED", "429"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED", "504", "408"}
_INVALID = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE", "400", "413"}
# Phrases in Triton's messages that say more than the status does.
_TIMEOUT_PHRASES = ("timeout expired", "timed out", "deadline exceeded")
_REJECTED_PHRASES = ("exceeds maximum queue size", "queue is full", "rate limit")
_UNAVAILABLE_PHRASES = ("unknown model", "is not ready", "unavailable", "not found")
# Phrases of a failure to reach the server at all (nothing was sent, or the server went away).
_CONNECTION_PHRASES = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "socket closed",
    "broken pipe",
    "connect failed",
    "goaway",
    "not connected",
    "no route to host",
    "end of tcp stream",
)


def is_transient(exc: BaseException) -> bool:
    """Return whether ``exc`` is a connection failure worth retrying (not a server verdict)."""
    if isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError)):
        return True
    if isinstance(exc, InferenceServerException):
        message = (exc.message() or "").lower()
        return exc.status() == "StatusCode.UNAVAILABLE" and any(
            phrase in message for phrase in _CONNECTION_PHRASES
        )
    return False


def translate(exc: BaseException, where: str, batch_size: int) -> Exception:
    """Return the batchkit error for ``exc``, raised by tritonclient about ``where``.

    ``where`` names the server and model ("model 'scale' at grpc://127.0.0.1:8001"). The
    result has ``exc`` as its ``__cause__``.
    """
    error = _translate(exc, where, batch_size)
    error.__cause__ = exc
    return error


def _translate(exc: BaseException, where: str, n: int) -> Exception:
    if isinstance(exc, InferenceServerException):
        status = exc.status() or ""
        reason = exc.message() or str(exc)
        text = reason.lower()
        said = f"{where} failed the request of {n} rows [{status or 'no status'}]: {reason}"
        if status in _TIMEOUT or any(phrase in text for phrase in _TIMEOUT_PHRASES):
            return DeadlineExceeded(f"{where}: the deadline passed in the server: {reason}")
        if status in _REJECTED or any(phrase in text for phrase in _REJECTED_PHRASES):
            return RemoteRejected(said, batch_size=n)
        if is_transient(exc):
            return RemoteUnavailable(f"{where} is unreachable: {reason}", batch_size=n)
        if status in _UNAVAILABLE or any(phrase in text for phrase in _UNAVAILABLE_PHRASES):
            return RemoteUnavailable(said, batch_size=n)
        if status in _INVALID:
            return RemoteInvalidInput(said, batch_size=n)
        return RemoteError(said, batch_size=n)
    if isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError)):
        return RemoteUnavailable(
            f"{where} is unreachable: {type(exc).__name__}: {exc}", batch_size=n
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return RemoteUnavailable(f"{where} did not answer in time: {exc!r}", batch_size=n)
    return RemoteError(f"{where} failed: {type(exc).__name__}: {exc}", batch_size=n)
