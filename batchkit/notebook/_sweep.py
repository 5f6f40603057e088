"""The profiler's sweep: run a model under each combination of settings and load.

Each point of the sweep builds a fresh ``BatchedModel`` over the model function with one
combination of ``max_batch_size``, ``max_wait`` and ``max_concurrency``, runs it in the
sweep's own event loop, and drives it with ``concurrency`` callers in a closed loop (each sends
its next item as soon as its last one is answered) for ``requests`` measured calls. Latencies
are what the callers saw, measured on the event loop's clock (``anyio.current_time()``), so a
test can run the sweep on trio's mock clock and get figures that do not depend on the machine.

matplotlib (for ``ProfileResult.plot``) and IPython (for the notebook progress bar) are
imported only when used.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._core import BatchedModel, ConfigurationError, LatencySummary
from ._progress import Progress, auto_progress
from ._result import Percentile, ProfilePoint, ProfileResult, check_percentile, check_positive

__all__ = ("Measured", "aprofile", "grid", "measure", "profile", "statistics_of", "warm_up")

# Settings of the model a sweep takes over, besides the swept ones.
_KEPT_SETTINGS = ("size_fn", "max_batch_cost", "collate", "split", "isolate_failures")


@dataclass(frozen=True)
class _Sweep:
    fn: Callable[..., Any]
    name: str
    inputs: tuple[Any, ...]
    grid: tuple[tuple[int, float, int, int], ...]
    requests: int
    warmup: int | None
    kept: dict[str, Any]


def _sweep(
    fn: Callable[..., Any] | BatchedModel[Any, Any],
    inputs: Iterable[Any],
    max_batch_size: Sequence[int],
    max_wait: Sequence[float],
    max_concurrency: Sequence[int],
    concurrency: Sequence[int],
    requests: int,
    warmup: int | None,
    latency_target: float | None,
    options: dict[str, Any],
) -> _Sweep:
    """Validate the arguments of ``profile()`` and return the sweep they describe."""
    if isinstance(fn, BatchedModel):
        kept = {k: getattr(fn.settings, k) for k in _KEPT_SETTINGS}
        name, fn = fn.name, fn.model
    elif callable(fn):
        kept, name = {}, getattr(fn, "__qualname__", None) or type(fn).__name__
    else:
        raise ConfigurationError(f"the model must be callable or a BatchedModel, got {fn!r}")
    unknown = set(options) - set(_KEPT_SETTINGS)
    if unknown:
        raise ConfigurationError(f"profile() got unexpected settings: {sorted(unknown)}")
    kept.update(options)
    items = tuple(inputs)
    if not items:
        raise ConfigurationError("inputs must hold at least one sample item, got none")
    points = grid(max_batch_size, max_wait, max_concurrency, concurrency)
    _check_count("requests", requests, minimum=1)
    if warmup is not None:
        _check_count("warmup", warmup, minimum=0)
    if latency_target is not None:
        check_positive("latency_target", latency_target)
    return _Sweep(fn, str(name), items, points, requests, warmup, kept)


def grid(
    max_batch_size: Sequence[int],
    max_wait: Sequence[float],
    max_concurrency: Sequence[int],
    concurrency: Sequence[int],
) -> tuple[tuple[int, float, int, int], ...]:
    """Validate the swept values; return every point, (size, wait, slots, load), in the order
    the sweep measures them. Raises ``ConfigurationError`` for an invalid value."""
    sizes = _ints("max_batch_size", max_batch_size)
    waits = _seconds("max_wait", max_wait)
    slots = _ints("max_concurrency", max_concurrency)
    loads = _ints("concurrency", concurrency)
    return tuple(itertools.product(sizes, waits, slots, loads))


async def aprofile(
    fn: Callable[..., Any] | BatchedModel[Any, Any],
    inputs: Iterable[Any],
    *,
    max_batch_size: Sequence[int] = (1, 4, 16, 64),
    max_wait: Sequence[float] = (0.0,),
    max_concurrency: Sequence[int] = (1,),
    concurrency: Sequence[int] = (1, 8, 64),
    requests: int = 256,
    warmup: int | None = None,
    latency_target: float | None = None,
    percentile: Percentile = "p99",
    progress: Progress | None = None,
    **settings: Any,
) -> ProfileResult:
    """Run the sweep of ``profile()`` in the current event loop (asyncio or trio).

    Times are taken on this loop's clock, so under trio's ``MockClock`` an async fake model
    that sleeps gives exact, repeatable figures. ``progress(done, total)`` is called after each
    point. Arguments as for ``profile()``.
    """
    check_percentile(percentile)
    sweep = _sweep(
        fn,
        inputs,
        max_batch_size,
        max_wait,
        max_concurrency,
        concurrency,
        requests,
        warmup,
        latency_target,
        settings,
    )
    points = []
    for done, (size, wait, slots, load) in enumerate(sweep.grid, 1):
        points.append(await _measure(sweep, size, wait, slots, load))
        if progress is not None:
            progress(done, len(sweep.grid))
    return ProfileResult(sweep.name, tuple(points), latency_target, percentile)


async def _measure(sweep: _Sweep, size: int, wait: float, slots: int, load: int) -> ProfilePoint:
    """Measure one point: a fresh model under ``load`` callers for ``sweep.requests`` calls."""
    model: BatchedModel[Any, Any] = BatchedModel(
        sweep.fn,
        max_batch_size=size,
        max_wait=wait,
        max_concurrency=slots,
        name=f"{sweep.name}-profile",
        **sweep.kept,
    )
    inputs = sweep.inputs
    async with model:
        run = await measure(
            model.call,
            lambda i: inputs[i % len(inputs)],
            load,
            requests=sweep.requests,
            warmup=load if sweep.warmup is None else sweep.warmup,
            batch_sizes=statistics_of(model),
        )
    errors = run.errors
    return ProfilePoint(
        max_batch_size=size,
        max_wait=wait,
        max_concurrency=slots,
        concurrency=load,
        requests=sweep.requests,
        elapsed=run.elapsed,
        throughput=run.throughput,
        latency=LatencySummary.of(run.latencies),
        mean_batch_size=run.mean_batch_size,
        batches=sum(run.batch_sizes.values()),
        errors=len(errors),
        error=None if not errors else f"{type(errors[0]).__name__}: {errors[0]}",
    )


@dataclass(frozen=True)
class Measured:
    """What one closed-loop run measured: the calls answered and failed, and the batches.

    ``latencies`` (seconds, one per call answered) and ``elapsed`` are on the event loop's
    clock; ``batch_sizes`` counts the batches run during the run by size (empty when the
    target does not report them).
    """

    latencies: list[float]
    errors: list[BaseException]
    elapsed: float
    batch_sizes: dict[int, int]

    @property
    def throughput(self) -> float:
        """Return the calls answered per second."""
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else math.inf

    @property
    def mean_batch_size(self) -> float:
        """Return the mean size of the batches run (0.0 with none)."""
        batches = sum(self.batch_sizes.values())
        return sum(k * n for k, n in self.batch_sizes.items()) / batches if batches else 0.0


BatchSizes = Callable[[], Awaitable[Mapping[int, int] | None]]


def statistics_of(model: BatchedModel[Any, Any]) -> BatchSizes:
    """Return an async function giving ``model``'s batch-size counts so far."""

    async def batch_sizes() -> Mapping[int, int]:
        return model.statistics().batch_sizes

    return batch_sizes


