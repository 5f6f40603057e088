"""Property-based tests through the real engine, on asyncio and trio: random mixes of
priorities, deadlines, cancellations, batch failures and per-item exceptions."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchkit import BatchedModel, ClosedError, DeadlineExceeded, ModelError

KINDS = ("ok", "ok", "ok", "item_error", "poison")


@dataclass(frozen=True)
class CallSpec:
    kind: str
    priority: int
    timeout: float | None
    cancel_after: int | None  # checkpoints before the caller is cancelled; None: never


@dataclass(frozen=True)
class Scenario:
    max_batch_size: int
    max_concurrency: int
    isolate_failures: bool
    max_queue_size: int | None
    calls: tuple[CallSpec, ...]


call_specs = st.builds(
    CallSpec,
    kind=st.sampled_from(KINDS),
    priority=st.integers(0, 2),
    timeout=st.one_of(st.none(), st.none(), st.sampled_from([0.0, 0.001, 5.0])),
    cancel_after=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 6)),
)
scenarios = st.builds(
    Scenario,
    max_batch_size=st.integers(1, 6),
    max_concurrency=st.integers(1, 3),
    isolate_failures=st.booleans(),
    max_queue_size=st.one_of(st.none(), st.integers(1, 8)),
    calls=st.lists(call_specs, min_size=1, max_size=24).map(tuple),
)


class Recorder:
    """The scripted model: records each batch and what became of it."""

    def __init__(self, specs: tuple[CallSpec, ...]) -> None:
        self.specs = specs
        self.batches: list[tuple[float, list[int], bool]] = []  # (start, items, raised)
        self.item_errors = {
            i: ValueError(f"item {i}") for i, s in enumerate(specs) if s.kind == "item_error"
        }

    async def __call__(self, items: list[int]) -> list[Any]:
        start = anyio.current_time()
        await anyio.lowlevel.checkpoint()
        poisoned = any(self.specs[i].kind == "poison" for i in items)
        self.batches.append((start, list(items), poisoned))
        await anyio.lowlevel.checkpoint()
        if poisoned:
            raise RuntimeError("poison")
        return [self.item_errors.get(i, i * 2) for i in items]


CANCELLED = object()


def model_for(scenario: Scenario, fn: Any) -> BatchedModel[int, Any]:
    """The model under test: ``fn`` with the scenario's settings."""
    return BatchedModel(
        fn,
        max_batch_size=scenario.max_batch_size,
        max_concurrency=scenario.max_concurrency,
        isolate_failures=scenario.isolate_failures,
        max_queue_size=scenario.max_queue_size,
    )


async def run_scenario(scenario: Scenario) -> tuple[Recorder, dict[int, Any]]:
    recorder = Recorder(scenario.calls)
    model = model_for(scenario, recorder)
    outcomes: dict[int, Any] = {}

    async def caller(i: int, spec: CallSpec) -> None:
        deadline = None
        if spec.timeout is not None:
            deadline = anyio.current_time() + spec.timeout
        with anyio.CancelScope() as scope:
            if spec.cancel_after is not None:
                tg.start_soon(canceller, scope, spec.cancel_after)
            try:
                outcomes[i] = await model.call(i, priority=spec.priority, deadline=deadline)
            except Exception as exc:
                outcomes[i] = exc
        if scope.cancelled_caught:
            outcomes[i] = CANCELLED

    async def canceller(scope: anyio.CancelScope, checkpoints: int) -> None:
        for _ in range(checkpoints):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with model, anyio.create_task_group() as tg:
        for i, spec in enumerate(scenario.calls):
            tg.start_soon(caller, i, spec)
    stats = model.statistics()
    assert stats.submitted == stats.completed + stats.failed + stats.expired + stats.cancelled
    assert stats.queue_depth == 0 and stats.in_flight_batches == 0
    return recorder, outcomes


