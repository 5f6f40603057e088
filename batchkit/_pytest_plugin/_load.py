"""Run one described load against a target and measure it: the engine of the pytest plugin.

A round drives the target with ``concurrency`` callers in a closed loop (the profiler's driver,
``batchkit.notebook._sweep.measure``, on the event loop's clock; or threads calling
``call_sync``, on ``time.perf_counter``), and the baseline beside it when one is asked for, in
an order that rotates from round to round. ``Figures`` aggregates the rounds.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, cast

import anyio

from .._core import (
    BatchedModel,
    ClosedError,
    ConfigurationError,
    LatencySummary,
    ModelError,
    QueueFull,
    RemoteRejected,
    Settings,
)
from .._target import _takes_no_arguments, import_target, models_of
from ..notebook._sweep import Measured, grid, measure, statistics_of, warm_up

__all__ = (
    "ERROR_KINDS",
    "Figures",
    "GrpcTarget",
    "HttpTarget",
    "Load",
    "Mode",
    "PipeTarget",
    "Round",
    "SweepPoint",
    "error_kind",
    "run_round",
    "sweep",
)

Mode = Literal["asyncio", "trio", "threads"]
MODES = ("asyncio", "trio", "threads")
BASELINES = ("unbatched", "raw")
# Every call ends as ok or as one of these; each kind is always present in ``errors``.
ERROR_KINDS = ("reject", "timeout", "model", "closed", "other")


def error_kind(exc: BaseException) -> str:
    """Return the kind of a failed call: reject, timeout, model, closed or other."""
    if isinstance(exc, (QueueFull, RemoteRejected)):
        return "reject"
    if isinstance(exc, TimeoutError):  # DeadlineExceeded too
        return "timeout"
    if isinstance(exc, ModelError):
        return "model"
    if isinstance(exc, ClosedError):
        return "closed"
    return "other"


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipeTarget:
    """A model served by ``batchkit pipe TARGET`` in a child process, called over its pipe.

    ``target`` is the ``MODULE:ATTR`` the child serves; ``model`` picks one when it serves
    several; ``server_args``, ``env`` and ``cwd`` go to the child (see ``PipeClient``). Batch
    sizes come from the server's statistics. A fresh child serves each round.
    """

    target: str
    model: str | None = None
    server_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None

    def __str__(self) -> str:
        return f"pipe:{self.target}" + (f" ({self.model})" if self.model else "")


@dataclass(frozen=True)
class HttpTarget:
    """A model on a KServe v2 HTTP server (batchkit's, Triton's, ...), called with the stock
    asyncio ``tritonclient`` (``pip install 'batchkit[bench]'``).

    Every call sends the same request: ``inputs`` (arrays by input name), or random data shaped
    from the model's metadata with ``batch`` rows (as ``batchkit bench`` does); the items given
    to the fixture are not used. For a batchkit server, the mean batch size comes from its
    ``/metrics`` (no histogram). Runs on asyncio only.
    """

    url: str
    model: str
    version: str = ""
    inputs: Mapping[str, Any] | None = None
    batch: int = 1
    binary: bool = True
    timeout: float | None = 30.0

    def __str__(self) -> str:
        return f"http://{self.url}/{self.model}"


@dataclass(frozen=True)
class GrpcTarget:
    """A model on a KServe v2 gRPC server (``batchkit serve --grpc-port``, Triton's), called
    with the stock asyncio ``tritonclient.grpc`` (``pip install 'tritonclient[grpc]'``).

    As ``HttpTarget``, every call sends the same request (``inputs``, or random data with
    ``batch`` rows). ``metrics_url`` is the ``host:port`` of the HTTP side serving batchkit's
    ``/metrics``, for the mean batch size (none without it). Runs on asyncio only.
    """

    url: str
    model: str
    version: str = ""
    inputs: Mapping[str, Any] | None = None
    batch: int = 1
    timeout: float | None = 30.0
    metrics_url: str | None = None

    def __str__(self) -> str:
        return f"grpc://{self.url}/{self.model}"


# The targets in another process, reached over a transport, with their own settings.
REMOTE = (PipeTarget, HttpTarget, GrpcTarget)
KSERVE = (HttpTarget, GrpcTarget)

Target = BatchedModel[Any, Any] | Callable[..., Any] | str | PipeTarget | HttpTarget | GrpcTarget


# -- the load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One point of the profiler's sweep: batching settings and the load (callers at once).

    ``sweep()`` returns them as ``pytest.param`` values; give one to the fixture as ``point=``.
    """

    max_batch_size: int
    max_wait: float
    max_concurrency: int
    concurrency: int

    @property
    def settings(self) -> dict[str, Any]:
        """Return this point's settings as ``BatchedModel`` keyword arguments."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_wait": self.max_wait,
            "max_concurrency": self.max_concurrency,
        }

    @property
    def id(self) -> str:
        """Return the point's test id, e.g. ``bs16-wait0-mc1-c8``."""
        return (
            f"bs{self.max_batch_size}-wait{self.max_wait:g}-mc{self.max_concurrency}"
            f"-c{self.concurrency}"
        )


def sweep(
    *,
    max_batch_size: Sequence[int] = (1, 4, 16, 64),
    max_wait: Sequence[float] = (0.0,),
    max_concurrency: Sequence[int] = (1,),
    concurrency: Sequence[int] = (1, 8, 64),
) -> list[Any]:
    """Return the profiler's grid as ``pytest.param(SweepPoint, id=...)`` values, for
    ``@pytest.mark.parametrize("point", sweep(...))``: one test per setting.

    The arguments, their defaults, validation and the order of the points are those of
    ``batchkit.notebook.profile``. Raises ``ConfigurationError`` for an invalid value.
    """
    import pytest

    points = [
        SweepPoint(size, wait, slots, load)
        for size, wait, slots, load in grid(max_batch_size, max_wait, max_concurrency, concurrency)
    ]
    return [pytest.param(point, id=point.id) for point in points]


@dataclass(frozen=True)
class Load:
    """A described load, validated: what the fixture runs each round."""

    target: Target
    items: Callable[[int], Any]
    concurrency: int
    requests: int | None
    duration: float | None
    warmup: int
    mode: Mode
    settings: Mapping[str, Any]
    baseline: str | Target | None
    rounds: int
    backend_options: Mapping[str, Any]

    @property
    def baseline_name(self) -> str | None:
        """Return how the baseline is named in the figures."""
        if self.baseline is None or self.baseline in BASELINES:
            return self.baseline
        return _describe(self.baseline)


def load_of(
    target: Target,
    items: Sequence[Any] | Callable[[int], Any] | None,
    *,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    warmup: int | None,
    mode: str,
    settings: Mapping[str, Any] | None,
    point: SweepPoint | None,
    baseline: str | Target | None,
    rounds: int,
    backend_options: Mapping[str, Any] | None,
) -> Load:
    """Validate the fixture's arguments; return the ``Load``. Raises ``ConfigurationError``."""
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    merged = dict(settings or {})
    if point is not None:
        if not isinstance(point, SweepPoint):
            raise ConfigurationError(f"point must be a SweepPoint (from sweep()), got {point!r}")
        merged.update(point.settings)
        concurrency = point.concurrency
    _count("concurrency", concurrency, 1)
    _count("rounds", rounds, 1)
    if warmup is not None:
        _count("warmup", warmup, 0)
    if requests is None and duration is None:
        requests = 256
    elif requests is not None and duration is not None:
        raise ConfigurationError(
            f"give requests or duration, not both (got {requests!r} and {duration!r})"
        )
    if requests is not None:
        _count("requests", requests, 1)
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0
    ):
        raise ConfigurationError(f"duration must be seconds > 0, got {duration!r}")
    if isinstance(target, str):
        target = _import(target)
    remote = isinstance(target, REMOTE)
    if remote and merged:
        raise ConfigurationError(
            f"settings apply to in-process models; {_describe(target)} has its own: {merged}"
        )
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            baseline = _import(baseline)
        elif remote:
            raise ConfigurationError(
                f"baseline={baseline!r} needs the model function in this process; for "
                f"{_describe(target)} give another target as the baseline"
            )
    remote_baseline = isinstance(baseline, REMOTE)
    if mode == "threads" and (remote or remote_baseline):
        raise ConfigurationError("mode='threads' drives in-process models; use asyncio or trio")
    if any(isinstance(t, KSERVE) for t in (target, baseline)) and mode != "asyncio":
        raise ConfigurationError(
            f"HTTP and gRPC targets run on asyncio (tritonclient), not {mode!r}"
        )
    for name, value in (("target", target), ("baseline", baseline)):
        if name == "baseline" and (value is None or value in BASELINES):
            continue
        if not isinstance(value, (*REMOTE, BatchedModel)) and not callable(value):
            raise ConfigurationError(
                f"the {name} must be a BatchedModel, a model function, 'MODULE:ATTR', a "
                f"PipeTarget, an HttpTarget or a GrpcTarget, got {value!r}"
            )
    return Load(
        target=target,
        items=_item_source(items, http=isinstance(target, KSERVE)),
        concurrency=concurrency,
        requests=requests,
        duration=None if duration is None else float(duration),
        warmup=concurrency if warmup is None else warmup,
        mode=mode,  # type: ignore[arg-type]
        settings=merged,
        baseline=baseline,
        rounds=rounds,
        backend_options=dict(backend_options or {}),
    )


