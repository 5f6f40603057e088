"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService`` beside the HTTP app.

The service is the generated code of Triton's own proto, as ``tritonclient[grpc]`` ships it
(``service_pb2``, ``service_pb2_grpc``, ``model_config_pb2``), served by ``grpc.aio`` in the
event loop of a ``KServeApp``, over the same served models and engines. Requests go through the
same code as HTTP (``_grpc_tensors`` over ``_protocol`` and ``_tensors``; ``_infer.run_request``
for the call and its errors); an ``HTTPError`` becomes the gRPC status of ``GRPC_CODES`` with the
same message. Also serves the standard ``grpc.health.v1`` service.

Imports grpc, grpc_health and tritonclient: only ``open_grpc_server`` loads this module.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

try:
    import grpc
    from google.protobuf import json_format
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "serving gRPC needs grpcio, grpcio-health-checking and tritonclient[grpc]: "
        "pip install 'batchkit[server]'"
    ) from exc

import anyio.to_thread

from .._core import ConfigurationError, DeploymentStatistics
from ._errors import HTTPError
from ._gateway import credential_of
from ._grpc_tensors import encode_infer_response, parse_infer_request
from ._infer import OFFLOAD_BYTES, run_request
from ._routing import ROUTING_KEY_HEADER, routed_by_key
from ._served import ServedModel

__all__ = ("GRPC_CODES", "GRPCServer", "SERVICE_NAME", "open_grpc_server")

logger = logging.getLogger("batchkit.asgi")

SERVICE_NAME = "inference.GRPCInferenceService"

# The gRPC status of each HTTP status the shared code raises (Triton's mapping).
GRPC_CODES: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_INTERNAL = "internal server error; the server log has the details"
_ONE_MORE = object()  # on a stream's queue of answers: one more request to answer


