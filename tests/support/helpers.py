"""Shared by the tests: models whose behaviour the test scripts, and a bounded wait."""

from __future__ import annotations

import threading
from typing import Any

import anyio


def wait_for(condition: Any, limit: float = 10.0) -> None:
    """Block until ``condition()`` holds, for state another thread changes (bounded)."""
    done = threading.Event()
    deadline = threading.Event()
    timer = threading.Timer(limit, deadline.set)
    timer.start()
    try:
        while not condition():
            assert not deadline.is_set(), "condition never held"
            done.wait(0.001)
    finally:
        timer.cancel()


class GatedModel:
    """An async model that records each batch and holds it until the test opens the gate.

    ``outputs`` maps an item to what the model returns for it (default: ``item * 10``); an
    exception instance there is returned in that item's slot.
    """

    def __init__(self, *, gated: bool = True) -> None:
        self.batches: list[list[Any]] = []
        self.started = anyio.Event()
        self._gate = anyio.Event()
        if not gated:
            self._gate.set()
        self.fail_with: BaseException | None = None
        self.outputs: dict[Any, Any] = {}

    def open(self) -> None:
        self._gate.set()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        await self._gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [self.outputs.get(item, item * 10) for item in items]

    @property
    def seen(self) -> list[Any]:
        return [item for batch in self.batches for item in batch]
