"""Scenario 4: sync callers in threads, batched through ``call_sync`` or each calling the model.

16 threads each make calls one after another. Batched: every call goes through one
``BatchedModel`` (``max_batch_size=32``, background engine) with ``model.call_sync(x)``.
Unbatched: every thread calls the model function itself on a one-item list, as code without a
batcher would. The two alternate round by round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from batchkit import BatchedModel

from ._measure import Findings, batch_size_delta, mean_batch_size, median, rotated
from .mlp import MLP

pytest.importorskip("torch")

THREADS = 16
MAX_BATCH_SIZE = 32
CALLS_PER_THREAD = 40  # per round
ROUNDS = 9

TARGET_VS_UNBATCHED = 2.0  # from the issue


def run_threads(work: Callable[[int], None]) -> float:
    """Run ``work(thread_no)`` in ``THREADS`` threads released together; return wall seconds."""
    barrier = threading.Barrier(THREADS + 1)
    errors: list[BaseException] = []

    def main(n: int) -> None:
        barrier.wait()
        try:
            work(n)
        except BaseException as exc:  # reported below, in the benchmark's thread
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def measure(mlp: MLP) -> Findings:
    f = Findings(
        "sync_callers",
        "Sync callers: 16 threads, `call_sync` vs calling the model",
        order=5,
        number="4",
    )
    inputs = mlp.items(THREADS)
    model = BatchedModel(mlp.forward, max_batch_size=MAX_BATCH_SIZE, name="mlp")
    forward = mlp.forward

    def batched(n: int) -> None:
        x, call_sync = inputs[n], model.call_sync
        for _ in range(CALLS_PER_THREAD):
            call_sync(x)

    def unbatched(n: int) -> None:
        x = inputs[n]
        for _ in range(CALLS_PER_THREAD):
            forward([x])

    rounds: dict[str, Callable[[int], None]] = {"batchkit": batched, "unbatched": unbatched}
    with model:
        # Warm-up, and a check that each thread gets its own item's output.
        got: dict[int, Any] = {}
        run_threads(lambda n: got.__setitem__(n, model.call_sync(inputs[n])))
        expected = forward(inputs)
        assert all(bool(got[n].allclose(expected[n], atol=1e-5)) for n in range(THREADS))
        run_threads(unbatched)
        before = dict(model.statistics().batch_sizes)
        times: dict[str, list[float]] = {name: [] for name in rounds}
        for round_no in range(ROUNDS):
            for name in rotated(round_no, list(rounds)):
                times[name].append(run_threads(rounds[name]))
        sizes = batch_size_delta(before, model.statistics().batch_sizes)

    items = THREADS * CALLS_PER_THREAD
    f.setup(
        f"{THREADS} threads, {CALLS_PER_THREAD} calls each per round, one after another; "
        "the MLP of the throughput benchmark, one CPU thread per torch call"
    )
    f.setup(
        f"batchkit: `model.call_sync(x)` on `BatchedModel(forward, max_batch_size="
        f"{MAX_BATCH_SIZE})`, engine on its background thread (`with model:`)"
    )
    f.setup("unbatched: each thread calls `forward([x])` itself")
    f.setup(f"{ROUNDS} rounds of {items:,} items each way, alternating in rotated order")
    kit = [items / t for t in times["batchkit"]]
    alone = [items / t for t in times["unbatched"]]
    ratios = [k / a for k, a in zip(kit, alone, strict=True)]
    f.figure("batchkit_items_s", "batchkit: items/s", median(kit), "items/s")
    f.figure("unbatched_items_s", "unbatched: items/s", median(alone), "items/s")
    f.figure("vs_unbatched", "batchkit / unbatched (median of rounds)", median(ratios), "x")
    f.figure("vs_unbatched_min", "  lowest round", min(ratios), "x")
    f.figure("vs_unbatched_max", "  highest round", max(ratios), "x")
    f.figure("mean_batch", "batchkit: mean batch size", mean_batch_size(sizes), "items")
    f.distribution("batchkit batch sizes (timed rounds)", sizes)
    f.target("batchkit items/s vs unbatched", "vs_unbatched", ">=", TARGET_VS_UNBATCHED)
    return f


def test_sync_callers(benchmark: Any) -> None:
    mlp = MLP()
    try:
        findings = benchmark.pedantic(lambda: measure(mlp), rounds=1, iterations=1)
    finally:
        mlp.close()
    findings.save(benchmark)
