"""Scenario 11: several versions at once (``Deployment``).

11a. What shadow traffic costs primary callers. 8 asyncio tasks call a deployment one call after
another; the primary model costs 1 ms per batch. Three set-ups alternate round by round: no
shadow; a shadow on a healthy copy of the model (every call mirrored); a shadow on a model that
hangs (its worker stuck, the shadow queue full, every later mirror dropped); a shadow that
raises on every batch. Figures: the primary callers' latency percentiles and throughput, and
their ratios to no shadow, measured in the same run.

11b. The load-test scenario of ``examples/canary_loadtest.py`` over HTTP: a 10% canary's
observed share, the shadow's disagreement rate, and overload shed with 503 + Retry-After.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchkit import BatchedModel, Deployment

from ._measure import Findings, median, percentile, rotated

TASKS = 8
CALLS_PER_TASK = 60  # per round
ROUNDS = 7
COST = 0.001  # seconds per batch of the primary model

TARGET_HUNG_P50 = 1.25  # "within noise" of no shadow, from the issue
TARGET_RAISING_P50 = 1.25

ROOT = Path(__file__).resolve().parents[1]


def primary(items: list[int]) -> list[int]:
    time.sleep(COST)
    return [i * 2 for i in items]


def raising(items: list[int]) -> list[int]:
    raise RuntimeError("the shadow is broken")


async def timed_round(deployment: Deployment[int, int]) -> tuple[list[float], float]:
    """Run one round; return every call's latency and the round's wall time."""
    latencies: list[float] = []

    async def caller(base: int) -> None:
        for i in range(CALLS_PER_TASK):
            t0 = time.perf_counter()
            assert await deployment.call(base + i) == (base + i) * 2
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(TASKS):
            tg.start_soon(caller, n * 1000)
    return latencies, time.perf_counter() - t0


def measure_shadow_cost() -> Findings:
    f = Findings(
        "shadow_cost",
        "Shadow traffic: what a healthy, hung or failing shadow costs primary callers",
        order=11,
        number="11a",
    )
    release = threading.Event()

    def hung(items: list[int]) -> list[int]:
        release.wait(120)
        return [i * 2 for i in items]

    def deployment(shadow: Any) -> Deployment[int, int]:
        versions = {"1": BatchedModel(primary, max_batch_size=32)}
        if shadow is not None:
            versions["s"] = BatchedModel(shadow, max_batch_size=32)
        return Deployment(versions, shadow="s" if shadow else None, shadow_queue_size=256)

    setups = {
        "no shadow": deployment(None),
        "healthy shadow": deployment(primary),
        "hung shadow": deployment(hung),
        "raising shadow": deployment(raising),
    }
    latencies: dict[str, list[float]] = {name: [] for name in setups}
    walls: dict[str, list[float]] = {name: [] for name in setups}

    async def run() -> None:
        for d in setups.values():
            await timed_round(d)  # warm-up: engines started, threads spawned
        for round_no in range(ROUNDS):
            for name in rotated(round_no, list(setups)):
                lat, wall = await timed_round(setups[name])
                latencies[name] += lat
                walls[name].append(wall)

    try:
        anyio.run(run)
        shadows = {name: d.statistics().shadow for name, d in setups.items()}
    finally:
        release.set()
        for d in setups.values():
            d.close()

    items = TASKS * CALLS_PER_TASK
    f.setup(
        f"{TASKS} asyncio tasks, {CALLS_PER_TASK} calls each per round, one after another; "
        f"primary model: {COST * 1e3:g} ms per batch, max_batch_size 32, background engine"
    )
    f.setup(
        "shadow: every call mirrored (fraction 1), queue of 256; hung: the shadow model blocks "
        "until the end; raising: it raises on every batch"
    )
    f.setup(f"{ROUNDS} rounds of {items:,} calls per set-up, alternating in rotated order")
    base = percentile(latencies["no shadow"], 0.5)
    for name in setups:
        key = name.replace(" ", "_")
        p50 = percentile(latencies[name], 0.5)
        f.figure(f"{key}_p50_ms", f"{name}: primary p50 latency", p50 * 1e3, "ms")
        f.figure(
            f"{key}_p99_ms", f"{name}: primary p99 latency",
            percentile(latencies[name], 0.99) * 1e3, "ms",
        )  # fmt: skip
        f.figure(f"{key}_calls_s", f"{name}: calls/s", items / median(walls[name]), "items/s")
        if name != "no shadow":
            f.figure(f"{key}_vs_none", f"{name}: p50 / no shadow's", p50 / base, "x")
    hung = shadows["hung shadow"]
    f.figure("hung_dropped", "hung shadow: mirrors dropped (queue full)", hung.dropped, "items")
    f.figure(
        "raising_errors",
        "raising shadow: errors counted",
        shadows["raising shadow"].errors,
        "items",
    )
    f.target("hung shadow: primary p50 vs no shadow", "hung_shadow_vs_none", "<=", TARGET_HUNG_P50)
    f.target(
        "raising shadow: primary p50 vs no shadow", "raising_shadow_vs_none", "<=",
        TARGET_RAISING_P50,
    )  # fmt: skip
    return f


def measure_load_test(tmp: Path) -> Findings:
    f = Findings(
        "canary_load_test",
        "Load test: a canary, a shadow and overload over HTTP",
        order=11,
        number="11b",
    )
    report_path = tmp / "canary.json"
    requests, canary = 800, 0.1
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "canary_loadtest.py"),
            "--requests",
            str(requests),
            "--canary",
            str(canary),
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(report_path.read_text())
    f.setup(
        f"`python examples/canary_loadtest.py --requests {requests}`: a real uvicorn server, "
        "the stock tritonclient asyncio client, 16 tasks"
    )
    f.setup(
        "versions v1 (primary) and v2 (canary at 10%); v3 shadows every call and disagrees "
        "with v1 on 3% of the inputs"
    )
    f.setup("overload: 32 requests at once on a deployment with a queue of 2, 50 ms per batch")
    f.figure("canary_configured", "canary share configured", canary * 100, "%")
    observed = report["canary"]["observed"]
    f.figure("canary_observed", "canary share observed", observed * 100, "%")
    low, high = report["canary"]["interval"]
    f.figure("canary_low", "  99.9% interval, low", low * 100, "%")
    f.figure("canary_high", "  99.9% interval, high", high * 100, "%")
    shadow = report["shadow"]
    f.figure("shadow_rate", "shadow disagreement", shadow["disagreement_rate"] * 100, "%")
    f.figure(
        "shadow_compared",
        "shadow outputs compared",
        shadow["agreed"] + shadow["disagreed"],
        "items",
    )
    f.figure("shed", "overload: shed with 503 + Retry-After", report["overload"]["shed"], "items")
    f.figure("served", "overload: served", report["overload"]["served"], "items")
    f.target(
        "canary share observed within its 99.9% interval (low)", "canary_observed", ">=", low * 100
    )
    f.target(
        "canary share observed within its 99.9% interval (high)",
        "canary_observed",
        "<=",
        high * 100,
    )
    return f


def test_shadow_cost(benchmark: Any) -> None:
    findings = benchmark.pedantic(measure_shadow_cost, rounds=1, iterations=1)
    findings.save(benchmark)


def test_canary_load_test(benchmark: Any, tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("tritonclient.http.aio")
    findings = benchmark.pedantic(lambda: measure_load_test(tmp_path), rounds=1, iterations=1)
    findings.save(benchmark)
