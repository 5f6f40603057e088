"""Each fast lane of the engine on and off, measured side by side in the same run.

The engine meets its contract on its general path alone; each lane (``batchkit/_core/_plan.py``)
is a faster way to do part of it. Here every lane is measured where it matters, with the lane on
and off in alternating rounds (the private switch ``_plan.disabled``, read when an engine is
entered), so a lane that no longer pays shows as a ratio near 1 and can be deleted with evidence:

- ``plain``: scenario 1's dispatch (1,000 async callers, identity async model), µs per item;
- ``staging``: scenario 2's MLP with 128 async callers, items/s;
- ``inline``: one thread's ``call_sync`` at low load (identity sync model), p50 latency;
- ``side``: scenario 4's 16 threads calling ``call_sync`` on the MLP, items/s.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from batchkit import BatchedModel
from batchkit._core import _plan
from batchkit._core._plan import lanes_off

from ._measure import Findings, median, percentile, rotated
from .mlp import MLP
from .test_dispatch import drive, ident

pytest.importorskip("torch")

ROUNDS = 5
MAX_BATCH_SIZE = 64


def plan_of(model: BatchedModel[Any, Any]) -> _plan.Plan:
    engine = model._engine  # the benchmark checks the switch took: private on purpose
    assert engine is not None
    return engine.plan


async def measure_plain() -> dict[str, list[float]]:
    on = BatchedModel(ident, max_batch_size=MAX_BATCH_SIZE, name="on")
    off = BatchedModel(ident, max_batch_size=MAX_BATCH_SIZE, name="off")
    async with on:
        with lanes_off("plain"):
            await off.__aenter__()
        try:
            assert plan_of(on).plain and not plan_of(off).plain
            calls = {"on": on.call, "off": off.call}
            for call in calls.values():
                await drive(call, check=True)
            us: dict[str, list[float]] = {name: [] for name in calls}
            for round_no in range(ROUNDS):
                for name in rotated(round_no, list(calls)):
                    wall, _ = await drive(calls[name])
                    us[name].append(1e6 * wall / 30_000)
        finally:
            await off.__aexit__(None, None, None)
    return us


async def measure_staging(mlp: MLP) -> dict[str, list[float]]:
    callers, per_caller = 128, 8
    inputs = mlp.items(callers)
    on = BatchedModel(mlp.forward, max_batch_size=MAX_BATCH_SIZE, name="on")
    off = BatchedModel(mlp.forward, max_batch_size=MAX_BATCH_SIZE, name="off")

    async def run(model: BatchedModel[Any, Any]) -> float:
        start = asyncio.Event()

        async def caller(x: Any) -> None:
            await start.wait()
            for _ in range(per_caller):
                await model.call(x)

        tasks = [asyncio.ensure_future(caller(x)) for x in inputs]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return callers * per_caller / (time.perf_counter() - t0)

    async with on:
        with lanes_off("staging"):
            await off.__aenter__()
        try:
            assert plan_of(on).staging and not plan_of(off).staging
            models = {"on": on, "off": off}
            for model in models.values():
                await run(model)
            rates: dict[str, list[float]] = {name: [] for name in models}
            for round_no in range(ROUNDS):
                for name in rotated(round_no, list(models)):
                    rates[name].append(await run(models[name]))
        finally:
            await off.__aexit__(None, None, None)
    return rates


def measure_inline() -> dict[str, list[float]]:
    def echo(xs: list[Any]) -> list[Any]:
        return xs

    on = BatchedModel(echo, name="on")
    off = BatchedModel(echo, name="off")
    calls = 500
    with on:
        with lanes_off("inline", "side"):
            off.__enter__()
        try:
            assert plan_of(on).inline and not plan_of(off).inline
            models = {"on": on, "off": off}
            p50: dict[str, list[float]] = {name: [] for name in models}
            for round_no in range(ROUNDS):
                for name in rotated(round_no, list(models)):
                    call_sync, clock = models[name].call_sync, time.perf_counter_ns
                    samples = []
                    for i in range(calls):
                        t0 = clock()
                        call_sync(i)
                        samples.append(clock() - t0)
                    p50[name].append(percentile(samples[calls // 10 :], 0.5) / 1e3)
        finally:
            off.close()
    return p50


def measure_side(mlp: MLP) -> dict[str, list[float]]:
    threads, per_thread = 16, 40
    inputs = mlp.items(threads)
    on = BatchedModel(mlp.forward, max_batch_size=MAX_BATCH_SIZE, name="on")
    off = BatchedModel(mlp.forward, max_batch_size=MAX_BATCH_SIZE, name="off")

    def run(model: BatchedModel[Any, Any]) -> float:
        barrier = threading.Barrier(threads + 1)

        def main(n: int) -> None:
            barrier.wait()
            for _ in range(per_thread):
                model.call_sync(inputs[n])

        pool = [threading.Thread(target=main, args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        barrier.wait()
        t0 = time.perf_counter()
        for thread in pool:
            thread.join()
        return threads * per_thread / (time.perf_counter() - t0)

    with on:
        with lanes_off("side"):
            off.__enter__()
        try:
            assert plan_of(on).side and not plan_of(off).side
            models = {"on": on, "off": off}
            for model in models.values():
                run(model)
            rates: dict[str, list[float]] = {name: [] for name in models}
            for round_no in range(ROUNDS):
                for name in rotated(round_no, list(models)):
                    rates[name].append(run(models[name]))
        finally:
            off.close()
    return rates


def measure() -> Findings:
    f = Findings("lanes", "The engine's fast lanes, each on and off", order=10, number="10")
    f.setup(
        "each lane is measured with it on (every lane on, the default) and off (that lane "
        f"alone turned off), in {ROUNDS} alternating rounds; figures are medians over rounds"
    )
    rows: list[tuple[str, str, dict[str, list[float]], str, bool]] = []
    plain = asyncio.run(measure_plain())
    rows.append(("plain", "dispatch, scenario 1 (µs/item)", plain, "us", False))
    mlp = MLP()
    try:
        staging = asyncio.run(measure_staging(mlp))
        rows.append(("staging", "MLP, 128 async callers (items/s)", staging, "items/s", True))
        side = measure_side(mlp)
        rows.append(("side", "MLP, 16 threads `call_sync` (items/s)", side, "items/s", True))
    finally:
        mlp.close()
    inline = measure_inline()
    rows.append(("inline", "one thread's `call_sync`, p50 (µs)", inline, "us", False))
    for lane, what, values, unit, higher_is_better in rows:
        on, off = median(values["on"]), median(values["off"])
        f.figure(f"{lane}_on", f"{lane} on: {what}", on, unit)
        f.figure(f"{lane}_off", f"{lane} off: {what}", off, unit)
        gain = on / off if higher_is_better else off / on
        f.figure(f"{lane}_gain", f"{lane}: what the lane buys (on vs off, >1 pays)", gain, "x")
    f.note(
        "plain and inline are per-call paths (lower is better); staging and side are "
        "throughput (higher is better); the gain is always oriented so that above 1 the lane "
        "pays for itself on this machine"
    )
    return f


def test_lanes_on_and_off(benchmark: Any) -> None:
    findings = benchmark.pedantic(measure, rounds=1, iterations=1)
    findings.save(benchmark)
