"""HTTP plumbing of the KServe app: ASGI types, responses, bodies, content codings.

Nothing here knows the protocol: ``_infer`` and ``_repository`` build on it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import anyio.to_thread

from ._budget import Claim
from ._errors import BadRequest, HTTPError

__all__ = (
    "ASGIApp",
    "JSON",
    "OCTETS",
    "Message",
    "Receive",
    "Response",
    "Scope",
    "Send",
    "accepted_encoding",
    "allow",
    "decimal_header",
    "decompress",
    "error_response",
    "headers_of",
    "json_object",
    "json_response",
    "read_body",
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = [(b"content-type", b"application/json")]
OCTETS = [(b"content-type", b"application/octet-stream")]

# A compressed body this big may decompress to a megabyte and more: decompress it in a worker
# thread, so that the event loop keeps answering other requests meanwhile.
_OFFLOAD_COMPRESSED = 4096
# Bodies are decompressed this many bytes at a time, each piece charged to the budget first.
_DECOMPRESS_FIRST_STEP = 1 << 16
_DECOMPRESS_STEP = 1 << 20
_DECOMPRESS_INPUT = 1 << 16  # compressed bytes fed at a time
# A numeric header holds at most an int64 (19 digits).
_MAX_HEADER_DIGITS = 19


class Response:
    __slots__ = ("body", "headers", "model", "status", "version")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        model: str | None = None,
        version: str | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.model = model  # the served model and version an infer request was for
        self.version = version

    async def send(self, send: Send) -> None:
        headers = [*self.headers, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def json_response(status: int, payload: Any) -> Response:
    return Response(status, JSON, json.dumps(payload, separators=(",", ":")).encode())


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return Response(status, [*JSON, *extra], json.dumps({"error": message}).encode())


def allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HTTPError(
            f"method {method} is not allowed here; use {allowed}",
            status=405,
            headers={"allow": allowed},
        )


def headers_of(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(
    receive: Receive, headers: Mapping[str, str], limit: int, claim: Claim | None = None
) -> bytearray:
    """Return the request body, decompressed; 413 past ``limit`` bytes, 400 for bad data.

    With a ``claim``, every byte read and decompressed is charged to its budget as it comes
    (twice: the pieces, then the body joined from them), so a request over the server's budget
    stops reading at once (503, or 413 when it could never fit).
    """
    declared = headers.get("content-length")
    if declared is not None and decimal_header("Content-Length", declared) > limit:
        raise HTTPError(f"the body has {declared} bytes, more than the {limit} allowed", status=413)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError("the client disconnected", status=400)
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise HTTPError(f"the body is more than the {limit} bytes allowed", status=413)
            if claim is not None:
                claim.take(2 * len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = bytearray().join(chunks)
    del chunks
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    if len(body) > _OFFLOAD_COMPRESSED:
        return await anyio.to_thread.run_sync(decompress, body, encoding, limit, claim)
    return decompress(body, encoding, limit, claim)


def decimal_header(name: str, value: str) -> int:
    """Return the value of a numeric header: ASCII digits, at most 19 of them (int64); else 400.

    ``str.isdigit`` accepts more than ``int`` does (superscripts), and ``int`` refuses
    thousands of digits; both are checked before converting.
    """
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_HEADER_DIGITS:
        raise BadRequest(
            f"{name} must be a decimal integer of at most {_MAX_HEADER_DIGITS} digits, "
            f"got {_clip(value)}"
        )
    return int(text)


def _clip(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}... ({len(value)} characters)"


def json_object(body: bytes | bytearray) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the request must be a JSON object, got {type(value).__name__}")
    return value


def decompress(
    body: bytes | bytearray, encoding: str, limit: int, claim: Claim | None = None
) -> bytearray:
    """Decompress a gzip (every member, as ``gzip.decompress``) or deflate (zlib) body.

    Raises ``BadRequest`` for bad, truncated or trailing data, 413 past ``limit`` bytes. With a
    ``claim``, each piece is charged before it is decompressed, twice (the piece, and its copy in
    the joined body), and what it did not use is refunded.
    """
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    view = memoryview(body)
    parts: list[bytes] = []
    size, position, step = 0, 0, _DECOMPRESS_FIRST_STEP
    while True:  # one gzip member (or the deflate stream) a turn
        decompressor = zlib.decompressobj(wbits)
        pending: bytes | memoryview = b""
        full = False  # the last piece filled its step: more output may wait without input
        while not decompressor.eof:
            if not pending:
                if position < len(view):  # fed a slice at a time: unconsumed_tail stays small
                    pending = view[position : position + _DECOMPRESS_INPUT]
                    position += len(pending)
                elif not full:
                    raise BadRequest(f"the {encoding} body is truncated")
            step = min(step, limit + 1 - size)
            if claim is not None:
                claim.take(2 * step)  # the piece, and its copy in the joined body
            try:
                data = decompressor.decompress(pending, step)
            except zlib.error as exc:
                raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None
            if claim is not None:
                claim.refund(2 * (step - len(data)))
            size += len(data)
            if size > limit:
                raise HTTPError(
                    f"the decompressed body is more than the {limit} bytes allowed", status=413
                )
            parts.append(data)
            pending = decompressor.unconsumed_tail
            full = len(data) == step
            step = min(2 * step, _DECOMPRESS_STEP)
        position -= len(decompressor.unused_data)  # the next member starts there
        if position == len(view):
            return bytearray().join(parts)
        if encoding != "gzip" or bytes(view[position : position + 2]) != b"\x1f\x8b":
            raise BadRequest(
                f"the {encoding} body has {len(view) - position} bytes after the compressed data"
            )


def accepted_encoding(header: str | None, *, small: bool = False) -> str | None:
    """Return the response encoding ``Accept-Encoding`` prefers: gzip, deflate or None.

    A ``small`` body is sent as it is whenever identity is acceptable: compressing a few
    hundred bytes costs more CPU than it saves (and may not shrink them at all).

    The highest q-value wins among identity, gzip and deflate (``*`` stands for those not
    named; q=0 is "not acceptable"); on a tie, a named coding beats one ``*`` stands for, then
    gzip beats deflate beats identity. Identity is acceptable unless excluded, below any
    coding that is named.
    """
    if not header:
        return None
    named: dict[str, float] = {}
    for part in header.split(","):
        token, *params = part.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                q = _qvalue(value.strip())
        named[token.strip().lower()] = q
    wildcard = named.get("*")
    best, best_key = None, (0.0, False, -1)
    for rank, coding in enumerate(("identity", "deflate", "gzip")):
        explicit = coding in named
        given = named[coding] if explicit else wildcard
        q = given if given is not None else 0.001 if coding == "identity" else 0.0
        if coding == "identity" and small and q > 0:
            return None
        order = (q, explicit, rank)
        if q > 0 and order > best_key:
            best, best_key = coding, order
    return None if best == "identity" else best


def _qvalue(text: str) -> float:
    try:
        q = float(text)
    except ValueError:
        return 0.0
    return q if 0.0 <= q <= 1.0 else 0.0
