"""The profiler: sweep batching settings and load on a model, and recommend settings.

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

import csv
import io
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel

from .. import _render
from .._core import BatchedModel, ConfigurationError, LatencySummary

__all__ = ("ProfilePoint", "ProfileResult", "aprofile", "profile")

Percentile = Literal["p50", "p90", "p99"]
Progress = Callable[[int, int], None]

# Settings of the model a sweep takes over, besides the swept ones.
_KEPT_SETTINGS = ("size_fn", "max_batch_cost", "collate", "split", "isolate_failures")


@dataclass(frozen=True)
class ProfilePoint:
    """The measurements at one point of a sweep: settings, load, throughput and latency.

    ``throughput`` is answered calls per second over the measured phase; ``latency`` is the
    callers' end-to-end latency, in seconds, over the calls answered. ``errors`` counts calls
    that raised, and ``error`` shows the first one (a point with errors is never recommended).
    """

    max_batch_size: int
    max_wait: float
    max_concurrency: int
    concurrency: int
    requests: int
    elapsed: float
    throughput: float
    latency: LatencySummary
    mean_batch_size: float
    batches: int
    errors: int = 0
    error: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """Return this point's settings as ``BatchedModel`` keyword arguments."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_wait": self.max_wait,
            "max_concurrency": self.max_concurrency,
        }

    def as_dict(self) -> dict[str, Any]:
        """Return the point as a flat dict (times in seconds), one CSV row."""
        return {
            **self.settings,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "elapsed": self.elapsed,
            "throughput": self.throughput,
            "mean_batch_size": self.mean_batch_size,
            "batches": self.batches,
            "latency_mean": self.latency.mean,
            "latency_p50": self.latency.p50,
            "latency_p90": self.latency.p90,
            "latency_p99": self.latency.p99,
            "latency_max": self.latency.max,
            "error": self.error or "",
        }


