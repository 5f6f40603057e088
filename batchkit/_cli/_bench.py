"""``batchkit bench``: load-test a KServe v2 HTTP server and report each step.

Needs ``tritonclient[http]`` and numpy (``pip install 'batchkit[bench]'``, which adds rich for
the progress bar and tables); ``--plot`` needs matplotlib; ``--compare`` needs uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import re
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from .._render import fit_headers
from .._version import __version__

__all__ = ("add_parser", "run")

DEFAULT_CONCURRENCY = (1, 8, 32, 128)
DEFAULT_DURATION = 5.0


def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "bench",
        help="load-test a KServe v2 server over HTTP or gRPC (batchkit's, Triton's, ...)",
        description="Drive a KServe v2 server (HTTP or gRPC) with the asyncio tritonclient, "
        "step by step, and report throughput, latency percentiles, errors and (for batchkit "
        "servers) the server-side batch size. Exits 1 when any request failed.",
    )
    parser.add_argument(
        "url", nargs="?", help="the server: host:port, http://host:port or https://host:port"
    )
    parser.add_argument("--model", "-m", help="the model to call")
    parser.add_argument("--model-version", default="", help="the model version (default: any)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=_ints,
        help="closed loop: requests in flight per step, e.g. 1,8,32,128 (the default)",
    )
    load.add_argument("--rate", type=_floats, help="open loop: requests per second per step")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=_positive, help="seconds per step (default: 5)")
    stop.add_argument("--requests", type=int, help="requests per step")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each step")
    parser.add_argument("--input-file", help="inputs (.npz or .json) instead of random data")
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default: 1)")
    parser.add_argument("--json-tensors", action="store_true", help="JSON tensors, not binary")
    parser.add_argument(
        "--protocol",
        choices=("http", "grpc"),
        default="http",
        help="KServe v2 over HTTP (the default) or gRPC (URL is then the gRPC host:port)",
    )
    parser.add_argument(
        "--metrics-url",
        help="host:port serving batchkit's /metrics, for the server-side batch size "
        "(default: URL over HTTP; over gRPC, none unless given)",
    )
    parser.add_argument("--timeout", type=_positive, default=30.0, help="seconds per request")
    parser.add_argument("--json", dest="json_file", help="write every figure to this file")
    parser.add_argument("--plot", help="draw throughput and latency to this .png (matplotlib)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="serve the built-in demo model twice in this process, batching on and off, and "
        "compare them",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(command=run)


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"each value must be >= 1, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 500,2000, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"each value must be > 0, got {text!r}")
    return values


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


# -- running -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe; return the exit status."""
    try:
        from ..triton import _loadgen
    except ImportError as exc:
        raise SystemExit(
            f"batchkit bench needs tritonclient[http] and numpy ({exc}): "
            "pip install 'batchkit[bench]'"
        ) from None
    if args.requests is not None and args.requests < 1:
        _usage_error(f"--requests must be >= 1, got {args.requests}")
    if args.duration is None and args.requests is None:
        args.duration = DEFAULT_DURATION
    if args.rate is None and args.concurrency is None:
        args.concurrency = list(DEFAULT_CONCURRENCY)
    if not args.compare and (args.url is None or args.model is None):
        _usage_error("give URL and --model (or --compare)")
    if args.protocol == "grpc" and args.json_tensors:
        _usage_error("--json-tensors is for HTTP: gRPC sends raw tensor contents")
    if args.protocol == "grpc":
        try:
            _loadgen.client_module("grpc")
        except ImportError as exc:
            raise SystemExit(
                f"batchkit bench --protocol grpc needs tritonclient[grpc] ({exc}): "
                "pip install 'batchkit[bench,triton]'"
            ) from None
    server = None if args.compare else _server(args.url)
    if args.plot and not _can_import("matplotlib"):  # before the sweep, not after it
        _usage_error("--plot needs matplotlib: pip install matplotlib")
    if server is not None and server.https and args.protocol == "grpc":
        _usage_error("https:// is for HTTP: give --protocol grpc a host:port")
    console = _Console(quiet=args.quiet)
    try:
        if args.compare:
            report = _compare(args, console, _loadgen)
        else:
            assert server is not None
            report = asyncio.run(_sweep(args, server, args.model, console, _loadgen))
    except _Unreachable as exc:
        console.error(str(exc))
        return 2
    report["batchkit"] = __version__
    report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        _plot(report, args.plot)
    failed = report["failed"]
    if failed:
        for kind, sample in _error_samples(report).items():
            console.error(f"first {kind} error: {sample}")
        console.error(f"{failed} request(s) failed: see the error columns")
    return 1 if failed else 0


