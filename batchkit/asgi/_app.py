"""``KServeApp``: the ASGI callable that serves batched models over the KServe v2 protocol."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from functools import partial
from typing import Any

import anyio

from .._core import (
    BatchedModel,
    ConfigurationError,
    Deployment,
    FailureLog,
    observe_batches,
    request_context,
)
from .._version import __version__
from ._access import access_line, context_of, response_headers
from ._budget import MemoryBudget
from ._disconnect import ClientDisconnected, Waits
from ._errors import HTTPError
from ._gateway import Admitted, Gateway, OnStoreError, build_gateway, credential_of
from ._http import (
    JSON,
    ASGIApp,
    Receive,
    Response,
    Scope,
    Send,
    allow,
    error_response,
    headers_of,
    json_response,
)
from ._infer import infer
from ._model_repository import ModelRepository
from ._repository import Repository
from ._routing import RoutingAdmin, pinned, routed_versions, with_key
from ._served import ServedModel
from ._stats import model_stats, record_histograms
from ._tracing import Tracer

__all__ = (
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_INFLIGHT_BYTES",
    "ASGIApp",
    "KServeApp",
    "Receive",
    "Scope",
    "Send",
)

DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BYTES = 1024 * 1024 * 1024

logger = logging.getLogger("batchkit.asgi")

# The status an access line gives a request whose client went away before its response (the
# convention nginx set); nothing is sent.
CLIENT_GONE = 499


class KServeApp:
    """An ASGI app serving batched models over the KServe v2 protocol, as Triton speaks it.

    ``models``: ``ServedModel`` objects, or plain ``BatchedModel`` (or ``Deployment``) objects
    (served with the default signature: one FP32 vector ``INPUT0`` in, one FP32 vector
    ``OUTPUT0`` out). Several models may share a name with different versions. A
    ``Deployment`` serves its versions under one name (see docs/versions.md); the admin token
    also enables its routing endpoints (``/v2/routing``). Or a ``ModelRepository``: the models
    of a folder of model files, loaded by the app's lifespan, whose repository endpoints then
    (re)load and unload them from the folder.

    - ``max_body_size``: bytes an infer body may hold, after decompression (413 beyond).
    - ``max_inflight_bytes``: bytes of memory that all requests together may hold while their
      bodies are read, decompressed, parsed and decoded, and until they are answered (each
      request's share is charged as it goes, from a scan of its bytes before anything is
      built); a request that does not fit now is a 503 with Retry-After, one that could never
      fit a 413. ``app.budget.used`` and ``app.budget.peak`` report the bytes charged now and
      at most. See docs/serving.md for the server's worst-case memory.
    - ``metrics``: serve Prometheus metrics at ``/metrics`` (needs ``prometheus-client``;
      None, the default, serves them when it is installed).
    - ``admin_token``: enables the model repository endpoints (load a new version, unload),
      which then require ``Authorization: Bearer <admin_token>``.
    - ``weights_dir``: the directory that weight paths given to the load endpoint are
      relative to, and must stay inside.
    - ``api_keys``: a keys file (see docs/security.md): every request but the health checks
      then needs a key, as ``Authorization: Bearer <key>`` or ``X-API-Key``; metadata,
      config and ``/metrics`` too with ``protect_metadata``. ``rate_limit`` (``"100/s"``) is
      the default limit per key (keys may set their own; ``rate_limit_burst`` sets the
      burst), counted in rows with ``rate_limit_rows``, kept in ``rate_limit_store``
      (``"memory"``, the default, or a ``redis://`` URL shared by replicas); when that store
      fails, ``rate_limit_on_error`` lets requests through (``"open"``) or refuses them
      (``"closed"``). Or pass a ready ``gateway``.
    - ``access_log``: log one line per request to the ``batchkit.access`` logger (INFO).
    - ``tracing``: an OpenTelemetry span per request: True for the global tracer provider, or
      a ``TracerProvider`` (needs ``opentelemetry-api``: ``pip install 'batchkit[otel]'``).

    Each request's id (``X-Request-ID``, else the infer body's ``id``, else generated) and W3C
    trace context (``traceparent``) are given back in the response and carried by every log
    line written while it is served (see docs/operations.md).

    The app's lifespan runs every model's engine in the server's event loop (``async with``).
    When it is mounted in another app that does not forward lifespan events, enter
    ``app.lifespan()`` from the host's lifespan instead. Raises ``ConfigurationError`` for
    duplicate model versions or bad settings.
    """

    def __init__(
        self,
        models: Iterable[ServedModel | BatchedModel[Any, Any] | Deployment[Any, Any]]
        | ServedModel
        | BatchedModel[Any, Any]
        | Deployment[Any, Any]
        | ModelRepository,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        metrics: bool | None = None,
        admin_token: str | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
        api_keys: str | os.PathLike[str] | None = None,
        rate_limit: str | None = None,
        rate_limit_burst: float | None = None,
        rate_limit_rows: bool = False,
        rate_limit_store: str = "memory",
        rate_limit_on_error: OnStoreError = "open",
        protect_metadata: bool = False,
        gateway: Gateway | None = None,
        access_log: bool = True,
        tracing: Any = False,
    ) -> None:
        self._model_repository = models if isinstance(models, ModelRepository) else None
        if isinstance(models, (ServedModel, BatchedModel, Deployment)):
            models = [models]
        served = (
            []
            if isinstance(models, ModelRepository)
            else [m if isinstance(m, ServedModel) else ServedModel(m) for m in models]
        )
        if not served and self._model_repository is None:
            raise ConfigurationError("KServeApp needs at least one model")
        if (
            isinstance(max_body_size, bool)
            or not isinstance(max_body_size, int)
            or max_body_size < 1
        ):
            raise ConfigurationError(f"max_body_size must be an int >= 1, got {max_body_size!r}")
        if (
            isinstance(max_inflight_bytes, bool)
            or not isinstance(max_inflight_bytes, int)
            or max_inflight_bytes < 1
        ):
            raise ConfigurationError(
                f"max_inflight_bytes must be an int >= 1, got {max_inflight_bytes!r}"
            )
        if admin_token is not None and (not isinstance(admin_token, str) or not admin_token):
            raise ConfigurationError("admin_token must be a non-empty string or None")
        self._served: dict[str, list[ServedModel]] = (
            {} if self._model_repository is None else self._model_repository.served
        )
        for s in served:
            self._served.setdefault(s.name, []).append(s)
        self._check_versions()
        self.max_body_size = max_body_size
        self.budget = MemoryBudget(max_inflight_bytes)
        self._repository = Repository(
            self._served,
            self._find,
            admin_token=admin_token,
            weights_dir=weights_dir,
            max_body_size=max_body_size,
            model_repository=self._model_repository,
            budget=self.budget,
        )
        self._routing = RoutingAdmin(
            self._served, self._repository._authorize, max_body_size, self.budget
        )
        self.gateway = gateway
        if gateway is None and (api_keys is not None or rate_limit is not None):
            self.gateway = build_gateway(
                api_keys=api_keys,
                rate_limit=rate_limit,
                burst=rate_limit_burst,
                rows=rate_limit_rows,
                store=rate_limit_store,
                on_store_error=rate_limit_on_error,
                protect_metadata=protect_metadata,
            )
        self._running = False
        self._stopping = False
        self._cold: set[ServedModel] = set()  # models whose warm-up has not run yet
        self.access_log = access_log
        self._tracer = None if tracing is False else Tracer(None if tracing is True else tracing)
        if access_log or self._tracer is not None:
            observe_batches()  # queue and compute times per request, batch spans
        self._waits = Waits()
        self._failures = FailureLog(logger)
        self._last_inference: dict[tuple[str, str], int] = {}
        self._metrics: Any = None
        if metrics is None:
            metrics = importlib.util.find_spec("prometheus_client") is not None
        if metrics:
            from ..metrics import ServerMetrics

            if self._model_repository is None:
                self._metrics = ServerMetrics([(m.name, m.model) for m in served])
            else:  # its models come and go: read them per scrape
                self._metrics = ServerMetrics(lambda: [(m.name, m.model) for m in self.models])
            if self.gateway is not None:
                gate = self.gateway
                self._metrics.add_gateway(lambda: (dict(gate.counts), gate.store_errors))
        for s in served:  # after the metrics, which choose their own bounds
            record_histograms(s)

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
            if self._model_repository is not None:
                await stack.enter_async_context(self._model_repository.running())
            for served in self.models if self._model_repository is None else ():
                await stack.enter_async_context(served.model)
                record_histograms(served)
            if self.gateway is not None:
                stack.push_async_callback(self.gateway.aclose)
            self._running, self._stopping = True, False
            self._waits = Waits()
            self._cold = {s for s in self.models if s.warmup}
            try:
                async with anyio.create_task_group() as tg:
                    for served in self._cold:
                        tg.start_soon(self._warm_up, served)
                    try:
                        yield self
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                self._stopping = True
                self._running = False

    async def _warm_up(self, served: ServedModel) -> None:
        start = time.perf_counter()
        try:
            await served.model.call_many(served.warmup)
        except Exception as exc:
            self._failures.report(served.name, exc, version=served.version)
            logger.error(
                "batchkit: model %r failed its warm-up: it stays not ready (503)", served.name
            )
            return
        self._cold.discard(served)
        logger.info(
            "batchkit: model %r version %s warmed up (%d items, %.3f s): ready",
            served.name,
            served.version,
            len(served.warmup),
            time.perf_counter() - start,
        )

    async def _lifespan(self, receive: Receive, send: Send, context: Any = None) -> None:
        """Answer the ASGI lifespan protocol by entering ``context`` (default: ``lifespan()``)."""
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            if context is None:
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

    def start_draining(self) -> None:
        """Turn readiness to 503 so that load balancers stop sending; requests are still
        served (the server's SIGTERM handling calls this before its drain delay)."""
        self._stopping = True  # only this: a signal handler may call it

    def abort_waits(self) -> int:
        """Fail every infer request still waiting for the model with 503 (the server's
        shutdown timeout passed), and those that come later; return how many were waiting."""
        self._stopping = True
        return self._waits.abort()

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
        method: str = scope["method"]
        root = scope.get("root_path", "").rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :]
        start = time.perf_counter()
        parts = path.strip("/").split("/")
        admitted = None
        ctx = context_of(headers_of(scope))
        spanned = nullcontext() if self._tracer is None else self._tracer.span(ctx, method, path)
        with request_context(ctx), spanned as span:
            try:
                if self.gateway is not None:
                    admitted, scope = await self._gate(scope, parts)
                response = await self._route(scope, receive, parts)
            except HTTPError as exc:
                response = error_response(exc.status, exc.message, exc.headers)
                response.model, response.version = exc.model, exc.version
            except ClientDisconnected:
                response = Response(CLIENT_GONE, [], b"")
            except Exception:
                logger.exception("batchkit: internal error serving %s %s", method, path)
                response = error_response(
                    500, "internal server error; the server log has the details"
                )
            if admitted is not None and admitted.headers and response.status < 400:
                extra = [(k.encode(), v.encode()) for k, v in admitted.headers.items()]
                response.headers = [*response.headers, *extra]
            if response.status != CLIENT_GONE:
                response.headers = [*response.headers, *response_headers(ctx)]
                await response.send(send)
            elapsed = time.perf_counter() - start
            if span is not None:
                assert self._tracer is not None
                self._tracer.finish(span, ctx, response.status, response.model, response.version)
            if response.model is not None and response.status == 200:
                self._last_inference[(response.model, response.version or "")] = int(
                    time.time() * 1000
                )
            if self.access_log:
                access_line(
                    ctx,
                    method,
                    scope["path"],
                    response.status,
                    response.model,
                    response.version,
                    elapsed,
                )
        if self._metrics is not None and response.model is not None:
            self._metrics.observe_request(
                response.model, response.version, response.status, elapsed
            )

    async def _gate(self, scope: Scope, parts: list[str]) -> tuple[Admitted | None, Scope]:
        """Check the caller's key and limit for the route ``parts``; return what was admitted
        (None for open routes) and the scope to route with."""
        gateway = self.gateway
        assert gateway is not None
        open_route = (  # health checks, and the admin endpoints (the admin token guards those)
            parts[:2] == ["v2", "health"]
            or (parts[:2] == ["v2", "models"] and parts[-1] == "ready")
            or parts[:2] in (["v2", "repository"], ["v2", "routing"], ["v2", "gateway"])
        )
        infer = parts[:2] == ["v2", "models"] and parts[-1] == "infer" and len(parts) >= 4
        if open_route or (not infer and not gateway.protect_metadata):
            return None, scope
        authorization = api_key = None
        for name, value in scope["headers"]:  # the two it reads, not a dict of every header
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
        key = gateway.authenticate(credential_of(authorization, api_key))
        if not infer:
            return Admitted(key, {}), scope
        if gateway.rows:  # the infer code spends the rows once it has parsed them
            return None, {**scope, "batchkit_admit": partial(gateway.admit, key)}
        return await gateway.admit(key), scope

    async def _gateway_route(self, scope: Scope, receive: Receive, parts: list[str]) -> Response:
        if parts != ["reload"]:
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        allow(scope["method"], "POST")
        self._repository._authorize(headers_of(scope))
        gateway = self.gateway
        if gateway is None or gateway.keys is None:
            raise HTTPError("no API keys file is configured", status=404)
        try:
            count = gateway.keys.reload()
        except ConfigurationError as exc:
            raise HTTPError(f"the keys file was not reloaded: {exc}", status=400) from None
        return json_response(200, {"keys": count})

    async def _route(self, scope: Scope, receive: Receive, parts: list[str]) -> Response:
        method = scope["method"]
        if parts[0] == "metrics" and len(parts) == 1:
            allow(method, "GET")
            return self._metrics_response()
        if parts[0] != "v2":
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        rest = parts[1:]
        if not rest:
            allow(method, "GET")
            return json_response(200, self._server_metadata())
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            allow(method, "GET")
            if rest[1] == "ready" and self._stopping:
                raise HTTPError("the server is shutting down", status=503)
            if rest[1] == "ready" and self._cold:
                names = sorted({s.name for s in self._cold})
                raise HTTPError(f"models {names} are warming up", status=503)
            return Response(200, JSON, b"")
        if rest[0] == "models" and len(rest) >= 2:
            return await self._model_route(scope, receive, rest[1:])
        if rest[0] == "repository":
            return await self._repository.route(scope, receive, rest[1:])
        if rest[0] == "routing":
            return await self._routing.route(scope, receive, rest[1:])
        if rest[0] == "gateway":
            return await self._gateway_route(scope, receive, rest[1:])
        raise HTTPError(f"no route {scope['path']!r}", status=404)

    async def _model_route(self, scope: Scope, receive: Receive, parts: list[str]) -> Response:
        if parts == ["stats"] and "stats" not in self._served:
            allow(scope["method"], "GET")
            return json_response(200, {"model_stats": self._stats(self.models)})
        name, version, action = parts[0], None, ""
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "config", "infer", "stats")):
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        action = rest[0] if rest else ""
        method = scope["method"]
        allow(method, "POST" if action == "infer" else "GET")
        if action == "stats":
            group = self._served.get(name, [])
            chosen = group if version is None else [self._find(name, version)]
            if not chosen:
                self._find(name, version)  # 404, naming the models served
            return json_response(200, {"model_stats": self._stats(chosen)})
        served = self._find(name, version)
        if action == "infer":
            served = with_key(served, scope)
            try:
                if name in self._repository.unloaded:
                    raise HTTPError(f"model {name!r} is unloaded", status=404, headers={})
                return await infer(
                    served,
                    scope,
                    receive,
                    self.max_body_size,
                    self.budget,
                    waits=self._waits,
                    failures=self._failures,
                )
            except HTTPError as exc:
                # counted in the model's request metrics
                exc.model, exc.version = served.name, served.version
                raise
        if name in self._repository.unloaded:
            # ready answers "not ready"; metadata, config and infer: no such model (as Triton)
            raise HTTPError(f"model {name!r} is unloaded", status=503 if action == "ready" else 404)
        if action == "ready":
            repository = self._model_repository
            if repository is not None and not repository.is_ready(name):
                raise HTTPError(
                    f"model {name!r} is not ready; the repository index has its error", status=503
                )
            if served in self._cold:
                raise HTTPError(f"model {name!r} is warming up", status=503)
            return Response(200, JSON, b"")
        if action == "config":
            return json_response(200, served.config())
        return json_response(200, served.metadata(self._versions(name)))

    def _stats(self, models: list[ServedModel]) -> list[dict[str, Any]]:
        for s in models:
            record_histograms(s)  # a model loaded since: counted from now on
        return [
            model_stats(s, self._last_inference.get((s.name, s.version), 0))
            for s in sorted(models, key=lambda s: (s.name, _version_key(s.version)))
        ]

    def _versions(self, name: str) -> list[str]:
        group = self._served[name]
        versions = {s.version for s in group} | set(routed_versions(group))
        return sorted(versions, key=_version_key)

    def _find(self, name: str, version: str | None) -> ServedModel:
        group = self._served.get(name)
        if group is None:
            raise HTTPError(f"unknown model {name!r}; serving {sorted(self._served)}", status=404)
        if version is None or version == "":
            return max(group, key=lambda s: _version_key(s.version))
        routed = pinned(group, version)  # a deployment's version, even its primary one
        if routed is not None:
            return routed
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
            "statistics",
        ]
        if self._repository.admin_token is not None:
            extensions.append("model_repository")
        return {"name": "batchkit", "version": __version__, "extensions": extensions}

    # -- metrics -------------------------------------------------------------------------------

    def _metrics_response(self) -> Response:
        if self._metrics is None:
            raise HTTPError("metrics are disabled", status=404)
        body, content_type = self._metrics.render()
        return Response(200, [(b"content-type", content_type.encode())], body)


def _version_key(version: str) -> tuple[int, int, str, str]:
    # Versions of ASCII digits sort as numbers (by length without leading zeros, then text: no
    # int(), which refuses thousands of digits), after every other version. Not str.isdigit:
    # it accepts '²', which int() refuses.
    if version.isascii() and version.isdigit():
        digits = version.lstrip("0")
        return (1, len(digits), digits, version)
    return (0, 0, "", version)