@dataclass(frozen=True, repr=False)
class ProfileResult:
    """The points of a sweep, with the latency target it was run for (if any).

    Renders as a table in Jupyter (``_repr_html_``) and with rich (``__rich__``); ``plot()``
    draws throughput and latency against batch size and concurrency; ``to_dicts()`` and
    ``to_csv()`` export the points.
    """

    name: str
    points: tuple[ProfilePoint, ...]
    latency_target: float | None = None
    percentile: Percentile = "p99"

    @property
    def recommendation(self) -> ProfilePoint | None:
        """Return ``recommend()`` for the target the sweep was run with."""
        return self.recommend(self.latency_target, percentile=self.percentile)

    def recommend(
        self,
        latency_target: float | None = None,
        *,
        percentile: Percentile = "p99",
        concurrency: int | None = None,
    ) -> ProfilePoint | None:
        """Return the point with the best throughput whose latency meets the target.

        ``latency_target`` is in seconds, for the latency ``percentile`` ("p50", "p90" or
        "p99"); None keeps every point. ``concurrency`` keeps only the points measured at that
        load (the number of callers you expect). Points with errors are never chosen. Ties in
        throughput (equal to 4 significant digits) go to the lower latency, then to the
        smaller settings. Returns None when no point qualifies. Apply the settings with
        ``BatchedModel(fn, **point.settings)``.
        """
        _check_percentile(percentile)
        if latency_target is not None:
            _check_positive("latency_target", latency_target)
        fit = [
            p
            for p in self.points
            if not p.errors
            and p.requests
            and (concurrency is None or p.concurrency == concurrency)
            and (latency_target is None or getattr(p.latency, percentile) <= latency_target)
        ]
        if not fit:
            return None
        return min(
            fit,
            key=lambda p: (
                -_significant(p.throughput),
                _significant(getattr(p.latency, percentile)),
                p.max_batch_size,
                p.max_wait,
                p.max_concurrency,
                p.concurrency,
            ),
        )

    def to_dicts(self) -> list[dict[str, Any]]:
        """Return one flat dict per point (times in seconds), in sweep order."""
        return [p.as_dict() for p in self.points]

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the points as CSV text (a header row, then one row per point).

        With ``path``, also write the text to that file.
        """
        out = io.StringIO()
        rows = self.to_dicts()
        fields = list(rows[0]) if rows else list(_empty_point().as_dict())
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def summary(self) -> str:
        """Return one line that states the recommendation (or that none met the target)."""
        return _summary(self)

    def __repr__(self) -> str:
        return f"<ProfileResult {self.name!r}, {len(self.points)} points: {self.summary()}>"

    def table(self) -> _render.Table:
        """Return the points as a display table, the recommended one highlighted.

        A setting that the sweep held constant is stated in the caption instead of a column,
        and the errors column shows only when some point had errors.
        """
        best = self.recommendation
        columns: list[tuple[str, Callable[[ProfilePoint], str]]] = [
            ("max batch", lambda p: str(p.max_batch_size)),
        ]
        fixed = []
        if len({p.max_wait for p in self.points}) > 1:
            columns.append(("max wait ms", lambda p: _render.format_ms(p.max_wait)))
        elif self.points:
            fixed.append(f"max_wait={self.points[0].max_wait:g}")
        if len({p.max_concurrency for p in self.points}) > 1:
            columns.append(("max conc", lambda p: str(p.max_concurrency)))
        elif self.points:
            fixed.append(f"max_concurrency={self.points[0].max_concurrency}")
        columns += [
            ("callers", lambda p: str(p.concurrency)),
            ("items/s", lambda p: _render.format_rate(p.throughput)),
            ("mean batch", lambda p: f"{p.mean_batch_size:.1f}"),
            ("p50 ms", lambda p: _render.format_ms(p.latency.p50)),
            ("p99 ms", lambda p: _render.format_ms(p.latency.p99)),
        ]
        if any(p.errors for p in self.points):
            columns.append(("errors", lambda p: str(p.errors)))
        caption = "profile" + (f" ({', '.join(fixed)})" if fixed else "")
        return _render.Table(
            caption,
            [[cell(p) for _, cell in columns] for p in self.points],
            headers=[header for header, _ in columns],
            highlight=None if best is None else self.points.index(best),
            note=self.summary(),
        )

    def _repr_html_(self) -> str:
        return _render.tables_html([self.table()], title=f"batchkit profile of {self.name!r}")

    def __rich__(self) -> Any:
        return _render.tables_rich([self.table()], title=f"batchkit profile of {self.name!r}")

    def plot(self, *, max_wait: float | None = None, max_concurrency: int | None = None) -> Any:
        """Draw throughput and p50/p99 latency against batch size and concurrency.

        Returns a ``matplotlib.figure.Figure`` (it shows itself in Jupyter; ``savefig`` writes
        it to a file). When the sweep covered several ``max_wait`` or ``max_concurrency``
        values, the plot shows one of them: the one given, else the recommendation's, else the
        first. Needs matplotlib (``pip install batchkit[notebook]``).
        """
        from ._plot import plot_profile

        if not self.points:
            raise ConfigurationError("this profile has no points to plot")
        best = self.recommendation
        if max_wait is None:
            max_wait = best.max_wait if best else self.points[0].max_wait
        if max_concurrency is None:
            max_concurrency = best.max_concurrency if best else self.points[0].max_concurrency
        return plot_profile(self, max_wait, max_concurrency)


def _significant(x: float) -> float:
    """Return ``x`` to 4 significant digits, so that clock rounding noise does not pick."""
    return float(f"{x:.4g}")


def _summary(result: ProfileResult) -> str:
    target, pct = result.latency_target, result.percentile
    best = result.recommendation
    bound = "" if target is None else f" with {pct} \u2264 {_render.format_ms(target)} ms"
    if best is None:
        ok = [p for p in result.points if not p.errors and p.requests]
        if not ok:
            return "no point of the sweep answered without errors"
        low = min(ok, key=lambda p: getattr(p.latency, pct))
        return (
            f"no setting met {pct} \u2264 {_render.format_ms(target or 0.0)} ms; the lowest "
            f"{pct} was {_render.format_ms(getattr(low.latency, pct))} ms "
            f"({_settings_text(low)}, {low.concurrency} callers)"
        )
    return (
        f"best throughput{bound}: {_settings_text(best)} "
        f"({_render.format_rate(best.throughput)} items/s with {best.concurrency} callers, "
        f"{pct} {_render.format_ms(getattr(best.latency, pct))} ms)"
    )


def _settings_text(p: ProfilePoint) -> str:
    return (
        f"max_batch_size={p.max_batch_size}, max_wait={p.max_wait:g}, "
        f"max_concurrency={p.max_concurrency}"
    )


def _empty_point() -> ProfilePoint:
    return ProfilePoint(1, 0.0, 1, 1, 0, 0.0, 0.0, LatencySummary.of([]), 0.0, 0)


# -- running a sweep ----------------------------------------------------------------------------


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
    sizes = _ints("max_batch_size", max_batch_size)
    waits = _seconds("max_wait", max_wait)
    slots = _ints("max_concurrency", max_concurrency)
    loads = _ints("concurrency", concurrency)
    _check_count("requests", requests, minimum=1)
    if warmup is not None:
        _check_count("warmup", warmup, minimum=0)
    if latency_target is not None:
        _check_positive("latency_target", latency_target)
    grid = tuple(itertools.product(sizes, waits, slots, loads))
    return _Sweep(fn, str(name), items, grid, requests, warmup, kept)


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
    _check_percentile(percentile)
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
    latencies: list[float] = []
    errors: list[BaseException] = []
    async with model:
        warmup = load if sweep.warmup is None else sweep.warmup
        await _drive(model, sweep.inputs, load, warmup, [], [])
        before = model.statistics()
        start = anyio.current_time()
        await _drive(model, sweep.inputs, load, sweep.requests, latencies, errors)
        elapsed = anyio.current_time() - start
        after = model.statistics()
    batches = after.batches - before.batches
    items = sum(k * n for k, n in after.batch_sizes.items())
    items -= sum(k * n for k, n in before.batch_sizes.items())
    return ProfilePoint(
        max_batch_size=size,
        max_wait=wait,
        max_concurrency=slots,
        concurrency=load,
        requests=sweep.requests,
        elapsed=elapsed,
        throughput=len(latencies) / elapsed if elapsed > 0 else math.inf,
        latency=LatencySummary.of(latencies),
        mean_batch_size=items / batches if batches else 0.0,
        batches=batches,
        errors=len(errors),
        error=None if not errors else f"{type(errors[0]).__name__}: {errors[0]}",
    )


async def _drive(
    model: BatchedModel[Any, Any],
    inputs: tuple[Any, ...],
    load: int,
    calls: int,
    latencies: list[float],
    errors: list[BaseException],
) -> None:
    """Make ``calls`` calls from ``load`` callers, each calling again once answered."""
    counter = itertools.count()

    async def caller() -> None:
        while (i := next(counter)) < calls:
            t0 = anyio.current_time()
            try:
                await model.call(inputs[i % len(inputs)])
            except Exception as exc:  # recorded with the point; the sweep goes on
                errors.append(exc)
            else:
                latencies.append(anyio.current_time() - t0)

    async with anyio.create_task_group() as tg:
        for _ in range(min(load, calls)):
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
        reporter = _auto_progress()
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


# -- progress -----------------------------------------------------------------------------------


def _auto_progress() -> Progress | None:
    if _render.in_kernel():
        return _NotebookProgress()
    if sys.stderr is not None and sys.stderr.isatty():
        return _TextProgress()
    return None


class _NotebookProgress:
    """A progress bar in the output of the running cell, updated in place."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._update = _render.notebook_output(self._bar(0, 1))

    def _bar(self, done: int, total: int) -> str:
        secs = time.monotonic() - self._start
        return (
            f'<progress value="{done}" max="{total}" style="width:20em"></progress> '
            f"<span>{done}/{total} points, {secs:.1f} s</span>"
        )

    def __call__(self, done: int, total: int) -> None:
        self._update(self._bar(done, total))

    def finish(self, result: ProfileResult) -> None:
        secs = time.monotonic() - self._start
        self._update(f"<span>profiled {len(result.points)} points in {secs:.1f} s</span>")


class _TextProgress:
    """A one-line progress bar on stderr."""

    def __call__(self, done: int, total: int) -> None:
        filled = round(30 * done / total)
        end = "\n" if done == total else ""
        print(
            f"\rprofiling [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


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


def _check_positive(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{field} must be a positive number of seconds, got {value!r}")


def _check_percentile(percentile: object) -> None:
    if percentile not in ("p50", "p90", "p99"):
        raise ConfigurationError(f"percentile must be 'p50', 'p90' or 'p99', got {percentile!r}")
