"""The profiler (``batchkit/notebook/_sweep.py``, ``_result.py``): sweeps, recommendations,
exports and plots.

The sweeps run on trio's mock clock with an async fake model whose cost is a sleep: time
advances only when every task waits, so each batch takes exactly its scripted cost and every
figure is the same on any machine, however loaded.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from batchkit import BatchedModel, ConfigurationError, LatencySummary
from batchkit.notebook import ProfilePoint, ProfileResult, aprofile, profile

FIXED = 0.010  # seconds per batch
PER_ITEM = 0.001  # seconds per item


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Run these tests on trio with a clock that jumps ahead whenever every task waits."""
    from trio.testing import MockClock

    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class FakeModel:
    """An async model whose batch of n items takes FIXED + n * PER_ITEM seconds."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(len(items))
        await anyio.sleep(FIXED + PER_ITEM * len(items))
        return [2 * i for i in items]


def cost(n: int) -> float:
    return FIXED + PER_ITEM * n


SWEEP: dict[str, Any] = {
    "max_batch_size": (1, 4, 16, 64),
    "concurrency": (1, 8, 64),
    "requests": 192,
}


# -- measurements -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_lone_caller_sees_exactly_the_model_cost() -> None:
    result = await aprofile(FakeModel(), range(10), **SWEEP)
    lone = [p for p in result.points if p.concurrency == 1]
    assert len(lone) == 4
    for p in lone:
        assert p.latency.p50 == pytest.approx(cost(1))
        assert p.latency.p99 == pytest.approx(cost(1))
        assert p.throughput == pytest.approx(1 / cost(1))
        assert p.mean_batch_size == 1.0
        assert p.batches == SWEEP["requests"]


@pytest.mark.anyio
async def test_full_batches_under_load_match_the_cost_model() -> None:
    # 8 callers and room for 16: in steady state all 8 items ride in one batch.
    result = await aprofile(FakeModel(), range(10), max_batch_size=(16,), concurrency=(8,))
    (p,) = result.points
    assert p.mean_batch_size == 8.0
    assert p.latency.p99 == pytest.approx(cost(8))
    assert p.throughput == pytest.approx(8 / cost(8))


@pytest.mark.anyio
async def test_batch_size_caps_the_batches_and_queues_the_rest() -> None:
    # 8 callers, batches of 4: two batches per round, each caller waits for both.
    result = await aprofile(FakeModel(), range(10), max_batch_size=(4,), concurrency=(8,))
    (p,) = result.points
    assert p.mean_batch_size == 4.0
    assert p.throughput == pytest.approx(4 / cost(4))
    assert p.latency.p99 == pytest.approx(2 * cost(4))


@pytest.mark.anyio
async def test_every_point_is_measured_with_a_fresh_model_on_the_sample_inputs() -> None:
    fake = FakeModel()
    result = await aprofile(fake, [5], max_batch_size=(2, 4), concurrency=(3,), requests=30)
    assert [(p.max_batch_size, p.concurrency) for p in result.points] == [(2, 3), (4, 3)]
    assert all(p.requests == 30 and p.errors == 0 for p in result.points)
    assert max(fake.batches) <= 4
    # warm-up (one call per caller) plus the measured calls, at both points
    assert sum(fake.batches) == 2 * (3 + 30)


@pytest.mark.anyio
async def test_sweeps_are_repeatable() -> None:
    first = await aprofile(FakeModel(), range(10), **SWEEP)
    second = await aprofile(FakeModel(), range(10), **SWEEP)
    # Equal up to float rounding: the mock clock's absolute time differs between the runs.
    assert [rounded(d) for d in first.to_dicts()] == [rounded(d) for d in second.to_dicts()]


def rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in row.items()}


@pytest.mark.anyio
async def test_max_wait_and_max_concurrency_are_swept_too() -> None:
    result = await aprofile(
        FakeModel(),
        range(4),
        max_batch_size=(2,),
        max_wait=(0.0, 0.005),
        max_concurrency=(1, 2),
        concurrency=(4,),
        requests=40,
    )
    assert [(p.max_wait, p.max_concurrency) for p in result.points] == [
        (0.0, 1),
        (0.0, 2),
        (0.005, 1),
        (0.005, 2),
    ]
    # 4 callers, batches of 2: two slots run both batches at once, doubling the throughput.
    assert result.points[0].throughput == pytest.approx(2 / cost(2))
    assert result.points[1].throughput == pytest.approx(4 / cost(2))


@pytest.mark.anyio
async def test_model_errors_are_counted_and_such_points_are_never_recommended() -> None:
    async def fails_on_big_batches(items: list[int]) -> list[int]:
        await anyio.sleep(cost(len(items)))
        if len(items) > 4:
            raise MemoryError(f"batch of {len(items)} does not fit")
        return items

    result = await aprofile(
        fails_on_big_batches,
        range(10),
        max_batch_size=(4, 16),
        concurrency=(16,),
        requests=64,
        warmup=0,
    )
    small, big = result.points
    assert small.errors == 0
    assert big.errors > 0
    assert big.error is not None and "does not fit" in big.error
    assert result.recommend() is small


@pytest.mark.anyio
async def test_a_batched_model_is_profiled_with_its_collate_and_split() -> None:
    async def over_tuples(batch: tuple[int, ...]) -> dict[str, list[int]]:
        await anyio.sleep(cost(len(batch)))
        return {"out": [x + 1 for x in batch]}

    model = BatchedModel(over_tuples, collate=tuple, split=lambda out: out["out"], name="tup")
    result = await aprofile(model, range(3), max_batch_size=(2,), concurrency=(2,), requests=10)
    assert result.name == "tup"
    (p,) = result.points
    assert p.errors == 0 and p.mean_batch_size == 2.0
    assert model.statistics().submitted == 0  # the model's own engine was left alone


@pytest.mark.anyio
async def test_progress_is_reported_after_each_point() -> None:
    seen: list[tuple[int, int]] = []
    await aprofile(
        FakeModel(),
        [1],
        max_batch_size=(1, 2),
        concurrency=(1, 2),
        requests=4,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


# -- recommendations ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("target", [0.012, 0.020, 0.030, 0.100, 1.0])
async def test_recommendation_is_the_best_throughput_within_the_latency_target(
    target: float,
) -> None:
    result = await aprofile(FakeModel(), range(10), latency_target=target, **SWEEP)
    best = result.recommendation
    assert best is not None
    assert best.latency.p99 <= target
    within = [p for p in result.points if p.latency.p99 <= target]
    assert best.throughput == pytest.approx(max(p.throughput for p in within))


@pytest.mark.anyio
async def test_recommendations_for_known_costs() -> None:
    result = await aprofile(FakeModel(), range(10), **SWEEP)
    # Under 12 ms only a lone caller fits (11 ms); ties go to the smallest batch size.
    lone = result.recommend(0.012)
    assert lone is not None
    assert (lone.max_batch_size, lone.concurrency) == (1, 1)
    # Under 30 ms: 8 callers in batches of 8 (18 ms, 444 items/s) beats batches of 4 (28 ms).
    mid = result.recommend(0.030)
    assert mid is not None
    assert (mid.max_batch_size, mid.concurrency) == (16, 8)
    assert mid.throughput == pytest.approx(8 / cost(8))
    assert mid.settings == {"max_batch_size": 16, "max_wait": 0.0, "max_concurrency": 1}
    # No bound: the largest batches at the heaviest load.
    top = result.recommend()
    assert top is not None
    assert (top.max_batch_size, top.concurrency) == (64, 64)


@pytest.mark.anyio
async def test_no_recommendation_when_nothing_meets_the_target() -> None:
    result = await aprofile(FakeModel(), range(10), latency_target=0.005, **SWEEP)
    assert result.recommendation is None
    assert "no setting met p99 \u2264 5.00 ms; the lowest p99 was 11.0 ms" in result.summary()


def point(size: int, load: int, throughput: float, p99: float, **kw: Any) -> ProfilePoint:
    lat = LatencySummary(100, p99 / 2, p99 / 2, p99 * 0.9, p99, p99)
    return ProfilePoint(size, 0.0, 1, load, 100, 1.0, throughput, lat, float(size), 10, **kw)


def test_recommend_filters_by_concurrency_and_percentile() -> None:
    a = point(8, 4, 500.0, 0.010)
    b = point(32, 16, 900.0, 0.030)
    c = point(64, 16, 1000.0, 0.050)
    result = ProfileResult("m", (a, b, c))
    assert result.recommend(0.020) is a
    assert result.recommend(0.040) is b
    assert result.recommend(0.040, concurrency=4) is a
    assert result.recommend(concurrency=16) is c
    assert result.recommend(0.030, percentile="p50") is c  # p50 of c is 25 ms
    assert result.recommend(0.001) is None


def test_recommend_breaks_ties_by_latency_then_smaller_settings() -> None:
    slow = point(8, 4, 500.0, 0.020)
    fast = point(16, 4, 500.0, 0.010)
    small = point(4, 4, 500.0, 0.010)
    assert ProfileResult("m", (slow, fast, small)).recommend() is small


def test_recommend_validates_its_arguments() -> None:
    result = ProfileResult("m", (point(1, 1, 1.0, 0.01),))
    with pytest.raises(ConfigurationError, match="latency_target must be a positive number"):
        result.recommend(-1.0)
    with pytest.raises(ConfigurationError, match=r"percentile must be .* got 'p95'"):
        result.recommend(0.1, percentile="p95")  # type: ignore[arg-type]


# -- exports and rendering ----------------------------------------------------------------------


def sample_result() -> ProfileResult:
    points = (
        point(8, 4, 500.0, 0.010),
        point(32, 16, 900.0, 0.030),
        point(64, 16, 1000.0, 0.050, errors=2, error="MemoryError: no"),
    )
    return ProfileResult("net", points, latency_target=0.040)


def test_to_dicts_and_csv_hold_every_point(tmp_path: Path) -> None:
    result = sample_result()
    rows = result.to_dicts()
    assert [r["max_batch_size"] for r in rows] == [8, 32, 64]
    assert rows[1]["throughput"] == 900.0
    assert rows[1]["latency_p99"] == 0.030
    assert rows[2]["errors"] == 2 and rows[2]["error"] == "MemoryError: no"
    path = tmp_path / "profile.csv"
    text = result.to_csv(path)
    assert path.read_text() == text
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [float(r["latency_p99"]) for r in parsed] == [0.010, 0.030, 0.050]
    assert list(parsed[0]) == list(rows[0])


def test_html_table_shows_the_points_and_highlights_the_recommendation() -> None:
    from tests.support.render import Tables

    html = sample_result()._repr_html_()
    page = Tables(html)
    (caption,) = page.tables
    assert caption == "profile (max_wait=0, max_concurrency=1)"
    header, *rows = page.tables[caption]
    assert header == [
        "max batch",
        "callers",
        "items/s",
        "mean batch",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    assert rows[1] == ["32", "16", "900", "32.0", "15.0", "30.0", "0"]
    assert html.count('class="recommended"') == 1
    assert '<tr class="recommended"' in html and '<th scope="row"' in html
    recommended = html.split('class="recommended"')[1].split("</tr>")[0]
    assert ">900<" in recommended
    assert "best throughput with p99 \u2264 40.0 ms: max_batch_size=32" in html


def test_rich_table_shows_the_points() -> None:
    pytest.importorskip("rich")
    from tests.support.render import render

    text = render(sample_result())
    assert "batchkit profile of 'net'" in text
    assert any(line.split()[:3] == ["32", "16", "900"] for line in text.splitlines())
    assert "max_batch_size=32" in text


def test_plot_draws_throughput_and_latency_against_batch_size_and_concurrency() -> None:
    pytest.importorskip("matplotlib")
    result = sample_result()
    fig = result.plot()
    axes = fig.get_axes()
    assert len(axes) == 4
    assert [ax.get_xlabel() for ax in axes] == [
        "max_batch_size",
        "max_batch_size",
        "concurrency (callers)",
        "concurrency (callers)",
    ]
    assert axes[0].get_ylabel() == "throughput (items/s)"
    # the point with errors is left out; the target is drawn on the latency plots
    plotted = {x for line in axes[0].get_lines() for x in line.get_xdata()}
    assert plotted == {8, 32}
    target_lines = [line for line in axes[1].get_lines() if list(line.get_ydata()) == [40.0, 40.0]]
    assert target_lines
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")


def test_repr_states_the_recommendation() -> None:
    assert repr(sample_result()) == (
        "<ProfileResult 'net', 3 points: best throughput with p99 \u2264 40.0 ms: "
        "max_batch_size=32, max_wait=0, max_concurrency=1 (900 items/s with 16 callers, "
        "p99 30.0 ms)>"
    )


def test_plot_without_plottable_points_says_so() -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigurationError, match="no points to plot"):
        ProfileResult("empty", ()).plot()
    result = sample_result()
    with pytest.raises(ConfigurationError, match=r"no point without errors at max_wait=0\.5"):
        result.plot(max_wait=0.5)


# -- the sync entry point -----------------------------------------------------------------------


def slow_double(items: list[int]) -> list[int]:
    return [2 * i for i in items]


def test_profile_runs_sync_models_from_plain_code() -> None:
    result = profile(slow_double, range(5), max_batch_size=(1, 4), concurrency=(1, 4), requests=20)
    assert len(result.points) == 4
    assert all(p.errors == 0 and p.throughput > 0 for p in result.points)


def test_profile_works_inside_a_running_event_loop() -> None:
    async def cell() -> ProfileResult:
        # A notebook cell: code running inside the kernel's event loop calls profile().
        return profile(slow_double, [1], max_batch_size=(2,), concurrency=(2,), requests=8)

    result = asyncio.run(cell())
    assert result.points[0].errors == 0


def test_profile_reports_progress_to_a_callable() -> None:
    seen: list[int] = []
    profile(
        slow_double,
        [1],
        max_batch_size=(1, 2),
        concurrency=(1,),
        requests=2,
        progress=lambda done, total: seen.append(done),
    )
    assert seen == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 8}, "max_batch_size must be a sequence of ints, got 8"),
        ({"max_batch_size": ()}, "max_batch_size must hold at least one value"),
        ({"max_batch_size": (0,)}, "max_batch_size values must be ints >= 1, got 0"),
        ({"concurrency": (2.5,)}, "concurrency values must be ints >= 1, got 2.5"),
        ({"max_wait": (-1,)}, "max_wait values must be seconds >= 0, got -1"),
        ({"max_wait": (math.nan,)}, "max_wait values must be seconds >= 0, got nan"),
        ({"requests": 0}, "requests must be an int >= 1, got 0"),
        ({"warmup": -1}, "warmup must be an int >= 0, got -1"),
        ({"latency_target": 0}, "latency_target must be a positive number of seconds, got 0"),
        ({"percentile": "p95"}, "percentile must be 'p50', 'p90' or 'p99', got 'p95'"),
        ({"progress": "yes"}, "progress must be a bool or a callable, got 'yes'"),
        ({"bogus": 1}, r"unexpected settings: \['bogus'\]"),
    ],
)
def test_profile_validates_its_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        profile(slow_double, [1], **kwargs)


def test_profile_needs_inputs_and_a_model() -> None:
    with pytest.raises(ConfigurationError, match="inputs must hold at least one sample item"):
        profile(slow_double, [])
    with pytest.raises(ConfigurationError, match="the model must be callable"):
        profile(42, [1])  # type: ignore[arg-type]


async def async_double(items: list[int]) -> list[int]:
    await anyio.lowlevel.checkpoint()
    return [2 * i for i in items]


def test_interrupting_profile_stops_the_sweep() -> None:
    """KeyboardInterrupt (the kernel's interrupt button) stops the sweep and its threads."""
    import signal
    import threading

    seen: list[int] = []

    def interrupt_after_the_first_point(done: int, total: int) -> None:
        seen.append(done)
        if done == 1:  # SIGINT to the calling thread, as the kernel's interrupt button sends
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        profile(
            async_double,
            [1],
            max_batch_size=(1, 2, 4, 8),
            concurrency=(1,),
            requests=10_000,
            progress=interrupt_after_the_first_point,
        )
    assert seen[0] == 1 and len(seen) < 4


def test_aprofile_runs_on_asyncio_too() -> None:
    """The sweep runs in the caller's asyncio loop (real time: only shapes are checked)."""
    result = asyncio.run(
        aprofile(async_double, range(4), max_batch_size=(1, 4), concurrency=(4,), requests=40)
    )
    assert [(p.max_batch_size, p.concurrency) for p in result.points] == [(1, 4), (4, 4)]
    assert all(p.errors == 0 and p.latency.count == 40 for p in result.points)
    assert result.points[0].mean_batch_size == 1.0
    assert 1.0 <= result.points[1].mean_batch_size <= 4.0