def _can_import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _usage_error(message: str) -> NoReturn:
    print(f"batchkit bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _error_samples(report: dict[str, Any]) -> dict[str, str]:
    series = report["compare"].values() if "compare" in report else [report["steps"]]
    samples: dict[str, str] = {}
    for steps in series:
        for step in steps:
            for kind, sample in step["error_samples"].items():
                samples.setdefault(kind, sample)
    return samples


class _Unreachable(Exception):
    """The server or the model could not be reached before the run started."""


class _Server(NamedTuple):
    """Where the server is: ``host:port`` as tritonclient takes it, and whether over TLS."""

    address: str
    https: bool
    given: str  # the URL as the user wrote it

    @property
    def base(self) -> str:
        return f"{'https' if self.https else 'http'}://{self.address}"


_HOST = re.compile(r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])\Z")


def _server(url: str) -> _Server:
    """Parse ``host:port``, ``http://host:port`` or ``https://host:port`` (a usage error if bad)."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    host = parsed.hostname or ""
    if ":" in host:  # an IPv6 address, given in brackets
        host = f"[{host}]"
    try:
        port = parsed.port
    except ValueError as exc:
        _usage_error(f"bad URL {url!r}: {exc}")
    if parsed.scheme not in ("http", "https"):
        problem = f"the scheme must be http or https, got {parsed.scheme!r}"
    elif parsed.username is not None or parsed.password is not None:
        problem = "credentials in the URL are not supported"
    elif parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        problem = "give the server only (host:port), without a path, query or fragment"
    elif not _HOST.match(host):
        problem = "no valid host name or address in it"
    else:
        address = host if port is None else f"{host}:{port}"
        return _Server(address, parsed.scheme == "https", url)
    _usage_error(f"bad URL {url!r}: {problem}")


async def _sweep(
    args: argparse.Namespace, server: _Server, model: str, console: _Console, loadgen: Any
) -> dict[str, Any]:
    url = server.given
    steps = await _run_steps(args, server, [model], console, loadgen)
    table = [step.as_dict() for step in steps[model]]
    console.table(_step_rows(steps[model], closed=args.rate is None), title=f"{model} at {url}")
    if any(step.versions for step in steps[model]):
        console.table(
            _version_rows(steps[model], closed=args.rate is None),
            title=f"{model}: items per version and shadow agreement, per step",
        )
    return {
        "url": url,
        "model": model,
        "mode": "open" if args.rate is not None else "closed",
        "steps": table,
        "failed": sum(s.failed for s in steps[model]),
    }


async def _run_steps(
    args: argparse.Namespace, server: _Server, models: list[str], console: _Console, loadgen: Any
) -> dict[str, list[Any]]:
    """Run every step against every model (interleaved: step 1 of each, then step 2, ...)."""
    loads = args.rate if args.rate is not None else args.concurrency
    if args.rate is not None:  # as many as may be open at once, with some room
        connections = max(100, int(max(args.rate) * 0.05))
    else:
        connections = max(args.concurrency)
    if args.protocol == "grpc":
        client = loadgen.client_module("grpc").InferenceServerClient(server.address)
    else:
        client = loadgen.aio.InferenceServerClient(
            server.address, conn_limit=connections, ssl=server.https
        )
    try:
        targets = [await _target(client, server, model, args, loadgen) for model in models]
        results: dict[str, list[Any]] = {model: [] for model in models}
        with console.progress(len(loads) * len(targets)) as advance:
            for load in loads:
                for target in targets:
                    label = f"{target.model}: " + (
                        f"{load:g} req/s" if args.rate is not None else f"{load} in flight"
                    )
                    step = await _one_step(args, target, load, advance(label), loadgen)
                    results[target.model].append(step)
        return results
    finally:
        await client.close()


async def _target(
    client: Any, server: _Server, model: str, args: argparse.Namespace, loadgen: Any
) -> Any:
    try:
        if args.protocol == "grpc":
            metadata = await client.get_model_metadata(model, args.model_version, as_json=True)
        else:
            metadata = await client.get_model_metadata(model, args.model_version)
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line
        raise _Unreachable(
            f"cannot read the metadata of model {model!r} at {server.given}: {message}"
        ) from exc
    if args.input_file:
        inputs, datatypes = loadgen.load_inputs(args.input_file, metadata)
    else:
        inputs, datatypes = loadgen.random_inputs(metadata, batch=args.batch)
    outputs = [spec["name"] for spec in metadata.get("outputs", [])]
    return loadgen.Target(
        client,
        server.address,
        model,
        args.model_version,
        inputs,
        datatypes,
        outputs,
        binary=not args.json_tensors,
        timeout=args.timeout,
        protocol=args.protocol,
        metrics_url=args.metrics_url,
        https=server.https,
    )


async def _one_step(
    args: argparse.Namespace,
    target: Any,
    load: float,
    progress: Callable[[float], None],
    loadgen: Any,
) -> Any:
    options = {"duration": args.duration, "requests": args.requests, "warmup": args.warmup}
    if args.rate is not None:
        return await loadgen.open_loop(target, load, progress=progress, **options)
    return await loadgen.closed_loop(target, int(load), progress=progress, **options)


def _compare(args: argparse.Namespace, console: _Console, loadgen: Any) -> dict[str, Any]:
    from ..asgi import KServeApp, serving
    from ..asgi._demo import demo_models

    app = KServeApp(demo_models(unbatched=True))
    grpc_port = 0 if args.protocol == "grpc" else None
    with serving(app, grpc_port=grpc_port) as address:
        url = str(address)
        if address.grpc is not None:
            url, args.metrics_url = address.grpc, url
        models = ["demo", "demo_unbatched"]
        server = _Server(url, https=False, given=url)
        steps = asyncio.run(_run_steps(args, server, models, console, loadgen))
    batched, unbatched = steps["demo"], steps["demo_unbatched"]
    console.table(
        _compare_rows(batched, unbatched, closed=args.rate is None),
        title="the demo model (2 ms per batch): batching on (up to 64) vs off",
    )
    return {
        "url": url,
        "mode": "open" if args.rate is not None else "closed",
        "compare": {
            "batched": [s.as_dict() for s in batched],
            "unbatched": [s.as_dict() for s in unbatched],
        },
        "failed": sum(s.failed for s in batched + unbatched),
    }


# -- output ------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _load_of(step: Any, closed: bool) -> str:
    return str(step.concurrency) if closed else f"{step.target_rate:g}"


def _errors(step: Any) -> list[str]:
    return [str(step.errors[kind]) for kind in ("reject", "timeout", "other")]


def _batch(step: Any) -> str:
    return "-" if step.server_batch_size is None else f"{step.server_batch_size:.1f}"


def _step_rows(steps: Sequence[Any], *, closed: bool) -> list[list[str]]:
    header = ["in flight" if closed else "target req/s", "req/s", "p50 ms", "p90 ms"]
    header += ["p99 ms", "max ms", "reject", "timeout", "other", "server batch"]
    rows = [header]
    for s in steps:
        lat = s.latency
        rows.append(
            [
                _load_of(s, closed),
                f"{s.throughput:,.0f}",
                *(_ms(lat[q]) for q in ("p50", "p90", "p99", "max")),
                *_errors(s),
                _batch(s),
            ]
        )
    return rows


def _version_rows(steps: Sequence[Any], *, closed: bool) -> list[list[str]]:
    versions = sorted({v for s in steps for v in (s.versions or {})})
    header = ["in flight" if closed else "target req/s"]
    header += [f"version {v}" for v in versions]
    header += ["shadow compared", "disagreed", "dropped"]
    rows = [header]
    for s in steps:
        counts = s.versions or {}
        total = sum(counts.values())
        cells = [
            f"{counts.get(v, 0):,} ({counts.get(v, 0) / total:.1%})" if total else "0"
            for v in versions
        ]
        shadow = s.shadow or {}
        compared = shadow.get("agreed", 0) + shadow.get("disagreed", 0)
        disagreed = shadow.get("disagreed", 0)
        rate = f" ({disagreed / compared:.1%})" if compared else ""
        cells += [f"{compared:,}", f"{disagreed:,}{rate}", f"{shadow.get('dropped', 0):,}"]
        rows.append([_load_of(s, closed), *cells])
    return rows


def _compare_rows(
    batched: Sequence[Any], unbatched: Sequence[Any], *, closed: bool
) -> list[list[str]]:
    header = ["in flight" if closed else "target req/s", "batched req/s", "p50 ms", "p99 ms"]
    header += ["batch", "unbatched req/s", "p50 ms", "p99 ms", "speedup", "errors"]
    rows = [header]
    for b, u in zip(batched, unbatched, strict=True):
        speedup = b.throughput / u.throughput if u.throughput else float("inf")
        rows.append(
            [
                _load_of(b, closed),
                f"{b.throughput:,.0f}",
                _ms(b.latency["p50"]),
                _ms(b.latency["p99"]),
                _batch(b),
                f"{u.throughput:,.0f}",
                _ms(u.latency["p50"]),
                _ms(u.latency["p99"]),
                f"{speedup:.1f}x",
                str(b.failed + u.failed),
            ]
        )
    return rows


class _Console:
    """Progress and tables with rich when it is installed, plain text otherwise."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        try:
            import rich.console
        except ImportError:
            self._rich: Any = None
        else:
            # Not a terminal (a pipe, a CI log): wide enough for the tables anyway.
            width = None if sys.stdout.isatty() else 160
            self._rich = rich.console.Console(width=width)

    def progress(self, total: int) -> _Progress:
        return _Progress(self._rich if not self.quiet else None, total)

    def table(self, rows: list[list[str]], *, title: str) -> None:
        if self._rich is not None:
            from rich.table import Table

            table = Table(title=title, box=None, pad_edge=False, header_style="bold")
            for i, name in enumerate(fit_headers(rows[0], rows[1:], self._rich.width)):
                table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
            for row in rows[1:]:
                table.add_row(*row)
            self._rich.print(table)
            return
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print(title)
        for row in rows:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))

    def error(self, message: str) -> None:
        print(f"batchkit bench: {message}", file=sys.stderr)


