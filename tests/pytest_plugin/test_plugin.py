"""The pytest plugin, run from a user's side: suites written with ``pytester`` and run by pytest.

The scripted model takes ``FIXED + PER_ITEM * n`` seconds for a batch of n on trio's
``MockClock``, so the figures the fixture records are exact, not timed.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit._pytest_plugin._load import load_of
from batchkit.notebook import aprofile
from batchkit.pytest_plugin import GrpcTarget, PipeTarget, SweepPoint, sweep

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ("-p", "batchkit.pytest_plugin")
FIXED, PER_ITEM = 0.010, 0.001

FAKES = f"""
import anyio

FIXED, PER_ITEM = {FIXED}, {PER_ITEM}


def cost(n):
    return FIXED + PER_ITEM * n


async def scripted(items):
    await anyio.sleep(cost(len(items)))
    return [2 * i for i in items]


def mock_clock():
    from trio.testing import MockClock

    return {{"clock": MockClock(autojump_threshold=0)}}
"""

KEYS = {
    "target", "mode", "concurrency", "settings", "calls", "items_per_s", "p50", "p90", "p99",
    "latency_mean", "latency_max", "mean_batch_size", "batch_size_histogram", "errors",
    "error_samples", "baseline", "baseline_items_per_s", "ratio", "rounds", "recorded",
}  # fmt: skip


def cost(n: int) -> float:
    return FIXED + PER_ITEM * n


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project: the scripted model, and warnings as errors."""
    pytester.makepyfile(fakes=FAKES)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.syspathinsert()
    return pytester


def benchmarks(path: Path) -> dict[str, dict[str, Any]]:
    """Return the benchmarks of a ``--benchmark-json`` file by test name."""
    return {b["name"]: b for b in json.loads(path.read_text())["benchmarks"]}


# -- the figures ----------------------------------------------------------------------------


def test_the_figures_are_exact_on_a_scripted_model(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_model="""
        import pytest
        from fakes import cost, mock_clock, scripted

        def test_model(batchkit_benchmark):
            figures = batchkit_benchmark(
                scripted, range(100), concurrency=8, requests=64, mode="trio",
                settings={"max_batch_size": 16}, baseline="unbatched", rounds=3,
                backend_options=mock_clock(),
            )
            # 8 callers, room for 16: every batch holds all 8 items, each waits one batch.
            assert figures.items_per_s == pytest.approx(8 / cost(8))
            assert figures.latency.p50 == pytest.approx(cost(8))
            assert figures.latency.p99 == pytest.approx(cost(8))
            assert figures.calls == 3 * 64
            assert figures.batch_sizes == {8: 3 * 8}
            assert figures.mean_batch_size == 8.0
            # Unbatched, one item per batch: each batch costs cost(1).
            assert figures.baseline_items_per_s == pytest.approx(1 / cost(1))
            assert figures.ratio == pytest.approx(8 * cost(1) / cost(8))
            assert figures.failed == 0
        """
    )
    out = suite.path / "out.json"
    result = suite.runpytest_subprocess(*PLUGIN, f"--benchmark-json={out}")
    result.assert_outcomes(passed=1)
    (bench,) = benchmarks(out).values()
    info = bench["extra_info"]
    assert set(info) == KEYS
    assert info["items_per_s"] == pytest.approx(8 / cost(8))
    assert (info["p50"], info["p90"], info["p99"]) == pytest.approx((cost(8),) * 3)
    assert info["batch_size_histogram"] == {"8": 24}
    assert info["errors"] == {"reject": 0, "timeout": 0, "model": 0, "closed": 0, "other": 0}
    assert info["baseline"] == "unbatched"
    assert info["ratio"] == pytest.approx(8 * cost(1) / cost(8))
    # Each round's recorded time is 1 / ratio, so OPS is the ratio itself.
    assert bench["stats"]["rounds"] == 3
    assert bench["stats"]["data"] == pytest.approx([cost(8) / (8 * cost(1))] * 3)
    assert bench["stats"]["ops"] == pytest.approx(8 * cost(1) / cost(8))
    assert bench["options"]["timer"] == "batchkit_figure"
    assert (
        info["rounds"]
        == [
            {
                "items_per_s": pytest.approx(8 / cost(8)),
                "baseline_items_per_s": pytest.approx(1 / cost(1)),
                "ratio": pytest.approx(8 * cost(1) / cost(8)),
            }
        ]
        * 3
    )


