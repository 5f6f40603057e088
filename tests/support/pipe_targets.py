"""Models the pipe tests serve in a child process (`batchkit pipe tests.support.pipe_targets:X`).

``gated`` waits until the test writes to the pipe whose read end the child gets as
``BATCHKIT_TEST_GATE_FD``: a gate the test opens, with no timer involved.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any

import anyio

from batchkit import BatchedModel


def _double(items: list[Any]) -> list[Any]:
    time.sleep(0.001)  # a fixed cost per batch, so items gather while it runs
    return [item * 2 for item in items]


double = BatchedModel(_double, max_batch_size=64, name="double")


async def _gated(items: list[Any]) -> list[Any]:
    gate = os.environ.get("BATCHKIT_TEST_GATE_FD")
    if gate is not None:
        await anyio.wait_readable(int(gate))  # the test writes one byte, never read: stays open
    return items


gated = BatchedModel(_gated, max_batch_size=256, name="gated")


def _blocking(items: list[Any]) -> list[Any]:
    gate = os.environ.get("BATCHKIT_TEST_GATE_FD")
    if gate is not None:
        select.select([int(gate)], [], [])  # blocks this worker thread until the gate opens
    return items


blocking = BatchedModel(_blocking, name="blocking")


async def _hang(items: list[Any]) -> list[Any]:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


hang = BatchedModel(_hang, name="hang")


def _faulty(items: list[Any]) -> list[Any]:
    if "boom" in items:
        raise RuntimeError("boom in the batch")
    return [ValueError(f"negative: {x}") if x < 0 else x + 1 for x in items]


faulty = BatchedModel(_faulty, isolate_failures=True, name="faulty", version="7")


def _printer(items: list[Any]) -> list[Any]:
    print("print() from the model")
    os.write(1, b"os.write(1) from the model\n")
    return [{"item": item, "stdin": sys.stdin.read()} for item in items]


printer = BatchedModel(_printer, name="printer")


def _tensors(arrays: list[Any]) -> list[Any]:
    return [array * 2 for array in arrays]


tensors = BatchedModel(_tensors, name="tensors")

several = {"double": double, "hang": hang, "faulty": faulty}


def _stack_double(arrays: list[Any]) -> list[Any]:
    import numpy as np

    return list(np.stack(arrays) * 2)  # one array per batch: a bad item would fail them all


def declared() -> Any:
    """A model with a declaration (a ServedModel): float32 vectors of 3."""
    from batchkit.asgi import ServedModel, Tensor

    model = BatchedModel(_stack_double, name="declared", max_batch_size=256)
    return ServedModel(model, inputs=[Tensor("x", "FP32", [3])])