async def measure(
    call: Callable[[Any], Awaitable[Any]],
    item_at: Callable[[int], Any],
    load: int,
    *,
    requests: int | None = None,
    duration: float | None = None,
    warmup: int = 0,
    batch_sizes: BatchSizes | None = None,
) -> Measured:
    """Drive ``call`` with ``load`` callers in a closed loop and measure it.

    First ``warmup`` calls (not measured), then ``requests`` calls in all, or as many as start
    within ``duration`` seconds (one of the two). ``item_at(i)`` is the item of the i-th call.
    ``batch_sizes()``, read before and after the measured calls, gives the target's batches
    by size so far (or None). Used by the profiler's sweep and the pytest plugin.
    """
    if (requests is None) == (duration is None):
        raise ConfigurationError(
            f"give requests or duration, not both or neither "
            f"(got requests={requests!r}, duration={duration!r})"
        )
    await warm_up(call, item_at, load, warmup)
    before = dict(await batch_sizes() or {}) if batch_sizes is not None else {}
    latencies: list[float] = []
    errors: list[BaseException] = []
    start = anyio.current_time()
    until = None if duration is None else start + duration
    calls = requests if requests is not None else math.inf
    await _drive(call, item_at, load, calls, until, latencies, errors)
    elapsed = anyio.current_time() - start
    after = dict(await batch_sizes() or {}) if batch_sizes is not None else {}
    delta = {size: n - before.get(size, 0) for size, n in sorted(after.items())}
    return Measured(latencies, errors, elapsed, {k: n for k, n in delta.items() if n > 0})


async def warm_up(
    call: Callable[[Any], Awaitable[Any]], item_at: Callable[[int], Any], load: int, calls: int
) -> None:
    """Make ``calls`` calls from ``load`` callers, unmeasured (their errors are ignored)."""
    await _drive(call, item_at, load, calls, None, [], [])


