"""Scenario 1: dispatch overhead, batchkit against a plain asyncio queue batcher.

An identity async model costs nothing, so the time per item is all dispatch: submitting, queueing,
forming batches and waking each caller with its result. 1,000 asyncio tasks share 30,000 calls.
batchkit runs under ``async with model:`` in the benchmark's own event loop (the fast path).
The same callers drive batchkit, ``baseline.QueueBatcher`` (an ``asyncio.Queue`` and a worker),
and ``baseline.MinimalBatcher`` (the event loop's own floor), interleaved round by round.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from batchkit import BatchedModel

from ._measure import Findings, batch_size_delta, mean_batch_size, median, rotated
from .baseline import MinimalBatcher, QueueBatcher

CALLERS = 1_000
ITEMS = 30_000
MAX_BATCH_SIZE = 64
ROUNDS = 7

# From the issue.
TARGET_US_PER_ITEM = 2.0
TARGET_VS_BASELINE = 1.2


async def ident(xs: list[Any]) -> list[Any]:
    return xs


Call = Callable[[Any], Awaitable[Any]]


async def drive(call: Call, *, check: bool = False) -> tuple[float, float]:
    """Run ``ITEMS`` calls from ``CALLERS`` tasks; return (wall, CPU) seconds.

    The tasks are created before the clock starts and released together, so only dispatch is
    timed. With ``check``, every result is compared with its item (untimed warm-up only).
    """
    per_caller = ITEMS // CALLERS
    start = asyncio.Event()

    async def caller(offset: int) -> None:
        await start.wait()
        if check:
            for i in range(offset, offset + per_caller):
                result = await call(i)
                assert result == i, f"item {i} got {result!r}"
        else:
            for i in range(per_caller):
                await call(i)

    tasks = [asyncio.ensure_future(caller(n * per_caller)) for n in range(CALLERS)]
    await asyncio.sleep(0)  # let every task reach start.wait()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    start.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - wall0, time.process_time() - cpu0


async def measure() -> Findings:
    f = Findings(
        "dispatch",
        "Dispatch overhead: identity async model, 1,000 async callers",
        order=1,
        number="1",
    )
    model = BatchedModel(ident, max_batch_size=MAX_BATCH_SIZE)
    async with model, QueueBatcher(ident, max_batch_size=MAX_BATCH_SIZE) as baseline:
        async with MinimalBatcher(ident, max_batch_size=MAX_BATCH_SIZE) as floor:
            calls: dict[str, Call] = {
                "batchkit": model.call,
                "baseline": baseline.call,
                "floor": floor.call,
            }
            for call in calls.values():  # warm-up, and a check that every caller is answered
                await drive(call, check=True)
            before = dict(model.statistics().batch_sizes)
            base_before = dict(baseline.batch_sizes)
            wall: dict[str, list[float]] = {name: [] for name in calls}
            cpu: dict[str, list[float]] = {name: [] for name in calls}
            for round_no in range(ROUNDS):
                for name in rotated(round_no, list(calls)):
                    w, c = await drive(calls[name])
                    wall[name].append(w)
                    cpu[name].append(c)
            sizes = batch_size_delta(before, model.statistics().batch_sizes)
            base_sizes = batch_size_delta(base_before, baseline.batch_sizes)
    return summarize(f, wall, cpu, sizes, base_sizes)


def summarize(
    f: Findings,
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    sizes: dict[int, int],
    base_sizes: dict[int, int],
) -> Findings:
    f.setup(
        f"{CALLERS:,} asyncio tasks make {ITEMS:,} calls in all ({ITEMS // CALLERS} each, "
        "one after another) to `async def ident(xs): return xs`"
    )
    f.setup(
        f"`max_batch_size={MAX_BATCH_SIZE}`, other settings default; batchkit entered with "
        "`async with model:` in the benchmark's event loop"
    )
    f.setup(
        "baseline: `benchmarks/baseline.py` `QueueBatcher` (an `asyncio.Queue`; the worker "
        f"awaits one item, then takes up to {MAX_BATCH_SIZE - 1} more with `get_nowait()`); "
        "floor: `MinimalBatcher` (a list and a wake-up future, no features)"
    )
    f.setup(
        f"{ROUNDS} rounds, each running all three in rotated order; figures are medians over "
        "rounds, ratios are medians of the per-round ratios"
    )
    for name in ("batchkit", "baseline", "floor"):
        us_wall, us_cpu = (1e6 * median(t[name]) / ITEMS for t in (wall, cpu))
        f.figure(f"{name}_us_wall", f"{name}: wall time per item", us_wall, "us")
        f.figure(f"{name}_us_cpu", f"{name}: CPU time per item", us_cpu, "us")
        f.figure(f"{name}_items_s", f"{name}: items/s", ITEMS / median(wall[name]), "items/s")
    vs_base = [b / k for k, b in zip(wall["batchkit"], wall["baseline"], strict=True)]
    vs_floor = [fl / k for k, fl in zip(wall["batchkit"], wall["floor"], strict=True)]
    vs_base_cpu = [b / k for k, b in zip(cpu["batchkit"], cpu["baseline"], strict=True)]
    f.figure(
        "vs_baseline",
        "batchkit items/s / baseline items/s (median of rounds)",
        median(vs_base),
        "x",
    )
    f.figure("vs_baseline_min", "  lowest round", min(vs_base), "x")
    f.figure("vs_baseline_max", "  highest round", max(vs_base), "x")
    f.figure(
        "vs_baseline_cpu",
        "batchkit vs baseline from CPU time: baseline CPU per item / batchkit CPU per item",
        median(vs_base_cpu),
        "x",
    )
    f.figure(
        "vs_floor", "batchkit items/s / floor items/s (median of rounds)", median(vs_floor), "x"
    )
    f.figure("batchkit_mean_batch", "batchkit: mean batch size", mean_batch_size(sizes), "items")
    f.figure(
        "baseline_mean_batch", "baseline: mean batch size", mean_batch_size(base_sizes), "items"
    )
    f.distribution("batchkit batch sizes (timed rounds)", sizes)
    f.distribution("baseline batch sizes (timed rounds)", base_sizes)
    f.target("batchkit CPU time per item", "batchkit_us_cpu", "<=", TARGET_US_PER_ITEM)
    f.target("batchkit wall time per item", "batchkit_us_wall", "<=", TARGET_US_PER_ITEM)
    f.target("batchkit items/s vs baseline", "vs_baseline", ">=", TARGET_VS_BASELINE)
    f.note(
        "CPU time is the process's own (`time.process_time()`); the loop is single-threaded, so "
        "it is the per-item cost with other processes' time on a shared machine left out. The "
        "floor's figure is what the event loop alone costs per item on this machine."
    )
    return f


def test_dispatch_overhead(benchmark: Any) -> None:
    findings = benchmark.pedantic(lambda: asyncio.run(measure()), rounds=1, iterations=1)
    findings.save(benchmark)