@dataclass(frozen=True)
class GRPCServer:
    """A running gRPC server: where it listens, and its limit on one message."""

    host: str
    port: int
    max_message_size: int

    @property
    def address(self) -> str:
        """Return ``host:port`` (``[host]:port`` for IPv6), as ``tritonclient.grpc`` takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@asynccontextmanager
async def open_grpc_server(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_size: int | None = None,
    grace: float = 5.0,
    credentials: Any = None,
) -> AsyncIterator[GRPCServer]:
    """Serve ``app``'s models over gRPC in the running asyncio loop while the block runs.

    ``app`` is a ``KServeApp``; its engines run for the block unless its lifespan already runs
    them (under an ASGI server, or ``app.lifespan()``). ``port`` 0 picks a free port: read
    ``server.port``. ``max_message_size`` bounds a request and a response in bytes (default:
    the app's ``max_body_size``). On exit, RPCs in flight get ``grace`` seconds to finish.
    ``credentials`` (``grpc.ssl_server_credentials(...)``) serves TLS; None serves plaintext.

    Raises ``ConfigurationError`` for bad settings, ``RuntimeError`` outside asyncio (grpc.aio
    runs only on asyncio), ``OSError`` when the address cannot be bound.
    """
    from ._app import KServeApp

    if not isinstance(app, KServeApp):
        raise ConfigurationError(f"gRPC serves a KServeApp, got {app!r}")
    size = app.max_body_size if max_message_size is None else max_message_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < 2**31:
        raise ConfigurationError(
            f"max_message_size must be an int in [1, 2**31), got {max_message_size!r}"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigurationError(f"the gRPC port must be an int in [0, 65536), got {port!r}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("gRPC (grpc.aio) runs only on asyncio, not on this event loop") from None
    async with AsyncExitStack() as stack:
        if not app._running:
            await stack.enter_async_context(app.lifespan())
        options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        health_servicer = health.aio.HealthServicer()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(app, size), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if credentials is None:
                bound = server.add_insecure_port(target)
            else:
                bound = server.add_secure_port(target, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot serve gRPC on {target}: {exc}") from None
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("batchkit: serving gRPC on %s", target.rsplit(":", 1)[0] + f":{bound}")
        try:
            yield GRPCServer(host, bound, size)
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace)


class _Abort(Exception):
    """An RPC's failure: its gRPC status, message and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, message: str, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, metadata


def _abort_of(exc: HTTPError) -> _Abort:
    code = GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL)
    # Its headers (Retry-After, the gateway's RateLimit-*) go as trailing metadata.
    return _Abort(code, exc.message, tuple((k.lower(), v) for k, v in exc.headers.items()))


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Triton's GRPCInferenceService over a ``KServeApp``'s models."""

    def __init__(self, app: Any, max_message_size: int) -> None:
        self._app = app
        self._max = max_message_size

    async def _run(self, context: Any, what: str, job: Any) -> Any:
        """Await ``job``; answer an ``HTTPError`` with its gRPC status and message."""
        try:
            return await job
        except HTTPError as exc:
            failure = _abort_of(exc)
        except _Abort as exc:
            failure = exc
        except Exception:
            logger.exception("batchkit: internal error serving gRPC %s", what)
            failure = _Abort(grpc.StatusCode.INTERNAL, _INTERNAL)
        await context.abort(failure.code, failure.message, failure.metadata)

    # -- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._app._running and not self._app._stopping)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        app = self._app
        try:
            app._find(request.name, request.version)
        except HTTPError:
            return pb.ModelReadyResponse(ready=False)
        repository = app._model_repository
        ready = (
            app._running
            and request.name not in app._repository.unloaded
            and (repository is None or repository.is_ready(request.name))
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._check_metadata_access(context)
            return json_format.ParseDict(self._app._server_metadata(), pb.ServerMetadataResponse())

        return await self._run(context, "ServerMetadata", job())

    def _loaded(self, name: str, version: str) -> ServedModel:
        served: ServedModel = self._app._find(name, version)
        if name in self._app._repository.unloaded:
            raise HTTPError(f"model {name!r} is unloaded", status=404)
        return served

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._check_metadata_access(context)
            served = self._loaded(request.name, request.version)
            metadata = served.metadata(self._app._versions(served.name))
            return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

        return await self._run(context, "ModelMetadata", job())

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._check_metadata_access(context)
            served = self._loaded(request.name, request.version)
            config = served.config()
            if not served.version.isdigit():  # Triton's versions are numbers (int64)
                config["version_policy"] = {"latest": {"num_versions": 1}}
            # ignore_unknown_fields: the JSON also has what the proto has not (outputs' format)
            config = json_format.ParseDict(config, mc.ModelConfig(), ignore_unknown_fields=True)
            return pb.ModelConfigResponse(config=config)

        return await self._run(context, "ModelConfig", job())

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._check_metadata_access(context)
            if request.name:
                models = [self._app._find(request.name, request.version)]
            else:
                models = self._app.models
            return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in models])

        return await self._run(context, "ModelStatistics", job())

    # -- inference -----------------------------------------------------------------------------

    def _caller(self, meta: Mapping[str, str]) -> Any:
        """Return the caller's API key (None without a gateway or keys); raise the gateway's
        ``GatewayError`` (UNAUTHENTICATED, PERMISSION_DENIED) for a missing or bad one."""
        gateway = self._app.gateway
        if gateway is None:
            return None
        return gateway.authenticate(credential_of(meta.get("authorization"), meta.get("x-api-key")))

    def _check_metadata_access(self, context: Any) -> None:
        gateway = self._app.gateway
        if gateway is not None and gateway.protect_metadata:
            self._caller(_metadata(context))

    async def _infer(self, request: Any, key: str | None, meta: Mapping[str, str]) -> Any:
        """Answer one infer request; ``key`` is the call's routing key (for a deployment),
        ``meta`` its metadata (the gateway reads the API key there)."""
        app = self._app
        start = time.perf_counter()
        served: ServedModel | None = None
        gateway = app.gateway
        try:
            caller = self._caller(meta)
            if gateway is not None and not gateway.rows:  # before any parsing
                await gateway.admit(caller)
            served = routed_by_key(app._find(request.model_name, request.model_version), key)
            if served.name in app._repository.unloaded:
                raise HTTPError(f"model {served.name!r} is unloaded", status=404)
            big = sum(len(r) for r in request.raw_input_contents) > OFFLOAD_BYTES
            if big:
                parsed = await anyio.to_thread.run_sync(parse_infer_request, served, request)
            else:
                parsed = parse_infer_request(served, request)
            if gateway is not None and gateway.rows:  # the rows, before any is queued
                await gateway.admit(caller, parsed.rows)
            arrays, version, mixed = await run_request(served, parsed)
            job = (pb, served.name, version, parsed, arrays, mixed)
            if big or sum(a.nbytes for a in arrays.values()) > OFFLOAD_BYTES:
                response = await anyio.to_thread.run_sync(encode_infer_response, *job)
            else:
                response = encode_infer_response(*job)
            size = response.ByteSize()
            if size > self._max:
                raise HTTPError(
                    f"model {served.name!r}: the response holds {size} bytes, more than the "
                    f"server's max message size of {self._max} bytes",
                    status=413,
                )
        except HTTPError as exc:
            if served is not None:
                exc.model, exc.version = served.name, served.version
            self._observe(exc.model, exc.version, exc.status, start)
            raise
        self._observe(served.name, version, 200, start)
        return response

    def _observe(self, model: str | None, version: str | None, status: int, start: float) -> None:
        metrics = self._app._metrics
        if metrics is not None and model is not None:
            metrics.observe_request(model, version, status, time.perf_counter() - start)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        meta = _metadata(context)
        key = meta.get(ROUTING_KEY_HEADER)
        return await self._run(context, "ModelInfer", self._infer(request, key, meta))

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        """Answer each request on the stream with one response, in the order they finish;
        a failed request gets a response with its ``error_message`` and the stream goes on."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        meta = _metadata(context)
        key = meta.get(ROUTING_KEY_HEADER)

        async def answer(request: Any) -> None:
            try:
                response = await self._infer(request, key, meta)
                reply = pb.ModelStreamInferResponse(infer_response=response)
            except HTTPError as exc:
                reply = _stream_error(request, exc.message)
            except Exception:
                logger.exception("batchkit: internal error serving gRPC ModelStreamInfer")
                reply = _stream_error(request, _INTERNAL)
            answers.put_nowait(reply)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    answers.put_nowait(_ONE_MORE)
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        reading, waiting = True, 0
        try:
            while reading or waiting:
                item = await answers.get()
                if item is None:
                    reading = False
                elif item is _ONE_MORE:
                    waiting += 1
                else:
                    waiting -= 1
                    yield item
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # -- repository ----------------------------------------------------------------------------

    def _authorize(self, context: Any) -> None:
        self._app._repository._authorize(_metadata(context))

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._authorize(context)
            index = await self._app._repository.answer(["index"], {"ready": request.ready})
            return json_format.ParseDict(
                {"models": index}, pb.RepositoryIndexResponse(), ignore_unknown_fields=True
            )

        return await self._run(context, "RepositoryIndex", job())

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._authorize(context)
            parameters = {
                key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                for key, value in request.parameters.items()
            }
            parts = ["models", request.model_name, "load"]
            await self._app._repository.answer(parts, {"parameters": parameters})
            return pb.RepositoryModelLoadResponse()

        return await self._run(context, "RepositoryModelLoad", job())

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def job() -> Any:
            self._authorize(context)
            await self._app._repository.answer(["models", request.model_name, "unload"], {})
            return pb.RepositoryModelUnloadResponse()

        return await self._run(context, "RepositoryModelUnload", job())

    # -- what batchkit does not serve ----------------------------------------------------------

    async def _unsupported(self, context: Any, what: str) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"batchkit does not support {what}")

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        return await self._unsupported(context, "shared memory")

    SystemSharedMemoryRegister = SystemSharedMemoryStatus
    SystemSharedMemoryUnregister = SystemSharedMemoryStatus
    CudaSharedMemoryStatus = SystemSharedMemoryStatus
    CudaSharedMemoryRegister = SystemSharedMemoryStatus
    CudaSharedMemoryUnregister = SystemSharedMemoryStatus

    async def TraceSetting(self, request: Any, context: Any) -> Any:
        return await self._unsupported(context, "trace settings")

    async def LogSettings(self, request: Any, context: Any) -> Any:
        return await self._unsupported(context, "log settings")


