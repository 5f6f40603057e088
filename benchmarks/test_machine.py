"""Context: what handing work between threads costs on this machine (no batchkit, no target).

batchkit's paths cross threads: a sync model runs in a worker thread of the engine's loop, and
``call_sync`` hands its item to the engine's loop thread and waits for the answer. Each crossing
costs a thread wake-up, which is cheap on an idle machine and can take milliseconds on a busy
one. These round trips put the other scenarios' latencies and ratios in context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
import time
from typing import Any

import anyio.to_thread

from ._measure import Findings, percentile

TRIPS = 2_000
WARMUP = 100


def thread_ping_pong() -> list[int]:
    """Round trips main thread -> another thread -> main thread over ``queue.SimpleQueue``."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (x := there.get()) is not None:
            back.put(x)

    thread = threading.Thread(target=echo)
    thread.start()
    samples = []
    clock = time.perf_counter_ns
    for i in range(WARMUP + TRIPS):
        t0 = clock()
        there.put(i)
        back.get()
        samples.append(clock() - t0)
    there.put(None)
    thread.join()
    return samples[WARMUP:]


def noop() -> None:
    return None


async def to_thread_trips() -> list[int]:
    """Round trips event loop -> worker thread -> event loop (``anyio.to_thread.run_sync``)."""
    samples = []
    clock = time.perf_counter_ns
    for _ in range(WARMUP + TRIPS):
        t0 = clock()
        await anyio.to_thread.run_sync(noop)
        samples.append(clock() - t0)
    return samples[WARMUP:]


def loop_trips() -> list[int]:
    """Round trips thread -> event loop thread -> thread (``call_soon_threadsafe``)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    samples = []
    clock = time.perf_counter_ns
    try:
        for _ in range(WARMUP + TRIPS):
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            t0 = clock()
            loop.call_soon_threadsafe(future.set_result, None)
            future.result()
            samples.append(clock() - t0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return samples[WARMUP:]


def measure() -> Findings:
    f = Findings("machine", "Context: thread hand-off round trips on this machine", order=0)
    f.setup(f"{TRIPS:,} round trips each, after {WARMUP} warm-up trips; no batchkit involved")
    f.setup(
        f"CPython switch interval {1e3 * sys.getswitchinterval():g} ms (how long a thread may "
        "hold the GIL while another waits for it)"
    )
    runs = (
        ("thread", "thread to thread and back (`queue.SimpleQueue`)", thread_ping_pong),
        (
            "to_thread",
            "event loop to worker thread and back (`anyio.to_thread.run_sync`): what a batch "
            "of a sync model pays",
            lambda: asyncio.run(to_thread_trips()),
        ),
        (
            "loop",
            "thread to event loop and back (`call_soon_threadsafe`): what `call_sync` pays on top",
            loop_trips,
        ),
    )
    for key, label, run in runs:
        samples = [1e-6 * ns for ns in run()]
        f.figure(f"{key}_p50", f"{label}: p50", percentile(samples, 0.5), "ms")
        f.figure(f"{key}_p99", f"{label}: p99", percentile(samples, 0.99), "ms")
    return f


def test_thread_handoff(benchmark: Any) -> None:
    findings = benchmark.pedantic(measure, rounds=1, iterations=1)
    findings.save(benchmark)
