"""``batchkit bench`` against ``batchkit serve`` of a ``Deployment``: per-version counts and the
shadow's agreement for each step, from the server's metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_bench import bench, check_step, free_port

SERVED = textwrap.dedent(
    """
    from batchkit import BatchedModel, Deployment

    def double(rows):
        return [row * 2 for row in rows]

    def sometimes_off(rows):
        return [row * 2 + (row[0] > 0) for row in rows]

    deployment = Deployment(
        {
            "1": BatchedModel(double, name="clf", version="1"),
            "2": BatchedModel(double, name="clf", version="2"),
            "s": BatchedModel(sometimes_off, name="clf", version="s"),
        },
        weights={"1": 0.75, "2": 0.25},
        shadow="s",
        seed=3,
    )
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run ``batchkit serve`` of the deployment on a free loopback port; yield ``host:port``."""
    where = tmp_path_factory.mktemp("served")
    (where / "routed_models.py").write_text(SERVED)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchkit",
            "serve",
            "routed_models:deployment",
            "--port",
            str(port),
        ],
        cwd=where,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _path(where)},
    )
    assert proc.stderr is not None
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited: {proc.wait()}: {''.join(seen)[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
        rest = proc.stderr.read()
        proc.stderr.close()
        assert status in (0, -signal.SIGTERM), rest[-3000:]


def _path(where: Path) -> str:
    """``where`` first, then the path this test runs with (the tree under test)."""
    return os.pathsep.join([str(where), *filter(None, [os.environ.get("PYTHONPATH")])])


def test_each_step_reports_items_per_version_and_shadow_agreement(
    server: str, tmp_path: Path
) -> None:
    status, report, output = bench(
        tmp_path, server, "--model", "clf", "--concurrency", "1,4", "--requests", "200",
        "--warmup", "0",
    )  # fmt: skip
    assert status == 0, output
    for step in report["steps"]:
        check_step(step)
        versions = step["versions"]
        assert set(versions) == {"1", "2", "s"}
        assert versions["1"] + versions["2"] == 200 and versions["s"] == 0
        assert versions["2"] > 0
        shadow = step["shadow"]
        assert set(shadow) == {"agreed", "disagreed", "error", "dropped", "discarded"}
        assert 0 < shadow["agreed"] + shadow["disagreed"] + shadow["dropped"] <= 200
        assert shadow["error"] == 0
    assert "clf: items per version and shadow agreement, per step" in output
    assert "version 2" in output and "shadow compared" in output


def test_a_plain_model_reports_no_versions(tmp_path: Path) -> None:
    from batchkit import BatchedModel
    from batchkit.asgi import KServeApp, serving

    app = KServeApp(BatchedModel(lambda rows: rows, name="plain"))
    with serving(app) as url:
        status, report, output = bench(
            tmp_path, url, "-m", "plain", "--concurrency", "2", "--requests", "20", "--warmup", "0"
        )
    assert status == 0, output
    assert report["steps"][0]["versions"] is None and report["steps"][0]["shadow"] is None
    assert "items per version" not in output
