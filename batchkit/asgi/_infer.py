"""The infer endpoint: parse a request, run its rows through the model, encode the outputs."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
import zlib
from typing import Any

import anyio.to_thread

from .._core import (
    ClosedError,
    DeadlineExceeded,
    FailureLog,
    ModelError,
    QueueFull,
    RemoteError,
    RemoteInvalidInput,
    RemoteRejected,
    RemoteUnavailable,
    current_context,
)
from ._budget import Claim, MemoryBudget, retained_bytes
from ._disconnect import ClientDisconnected, ShutdownAbort, Waits, call_until_disconnect
from ._errors import HTTPError
from ._http import JSON, OCTETS, Receive, Response, Scope, accepted_encoding, headers_of, read_body
from ._protocol import InferRequest, encode_response, parse_request
from ._served import ServedModel

__all__ = ("COMPRESS_BYTES", "OFFLOAD_BYTES", "infer", "remote_error", "run_request")

logger = logging.getLogger("batchkit.asgi")
_failures = FailureLog(logger)

# Work on a request or response bigger than this (bytes) runs in a worker thread, so that the
# event loop keeps answering other requests (health checks) meanwhile; smaller work stays on
# the loop, where it costs less than the hop to a thread.
OFFLOAD_BYTES = 1 << 20
# Responses whose outputs take fewer bytes than this are not compressed (when identity is ok).
COMPRESS_BYTES = 1024


async def infer(
    served: ServedModel,
    scope: Scope,
    receive: Receive,
    max_body_size: int,
    budget: MemoryBudget | None = None,
    *,
    waits: Waits | None = None,
    failures: FailureLog | None = None,
) -> Response:
    """Run one infer request on ``served`` and return its response (``HTTPError`` for errors).

    With a ``budget``, reading, decompressing, parsing and decoding the body are charged to it
    as they go, and given back when the request ends. While the model works, the connection is
    watched: ``ClientDisconnected`` is raised when the client went away (its queued rows
    withdrawn). ``waits`` lets the app fail the wait at the end of its shutdown (503);
    ``failures`` logs the model's failures (once per batch).
    """
    if budget is None:
        return await _infer(served, scope, receive, max_body_size, None, waits, failures)
    with budget.claim() as claim:
        return await _infer(served, scope, receive, max_body_size, claim, waits, failures)


async def _infer(
    served: ServedModel,
    scope: Scope,
    receive: Receive,
    max_body_size: int,
    claim: Claim | None,
    waits: Waits | None,
    failures: FailureLog | None,
) -> Response:
    headers = headers_of(scope)
    received = await read_body(receive, headers, max_body_size, claim)
    header_length = headers.get("inference-header-content-length")
    if len(received) > OFFLOAD_BYTES:
        request = await anyio.to_thread.run_sync(
            parse_request, served, received, header_length, claim
        )
    else:
        request = parse_request(served, received, header_length, claim)
    if claim is not None:  # parsed: keep charged only what stays alive until the answer
        claim.refund(claim.size - retained_bytes(len(received), request.arrays))
    del received  # parsed; binary inputs are views of it
    ctx = current_context()
    if ctx is not None:
        ctx.adopt_id(request.id)
        ctx.notes["rows"] = request.rows
        if request.id is None and not ctx.generated:  # the client's X-Request-ID: the body
            request = dataclasses.replace(request, id=ctx.request_id)  # has a place for it
    admit = scope.get("batchkit_admit")
    if admit is not None:  # the gateway counts rows: spend them before any is queued
        await admit(request.rows)
    arrays, version, mixed = await run_request(
        served, request, receive=receive, waits=waits, failures=failures
    )
    size = _output_bytes(arrays)
    encoding = accepted_encoding(headers.get("accept-encoding"), small=size < COMPRESS_BYTES)
    job = (served.name, version, request, arrays, mixed, encoding)
    if size > OFFLOAD_BYTES:
        body, header_size = await anyio.to_thread.run_sync(encode_outputs, *job)
    else:
        body, header_size = encode_outputs(*job)
    response_headers = list(JSON if header_size is None else OCTETS)
    if header_size is not None:
        response_headers.append((b"inference-header-content-length", str(header_size).encode()))
    if encoding is not None:
        response_headers.append((b"content-encoding", encoding.encode()))
    return Response(200, response_headers, body, served.name, version)


async def run_request(
    served: ServedModel,
    request: InferRequest,
    *,
    receive: Receive | None = None,
    waits: Waits | None = None,
    failures: FailureLog | None = None,
) -> tuple[dict[str, Any], str, list[str] | None]:
    """Run a parsed request's rows through ``served``'s model; return its output arrays, the
    version that answered, and every row's version when they differ (``HTTPError`` for errors).

    Shared by HTTP and gRPC, which map the ``HTTPError`` to their own status. With ``receive``
    (HTTP), the client's disconnect cancels the wait (``ClientDisconnected``); ``waits`` and
    ``failures`` as ``infer``'s.
    """
    failures = failures if failures is not None else _failures
    model = served.model
    items = served.items(request.arrays, request.rows)
    try:
        if receive is None:  # gRPC: a cancelled RPC cancels this task itself
            results = await model.call_many_nowait_versioned(
                items, priority=request.priority, timeout=request.timeout, **served.route
            )
        else:
            results = await call_until_disconnect(
                receive,
                model.call_many_nowait_versioned,
                items,
                priority=request.priority,
                timeout=request.timeout,
                waits=waits,
                **served.route,
            )
    except ShutdownAbort:
        raise HTTPError(
            f"model {served.name!r}: the server shut down before the model answered",
            status=503,
        ) from None
    except QueueFull as exc:
        retry = str(max(1, math.ceil(exc.retry_after)))
        raise HTTPError(
            f"model {served.name!r} is at capacity; retry after {retry} s",
            status=503,
            headers={"retry-after": retry},
        ) from None
    except DeadlineExceeded:
        raise HTTPError(
            f"model {served.name!r}: the request's deadline passed before its outputs",
            status=504,
        ) from None
    except ClosedError:
        raise HTTPError(f"model {served.name!r} is shutting down", status=503) from None
    except RemoteError as exc:  # a model that forwards to another server (TritonModel)
        raise remote_error(served.name, exc) from None
    except ModelError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        failures.report(served.name, exc)
        raise HTTPError(
            f"model {served.name!r} failed on this request ({type(cause).__name__}); "
            "the server log has the details",
            status=500,
        ) from None
    except ClientDisconnected:
        raise
    except Exception as exc:  # the model's own error for one row
        failures.report(served.name, exc, version=served.version)
        raise HTTPError(
            f"model {served.name!r} failed on a row of this request ({type(exc).__name__}); "
            "the server log has the details",
            status=500,
        ) from None
    try:
        arrays = served.outputs_of([r.value for r in results], [o.tensor for o in request.outputs])
    except (TypeError, ValueError) as exc:
        logger.error("batchkit: model %r returned a bad output: %s", served.name, exc)
        raise HTTPError(
            f"model {served.name!r} returned an output that does not fit its signature: {exc}",
            status=500,
        ) from None
    version = results[0].version
    versions = [r.version for r in results]
    mixed = versions if any(v != version for v in versions) else None
    return arrays, version, mixed


def remote_error(name: str, exc: RemoteError) -> HTTPError:
    """Answer for a model whose upstream server failed: unavailable and rejected are 503 (the
    latter with Retry-After), invalid input 400 (the client's fault), anything else 502."""
    if isinstance(exc, RemoteRejected):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return HTTPError(
            f"model {name!r}: its upstream server refused the request; retry after {retry} s",
            status=503,
            headers={"retry-after": retry},
        )
    if isinstance(exc, RemoteUnavailable):
        return HTTPError(f"model {name!r}: its upstream server is unavailable", status=503)
    if isinstance(exc, RemoteInvalidInput):
        return HTTPError(
            f"model {name!r}: the upstream server rejected the input: {exc}", status=400
        )
    logger.error("batchkit: the upstream server of model %r failed", name, exc_info=exc)
    return HTTPError(
        f"model {name!r}: its upstream server failed on this request; the server log has the "
        "details",
        status=502,
    )


def encode_outputs(
    name: str,
    version: str,
    request: InferRequest,
    arrays: dict[str, Any],
    versions: list[str] | None,
    encoding: str | None,
) -> tuple[bytes, int | None]:
    body, header_size = encode_response(name, version, request, arrays, versions)
    if encoding == "gzip":
        body = gzip.compress(body, 1)
    elif encoding == "deflate":
        body = zlib.compress(body, 1)
    return body, header_size


def _output_bytes(arrays: dict[str, Any]) -> int:
    """Return about how many bytes encoding ``arrays`` writes (JSON numbers: ~8 each)."""
    total = 0
    for array in arrays.values():
        if array.dtype.kind == "O":
            total += sum(len(b) + 4 for b in array.reshape(-1).tolist())
        else:
            total += array.size * max(8, array.itemsize)
    return total
