"""``batchkit serve``: run a ``KServeApp`` (or any ASGI app) with uvicorn, and gRPC beside it."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from .._core import BatchedModel, ConfigurationError, observe_batches
from .._target import import_target, routed_models_of
from ._logging import FORMATS, LEVELS, announce
from ._logging import configure as configure_logging

__all__ = ("add_parser", "app_for", "repository_app", "run")

ADMIN_TOKEN_ENV = "BATCHKIT_ADMIN_TOKEN"
DEFAULT_DRAIN_DELAY = 5.0
DEFAULT_SHUTDOWN_TIMEOUT = 20.0  # drain + shutdown fit Kubernetes' default 30 s grace

logger = logging.getLogger("batchkit.asgi")


def add_parser(subparsers: Any) -> None:
    """Add the ``serve`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "serve",
        help="serve models over HTTP (KServe v2 / Triton protocol)",
        description="Serve batched models over HTTP with the KServe v2 protocol, as Triton "
        "speaks it. Without TARGET, serve the built-in demo model.",
    )
    parser.add_argument(
        "target",
        nargs="?",
        help="MODULE:ATTR naming a BatchedModel, Deployment, ServedModel, a collection of them, "
        "a factory, or an ASGI app; or a model file (model.onnx)",
    )
    repository = parser.add_argument_group("model repository (model files, no code)")
    repository.add_argument(
        "--model-repository",
        metavar="DIR",
        help="serve the model files of DIR, laid out as Triton's model repository",
    )
    repository.add_argument(
        "--load",
        choices=("eager", "lazy"),
        default="eager",
        help="load every model at start (eager, the default) or on its first request (lazy)",
    )
    repository.add_argument(
        "--poll-repository",
        type=float,
        metavar="SECONDS",
        help="rescan the repository every SECONDS for new or removed versions and models",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    parser.add_argument(
        "--max-body-size",
        type=int,
        default=64 * 1024 * 1024,
        help="largest infer body in bytes, after decompression (default: 64 MiB)",
    )
    parser.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=1024 * 1024 * 1024,
        help="memory all requests together may hold while being read, decompressed, parsed and "
        "decoded; beyond it, 503 with Retry-After (default: 1 GiB)",
    )
    parser.add_argument(
        "--weights-dir", help="directory the repository load endpoint may read weights from"
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="also serve KServe v2 gRPC (tritonclient.grpc) on this port of --host, in the same "
        "process and event loop (0: a free port, logged)",
    )
    parser.add_argument(
        "--grpc-max-message-size",
        type=int,
        help="largest gRPC request or response in bytes (default: --max-body-size)",
    )
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    gate = parser.add_argument_group("gateway (API keys and rate limits; docs/security.md)")
    gate.add_argument("--api-keys", metavar="FILE", help="JSON file of API keys; SIGHUP reloads")
    gate.add_argument(
        "--rate-limit", metavar="RATE", help="default limit per key, e.g. 100/s or 6000/min"
    )
    gate.add_argument(
        "--rate-limit-burst", type=float, metavar="N", help="units at once (default: the rate)"
    )
    gate.add_argument(
        "--rate-limit-rows", action="store_true", help="count rows (items), not requests"
    )
    gate.add_argument(
        "--rate-limit-store",
        default="memory",
        metavar="STORE",
        help="'memory' (default, this process) or redis://host:port/db (shared by replicas)",
    )
    gate.add_argument(
        "--rate-limit-on-error",
        choices=("open", "closed"),
        default="open",
        help="when the store fails: let requests through (open, default) or refuse them (503)",
    )
    gate.add_argument(
        "--protect-metadata",
        action="store_true",
        help="metadata, config and /metrics need a key too (health never does)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=LEVELS,
        help="what is logged to stderr (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="text lines, or one JSON object per line (default: %(default)s)",
    )
    parser.add_argument(
        "--no-access-log", action="store_true", help="do not log a line per request"
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="an OpenTelemetry span per request, on the global tracer provider (needs "
        "batchkit[otel]; configure the exporter as OpenTelemetry documents)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=DEFAULT_DRAIN_DELAY,
        metavar="SECONDS",
        help="after SIGTERM, answer /v2/health/ready with 503 and keep serving this long "
        "before closing the listeners (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metavar="SECONDS",
        help="then give the requests in flight this long; those still waiting for a model get "
        "503 (default: %(default)s)",
    )
    parser.set_defaults(command=run)


def app_for(target: str | None, **options: Any) -> Any:
    """Return the ASGI app serving ``target`` (MODULE:ATTR, or a model file), or the demo
    model when None."""
    from ..asgi import KServeApp, ModelRepository, ServedModel

    if target is not None and os.path.isfile(target):
        return KServeApp(ModelRepository(target), **options)
    if target is None:
        from ..asgi._demo import demo_models

        return KServeApp(demo_models(), **options)
    obj = import_target(target)
    if _is_factory(obj):
        obj = obj()
    if isinstance(obj, KServeApp):
        if options.get("access_log") is False:
            obj.access_log = False
        if options.get("tracing") and obj._tracer is None:
            from ..asgi._tracing import Tracer

            obj._tracer = Tracer()
            observe_batches()
        return obj
    served = _served_of(obj, ServedModel)
    if served is not None:
        return KServeApp(served, **options)
    try:
        models = routed_models_of(obj)
    except ConfigurationError:
        if _is_asgi_app(obj):
            return obj
        raise
    return KServeApp([ServedModel(m, name=n) for n, m in models.items()], **options)


def repository_app(folder: str, load: Any, poll: float | None, options: dict[str, Any]) -> Any:
    """Return the app serving the model repository ``folder``."""
    from ..asgi import KServeApp, ModelRepository

    return KServeApp(ModelRepository(folder, load=load, poll=poll), **options)


def _served_of(obj: Any, served_type: type) -> list[Any] | None:
    if isinstance(obj, served_type):
        return [obj]
    if isinstance(obj, (BatchedModel, str, bytes)):
        return None
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, Iterable) and not isinstance(obj, type):
        items = list(values)
        if items and any(isinstance(x, served_type) for x in items):
            return items
    return None


def _is_factory(obj: Any) -> bool:
    if not callable(obj) or isinstance(obj, (type, BatchedModel)) or _is_asgi_app(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


def _is_asgi_app(obj: Any) -> bool:
    if not callable(obj) or isinstance(obj, type):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 3


def _announce(server: Any) -> None:
    # Written whatever the log level (scripts wait for it), in the log's format.
    announce(
        f"batchkit gRPC running on {server.address} (KServe v2, tritonclient.grpc)",
        grpc_address=server.address,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT (then drain and shut down); return the exit status."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("batchkit serve needs uvicorn: pip install 'batchkit[server]'") from None
    for flag in ("drain_delay", "shutdown_timeout"):
        value = getattr(args, flag)
        if not value >= 0:  # also refuses nan
            raise SystemExit(f"batchkit serve: --{flag.replace('_', '-')} must be >= 0")
    configure_logging(args.log_level, args.log_format, access_stream=sys.stdout)
    options: dict[str, Any] = {
        "max_body_size": args.max_body_size,
        "max_inflight_bytes": args.max_inflight_bytes,
        "metrics": False if args.no_metrics else None,
        "admin_token": os.environ.get(ADMIN_TOKEN_ENV) or None,
        "weights_dir": args.weights_dir,
        "access_log": not args.no_access_log,
        "tracing": args.tracing,
    }
    gateway = {
        "api_keys": args.api_keys,
        "rate_limit": args.rate_limit,
        "rate_limit_burst": args.rate_limit_burst,
        "rate_limit_rows": args.rate_limit_rows,
        "rate_limit_store": args.rate_limit_store,
        "rate_limit_on_error": args.rate_limit_on_error,
        "protect_metadata": args.protect_metadata,
    }
    if args.api_keys is not None or args.rate_limit is not None:
        options.update(gateway)
    try:
        if args.model_repository is not None:
            if args.target is not None:
                raise ConfigurationError("give a TARGET or --model-repository, not both")
            app = repository_app(args.model_repository, args.load, args.poll_repository, options)
        else:
            app = app_for(args.target, **options)
        if args.grpc_port is not None:
            from ..asgi._grpc import GRPCBeside

            app = GRPCBeside(
                app,
                host=args.host,
                port=args.grpc_port,
                max_message_size=args.grpc_max_message_size,
                on_start=_announce,
            )
    except ConfigurationError as exc:
        raise SystemExit(f"batchkit serve: {exc}") from None
    if (args.api_keys is not None or args.rate_limit is not None) and getattr(
        app, "gateway", None
    ) is None:
        raise SystemExit(
            "batchkit serve: the gateway options need a model target (the app given builds "
            "its own KServeApp: pass it api_keys=/rate_limit=)"
        )
    _reload_keys_on_sighup(app)
    # gRPC starts in the lifespan: "on" makes a failure to start it stop the server
    lifespan: Literal["auto", "on"] = "auto" if args.grpc_port is None else "on"
    from ._server import Server

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # configured above: one handler, one format
        log_level=None,
        access_log=False,  # the app logs its own access lines, with request ids
        lifespan=lifespan,
    )
    kserve = getattr(app, "app", app)  # the KServeApp inside GRPCBeside
    server = Server(
        config,
        kserve if hasattr(kserve, "start_draining") else app,
        drain_delay=args.drain_delay,
        shutdown_timeout=args.shutdown_timeout,
    )
    server.run()
    return 0 if server.started else 3


def _reload_keys_on_sighup(app: Any) -> None:
    """Reload the app's keys file on SIGHUP (where the platform has it)."""
    gateway = getattr(app, "gateway", None)
    hup = getattr(signal, "SIGHUP", None)
    if gateway is None or gateway.keys is None or hup is None:
        return
    keys = gateway.keys

    def reload(signum: int, frame: Any) -> None:
        try:
            keys.reload()
        except ConfigurationError as exc:
            logger.error("batchkit: the keys file was not reloaded: %s", exc)

    signal.signal(hup, reload)
