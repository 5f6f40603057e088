"""``KServeApp``: the ASGI callable that serves batched models over the KServe v2 protocol."""

from __future__ import annotations

import gzip
import hmac
import importlib.util
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio.to_thread

from .._core import (
    BatchedModel,
    ClosedError,
    ConfigurationError,
    DeadlineExceeded,
    ForbiddenPath,
    ModelError,
    QueueFull,
    RemoteError,
    RemoteInvalidInput,
    RemoteRejected,
    RemoteUnavailable,
    SwapError,
)
from .._version import __version__
from ._errors import BadRequest, HTTPError
from ._protocol import InferRequest, encode_response, parse_request
from ._served import ServedModel

__all__ = ("ASGIApp", "KServeApp", "Receive", "Scope", "Send")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("batchkit.asgi")

_JSON = [(b"content-type", b"application/json")]
_OCTETS = [(b"content-type", b"application/octet-stream")]

# Work on a request or response bigger than this (bytes) runs in a worker thread, so that the
# event loop keeps answering other requests (health checks) meanwhile; smaller work stays on
# the loop, where it costs less than the hop to a thread.
OFFLOAD_BYTES = 1 << 20
# Responses whose outputs take fewer bytes than this are not compressed (when identity is ok).
COMPRESS_BYTES = 1024
# A compressed body this big may decompress to OFFLOAD_BYTES and more.
_OFFLOAD_COMPRESSED = 4096


