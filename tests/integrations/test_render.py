"""HTML and rich rendering of models and statistics (``batchkit/_render.py``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import MappingProxyType

import pytest

from batchkit import BatchedModel, LatencySummary, Statistics
from batchkit._render import batch_size_rows

from ..support.render import Tables, render


def latency(p50: float, p90: float, p99: float, most: float, count: int = 10) -> LatencySummary:
    return LatencySummary(count, p50, p50, p90, p99, most)


def snapshot(**changes: object) -> Statistics:
    fields: dict[str, object] = {
        "name": "embed",
        "model_version": "v7",
        "submitted": 1234,
        "completed": 1200,
        "failed": 3,
        "expired": 2,
        "cancelled": 1,
        "rejected": 5,
        "queue_depth": 17,
        "waiting_for_room": 4,
        "in_flight_batches": 2,
        "batches": 40,
        "batch_sizes": MappingProxyType({1: 10, 8: 20, 32: 10}),
        "queue_wait": latency(0.0005, 0.001, 0.004, 0.0041),
        "compute": latency(0.0123, 0.02, 0.0456, 0.05),
        "end_to_end": latency(0.0150, 0.1234, 0.2500, 1.5, count=1200),
        "swaps": 2,
    }
    fields.update(changes)
    return Statistics(**fields)  # type: ignore[arg-type]


def double(items: list[int]) -> list[int]:
    return [2 * i for i in items]


# -- Statistics as HTML -------------------------------------------------------------------------


def test_statistics_html_shows_the_counts() -> None:
    page = Tables(snapshot()._repr_html_())
    assert page.row("items", "submitted") == ["1,234"]
    assert page.row("items", "completed") == ["1,200"]
    assert page.row("items", "failed") == ["3"]
    assert page.row("items", "expired") == ["2"]
    assert page.row("items", "cancelled") == ["1"]
    assert page.row("items", "rejected") == ["5"]
    assert page.row("items", "queue depth") == ["17"]
    assert page.row("items", "waiting for room") == ["4"]
    assert page.row("items", "in-flight batches") == ["2"]


def test_statistics_html_shows_latency_percentiles_in_milliseconds() -> None:
    page = Tables(snapshot()._repr_html_())
    assert page.tables["latency (ms)"][0] == ["", "p50", "p90", "p99", "max"]
    assert page.row("latency (ms)", "queue wait") == ["0.50", "1.00", "4.00", "4.10"]
    assert page.row("latency (ms)", "compute (batch)") == ["12.3", "20.0", "45.6", "50.0"]
    assert page.row("latency (ms)", "end to end") == ["15.0", "123", "250", "1,500"]
    assert "over the last 1,200 items" in snapshot()._repr_html_()


def test_statistics_html_shows_the_batch_size_histogram() -> None:
    stats = snapshot()
    html = stats._repr_html_()
    page = Tables(html)
    assert page.row("batch sizes", "1") == ["10", ""]  # the last cell holds the bar
    assert page.row("batch sizes", "8") == ["20", ""]
    assert page.row("batch sizes", "32") == ["10", ""]
    assert page.bars == ["50", "100", "50"]  # bars relative to the most common size
    assert f"40 batches, mean size {stats.mean_batch_size:.1f}" in html


def test_statistics_html_says_when_dispatch_is_held() -> None:
    assert "dispatch" not in Tables(snapshot()._repr_html_()).tables["items"][-1]
    page = Tables(snapshot(dispatch_held=True)._repr_html_())
    assert page.row("items", "dispatch") == ["held (in-place swap)"]


def test_statistics_html_names_the_model_and_version() -> None:
    html = snapshot()._repr_html_()
    assert "embed \u00b7 version v7" in html


def test_html_escapes_names() -> None:
    html = snapshot(name="<script>alert(1)</script>", model_version="a&b")._repr_html_()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "a&amp;b" in html


def test_empty_statistics_render() -> None:
    empty = BatchedModel(double, name="fresh").statistics()
    page = Tables(empty._repr_html_())
    assert page.row("items", "submitted") == ["0"]
    assert page.tables["batch sizes"] == [["size", "batches"]]


@pytest.mark.parametrize(
    ("sizes", "rows"),
    [
        ({}, []),
        ({3: 1, 1: 2}, [("1", 2), ("3", 1)]),
        (
            {n: 1 for n in range(1, 20)},
            [
                ("1", 1),
                ("2", 1),
                ("3\u20134", 2),
                ("5\u20138", 4),
                ("9\u201316", 8),
                ("17\u201332", 3),
            ],
        ),
    ],
)
def test_many_batch_sizes_are_grouped_in_power_of_two_ranges(
    sizes: dict[int, int], rows: list[tuple[str, int]]
) -> None:
    assert batch_size_rows(sizes) == rows


# -- BatchedModel as HTML -----------------------------------------------------------------------


def test_model_html_shows_settings_state_and_statistics() -> None:
    model = BatchedModel(
        double, name="doubler", max_batch_size=8, max_wait=0.002, max_queue_size=100, version="3"
    )
    page = Tables(model._repr_html_())
    assert page.row("model", "state") == ["idle"]
    assert page.row("model", "version") == ["3"]
    assert page.row("model", "max_batch_size") == ["8"]
    assert page.row("model", "max_wait") == ["2.00 ms"]
    assert page.row("model", "max_concurrency") == ["1"]
    assert page.row("model", "max_queue_size") == ["100"]
    with model:
        assert model.call_many_sync(range(20)) == [2 * i for i in range(20)]
        page = Tables(model._repr_html_())
        assert page.row("model", "state") == ["running"]
        assert page.row("items", "completed") == ["20"]
        sizes = {int(row[0]): int(row[1]) for row in page.tables["batch sizes"][1:]}
        assert sum(size * n for size, n in sizes.items()) == 20
        assert max(sizes) <= 8
    assert Tables(model._repr_html_()).row("model", "state") == ["closed"]


def test_model_html_shows_greedy_wait() -> None:
    page = Tables(BatchedModel(double)._repr_html_())
    assert page.row("model", "max_wait") == ["0 (greedy)"]
    assert page.row("model", "max_queue_size") == ["unbounded"]


# -- rich ---------------------------------------------------------------------------------------


def test_statistics_render_with_rich() -> None:
    pytest.importorskip("rich")
    text = render(snapshot())
    assert "embed \u00b7 version v7" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "1,234" in lines["submitted"]
    words = next(line for line in text.splitlines() if "end to end" in line).split()
    at = words.index("to") + 2
    assert words[at : at + 4] == ["15.0", "123", "250", "1,500"]


def test_model_renders_with_rich() -> None:
    pytest.importorskip("rich")
    text = render(BatchedModel(double, name="doubler", max_batch_size=8))
    assert "BatchedModel 'doubler'" in text
    assert "max_batch_size" in text


def test_rendering_is_imported_only_when_used() -> None:
    code = textwrap.dedent(
        """
        import sys
        import batchkit
        model = batchkit.BatchedModel(lambda xs: xs, name="m")
        assert "batchkit._render" not in sys.modules
        model.statistics()._repr_html_()
        assert "batchkit._render" in sys.modules
        assert "rich" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