def _count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")


def _import(spec: str) -> Target:
    """Return what ``MODULE:ATTR`` names: a model function, or the one model it holds."""
    obj = import_target(spec)
    if callable(obj) and not isinstance(obj, BatchedModel) and not _takes_no_arguments(obj):
        function: Callable[..., Any] = obj
        return function
    models = models_of(obj)
    if len(models) != 1:
        raise ConfigurationError(f"{spec!r} holds several models, name one: {sorted(models)}")
    return next(iter(models.values()))


def _item_source(items: Sequence[Any] | Callable[[int], Any] | None, *, http: bool) -> Any:
    if items is None:
        if http:
            return lambda i: None
        raise ConfigurationError("give the items to send: a sequence, or a function of i")
    if callable(items):
        return items
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ConfigurationError(
            f"items must be a sequence (sent in turn) or a function of i, got {items!r}"
        )
    pool = tuple(items)
    if not pool:
        raise ConfigurationError("items must hold at least one item, got none")
    return lambda i: pool[i % len(pool)]


def _describe(target: object) -> str:
    if isinstance(target, BatchedModel):
        return f"model {target.name!r}"
    if isinstance(target, REMOTE):
        return str(target)
    return getattr(target, "__qualname__", None) or repr(target)


# -- one round ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """What one side of a round (the target, or its baseline) measured."""

    run: Measured
    mean_batch_size: float

    @property
    def items_per_s(self) -> float:
        """Return the calls answered per second."""
        return self.run.throughput