class KServeApp:
    """An ASGI app serving batched models over the KServe v2 protocol, as Triton speaks it.

    ``models``: ``ServedModel`` objects, or plain ``BatchedModel`` objects (served with the
    default signature: one FP32 vector ``INPUT0`` in, one FP32 vector ``OUTPUT0`` out). Several
    models may share a name with different versions.

    - ``max_body_size``: bytes an infer body may hold, after decompression (413 beyond).
    - ``metrics``: serve Prometheus metrics at ``/metrics`` (needs ``prometheus-client``;
      None, the default, serves them when it is installed).
    - ``admin_token``: enables the model repository endpoints (load a new version, unload),
      which then require ``Authorization: Bearer <admin_token>``.
    - ``weights_dir``: the directory that weight paths given to the load endpoint are
      relative to, and must stay inside.

    The app's lifespan runs every model's engine in the server's event loop (``async with``).
    When it is mounted in another app that does not forward lifespan events, enter
    ``app.lifespan()`` from the host's lifespan instead. Raises ``ConfigurationError`` for
    duplicate model versions or bad settings.
    """

    def __init__(
        self,
        models: Iterable[ServedModel | BatchedModel[Any, Any]]
        | ServedModel
        | BatchedModel[Any, Any],
        *,
        max_body_size: int = 64 * 1024 * 1024,
        metrics: bool | None = None,
        admin_token: str | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(models, (ServedModel, BatchedModel)):
            models = [models]
        served = [m if isinstance(m, ServedModel) else ServedModel(m) for m in models]
        if not served:
            raise ConfigurationError("KServeApp needs at least one model")
        if (
            isinstance(max_body_size, bool)
            or not isinstance(max_body_size, int)
            or max_body_size < 1
        ):
            raise ConfigurationError(f"max_body_size must be an int >= 1, got {max_body_size!r}")
        if admin_token is not None and (not isinstance(admin_token, str) or not admin_token):
            raise ConfigurationError("admin_token must be a non-empty string or None")
        self._served: dict[str, list[ServedModel]] = {}
        for s in served:
            self._served.setdefault(s.name, []).append(s)
        self._check_versions()
        self.max_body_size = max_body_size
        self._admin_token = admin_token
        self._weights_dir = None if weights_dir is None else os.path.realpath(weights_dir)
        self._unloaded: set[str] = set()
        self._running = False
        self._stopping = False
        self._metrics: Any = None
        if metrics is None:
            metrics = importlib.util.find_spec("prometheus_client") is not None
        if metrics:
            from ..metrics import ServerMetrics

            self._metrics = ServerMetrics([(m.name, m.model) for m in served])

    @property
    def models(self) -> list[ServedModel]:
        """Return every served model."""
        return [s for group in self._served.values() for s in group]

    def _check_versions(self) -> None:
        for name, group in self._served.items():
            versions = [s.version for s in group]
            if len(set(versions)) != len(versions):
                raise ConfigurationError(f"model {name!r} has the same version twice: {versions}")
            if len({id(s.model) for s in group}) != len(group):
                raise ConfigurationError(f"model {name!r} lists one BatchedModel twice")

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self) -> Any:
        """Run every model's engine in the current event loop for the duration of the block."""
        async with AsyncExitStack() as stack:
            for served in self.models:
                await stack.enter_async_context(served.model)
            self._running, self._stopping = True, False
            try:
                yield self
            finally:
                self._stopping = True
                self._running = False

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            context = self.lifespan()
            await context.__aenter__()
        except Exception as exc:
            logger.exception("batchkit: the models failed to start")
            await send(
                {"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"}
            )
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        try:
            self._stopping = True
            await context.__aexit__(None, None, None)
        except Exception as exc:
            logger.exception("batchkit: the models failed to stop")
            await send(
                {"type": "lifespan.shutdown.failed", "message": f"{type(exc).__name__}: {exc}"}
            )
            return
        await send({"type": "lifespan.shutdown.complete"})

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # websocket: not ours
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        root = scope.get("root_path", "").rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :]
        start = time.perf_counter()
        try:
            response = await self._route(scope, receive, path.strip("/").split("/"))
        except HTTPError as exc:
            response = _error(exc.status, exc.message, exc.headers)
            response.model, response.version = exc.model, exc.version
        except Exception:
            logger.exception("batchkit: internal error serving %s %s", scope["method"], path)
            response = _error(500, "internal server error; the server log has the details")
        await response.send(send)
        if self._metrics is not None and response.model is not None:
            self._metrics.observe_request(
                response.model, response.version, response.status, time.perf_counter() - start
            )

    async def _route(self, scope: Scope, receive: Receive, parts: list[str]) -> _Response:
        method = scope["method"]
        if parts[0] == "metrics" and len(parts) == 1:
            _allow(method, "GET")
            return self._metrics_response()
        if parts[0] != "v2":
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        rest = parts[1:]
        if not rest:
            _allow(method, "GET")
            return _json(200, self._server_metadata())
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _allow(method, "GET")
            if rest[1] == "ready" and self._stopping:
                raise HTTPError("the server is shutting down", status=503)
            return _Response(200, _JSON, b"")
        if rest[0] == "models" and len(rest) >= 2:
            return await self._model_route(scope, receive, rest[1:])
        if rest[0] == "repository":
            return await self._repository_route(scope, receive, rest[1:])
        raise HTTPError(f"no route {scope['path']!r}", status=404)

    async def _model_route(self, scope: Scope, receive: Receive, parts: list[str]) -> _Response:
        name, version, action = parts[0], None, ""
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "config", "infer")):
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        action = rest[0] if rest else ""
        method = scope["method"]
        _allow(method, "POST" if action == "infer" else "GET")
        served = self._find(name, version)
        if action == "infer":
            try:
                return await self._infer(served, scope, receive)
            except HTTPError as exc:
                # counted in the model's request metrics
                exc.model, exc.version = served.name, served.version
                raise
        if name in self._unloaded:
            # ready answers "not ready"; metadata, config and infer: no such model (as Triton)
            raise HTTPError(f"model {name!r} is unloaded", status=503 if action == "ready" else 404)
        if action == "ready":
            return _Response(200, _JSON, b"")
        if action == "config":
            return _json(200, served.config())
        return _json(200, served.metadata(self._versions(name)))

    def _versions(self, name: str) -> list[str]:
        return sorted((s.version for s in self._served[name]), key=_version_key)

    def _find(self, name: str, version: str | None) -> ServedModel:
        group = self._served.get(name)
        if group is None:
            raise HTTPError(f"unknown model {name!r}; serving {sorted(self._served)}", status=404)
        if version is None or version == "":
            return max(group, key=lambda s: _version_key(s.version))
        for served in group:
            if served.version == version:
                return served
        versions = self._versions(name)
        raise HTTPError(f"model {name!r} has no version {version!r}; it has {versions}", status=404)

    def _server_metadata(self) -> dict[str, Any]:
        extensions = [
            "binary_tensor_data",
            "classification",
            "model_configuration",
            "schedule_policy",
        ]
        if self._admin_token is not None:
            extensions.append("model_repository")
        return {"name": "batchkit", "version": __version__, "extensions": extensions}

    # -- infer ---------------------------------------------------------------------------------

    async def _infer(self, served: ServedModel, scope: Scope, receive: Receive) -> _Response:
        if served.name in self._unloaded:
            raise HTTPError(f"model {served.name!r} is unloaded", status=404, headers={})
        headers = _headers(scope)
        body = await self._body(receive, headers)
        header_length = headers.get("inference-header-content-length")
        if len(body) > OFFLOAD_BYTES:
            request = await anyio.to_thread.run_sync(parse_request, served, body, header_length)
        else:
            request = parse_request(served, body, header_length)
        model = served.model
        items = served.items(request.arrays, request.rows)
        try:
            results = await model.call_many_nowait_versioned(
                items, priority=request.priority, timeout=request.timeout
            )
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
            raise _remote_error(served.name, exc) from None
        except ModelError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            logger.error("batchkit: model %r failed", served.name, exc_info=exc)
            raise HTTPError(
                f"model {served.name!r} failed on this request ({type(cause).__name__}); "
                "the server log has the details",
                status=500,
            ) from None
        except Exception as exc:  # the model's own error for one row
            logger.error("batchkit: model %r failed on a row", served.name, exc_info=exc)
            raise HTTPError(
                f"model {served.name!r} failed on a row of this request ({type(exc).__name__}); "
                "the server log has the details",
                status=500,
            ) from None
        try:
            arrays = served.outputs_of(
                [r.value for r in results], [o.tensor for o in request.outputs]
            )
        except (TypeError, ValueError) as exc:
            logger.error("batchkit: model %r returned a bad output: %s", served.name, exc)
            raise HTTPError(
                f"model {served.name!r} returned an output that does not fit its signature: {exc}",
                status=500,
            ) from None
        version = results[0].version
        versions = [r.version for r in results]
        mixed = versions if any(v != version for v in versions) else None
        size = _output_bytes(arrays)
        encoding = _accepted_encoding(headers.get("accept-encoding"), small=size < COMPRESS_BYTES)
        job = (served.name, version, request, arrays, mixed, encoding)
        if size > OFFLOAD_BYTES:
            body, header_size = await anyio.to_thread.run_sync(_encode, *job)
        else:
            body, header_size = _encode(*job)
        response_headers = list(_JSON if header_size is None else _OCTETS)
        if header_size is not None:
            response_headers.append((b"inference-header-content-length", str(header_size).encode()))
        if encoding is not None:
            response_headers.append((b"content-encoding", encoding.encode()))
        return _Response(200, response_headers, body, served.name, version)

    async def _body(self, receive: Receive, headers: Mapping[str, str]) -> bytes:
        limit = self.max_body_size
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(
                f"the body has {declared} bytes, more than the {limit} allowed", status=413
            )
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
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("identity", ""):
            return body
        if encoding not in ("gzip", "deflate"):
            raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
        if len(body) > _OFFLOAD_COMPRESSED:
            return await anyio.to_thread.run_sync(_decompress, body, encoding, limit)
        return _decompress(body, encoding, limit)

    # -- metrics -------------------------------------------------------------------------------

    def _metrics_response(self) -> _Response:
        if self._metrics is None:
            raise HTTPError("metrics are disabled", status=404)
        body, content_type = self._metrics.render()
        return _Response(200, [(b"content-type", content_type.encode())], body)

    # -- model repository (admin) --------------------------------------------------------------

    async def _repository_route(
        self, scope: Scope, receive: Receive, parts: list[str]
    ) -> _Response:
        method = scope["method"]
        if parts == ["index"] or (
            len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload")
        ):
            _allow(method, "POST")
        else:
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        headers = _headers(scope)
        self._authorize(headers)
        body = await self._body(receive, headers)
        request = _json_object(body)
        if parts == ["index"]:
            return _json(200, self._index(request))
        name = parts[1]
        if name not in self._served:
            raise HTTPError(f"unknown model {name!r}; serving {sorted(self._served)}", status=404)
        if parts[2] == "unload":
            self._unloaded.add(name)
            logger.info("batchkit: model %r unloaded", name)
            return _Response(200, _JSON, b"")
        await self._load(name, request)
        return _Response(200, _JSON, b"")

    def _authorize(self, headers: Mapping[str, str]) -> None:
        token = self._admin_token
        if token is None:
            raise HTTPError(
                "the model repository API is disabled; configure an admin token to enable it",
                status=403,
            )
        given = headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            raise HTTPError(
                "the model repository API needs 'Authorization: Bearer <admin token>'",
                status=401,
                headers={"www-authenticate": "Bearer"},
            )

    def _index(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        ready_only = request.get("ready", False) is True
        index = []
        for served in self.models:
            unloaded = served.name in self._unloaded
            if ready_only and unloaded:
                continue
            entry = {
                "name": served.name,
                "version": served.version,
                "state": "UNAVAILABLE" if unloaded else "READY",
            }
            if unloaded:
                entry["reason"] = "unloaded"
            index.append(entry)
        return index

    async def _load(self, name: str, request: dict[str, Any]) -> None:
        params = request.get("parameters", {})
        if not isinstance(params, dict):
            raise BadRequest(f"'parameters' must be a JSON object, got {params!r}")
        weights, version = params.get("weights"), params.get("version")
        if weights is None:
            if version is not None:
                raise BadRequest("'version' needs 'weights' (the file to load it from)")
            self._unloaded.discard(name)  # load again what was unloaded
            logger.info("batchkit: model %r loaded", name)
            return
        if not isinstance(weights, str) or not isinstance(version, str) or not version:
            raise BadRequest(
                "'weights' (a path inside the weights directory) and 'version' (a non-empty "
                f"string) must be strings, got weights={weights!r}, version={version!r}"
            )
        if "\x00" in weights or "\x00" in version or "/" in version:
            raise BadRequest(
                "'weights' may not hold a NUL byte, nor 'version' a NUL byte or '/', got "
                f"weights={weights!r}, version={version!r}"
            )
        served = self._find(name, params.get("replace"))
        if any(s.version == version for s in self._served[name]):
            raise HTTPError(f"model {name!r} already serves version {version!r}", status=409)
        path = self._weights_path(weights)
        try:
            await served.model.swap(path, version=version)
        except ForbiddenPath as exc:
            raise HTTPError(str(exc), status=403) from None
        except SwapError as exc:
            raise HTTPError(
                f"loading version {version!r} of {name!r} failed: {exc}", status=400
            ) from None
        self._unloaded.discard(name)
        logger.info("batchkit: model %r now serves version %r", name, version)

    def _weights_path(self, weights: str) -> str:
        root = self._weights_dir
        if root is None:
            raise HTTPError(
                "loading weights needs a weights directory configured on the server", status=403
            )
        path = os.path.realpath(os.path.join(root, weights))
        if os.path.commonpath([root, path]) != root:
            raise HTTPError(
                f"the weights path {weights!r} is outside the weights directory", status=403
            )
        return path


class _Response:
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


def _remote_error(name: str, exc: RemoteError) -> HTTPError:
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


def _json(status: int, payload: Any) -> _Response:
    return _Response(status, _JSON, json.dumps(payload, separators=(",", ":")).encode())


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> _Response:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return _Response(status, [*_JSON, *extra], json.dumps({"error": message}).encode())


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HTTPError(
            f"method {method} is not allowed here; use {allowed}",
            status=405,
            headers={"allow": allowed},
        )


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _encode(
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


def _json_object(body: bytes) -> dict[str, Any]:
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


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a gzip (every member, as ``gzip.decompress``) or deflate (zlib) body.

    Raises ``BadRequest`` for bad, truncated or trailing data, 413 past ``limit`` bytes.
    """
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size, rest = 0, body
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            data = decompressor.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None
        size += len(data)
        if size > limit or decompressor.unconsumed_tail:
            raise HTTPError(
                f"the decompressed body is more than the {limit} bytes allowed", status=413
            )
        if not decompressor.eof:
            raise BadRequest(f"the {encoding} body is truncated")
        parts.append(data)
        rest = decompressor.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if encoding != "gzip" or not rest.startswith(b"\x1f\x8b"):
            raise BadRequest(
                f"the {encoding} body has {len(rest)} bytes after the compressed data"
            )


def _accepted_encoding(header: str | None, *, small: bool = False) -> str | None:
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


def _version_key(version: str) -> tuple[int, int, str]:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)