def check(scenario: Scenario, recorder: Recorder, outcomes: dict[int, Any]) -> None:
    # Every caller got exactly one outcome.
    assert sorted(outcomes) == list(range(len(scenario.calls)))
    succeeded_in: dict[int, int] = {}
    failed_in: dict[int, int] = {}
    for _start, items, raised in recorder.batches:
        assert 1 <= len(items) <= scenario.max_batch_size
        assert len(set(items)) == len(items)
        for i in items:
            # An item is never sent to the model after its deadline. The model's start time is
            # only an upper bound on when the batch left, so check what is certain: a call with
            # timeout 0 is past its deadline from the start and must never be computed.
            assert scenario.calls[i].timeout != 0.0
            target = failed_in if raised else succeeded_in
            target[i] = target.get(i, 0) + 1
    for i, spec in enumerate(scenario.calls):
        outcome = outcomes[i]
        # Computed successfully at most once, and only re-run when splitting a failed batch.
        assert succeeded_in.get(i, 0) <= 1
        if not scenario.isolate_failures:
            assert succeeded_in.get(i, 0) + failed_in.get(i, 0) <= 1
        if outcome is CANCELLED:
            continue
        if isinstance(outcome, DeadlineExceeded):
            assert spec.timeout is not None
            continue
        assert not isinstance(outcome, ClosedError)
        if isinstance(outcome, ModelError):
            assert failed_in.get(i, 0) >= 1
            assert isinstance(outcome.__cause__, RuntimeError)
            if scenario.isolate_failures:
                assert spec.kind == "poison"
            continue
        assert spec.kind != "poison"
        assert succeeded_in.get(i) == 1
        if spec.kind == "item_error":
            assert outcome is recorder.item_errors[i]
        else:
            assert outcome == i * 2


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios)
def test_every_caller_gets_the_outcome_it_should(backend: str, scenario: Scenario) -> None:
    before = threading.active_count()
    recorder, outcomes = anyio.run(run_scenario, scenario, backend=backend)
    check(scenario, recorder, outcomes)
    assert threading.active_count() <= before + 1  # at most anyio's idle worker thread


@settings(max_examples=20, deadline=None)
@given(scenario=scenarios)
def test_no_task_is_left_behind_on_asyncio(scenario: Scenario) -> None:
    async def main() -> int:
        await run_scenario(scenario)
        return len(asyncio.all_tasks()) - 1

    assert asyncio.run(main()) == 0


class SyncRecorder(Recorder):
    """The scripted model as a sync function, for callers in threads."""

    def __call__(self, items: list[int]) -> list[Any]:  # type: ignore[override]
        poisoned = any(self.specs[i].kind == "poison" for i in items)
        self.batches.append((0.0, list(items), poisoned))  # list.append: atomic
        if poisoned:
            raise RuntimeError("poison")
        return [self.item_errors.get(i, i * 2) for i in items]


CALLER_THREADS = 4

thread_scenarios = st.builds(
    Scenario,
    max_batch_size=st.integers(1, 6),
    max_concurrency=st.integers(1, 2),
    isolate_failures=st.booleans(),
    max_queue_size=st.one_of(st.none(), st.none(), st.integers(1, 8)),
    calls=st.lists(
        st.builds(
            CallSpec,
            kind=st.sampled_from(KINDS),
            priority=st.integers(0, 2),
            # With a timeout, a sync call goes through the engine's loop; without, callers'
            # threads may run the batches themselves.
            timeout=st.sampled_from([None, None, 5.0]),
            cancel_after=st.none(),
        ),
        min_size=1,
        max_size=24,
    ).map(tuple),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=thread_scenarios)
def test_sync_callers_in_threads_get_the_outcomes_they_should(scenario: Scenario) -> None:
    before = threading.active_count()
    recorder = SyncRecorder(scenario.calls)
    outcomes: dict[int, Any] = {}
    model = model_for(scenario, recorder)

    def caller_thread(first: int) -> None:
        for i in range(first, len(scenario.calls), CALLER_THREADS):
            spec = scenario.calls[i]
            try:
                outcomes[i] = model.call_sync(i, priority=spec.priority, timeout=spec.timeout)
            except Exception as exc:
                outcomes[i] = exc

    with model:
        threads = [threading.Thread(target=caller_thread, args=(n,)) for n in range(CALLER_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        stats = model.statistics()
    assert stats.submitted == len(scenario.calls)
    assert stats.submitted == stats.completed + stats.failed
    assert stats.queue_depth == 0 and stats.in_flight_batches == 0
    assert stats.batches == len(recorder.batches)
    assert sum(n * count for n, count in stats.batch_sizes.items()) == sum(
        len(items) for _, items, _ in recorder.batches
    )
    check(scenario, recorder, outcomes)
    assert threading.active_count() <= before + 1
