from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on asyncio and on trio."""
    return str(request.param)


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