def _metadata(context: Any) -> dict[str, str]:
    """Return the call's metadata (text values, lowercase keys) as a dict."""
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _stream_error(request: Any, message: str) -> Any:
    response = pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


def _statistics(served: ServedModel) -> Any:
    """Return the engine's statistics as Triton's ``ModelStatistics`` (durations are the
    recent samples' means times the counts)."""
    stats = served.model.statistics()
    if isinstance(stats, DeploymentStatistics):  # every version of a deployment together
        stats = stats.total

    def duration(count: int, mean: float) -> Any:
        return pb.StatisticDuration(count=count, ns=round(mean * count * 1e9))

    done = stats.completed
    inference = pb.InferStatistics(
        success=duration(done, stats.end_to_end.mean),
        fail=pb.StatisticDuration(count=stats.failed + stats.expired + stats.rejected),
        queue=duration(done, stats.queue_wait.mean),
        compute_infer=duration(done, stats.compute.mean),
    )
    batches = [
        pb.InferBatchStatistics(batch_size=size, compute_infer=duration(n, stats.compute.mean))
        for size, n in sorted(stats.batch_sizes.items())
    ]
    return pb.ModelStatistics(
        name=served.name,
        version=stats.model_version,
        inference_count=done,
        execution_count=stats.batches,
        inference_stats=inference,
        batch_stats=batches,
    )


# -- gRPC beside an ASGI server ----------------------------------------------------------------


class GRPCBeside:
    """An ASGI app: ``app`` as it is, whose lifespan also serves gRPC in the same event loop.

    For ASGI servers (uvicorn) that run one app: ``batchkit serve --grpc-port`` and
    ``serving(..., grpc_port=...)``. ``started`` is set once the gRPC server listens (``server``
    is then its ``GRPCServer``) or failed to start (``server`` stays None).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        max_message_size: int | None = None,
        on_start: Callable[[GRPCServer], None] | None = None,
    ) -> None:
        from ._app import KServeApp

        if not isinstance(app, KServeApp):
            raise ConfigurationError(f"gRPC serves a KServeApp, got {app!r}")
        self.app = app
        self._host, self._port, self._max_message_size = host, port, max_message_size
        self.server: GRPCServer | None = None
        self.started = threading.Event()
        self._on_start = on_start

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app._lifespan(receive, send, self._lifespan())
        else:
            await self.app(scope, receive, send)

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        try:
            async with self.app.lifespan():
                async with open_grpc_server(
                    self.app,
                    host=self._host,
                    port=self._port,
                    max_message_size=self._max_message_size,
                ) as server:
                    self.server = server
                    self.started.set()
                    if self._on_start is not None:
                        self._on_start(server)
                    yield
        finally:
            self.started.set()