class _Progress:
    """A rich progress bar over the steps (nothing without rich, or when quiet)."""

    def __init__(self, console: Any, total: int) -> None:
        self._console = console
        self._total = total
        self._bar: Any = None

    def __enter__(self) -> Callable[[str], Callable[[float], None]]:
        if self._console is not None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeRemainingColumn(),
                console=self._console,
                transient=True,
            )
            self._bar.__enter__()
        return self._step

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def _step(self, label: str) -> Callable[[float], None]:
        if self._bar is None:
            return lambda fraction: None
        task = self._bar.add_task(label, total=1.0)
        bar = self._bar

        def update(fraction: float) -> None:
            bar.update(task, completed=fraction)

        return update


def _plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("batchkit bench --plot needs matplotlib: pip install matplotlib") from None
    closed = report["mode"] == "closed"
    series = report["compare"] if "compare" in report else {report["model"]: report["steps"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, steps in series.items():
        xs = [s["concurrency"] if closed else s["target_rate"] for s in steps]
        left.plot(xs, [s["throughput"] for s in steps], marker="o", label=name)
        right.plot(xs, [s["latency"]["p99"] * 1e3 for s in steps], marker="o", label=f"{name} p99")
        right.plot(
            xs, [s["latency"]["p50"] * 1e3 for s in steps], marker=".", ls="--", label=f"{name} p50"
        )
    xlabel = "requests in flight" if closed else "target requests/s"
    for ax, ylabel in ((left, "requests/s"), (right, "latency (ms)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
