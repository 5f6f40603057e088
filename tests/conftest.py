from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from .support.triton_server import TritonServer, find_tritonserver

# The pytest plugin's tests (tests/pytest_plugin) write suites and run them with `pytester`.
pytest_plugins = ("pytester",)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _skip_when_the_lane_is_off(request: pytest.FixtureRequest) -> None:
    """Skip a test of a fast lane when the private switch turned that lane off.

    ``BATCHKIT_LANES_OFF`` (see ``batchkit/_core/_plan.py``) runs the same suite under other
    plans: ``nox -s tests`` runs ``tests/core`` with every lane off and with each lane alone.
    """
    from batchkit._core import _plan

    for marker in request.node.iter_markers("lane"):
        if marker.args[0] in _plan.disabled:
            pytest.skip(f"the {marker.args[0]} lane is off (BATCHKIT_LANES_OFF)")


@pytest.fixture(autouse=True)
def no_engine_threads_left() -> Iterator[None]:
    """Fail a test that leaves a batchkit background thread running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    left = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("batchkit-")
    ]
    assert not left, f"background engine threads left running: {left}"


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real Triton Inference Server with the test models, for the whole session.

    Skips when nvidia-pytriton (which bundles ``tritonserver``) is not installed: run
    ``nox -s triton``.
    """
    package = find_tritonserver()
    if package is None:
        pytest.skip("no tritonserver: nvidia-pytriton is not installed (run `nox -s triton`)")
    server = TritonServer(package, tmp_path_factory.mktemp("triton"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
