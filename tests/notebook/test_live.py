"""The live view (``batchkit/notebook/_live.py``): figures, versions, lifecycle, sinks."""

from __future__ import annotations

import threading

import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit.notebook import LiveView, live
from tests.support.render import Tables


def double_all(items: list[int]) -> list[int]:
    return [2 * i for i in items]


def plus_one(items: list[int]) -> list[int]:
    return [i + 1 for i in items]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def model() -> BatchedModel[int, int]:
    m = BatchedModel(double_all, name="net", max_batch_size=4, version="1")
    yield m  # type: ignore[misc]
    m.close()


def test_throughput_is_answered_items_per_second_over_recent_snapshots(
    model: BatchedModel[int, int],
) -> None:
    clock = Clock()
    view = LiveView(model, display="none", clock=clock)
    assert view.throughput == 0.0
    model.call_many_sync(range(10))
    clock.now += 2.0
    view.update()
    assert view.throughput == 5.0
    model.call_many_sync(range(30))
    clock.now += 2.0
    view.update()
    assert view.throughput == 10.0  # 40 items over the 4 s still in the window
    clock.now += 10.0
    view.update()
    assert view.throughput == 0.0  # nothing answered in the last 10 s


def test_frame_shows_the_live_figures(model: BatchedModel[int, int]) -> None:
    clock = Clock()
    view = LiveView(model, display="none", clock=clock)
    model.call_many_sync(range(12))
    clock.now += 3.0
    view.update()
    page = Tables(view._repr_html_())
    assert page.row("items", "completed") == ["12"]
    assert page.row("items", "queue depth") == ["0"]
    assert page.row("items", "throughput") == ["4.0 items/s"]
    assert page.row("batch sizes", "4") == ["3", ""]
    assert page.tables["latency (ms)"][0] == ["", "p50", "p90", "p99", "max"]
    assert "net \u00b7 version 1 \u00b7 stopped" in view._repr_html_()


def test_versions_seen_are_listed_with_when_they_appeared(model: BatchedModel[int, int]) -> None:
    clock = Clock()
    view = LiveView(model, display="none", clock=clock)
    clock.now += 1.5
    model.swap_sync(plus_one, version="2")
    view.update()
    clock.now += 1.0
    model.rollback_sync()
    view.update()
    assert view.versions == [(0.0, "1"), (1.5, "2"), (2.5, "1")]
    page = Tables(view._repr_html_())
    assert page.row("items", "versions") == ["1 \u2192 2 (1.5 s) \u2192 1 (2.5 s)"]
    assert "version 1" in view._repr_html_()


def test_start_and_stop_run_and_end_the_refresh_thread(model: BatchedModel[int, int]) -> None:
    view = live(model, interval=0.01, display="none")
    assert view.running
    assert any(t.name == "batchkit-live-net" for t in threading.enumerate())
    model.call_many_sync(range(8))
    view.stop()
    assert not view.running
    assert not any(t.name == "batchkit-live-net" for t in threading.enumerate())
    assert Tables(view._repr_html_()).row("items", "completed") == ["8"]  # the last frame
    view.stop()  # stopping again does nothing


def test_repr_says_whether_the_view_runs(model: BatchedModel[int, int]) -> None:
    view = LiveView(model, interval=0.25, display="none")
    assert repr(view) == "<LiveView of 'net' stopped, every 0.25 s>"
    with view:
        assert repr(view) == "<LiveView of 'net' live, every 0.25 s>"


def test_with_block_stops_the_view(model: BatchedModel[int, int]) -> None:
    with LiveView(model, interval=0.01, display="none") as view:
        assert view.running
    assert not view.running


def test_a_view_starts_once(model: BatchedModel[int, int]) -> None:
    with LiveView(model, display="none") as view:
        with pytest.raises(ConfigurationError, match="already started"):
            view.start()


def test_terminal_view_draws_with_rich(
    model: BatchedModel[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("rich")
    with live(model, interval=0.01, display="terminal"):
        model.call_many_sync(range(5))
    err = capsys.readouterr().err
    assert "net \u00b7 version 1 \u00b7 stopped" in err
    assert "throughput" in err


def test_live_view_does_not_start_the_model() -> None:
    fresh = BatchedModel(double_all, name="fresh")
    with live(fresh, interval=0.01, display="none") as view:
        pass
    assert Tables(view._repr_html_()).row("items", "submitted") == ["0"]
    assert repr(fresh) == "<BatchedModel 'fresh' idle>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval": 0}, "interval must be a positive number of seconds, got 0"),
        ({"interval": float("inf")}, "interval must be a positive number of seconds, got inf"),
        ({"display": "web"}, "display must be 'auto', 'notebook', 'terminal' or 'none', got 'web'"),
    ],
)
def test_live_validates_its_arguments(
    model: BatchedModel[int, int], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LiveView(model, **kwargs)  # type: ignore[arg-type]


def test_live_needs_a_model() -> None:
    with pytest.raises(ConfigurationError, match="live\\(\\) needs a BatchedModel, got 42"):
        live(42)  # type: ignore[arg-type]


def test_a_deployment_shows_its_split_and_the_shadow() -> None:
    from batchkit import Deployment

    versions = {
        "1": BatchedModel(double_all, name="net", version="1"),
        "2": BatchedModel(plus_one, name="net", version="2"),
    }
    with Deployment(versions, weights={"1": 3, "2": 1}, seed=0) as deployment:
        view = LiveView(deployment, display="none", clock=Clock())
        for i in range(40):
            deployment.call_sync(i)
        deployment.call_many_sync(range(4), version="2")
        deployment.set_shadow("2", fraction=1.0)
        deployment.call_many_sync([1, 2, 3], version="1")  # pinned: not mirrored
        deployment.call_sync(5, key="k")
        assert deployment.wait_shadow_sync(30)
        stats = deployment.statistics()
        view.update()
        page = Tables(view._repr_html_())
        routed = stats.routed
        assert page.tables["split"][0] == [
            "version", "weight", "routed", "pinned", "completed", "observed",
        ]  # fmt: skip
        total = routed["1"] + routed["2"]
        assert page.row("split", "1 (primary)") == [
            "75.0%", str(routed["1"]), "3", str(stats.versions["1"].completed),
            f"{routed['1'] / total:.1%}", "",
        ]  # fmt: skip
        assert page.row("split", "2 (shadow)")[:3] == ["25.0%", str(routed["2"]), "4"]
        s = stats.shadow
        assert f"shadow 2 at 100%: {s.disagreement_rate:.1%} disagree" in view._repr_html_()
        assert page.row("items", "completed") == [str(stats.total.completed)]
        deployment.promote("2")
        view.update()
        assert [v for _, v in view.versions] == ["1", "2"]
        assert "net \u00b7 version 2" in view._repr_html_()