def test_a_small_batch_size_caps_the_batches(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_cap="""
        import pytest
        from fakes import cost, mock_clock, scripted

        def test_cap(batchkit_benchmark):
            figures = batchkit_benchmark(
                scripted, [1, 2, 3], concurrency=8, requests=64, mode="trio",
                settings={"max_batch_size": 4}, rounds=1, backend_options=mock_clock(),
            )
            assert figures.batch_sizes == {4: 16}
            assert figures.items_per_s == pytest.approx(4 / cost(4))
            assert figures.latency.p99 == pytest.approx(2 * cost(4))
            assert figures.baseline is None and figures.ratio is None
        """
    )
    out = suite.path / "out.json"
    suite.runpytest_subprocess(*PLUGIN, f"--benchmark-json={out}").assert_outcomes(passed=1)
    (bench,) = benchmarks(out).values()
    # Without a baseline each round records the seconds per item: OPS is items/s.
    assert bench["stats"]["data"] == pytest.approx([cost(4) / 4])
    assert bench["extra_info"]["recorded"] == "seconds per item (1 / items/s)"


def test_the_raw_baseline_is_the_model_on_full_batches(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_raw="""
        import pytest
        from fakes import cost, mock_clock, scripted

        def test_raw(batchkit_benchmark):
            figures = batchkit_benchmark(
                scripted, range(10), concurrency=8, requests=64, mode="trio",
                settings={"max_batch_size": 16}, baseline="raw", rounds=2,
                backend_options=mock_clock(),
            )
            assert figures.baseline == "raw"
            assert figures.baseline_items_per_s == pytest.approx(16 / cost(16))
            assert figures.ratio == pytest.approx((8 / cost(8)) / (16 / cost(16)))
        """
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


def test_a_duration_bounds_the_calls_started(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_duration="""
        import pytest
        from fakes import cost, mock_clock, scripted

        def test_duration(batchkit_benchmark):
            figures = batchkit_benchmark(
                scripted, range(10), concurrency=8, duration=1.0, mode="trio",
                settings={"max_batch_size": 8}, rounds=1, backend_options=mock_clock(),
            )
            # Batches leave at 0, cost(8), 2 cost(8), ...: 56 of them start before 1.0 s.
            assert figures.calls == 8 * 56
            assert figures.items_per_s == pytest.approx(8 / cost(8))
        """
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


def test_errors_are_counted_by_kind_with_a_sample_of_each(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_errors="""
        import anyio
        from fakes import mock_clock

        async def flaky(items):
            if 13 in items:
                raise RuntimeError("the model broke")
            if 99 in items:
                await anyio.sleep(1.5)  # past the timeout: the caller stops waiting at 1.0
            return [ValueError(f"bad {i}") if i == 7 else i for i in items]

        def test_errors(batchkit_benchmark):
            figures = batchkit_benchmark(
                flaky, lambda i: [7, 13, 99, 1][i % 4], concurrency=1, requests=40,
                mode="trio", settings={"max_batch_size": 1, "timeout": 1.0}, rounds=1,
                warmup=0, backend_options=mock_clock(),
            )
            assert figures.errors == {
                "reject": 0, "timeout": 10, "model": 10, "closed": 0, "other": 10,
            }
            assert figures.calls == 10
            assert "the model broke" in figures.error_samples["model"]
            assert "bad 7" in figures.error_samples["other"]
            assert "DeadlineExceeded" in figures.error_samples["timeout"]
        """
    )
    out = suite.path / "out.json"
    suite.runpytest_subprocess(*PLUGIN, f"--benchmark-json={out}").assert_outcomes(passed=1)
    (bench,) = benchmarks(out).values()
    assert bench["extra_info"]["errors"]["model"] == 10


def test_threads_call_a_sync_model_and_every_call_is_counted(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_threads="""
        import threading
        from batchkit import BatchedModel

        seen = set()

        def double(items):
            seen.add(threading.current_thread().name)
            return [2 * i for i in items]

        model = BatchedModel(double, max_batch_size=4)

        def test_threads(batchkit_benchmark):
            figures = batchkit_benchmark(
                model, range(10), concurrency=4, requests=100, mode="threads",
                baseline="raw", rounds=2,
            )
            assert figures.calls == 200
            assert sum(k * n for k, n in figures.batch_sizes.items()) == 200
            assert max(figures.batch_sizes) <= 4
            assert 1.0 <= figures.mean_batch_size <= 4.0
            assert figures.failed == 0
            assert figures.ratio is not None and figures.ratio > 0
            # The user's model itself was never started, used or closed.
            assert model.statistics().submitted == 0
            assert model.call_sync(3) == 6
            model.close()
        """
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


# -- comparing runs -------------------------------------------------------------------------

COMPARED = """
import os
from fakes import mock_clock, scripted

def test_ratio(batchkit_benchmark):
    batchkit_benchmark(
        scripted, range(10), concurrency=8, requests=64, mode="trio",
        settings={"max_batch_size": int(os.environ["BATCH"])}, baseline="unbatched",
        rounds=3, backend_options=mock_clock(),
    )
"""


def test_compare_fail_catches_a_worse_ratio(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite.makepyfile(test_compared=COMPARED)
    storage = f"--benchmark-storage=file://{suite.path / 'runs'}"
    monkeypatch.setenv("BATCH", "16")
    suite.runpytest_subprocess(*PLUGIN, storage, "--benchmark-save=base").assert_outcomes(passed=1)
    compare = (storage, "--benchmark-compare=0001", "--benchmark-compare-fail=mean:5%")
    # The same setting: the same ratio, the comparison passes.
    same = suite.runpytest_subprocess(*PLUGIN, *compare)
    same.assert_outcomes(passed=1)
    assert same.ret == 0
    # Batches of 4 for 8 callers: the ratio over unbatched drops, the run fails.
    monkeypatch.setenv("BATCH", "4")
    worse = suite.runpytest_subprocess(*PLUGIN, *compare)
    assert worse.ret != 0
    said = worse.stdout.str() + worse.stderr.str()
    assert "Performance has regressed" in said
    assert "test_ratio (0001_base) - Field 'mean' has failed PercentageRegressionCheck" in said


def test_compare_follows_the_ratio_not_the_absolute_speed(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model gets twice as slow on every batch: throughput halves, but batched and
    # unbatched halve alike, so the ratio, and the comparison, hold.
    suite.makepyfile(
        test_compared=COMPARED.replace(
            "from fakes import mock_clock, scripted",
            "import anyio\nfrom fakes import cost, mock_clock\n\n"
            "async def scripted(items):\n"
            "    await anyio.sleep(float(os.environ['SLOWER']) * cost(len(items)))\n"
            "    return items\n",
        )
    )
    storage = f"--benchmark-storage=file://{suite.path / 'runs'}"
    monkeypatch.setenv("BATCH", "16")
    monkeypatch.setenv("SLOWER", "1")
    suite.runpytest_subprocess(*PLUGIN, storage, "--benchmark-save=base").assert_outcomes(passed=1)
    monkeypatch.setenv("SLOWER", "2")
    out = suite.path / "slower.json"
    slower = suite.runpytest_subprocess(
        *PLUGIN,
        storage,
        "--benchmark-compare=0001",
        "--benchmark-compare-fail=mean:1%",
        f"--benchmark-json={out}",
    )
    assert slower.ret == 0
    (bench,) = benchmarks(out).values()
    assert bench["extra_info"]["items_per_s"] == pytest.approx(8 / (2 * cost(8)))


# -- the sweep ------------------------------------------------------------------------------


def test_sweep_gives_the_profilers_grid_as_test_ids() -> None:
    params = sweep(max_batch_size=(1, 16), max_wait=(0, 0.002), concurrency=(8,))
    assert [p.id for p in params] == [
        "bs1-wait0-mc1-c8", "bs1-wait0.002-mc1-c8", "bs16-wait0-mc1-c8", "bs16-wait0.002-mc1-c8",
    ]  # fmt: skip
    assert params[2].values == (SweepPoint(16, 0.0, 1, 8),)
    with pytest.raises(ConfigurationError, match="max_batch_size values must be ints >= 1"):
        sweep(max_batch_size=(0,))


@pytest.mark.anyio
async def test_one_test_per_sweep_point_measures_what_the_profiler_does(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        test_sweep="""
        import pytest
        from batchkit.pytest_plugin import sweep
        from fakes import mock_clock, scripted

        @pytest.mark.parametrize("point", sweep(max_batch_size=(1, 4, 16), concurrency=(8,)))
        def test_point(batchkit_benchmark, point):
            batchkit_benchmark(
                scripted, range(10), point=point, requests=64, mode="trio", rounds=1,
                backend_options=mock_clock(),
            )
        """
    )
    out = suite.path / "out.json"
    suite.runpytest_subprocess(*PLUGIN, f"--benchmark-json={out}").assert_outcomes(passed=3)
    found = benchmarks(out)
    assert sorted(found) == [
        "test_point[bs1-wait0-mc1-c8]", "test_point[bs16-wait0-mc1-c8]",
        "test_point[bs4-wait0-mc1-c8]",
    ]  # fmt: skip
    fakes: dict[str, Any] = {}
    exec(FAKES, fakes)
    # The profiler, on this test's own mock clock (see anyio_backend below).
    profiled = await aprofile(
        fakes["scripted"], range(10), max_batch_size=(1, 4, 16), concurrency=(8,), requests=64
    )
    for point in profiled.points:
        info = found[f"test_point[bs{point.max_batch_size}-wait0-mc1-c8]"]["extra_info"]
        assert info["items_per_s"] == pytest.approx(point.throughput)
        assert info["p99"] == pytest.approx(point.latency.p99)
        assert info["mean_batch_size"] == pytest.approx(point.mean_batch_size)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Run the async tests here on trio with a clock that jumps ahead when all tasks wait."""
    from trio.testing import MockClock

    return ("trio", {"clock": MockClock(autojump_threshold=0)})


# -- other targets ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_pipe_target_is_driven_through_its_child_process(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_pipe="""
        from batchkit.pytest_plugin import PipeTarget

        def test_pipe(batchkit_benchmark):
            figures = batchkit_benchmark(
                PipeTarget("tests.support.pipe_targets:double", cwd=ROOT),
                range(5), concurrency=8, requests=64, rounds=1,
            )
            assert figures.calls == 64
            assert figures.failed == 0
            assert sum(k * n for k, n in figures.batch_sizes.items()) == 64
            assert figures.target == "pipe:tests.support.pipe_targets:double"
        """.replace("ROOT", repr(str(ROOT)))
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


@pytest.fixture
def demo_server() -> Iterator[str]:
    """The demo models (batched and not) on a real uvicorn server.

    Request it before ``suite``: numpy and tritonclient must be imported before ``pytester``
    snapshots ``sys.modules`` (it drops what the test imported, and numpy cannot load twice).
    """
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("uvicorn")
    from batchkit.asgi import KServeApp
    from batchkit.asgi._demo import demo_models

    from ..support.asgi import running_server

    with running_server(KServeApp(demo_models(unbatched=True))) as url:
        yield url


@pytest.mark.timeout(120)
def test_an_http_target_is_compared_with_another_on_the_same_server(
    demo_server: str, suite: pytest.Pytester
) -> None:
    url = demo_server
    suite.makepyfile(
        test_http=f"""
        from batchkit.pytest_plugin import HttpTarget

        def test_http(batchkit_benchmark):
            figures = batchkit_benchmark(
                HttpTarget({url!r}, "demo"), concurrency=8, requests=64, rounds=1,
                baseline=HttpTarget({url!r}, "demo_unbatched"),
            )
            assert figures.calls == 64
            assert figures.failed == 0
            assert 1.0 <= figures.mean_batch_size <= 8.0
            assert figures.baseline == "http://{url}/demo_unbatched"
            assert figures.ratio is not None and figures.ratio > 0
        """
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


@pytest.fixture
def demo_grpc_server() -> Iterator[tuple[str, str]]:
    """The demo models on a real server with gRPC beside HTTP: (gRPC address, HTTP address).

    Request it before ``suite``, for the reason ``demo_server`` gives (grpc loads once too).
    """
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("grpc")
    pytest.importorskip("uvicorn")
    from batchkit.asgi import KServeApp, serving
    from batchkit.asgi._demo import demo_models

    with serving(KServeApp(demo_models(unbatched=True)), grpc_port=0) as address:
        assert address.grpc is not None
        yield address.grpc, str(address)


@pytest.mark.timeout(120)
def test_a_grpc_target_is_compared_with_another_on_the_same_server(
    demo_grpc_server: tuple[str, str], suite: pytest.Pytester
) -> None:
    grpc_url, http_url = demo_grpc_server
    suite.makepyfile(
        test_grpc=f"""
        from batchkit.pytest_plugin import GrpcTarget

        def test_grpc(batchkit_benchmark):
            figures = batchkit_benchmark(
                GrpcTarget({grpc_url!r}, "demo", metrics_url={http_url!r}),
                concurrency=8, requests=64, rounds=1,
                baseline=GrpcTarget({grpc_url!r}, "demo_unbatched"),
            )
            assert figures.calls == 64
            assert figures.failed == 0
            assert 1.0 <= figures.mean_batch_size <= 8.0  # from the HTTP side's /metrics
            assert figures.target == "grpc://{grpc_url}/demo"
            assert figures.ratio is not None and figures.ratio > 0
        """
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


# -- enabling it, and leaving other suites alone ---------------------------------------------

UNRELATED = {
    "conftest": """
        import pytest

        @pytest.fixture
        def batchkit_benchmark():
            return "the suite's own fixture"
        """,
    "test_unrelated": """
        import pytest

        def test_passes(batchkit_benchmark):
            assert batchkit_benchmark == "the suite's own fixture"

        def test_fails():
            assert 1 == 2

        @pytest.mark.skip(reason="not today")
        def test_skipped():
            pass

        def test_benchmark(benchmark):
            assert benchmark(sum, [1, 2]) == 3
        """,
}


def _site_with_the_entry_point(tmp: Path) -> Path:
    """Return a directory holding batchkit's pytest11 entry point as pip installs it."""
    value = _entry_point()
    dist = tmp / "site" / "batchkit_plugin-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: batchkit-plugin\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[pytest11]\nbatchkit = {value}\n")
    return dist.parent


def _run(where: Path, site: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    path = [str(site)] if site is not None else []
    env = {"PYTHONPATH": ":".join([*path, str(ROOT)]), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )


def _stable(text: str) -> list[str]:
    """Return pytest's output without the lines that change from run to run (times)."""
    return [
        line.split(" in ")[0].strip("- ")
        for line in text.splitlines()
        if not line.startswith(("platform ", "rootdir", "plugins", "cachedir"))
        and "(time in" not in line
        and not line.startswith("test_benchmark ")
    ]


@pytest.mark.timeout(180)
def test_an_unrelated_suite_runs_exactly_as_before(suite: pytest.Pytester) -> None:
    suite.makepyfile(**UNRELATED)
    site = _site_with_the_entry_point(suite.path)
    runs = []
    for args in (("-rA", "--benchmark-json=out.json"), ("--fixtures",)):
        # Without: blocked by name too, in case batchkit is installed here (as under nox).
        without = _run(suite.path, None, *args, "-p", "no:batchkit")
        with_it = _run(suite.path, site, *args)
        assert with_it.returncode == without.returncode, args
        assert _stable(with_it.stdout) == _stable(without.stdout), args
        runs.append(with_it.stdout)
    assert "1 failed, 2 passed, 1 skipped" in runs[0]
    # The plugin was loaded, through its entry point (pytest names the distribution: the fake
    # one here, or batchkit itself where it is installed).
    plugins = next(line for line in runs[0].splitlines() if line.startswith("plugins:"))
    assert "batchkit" in plugins
    # pytest-benchmark's own fixture keeps its own timer.
    assert benchmarks(suite.path / "out.json")["test_benchmark"]["options"]["timer"] == (
        "perf_counter"
    )


@pytest.mark.timeout(120)
def test_the_ini_switch_enables_the_plugin_through_the_entry_point(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        test_enabled="""
        from fakes import mock_clock, scripted

        def test_enabled(batchkit_benchmark):
            figures = batchkit_benchmark(
                scripted, [1], concurrency=2, requests=8, mode="trio", rounds=1,
                backend_options=mock_clock(),
            )
            assert figures.calls == 8
        """
    )
    site = _site_with_the_entry_point(suite.path)
    off = _run(suite.path, site, "-q")
    assert "fixture 'batchkit_benchmark' not found" in off.stdout
    suite.makeini("[pytest]\nfilterwarnings = error\nbatchkit_benchmark = true\n")
    on = _run(suite.path, site, "-q", "--strict-config")
    assert on.returncode == 0, on.stdout + on.stderr
    assert "1 passed" in on.stdout
    # -p no:batchkit turns the entry point off: the switch is then an unknown option.
    off = _run(suite.path, site, "-q", "-p", "no:batchkit")
    assert "Unknown config option: batchkit_benchmark" in off.stdout


@pytest.mark.timeout(120)
def test_enabling_it_twice_is_harmless(suite: pytest.Pytester) -> None:
    suite.makeconftest('pytest_plugins = ["batchkit.pytest_plugin"]')
    suite.makeini("[pytest]\nfilterwarnings = error\nbatchkit_benchmark = true\n")
    suite.makepyfile(
        test_x="""
        def test_x(batchkit_benchmark):
            batchkit_benchmark(lambda xs: xs, [1], concurrency=1, requests=2, rounds=1)
        """
    )
    # Installed (the entry point), switched on in the ini and the conftest, with -p or not.
    site = _site_with_the_entry_point(suite.path)
    for args in (PLUGIN, ()):
        installed = _run(suite.path, site, *args, "-q")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "1 passed" in installed.stdout


def test_the_entry_point_imports_nothing_of_the_plugin() -> None:
    code = (
        "import sys, batchkit._pytest_plugin._entry\n"
        "print(sorted(m for m in sys.modules if m.startswith('batchkit.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "batchkit.pytest_plugin" not in out.stdout
    assert "batchkit.notebook" not in out.stdout


def _entry_point() -> str:
    """Return what pyproject.toml's pytest11 entry point loads (tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'^\[project\.entry-points\.pytest11\]\nbatchkit = "([^"]+)"$', text, re.M)
    assert len(found) == 1, "pyproject.toml declares one pytest11 entry point, batchkit"
    return str(found[0])


def test_the_entry_point_is_declared() -> None:
    assert _entry_point() == "batchkit._pytest_plugin._entry"


# -- misuse gets a clear error ---------------------------------------------------------------


def test_without_pytest_benchmark_the_fixture_says_what_to_install(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_x="def test_x(batchkit_benchmark):\n    pass\n")
    result = suite.runpytest_subprocess(*PLUGIN, "-p", "no:benchmark")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs pytest-benchmark: pip install pytest-benchmark*"])


def test_requesting_benchmark_too_is_refused(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_x="def test_x(batchkit_benchmark, benchmark):\n    pass\n")
    result = suite.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*request batchkit_benchmark alone*"])


def test_one_load_per_test(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_x="""
        import pytest
        from batchkit import ConfigurationError

        def test_x(batchkit_benchmark):
            batchkit_benchmark(lambda xs: xs, [1], concurrency=1, requests=2, rounds=1)
            with pytest.raises(ConfigurationError, match="one load per test"):
                batchkit_benchmark(lambda xs: xs, [1], concurrency=1, requests=2, rounds=1)
        """
    )
    suite.runpytest_subprocess(*PLUGIN).assert_outcomes(passed=1)


def test_benchmark_skip_and_disable_are_honoured(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_x="""
        def test_x(batchkit_benchmark):
            figures = batchkit_benchmark(lambda xs: xs, [1], concurrency=2, requests=4, rounds=5)
            assert len(figures.rounds) == 1  # disabled: one run, no stats
        """
    )
    suite.runpytest_subprocess(*PLUGIN, "--benchmark-skip").assert_outcomes(skipped=1)
    suite.runpytest_subprocess(*PLUGIN, "--benchmark-disable").assert_outcomes(passed=1)


def _load(target: Any = None, items: Any = (1, 2), **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "concurrency": 1, "requests": None, "duration": None, "warmup": None,
        "mode": "asyncio", "settings": None, "point": None, "baseline": None, "rounds": 1,
        "backend_options": None,
    }  # fmt: skip
    options.update(kwargs)
    return load_of(target if target is not None else (lambda xs: xs), items, **options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "gevent"}, "mode must be one of"),
        ({"concurrency": 0}, "concurrency must be an int >= 1, got 0"),
        ({"rounds": True}, "rounds must be an int >= 1"),
        ({"requests": 5, "duration": 1.0}, "give requests or duration, not both"),
        ({"duration": -1}, "duration must be seconds > 0"),
        ({"requests": 0}, "requests must be an int >= 1"),
        ({"items": []}, "items must hold at least one item"),
        ({"items": "abc"}, "items must be a sequence"),
        ({"items": None}, "give the items to send"),
        ({"target": 42}, "the target must be a BatchedModel"),
        ({"baseline": 42}, "the baseline must be a BatchedModel"),
        ({"baseline": "unbatched", "target": 42}, "the target must be a BatchedModel"),
        ({"target": "no_such_module:x"}, "no module named 'no_such_module'"),
        ({"point": (1, 2)}, "point must be a SweepPoint"),
        ({"target": PipeTarget("m:x"), "settings": {"max_batch_size": 2}}, "own"),
        ({"target": PipeTarget("m:x"), "baseline": "unbatched"}, "another target"),
        ({"target": PipeTarget("m:x"), "mode": "threads"}, "mode='threads' drives in-process"),
        ({"target": GrpcTarget("h:1", "m"), "items": None, "mode": "trio"}, "run on asyncio"),
    ],
)
def test_a_bad_load_is_a_configuration_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _load(**kwargs)


def test_a_model_names_its_settings_and_a_point_sets_the_load() -> None:
    model = BatchedModel(lambda xs: xs, max_batch_size=8, name="m")
    load = _load(model, point=SweepPoint(4, 0.001, 2, 16), requests=10)
    assert load.settings == {"max_batch_size": 4, "max_wait": 0.001, "max_concurrency": 2}
    assert (load.concurrency, load.warmup, load.requests) == (16, 16, 10)
    assert _load(model).requests == 256
    assert _load("tests.support.pipe_targets:double").target.name == "double"


# -- the example suite ------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_example_suite_runs_saves_and_compares(tmp_path: Path) -> None:
    example = ROOT / "examples" / "pytest_benchmark"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    common = [sys.executable, "-m", "pytest", str(example), "-p", "no:cacheprovider", "-q"]
    common.append(f"--benchmark-storage=file://{tmp_path / 'runs'}")

    def run(*args: str) -> str:
        out = subprocess.run(
            [*common, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=80
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    run("--benchmark-autosave", f"--benchmark-json={tmp_path / 'first.json'}")
    found = benchmarks(tmp_path / "first.json")
    assert sorted(found) == [
        "test_embed_settings[bs32-wait0-mc1-c16]", "test_embed_settings[bs4-wait0-mc1-c16]",
        "test_embed_under_concurrent_callers",
    ]  # fmt: skip
    for bench in found.values():
        info = bench["extra_info"]
        assert set(info) == KEYS
        assert info["baseline"] == "unbatched"
        assert sum(info["errors"].values()) == 0
        # Every round recorded 1 / its ratio; the ratio reported is their median.
        ratios = [r["ratio"] for r in info["rounds"]]
        assert sorted(1 / figure for figure in bench["stats"]["data"]) == pytest.approx(
            sorted(ratios)
        )
        assert info["ratio"] == pytest.approx(statistics.median(ratios))
    compared = run("--benchmark-compare")
    assert "0001_" in compared  # the saved run, in the comparison table


# -- the docs -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_python_blocks_of_the_docs_page_run_as_a_suite(suite: pytest.Pytester) -> None:
    page = (ROOT / "docs" / "pytest-benchmark.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 3
    suite.makepyfile(**{f"test_block_{n}": block for n, block in enumerate(blocks)})
    result = suite.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=1 + 6 + 1)


def test_a_benchmark_marker_and_extra_info_of_ones_own_are_kept(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_x="""
        import pytest

        @pytest.mark.benchmark(group="mine", min_rounds=1)
        def test_x(batchkit_benchmark):
            batchkit_benchmark.benchmark.extra_info["note"] = "kept"
            batchkit_benchmark(lambda xs: xs, [1], concurrency=2, requests=4, rounds=2)
        """
    )
    out = suite.path / "out.json"
    suite.runpytest_subprocess(*PLUGIN, f"--benchmark-json={out}").assert_outcomes(passed=1)
    (bench,) = benchmarks(out).values()
    assert bench["group"] == "mine"
    assert bench["options"]["timer"] == "batchkit_figure"
    assert bench["extra_info"]["note"] == "kept"
    assert bench["stats"]["rounds"] == 2


def test_errors_are_classified_by_kind() -> None:
    from batchkit import ClosedError, DeadlineExceeded, ModelError, QueueFull, RemoteRejected
    from batchkit._pytest_plugin._load import error_kind

    assert error_kind(QueueFull("full")) == "reject"
    assert error_kind(RemoteRejected("503", batch_size=4)) == "reject"
    assert error_kind(DeadlineExceeded("late")) == "timeout"
    assert error_kind(TimeoutError()) == "timeout"
    assert error_kind(ModelError("broke", batch_size=1)) == "model"
    assert error_kind(ClosedError("closed")) == "closed"
    assert error_kind(ValueError("bad item")) == "other"
