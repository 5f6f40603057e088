"""Scenario 2: throughput on a torch MLP under load, against the model's own ceiling.

128 async callers share one ``BatchedModel`` (``max_batch_size=64``) over a sync model function
that stacks the items, runs the MLP and unbinds the output; batchkit runs it in a worker thread.
The ceiling is the same function called directly on full batches of 64 in a tight loop: the
most items/s the model can give on this machine, with no batching library at all.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from batchkit import BatchedModel

from ._measure import Findings, batch_size_delta, mean_batch_size, median, rotated
from .mlp import MLP

pytest.importorskip("torch")

CALLERS = 128
MAX_BATCH_SIZE = 64
BATCHES_PER_ROUND = 50  # the ceiling's batches per round; batchkit serves as many items
ROUNDS = 7

TARGET_OF_CEILING = 0.85  # from the issue


async def measure(mlp: MLP) -> Findings:
    f = Findings(
        "mlp_throughput",
        "Throughput: torch MLP, 128 async callers, vs the ceiling",
        order=2,
        number="2",
    )
    items_per_round = BATCHES_PER_ROUND * MAX_BATCH_SIZE
    per_caller = items_per_round // CALLERS
    inputs = mlp.items(CALLERS)
    full_batch = mlp.items(MAX_BATCH_SIZE)
    # Both sides call the model through `timed`, which notes when each batch starts and ends
    # (two clock reads per batch): it shows how long the model ran and how long it sat idle.
    spans: list[tuple[float, float]] = []
    clock = time.perf_counter

    def timed(items: list[Any]) -> Any:
        t0 = clock()
        out = mlp.forward(items)
        spans.append((t0, clock()))
        return out

    model = BatchedModel(timed, max_batch_size=MAX_BATCH_SIZE, name="mlp")

    async def batched_round() -> float:
        start = asyncio.Event()

        async def caller(x: Any) -> None:
            await start.wait()
            for _ in range(per_caller):
                await model.call(x)

        tasks = [asyncio.ensure_future(caller(x)) for x in inputs]
        await asyncio.sleep(0)
        t0 = clock()
        start.set()
        await asyncio.gather(*tasks)
        return clock() - t0

    def ceiling_round() -> float:
        t0 = clock()
        for _ in range(BATCHES_PER_ROUND):
            timed(full_batch)
        return clock() - t0

    async with model:
        # Warm-up, and a check that each caller gets its own item's output.
        outputs = await asyncio.gather(*(model.call(x) for x in inputs))
        expected = mlp.forward(inputs)
        assert all(bool(o.allclose(e, atol=1e-5)) for o, e in zip(outputs, expected, strict=True))
        ceiling_round()
        await batched_round()

        stats0 = model.statistics()
        times: dict[str, list[float]] = {"batchkit": [], "ceiling": []}
        runs: dict[str, list[float]] = {"batchkit": [], "ceiling": []}  # model time per batch
        gaps: list[float] = []  # batchkit: from one batch's end to the next one's start
        for round_no in range(ROUNDS):
            for name in rotated(round_no, list(times)):
                del spans[:]
                if name == "batchkit":
                    times[name].append(await batched_round())
                    gaps += [b0 - a1 for (_, a1), (b0, _) in itertools.pairwise(spans)]
                else:
                    times[name].append(ceiling_round())
                runs[name] += [b - a for a, b in spans]
        stats1 = model.statistics()

    f.setup(
        "MLP: Linear(256->1024), ReLU, Linear(1024->256) on CPU, `torch.set_num_threads(1)`, "
        "under `torch.inference_mode()`; the model function stacks the items, runs the MLP and "
        "unbinds the output"
    )
    f.setup(
        f"batchkit: {CALLERS} asyncio tasks, {per_caller} calls each per round, "
        f"`BatchedModel(forward, max_batch_size={MAX_BATCH_SIZE})` under `async with` "
        "(the sync function runs in a worker thread)"
    )
    f.setup(
        f"ceiling: the same function called directly on lists of {MAX_BATCH_SIZE} items, "
        f"{BATCHES_PER_ROUND} batches per round, in a tight loop"
    )
    f.setup(f"{ROUNDS} rounds of {items_per_round:,} items each, alternating in rotated order")
    kit = [items_per_round / t for t in times["batchkit"]]
    top = [items_per_round / t for t in times["ceiling"]]
    ratios = [k / c for k, c in zip(kit, top, strict=True)]
    f.figure("batchkit_items_s", "batchkit: items/s", median(kit), "items/s")
    f.figure("ceiling_items_s", "ceiling: items/s", median(top), "items/s")
    f.figure("of_ceiling", "batchkit / ceiling (median of rounds)", 100 * median(ratios), "%")
    f.figure("of_ceiling_min", "  lowest round", 100 * min(ratios), "%")
    f.figure("of_ceiling_max", "  highest round", 100 * max(ratios), "%")
    sizes = batch_size_delta(stats0.batch_sizes, stats1.batch_sizes)
    f.figure("mean_batch", "batchkit: mean batch size", mean_batch_size(sizes), "items")
    f.figure(
        "ceiling_run_ms",
        "ceiling: model function time per batch, median",
        1e3 * median(runs["ceiling"]),
        "ms",
    )
    f.figure(
        "batchkit_run_ms",
        "batchkit: model function time per batch, median (timed inside the worker thread)",
        1e3 * median(runs["batchkit"]),
        "ms",
    )
    f.figure(
        "batchkit_gap_ms",
        "batchkit: idle time between batches (one batch's end to the next one's start), median",
        1e3 * median(gaps),
        "ms",
    )
    f.figure(
        "batchkit_busy",
        "batchkit: share of wall time the model function ran",
        100 * sum(runs["batchkit"]) / sum(times["batchkit"]),
        "%",
    )
    f.distribution("batchkit batch sizes (timed rounds)", sizes)
    f.target("batchkit items/s, share of the ceiling", "of_ceiling", ">=", 100 * TARGET_OF_CEILING)
    return f


def test_mlp_throughput(benchmark: Any) -> None:
    mlp = MLP()
    try:
        findings = benchmark.pedantic(lambda: asyncio.run(measure(mlp)), rounds=1, iterations=1)
    finally:
        mlp.close()
    findings.save(benchmark)