async def _drive(
    call: Callable[[Any], Awaitable[Any]],
    item_at: Callable[[int], Any],
    load: int,
    calls: float,
    until: float | None,
    latencies: list[float],
    errors: list[BaseException],
) -> None:
    """Make ``calls`` calls (or as many as start before ``until``) from ``load`` callers, each
    calling again once answered."""
    counter = itertools.count()

    async def caller() -> None:
        while (i := next(counter)) < calls:
            t0 = anyio.current_time()
            if until is not None and t0 >= until:
                return
            try:
                await call(item_at(i))
            except Exception as exc:  # recorded with the run; the run goes on
                errors.append(exc)
            else:
                latencies.append(anyio.current_time() - t0)

    async with anyio.create_task_group() as tg:
        for _ in range(int(min(load, calls))):
            tg.start_soon(caller)


def profile(
    fn: Callable[..., Any] | BatchedModel[Any, Any],
    inputs: Iterable[Any],
    *,
    max_batch_size: Sequence[int] = (1, 4, 16, 64),
    max_wait: Sequence[float] = (0.0,),
    max_concurrency: Sequence[int] = (1,),
    concurrency: Sequence[int] = (1, 8, 64),
    requests: int = 256,
    warmup: int | None = None,
    latency_target: float | None = None,
    percentile: Percentile = "p99",
    progress: bool | Progress = True,
    **settings: Any,
) -> ProfileResult:
    """Sweep batching settings and load on ``fn`` and return the measurements.

    ``fn`` is a model function over a list of items (sync or async, as for ``@batched``), or a
    ``BatchedModel``, whose function and ``collate``/``split``/``size_fn``/``max_batch_cost``/
    ``isolate_failures`` are used (its own engine and statistics are left alone); those
    settings may also be given as keyword arguments. ``inputs`` are sample items, sent in turn.

    Every combination of ``max_batch_size``, ``max_wait`` (seconds) and ``max_concurrency``
    (the settings) with ``concurrency`` (the load: callers sending at once, each again as soon
    as answered) is one point: a fresh model gets ``warmup`` calls (default: one per caller),
    then ``requests`` measured calls. ``latency_target`` (seconds, on the latency
    ``percentile``) is what ``result.recommendation`` must meet.

    ``progress``: True shows a progress bar (in Jupyter, or on a terminal's stderr), False
    none, or a callable ``progress(done, total)`` called after each point.

    Safe in a notebook cell and in any thread: the sweep runs in its own event loop on a
    background thread. Interrupting the cell (KeyboardInterrupt) stops the sweep.

    Raises ``ConfigurationError`` for an invalid argument.
    """
    reporter: Progress | None
    if progress is True:
        reporter = auto_progress()
    elif progress is False or progress is None:
        reporter = None
    elif callable(progress):
        reporter = progress
    else:
        raise ConfigurationError(f"progress must be a bool or a callable, got {progress!r}")
    run = partial(
        aprofile,
        fn,
        inputs,
        max_batch_size=max_batch_size,
        max_wait=max_wait,
        max_concurrency=max_concurrency,
        concurrency=concurrency,
        requests=requests,
        warmup=warmup,
        latency_target=latency_target,
        percentile=percentile,
        progress=reporter,
        **settings,
    )
    result: ProfileResult = _run_in_thread(run)
    if reporter is not None and hasattr(reporter, "finish"):
        reporter.finish(result)
    return result


def _run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run the async ``fn`` in a new event loop on a new thread; interruptible from this one."""
    outcome: dict[str, Any] = {}
    started, finished = threading.Event(), threading.Event()

    async def main() -> None:
        with anyio.CancelScope() as scope:
            outcome["scope"], outcome["token"] = scope, anyio.lowlevel.current_token()
            started.set()
            outcome["value"] = await fn()

    def target() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc
        finally:
            started.set()
            finished.set()

    thread = threading.Thread(target=target, name="batchkit-profile", daemon=True)
    thread.start()
    # Wait on an event, not on join(): a join() interrupted by KeyboardInterrupt may not wait
    # properly afterwards.
    try:
        finished.wait()
    except BaseException:  # KeyboardInterrupt in a notebook cell: stop the sweep, then re-raise
        started.wait()
        if "token" in outcome and not finished.is_set():
            try:
                anyio.from_thread.run_sync(outcome["scope"].cancel, token=outcome["token"])
            except RuntimeError:  # the loop has just ended
                pass
        finished.wait()
        thread.join()
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# -- validation ---------------------------------------------------------------------------------


def _ints(field: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigurationError(f"{field} must be a sequence of ints, got {values!r}")
    out = tuple(values)
    if not out:
        raise ConfigurationError(f"{field} must hold at least one value, got {values!r}")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigurationError(f"{field} values must be ints >= 1, got {v!r}")
    return out


def _seconds(field: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigurationError(f"{field} must be a sequence of seconds, got {values!r}")
    out = tuple(values)
    if not out:
        raise ConfigurationError(f"{field} must hold at least one value, got {values!r}")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ConfigurationError(f"{field} values must be seconds >= 0, got {v!r}")
    return tuple(float(v) for v in out)


def _check_count(field: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{field} must be an int >= {minimum}, got {value!r}")
