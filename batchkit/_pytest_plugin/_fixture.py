"""The ``batchkit_benchmark`` fixture: a described load, run inside pytest-benchmark's timing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from .._core import ConfigurationError
from ._load import Figures, Load, Round, SweepPoint, Target, figures_of, load_of, run_round

__all__ = ("BatchBenchmark", "FigureClock", "batchkit_benchmark")


class FigureClock:
    """The timer pytest-benchmark reads for a ``batchkit_benchmark`` test.

    pytest-benchmark times a round as ``timer()`` after it minus ``timer()`` before it. This
    timer reads 0.0, except once after each round, when it reads the round's figure (see
    ``Round.figure``): so each round's recorded "time" is exactly that figure, and every stat
    pytest-benchmark keeps and compares (min, max, mean, median, ...) is a stat of the figure.
    """

    __name__ = "batchkit_figure"

    def __init__(self) -> None:
        self._reading: float | None = None

    def __call__(self) -> float:
        reading, self._reading = self._reading, None
        return 0.0 if reading is None else reading

    def record(self, figure: float) -> None:
        """Make the next reading ``figure`` (the end of the round being timed)."""
        self._reading = figure


class BatchBenchmark:
    """What the ``batchkit_benchmark`` fixture gives a test: call it once with the load.

    ``benchmark`` is pytest-benchmark's fixture for the test (its ``extra_info`` gets the
    figures).
    """

    def __init__(self, benchmark: Any, clock: FigureClock) -> None:
        self.benchmark = benchmark
        self._clock = clock
        self._used = False

    def __call__(
        self,
        target: Target,
        items: Sequence[Any] | Callable[[int], Any] | None = None,
        *,
        concurrency: int = 8,
        requests: int | None = None,
        duration: float | None = None,
        warmup: int | None = None,
        mode: str = "asyncio",
        settings: Mapping[str, Any] | None = None,
        point: SweepPoint | None = None,
        baseline: str | Target | None = None,
        rounds: int = 3,
        backend_options: Mapping[str, Any] | None = None,
    ) -> Figures:
        """Run the load ``rounds`` times inside pytest-benchmark's timing; return the figures.

        ``target``: a ``BatchedModel`` (its function and settings; it is never called itself:
        each measurement builds a fresh model), a model function over a list of items,
        ``"MODULE:ATTR"`` naming either, a ``PipeTarget`` or an ``HttpTarget``.
        ``items``: the items sent, in turn (a sequence), or ``items(i)`` for the i-th call.
        ``concurrency`` callers call in a closed loop (each again as soon as answered);
        ``requests`` calls in all (default 256), or calls for ``duration`` seconds; before
        them, ``warmup`` calls (default: one per caller). ``mode``: callers are tasks on
        ``"asyncio"`` or ``"trio"`` (times on the event loop's clock, so a trio ``MockClock``
        in ``backend_options`` gives exact figures), or ``"threads"`` calling ``call_sync``.
        ``settings`` (or a sweep ``point``, which sets the concurrency too) override the
        model's batching settings.
        ``baseline``: ``"unbatched"`` (the same model with ``max_batch_size=1`` under the same
        load), ``"raw"`` (the model function called directly on full batches, back to back),
        or another target under the same load; measured in every round, alternating with the
        target. The ratio is the target's items/s over the baseline's.

        Each round's recorded time is the baseline's items/s over the target's (1 / ratio),
        or, without a baseline, the seconds per item; so ``--benchmark-compare-fail=mean:5%``
        fails when the ratio (or the throughput) gets 5% worse. Raises
        ``ConfigurationError`` for an invalid argument.
        """
        if self._used:
            raise ConfigurationError("batchkit_benchmark runs one load per test; it ran already")
        self._used = True
        load = load_of(
            target,
            items,
            concurrency=concurrency,
            requests=requests,
            duration=duration,
            warmup=warmup,
            mode=mode,
            settings=settings,
            point=point,
            baseline=baseline,
            rounds=rounds,
            backend_options=backend_options,
        )
        return self.run(load)

    def run(self, load: Load) -> Figures:
        """Run a validated ``load`` and record its figures."""
        done: list[Round] = []

        def one_round() -> None:
            found = run_round(load, len(done))
            done.append(found)
            self._clock.record(found.figure)

        self.benchmark.pedantic(one_round, rounds=load.rounds, iterations=1, warmup_rounds=0)
        figures = figures_of(load, done)
        self.benchmark.extra_info.update(figures.extra_info())
        return figures


@pytest.fixture
def batchkit_benchmark(request: pytest.FixtureRequest) -> BatchBenchmark:
    """Benchmark a batched model under a described load (see ``BatchBenchmark.__call__``).

    Uses pytest-benchmark's ``benchmark`` fixture (do not request both in one test), timed by
    a ``FigureClock``; the test's own ``@pytest.mark.benchmark(...)`` options are kept.
    """
    plugins = request.config.pluginmanager
    if not (plugins.hasplugin("benchmark") or plugins.hasplugin("pytest_benchmark.plugin")):
        pytest.fail(
            "batchkit_benchmark needs pytest-benchmark: pip install pytest-benchmark",
            pytrace=False,
        )
    if "benchmark" in request.fixturenames:
        pytest.fail(
            "request batchkit_benchmark alone: it uses the test's `benchmark` fixture itself "
            "(with its own timer); read it as batchkit_benchmark.benchmark",
            pytrace=False,
        )
    clock = FigureClock()
    own = request.node.get_closest_marker("benchmark")
    options = {**(own.kwargs if own is not None else {}), "timer": clock}
    request.node.add_marker(pytest.mark.benchmark(**options), append=False)
    return BatchBenchmark(request.getfixturevalue("benchmark"), clock)