@dataclass(frozen=True)
class Round:
    """One round: the target's side, and the baseline's when one was asked for."""

    target: Side
    baseline: Side | None

    @property
    def ratio(self) -> float | None:
        """Return the target's items/s over the baseline's (None without a baseline)."""
        if self.baseline is None:
            return None
        base = self.baseline.items_per_s
        return self.target.items_per_s / base if base > 0 else math.inf

    @property
    def figure(self) -> float:
        """Return what pytest-benchmark records as this round's time: lower is better.

        With a baseline, the baseline's items/s over the target's (1 / ratio), so that
        ``--benchmark-compare-fail=mean:5%`` fails when the ratio gets 5% worse; without one,
        the seconds per item answered (1 / items/s).
        """
        if self.baseline is not None:
            return self.baseline.items_per_s / self.target.items_per_s
        return 1 / self.target.items_per_s if self.target.items_per_s > 0 else math.inf


def run_round(load: Load, number: int) -> Round:
    """Run round ``number``: the target and its baseline, alternating which goes first."""
    sides = ["target"] + (["baseline"] if load.baseline is not None else [])
    k = number % len(sides)
    order = sides[k:] + sides[:k]
    measured: dict[str, Side] = {}
    for side in order:
        measured[side] = _run_side(load, side)
    return Round(measured["target"], measured.get("baseline"))


def _run_side(load: Load, side: str) -> Side:
    if side == "target":
        target, overrides = load.target, dict(load.settings)
    elif load.baseline == "unbatched":
        target, overrides = load.target, {**load.settings, "max_batch_size": 1, "max_wait": 0.0}
    elif load.baseline == "raw":
        return _run_raw(load)
    else:
        target, overrides = cast("Target", load.baseline), {}
    if load.mode == "threads":
        assert not isinstance(target, (*REMOTE, str))
        return _threads(load, fresh_model(target, overrides))
    backend = "trio" if load.mode == "trio" else "asyncio"

    async def main() -> Side:
        async with _opened(target, overrides) as (call, counts):
            return await _measure(load, call, counts)

    result: Side = anyio.run(main, backend=backend, backend_options=dict(load.backend_options))
    return result


def fresh_model(target: object, overrides: Mapping[str, Any]) -> BatchedModel[Any, Any]:
    """Return a new model over ``target``'s function with its settings and ``overrides``.

    The user's own model is never entered, called or closed: every measurement gets a fresh
    engine, so its statistics are its own.
    """
    if isinstance(target, BatchedModel):
        own = {f.name: getattr(target.settings, f.name) for f in fields(Settings)}
        own["version"] = target.version
        fn = target.model
    else:
        own, fn = {}, cast("Callable[..., Any]", target)
    own.update(overrides)
    try:
        return BatchedModel(fn, **own)
    except TypeError as exc:  # a misspelt setting
        raise ConfigurationError(str(exc)) from None


# The (items, batches) a target has run so far, or its batches by size: what a side reads
# before and after its measured calls.
Counts = Callable[[], Awaitable[tuple[float, float] | Mapping[int, int] | None]]


@asynccontextmanager
async def _opened(
    target: object, overrides: Mapping[str, Any]
) -> AsyncIterator[tuple[Callable[[Any], Awaitable[Any]], Counts]]:
    if isinstance(target, PipeTarget):
        from ..pipe import PipeClient

        client = PipeClient(
            target.target, server_args=target.server_args, env=target.env, cwd=target.cwd
        )
        async with client:
            pick = target.model

            async def call(item: Any) -> Any:
                return await client.call(item, model=pick)

            async def pipe_sizes() -> Mapping[int, int]:
                return (await client.statistics(pick)).batch_sizes

            yield call, pipe_sizes
    elif isinstance(target, KSERVE):
        async with _kserve(target) as opened:
            yield opened
    else:
        model = fresh_model(target, overrides)
        async with model:
            yield model.call, statistics_of(model)


@asynccontextmanager
async def _kserve(
    target: HttpTarget | GrpcTarget,
) -> AsyncIterator[tuple[Callable[[Any], Awaitable[Any]], Counts]]:
    grpc = isinstance(target, GrpcTarget)
    try:
        from ..triton import _loadgen

        module = _loadgen.client_module("grpc" if grpc else "http")
    except ImportError as exc:
        extra = "tritonclient[grpc]" if grpc else "'batchkit[bench]'"
        raise ConfigurationError(
            f"{type(target).__name__} needs tritonclient and numpy ({exc}): pip install {extra}"
        ) from None
    client = module.InferenceServerClient(target.url)
    try:
        if grpc:
            metadata = await client.get_model_metadata(target.model, target.version, as_json=True)
        else:
            metadata = await client.get_model_metadata(target.model, target.version)
        if target.inputs is not None:
            inputs = dict(target.inputs)
            specs = {spec["name"]: spec["datatype"] for spec in metadata.get("inputs", [])}
            unknown = sorted(set(inputs) - set(specs))
            if unknown:
                raise ConfigurationError(
                    f"{target}: the model has no input(s) {unknown} (it has {sorted(specs)})"
                )
            datatypes = {name: specs[name] for name in inputs}
        else:
            inputs, datatypes = _loadgen.random_inputs(metadata, batch=target.batch)
        remote = _loadgen.Target(
            client,
            target.url,
            target.model,
            target.version,
            inputs,
            datatypes,
            [spec["name"] for spec in metadata.get("outputs", [])],
            binary=target.binary if isinstance(target, HttpTarget) else True,
            timeout=target.timeout,
            protocol="grpc" if grpc else "http",
            metrics_url=target.metrics_url if isinstance(target, GrpcTarget) else None,
        )

        async def call(item: Any) -> Any:
            try:
                await remote.infer()
            except Exception as exc:
                raise _HttpError(_loadgen.classify(exc), exc) from exc

        yield call, remote.batch_counts
    finally:
        await client.close()


class _HttpError(Exception):
    """A failed HTTP or gRPC call, with the load generator's kind (reject, timeout, other)."""

    def __init__(self, kind: str, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.kind = kind


async def _measure(load: Load, call: Callable[[Any], Awaitable[Any]], counts: Counts) -> Side:
    await warm_up(call, load.items, load.concurrency, load.warmup)
    before = await counts()
    run = await measure(
        call, load.items, load.concurrency, requests=load.requests, duration=load.duration
    )
    after = await counts()
    return _side(run, before, after)


def _side(run: Measured, before: object, after: object) -> Side:
    """Return ``run`` with the batches the target ran between ``before`` and ``after``."""
    if isinstance(before, tuple) and isinstance(after, tuple):  # (items, batches), HTTP
        batches = after[1] - before[1]
        mean = (after[0] - before[0]) / batches if batches > 0 else 0.0
        return Side(run, mean)
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        delta = {size: n - before.get(size, 0) for size, n in sorted(after.items())}
        sizes = {size: n for size, n in delta.items() if n > 0}
        run = replace(run, batch_sizes=sizes)
    return Side(run, run.mean_batch_size)


def _run_raw(load: Load) -> Side:
    """Call the model function directly on full batches, back to back: the ceiling."""
    target = load.target
    model = fresh_model(target, load.settings)
    size = model.settings.max_batch_size
    fn, collate = model.model, model.settings.collate
    total = load.requests

    def batch_at(i: int) -> list[Any]:
        return [load.items(i * size + j) for j in range(size)]

    if load.mode == "threads":
        return _raw_sync(fn, collate, batch_at, size, total, load.duration)

    async def main() -> Side:
        clock = anyio.current_time
        start = clock()
        end = math.inf if load.duration is None else start + load.duration
        done = 0
        i = 0
        while (total is None or done < total) and clock() < end:
            items = batch_at(i)[: size if total is None else min(size, total - done)]
            out = fn(collate(items) if collate is not None else items)
            if isinstance(out, Awaitable):
                await out
            done, i = done + len(items), i + 1
        elapsed = clock() - start
        return Side(_raw_run(done, elapsed, size), float(size))

    backend = "trio" if load.mode == "trio" else "asyncio"
    result: Side = anyio.run(main, backend=backend, backend_options=dict(load.backend_options))
    return result


def _raw_sync(
    fn: Callable[..., Any],
    collate: Callable[[list[Any]], Any] | None,
    batch_at: Callable[[int], list[Any]],
    size: int,
    total: int | None,
    duration: float | None,
) -> Side:
    start = time.perf_counter()
    end = math.inf if duration is None else start + duration
    done = i = 0
    while (total is None or done < total) and time.perf_counter() < end:
        items = batch_at(i)[: size if total is None else min(size, total - done)]
        out = fn(collate(items) if collate is not None else items)
        if isinstance(out, Awaitable):
            raise ConfigurationError("baseline='raw' in threads mode needs a sync model function")
        done, i = done + len(items), i + 1
    return Side(_raw_run(done, time.perf_counter() - start, size), float(size))


def _raw_run(done: int, elapsed: float, size: int) -> Measured:
    # One latency per item: the raw model answers a batch's items together.
    batches = math.ceil(done / size)
    per_item = elapsed / batches if batches else 0.0
    return Measured([per_item] * done, [], elapsed, {size: batches} if batches else {})


def _threads(load: Load, model: BatchedModel[Any, Any]) -> Side:
    """Drive ``model`` from ``concurrency`` threads calling ``call_sync``, on perf_counter."""
    with model:
        _drive_threads(model.call_sync, load.items, load.concurrency, load.warmup, None, [], [])
        before = dict(model.statistics().batch_sizes)
        latencies: list[float] = []
        errors: list[BaseException] = []
        start = time.perf_counter()
        until = None if load.duration is None else start + load.duration
        calls = load.requests if load.requests is not None else math.inf
        _drive_threads(
            model.call_sync, load.items, load.concurrency, calls, until, latencies, errors
        )
        elapsed = time.perf_counter() - start
        after = dict(model.statistics().batch_sizes)
    return _side(Measured(latencies, errors, elapsed, {}), before, after)


def _drive_threads(
    call: Callable[[Any], Any],
    item_at: Callable[[int], Any],
    load: int,
    calls: float,
    until: float | None,
    latencies: list[float],
    errors: list[BaseException],
) -> None:
    counter = _Counter()

    def caller() -> None:
        while (i := counter.next()) < calls:
            t0 = time.perf_counter()
            if until is not None and t0 >= until:
                return
            try:
                call(item_at(i))
            except Exception as exc:  # recorded with the run; the run goes on
                errors.append(exc)
            else:
                latencies.append(time.perf_counter() - t0)

    threads = [
        threading.Thread(target=caller, name=f"batchkit-bench-caller-{n}")
        for n in range(int(min(load, calls)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class _Counter:
    """The next call's number, shared by the caller threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0

    def next(self) -> int:
        with self._lock:
            n, self._next = self._next, self._next + 1
            return n


# -- the figures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """What the fixture measured over every round; ``extra_info()`` is what it records.

    ``items_per_s`` and ``ratio`` are the medians of the rounds' figures; ``latency`` is over
    every call answered in every round (seconds); ``batch_sizes`` counts every batch of every
    round by size (empty for an HTTP target, which reports only ``mean_batch_size``);
    ``errors`` counts the failed calls by kind, with the first message of each kind in
    ``error_samples``.
    """

    target: str
    mode: str
    concurrency: int
    settings: Mapping[str, Any]
    calls: int
    items_per_s: float
    latency: LatencySummary
    mean_batch_size: float
    batch_sizes: Mapping[int, int]
    errors: Mapping[str, int]
    error_samples: Mapping[str, str]
    baseline: str | None
    baseline_items_per_s: float | None
    ratio: float | None
    rounds: tuple[Round, ...]

    @property
    def failed(self) -> int:
        """Return the failed calls of every round."""
        return sum(self.errors.values())

    def extra_info(self) -> dict[str, Any]:
        """Return the figures as plain JSON data, for ``benchmark.extra_info``."""
        return {
            "target": self.target,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "settings": {k: v for k, v in self.settings.items() if _is_json(v)},
            "calls": self.calls,
            "items_per_s": self.items_per_s,
            "p50": self.latency.p50,
            "p90": self.latency.p90,
            "p99": self.latency.p99,
            "latency_mean": self.latency.mean,
            "latency_max": self.latency.max,
            "mean_batch_size": self.mean_batch_size,
            "batch_size_histogram": {str(k): n for k, n in sorted(self.batch_sizes.items())},
            "errors": dict(self.errors),
            "error_samples": dict(self.error_samples),
            "baseline": self.baseline,
            "baseline_items_per_s": self.baseline_items_per_s,
            "ratio": self.ratio,
            "rounds": [
                {
                    "items_per_s": r.target.items_per_s,
                    "baseline_items_per_s": None if r.baseline is None else r.baseline.items_per_s,
                    "ratio": r.ratio,
                }
                for r in self.rounds
            ],
            "recorded": "baseline items/s / items/s (1 / ratio)"
            if self.baseline is not None
            else "seconds per item (1 / items/s)",
        }


def _is_json(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def figures_of(load: Load, rounds: Sequence[Round]) -> Figures:
    """Aggregate ``rounds`` of ``load``."""
    latencies = [t for r in rounds for t in r.target.run.latencies]
    sizes: Counter[int] = Counter()
    for r in rounds:
        sizes.update(r.target.run.batch_sizes)
    batches = sum(sizes.values())
    if batches:
        mean_batch = sum(k * n for k, n in sizes.items()) / batches
    else:  # an HTTP target: the mean of the rounds' means
        means = [r.target.mean_batch_size for r in rounds if r.target.mean_batch_size > 0]
        mean_batch = _median(means) if means else 0.0
    errors = dict.fromkeys(ERROR_KINDS, 0)
    samples: dict[str, str] = {}
    for r in rounds:
        for exc in r.target.run.errors:
            kind = exc.kind if isinstance(exc, _HttpError) else error_kind(exc)
            errors[kind] += 1
            samples.setdefault(kind, f"{type(exc).__name__}: {exc}"[:300])
    ratios = [r.ratio for r in rounds if r.ratio is not None]
    base = [r.baseline.items_per_s for r in rounds if r.baseline is not None]
    return Figures(
        target=_describe(load.target),
        mode=load.mode,
        concurrency=load.concurrency,
        settings=dict(load.settings),
        calls=len(latencies),
        items_per_s=_median([r.target.items_per_s for r in rounds]),
        latency=LatencySummary.of(latencies),
        mean_batch_size=mean_batch,
        batch_sizes=dict(sorted(sizes.items())),
        errors=errors,
        error_samples=samples,
        baseline=load.baseline_name,
        baseline_items_per_s=_median(base) if base else None,
        ratio=_median(ratios) if ratios else None,
        rounds=tuple(rounds),
    )


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
