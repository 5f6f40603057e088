"""``Deployment``: several versions live at once, through the public API only.

Weighted routing against a binomial bound (seeded, so deterministic), sticky keys, pinning,
shadow traffic and its counters, a shadow that hangs or fails changing nothing for primary
callers, atomic routing changes under concurrent async (asyncio, trio) and thread callers.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from batchkit import (
    BatchedModel,
    ClosedError,
    ConfigurationError,
    Deployment,
    DeploymentStatistics,
    Routing,
    Versioned,
    default_compare,
)

pytestmark = pytest.mark.anyio

# A 99.9% two-sided normal bound for a binomial count.
Z999 = 3.2905


def within_binomial(count: int, n: int, p: float) -> bool:
    """Return whether ``count`` successes in ``n`` trials fit probability ``p`` at 99.9%."""
    return abs(count - n * p) <= Z999 * math.sqrt(n * p * (1 - p)) + 1


def tagged(tag: str) -> Callable[[list[Any]], list[Any]]:
    """A model answering each item with (tag, item): every output names its maker."""

    def model(items: list[Any]) -> list[Any]:
        return [(tag, item) for item in items]

    model.__name__ = "clf"
    return model


def three_versions(**options: Any) -> Deployment[Any, Any]:
    return Deployment(
        {v: BatchedModel(tagged(v), name="clf", version=v) for v in ("1", "2", "3")}, **options
    )


class TestWeights:
    async def test_observed_shares_fit_the_weights_over_10000_calls(self) -> None:
        weights = {"1": 0.85, "2": 0.10, "3": 0.05}
        deployment = three_versions(weights=weights, seed=7)
        n = 10_000
        seen: Counter[str] = Counter()

        async def caller(i: int) -> None:
            (tag, item), version = await deployment.call_versioned(i)
            assert (tag, item) == (version, i)  # from the version it reports
            seen[version] += 1

        async with deployment:
            await concurrently(caller, range(n))
        stats = deployment.statistics()
        assert dict(stats.routed) == dict(seen)
        for version, weight in weights.items():
            assert within_binomial(seen[version], n, weight), (version, seen)
        assert stats.observed_shares() == {v: seen[v] / n for v in weights}
        assert stats.total.completed == n == stats.completed
        assert {v: s.completed for v, s in stats.versions.items()} == dict(seen)

    async def test_a_seed_makes_the_routing_reproducible(self) -> None:
        runs = []
        for _ in range(2):
            async with three_versions(weights={"1": 1, "2": 1, "3": 1}, seed=3) as deployment:
                runs.append([(await deployment.call_versioned(i)).version for i in range(200)])
        assert runs[0] == runs[1]
        assert set(runs[0]) == {"1", "2", "3"}

    def test_call_sync_and_call_many_sync_route_by_weight(self) -> None:
        with three_versions(weights={"2": 1}) as deployment:
            assert deployment.call_sync(5) == ("2", 5)
            assert deployment.call_sync_versioned(5) == Versioned(("2", 5), "2")
            assert deployment.call_many_sync([1, 2]) == [("2", 1), ("2", 2)]
            assert deployment.statistics().routed == {"1": 0, "2": 4, "3": 0}

    async def test_call_many_sends_the_whole_call_to_one_version(self) -> None:
        async with three_versions(weights={"1": 1, "2": 1, "3": 1}, seed=1) as deployment:
            for _ in range(30):
                results = await deployment.call_many_versioned(range(5))
                assert len({r.version for r in results}) == 1
                assert [r.value for r in results] == [(results[0].version, i) for i in range(5)]
            assert sum(deployment.statistics().routed.values()) == 150
            values = await deployment.call_many_nowait([7, 8], version="3")
            assert values == [("3", 7), ("3", 8)]
            assert await deployment.call_nowait(9, version="2") == ("2", 9)

    async def test_the_default_routes_everything_to_the_first_version(self) -> None:
        async with three_versions() as deployment:
            assert deployment.routing == Routing({"1": 1.0, "2": 0.0, "3": 0.0})
            assert deployment.version == "1"
            assert {(await deployment.call_versioned(i)).version for i in range(50)} == {"1"}


class TestStickyKeys:
    async def test_a_key_stays_on_its_version_while_the_weights_hold(self) -> None:
        deployment = three_versions(weights={"1": 0.6, "2": 0.3, "3": 0.1}, seed=0)
        keys = [f"user-{i}" for i in range(2000)]
        first: dict[str, str] = {}

        async def first_call(k: str) -> None:
            first[k] = (await deployment.call_versioned(0, key=k)).version

        async def again(k: str) -> None:
            assert (await deployment.call_versioned(1, key=k)).version == first[k]

        def from_a_thread() -> dict[str, str]:
            return {k: deployment.call_sync_versioned(2, key=k).version for k in keys}

        async with deployment:
            await concurrently(first_call, keys)
            await concurrently(again, keys)
            # a change that keeps the weights keeps every key where it was
            deployment.set_shadow("3", fraction=0.5)
            deployment.set_weights({"1": 0.6, "2": 0.3, "3": 0.1})
            assert await anyio.to_thread.run_sync(from_a_thread) == first
        shares = Counter(first.values())
        for version, weight in {"1": 0.6, "2": 0.3, "3": 0.1}.items():
            assert within_binomial(shares[version], len(keys), weight), shares

    def test_keys_hash_the_same_in_every_process(self) -> None:
        code = (
            "from batchkit import BatchedModel, Deployment\n"
            "d = Deployment({v: BatchedModel(lambda xs: xs, version=v) for v in 'abc'},"
            " weights={'a': 1, 'b': 1, 'c': 1})\n"
            "with d:\n"
            "    print(''.join(d.call_sync_versioned(0, key=f'k{i}').version for i in range(64)))\n"
        )
        outputs = {
            subprocess.run(
                [sys.executable, "-c", code],
                env={**_env(), "PYTHONHASHSEED": seed},
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            for seed in ("1", "2")
        }
        assert len(outputs) == 1
        assert set(outputs.pop().strip()) == {"a", "b", "c"}

    async def test_keys_may_be_str_bytes_or_int_and_nothing_else(self) -> None:
        async with three_versions(weights={"1": 1, "2": 1}) as deployment:
            assert (await deployment.call_versioned(0, key=b"k")).version == (
                await deployment.call_versioned(0, key=b"k")
            ).version
            assert (await deployment.call_versioned(0, key=42)).version == (
                await deployment.call_versioned(0, key="42")
            ).version
            with pytest.raises(ConfigurationError, match="routing key"):
                await deployment.call(0, key=1.5)  # type: ignore[arg-type]


class TestPinning:
    async def test_a_pinned_call_always_hits_its_version_even_at_weight_zero(self) -> None:
        async with three_versions(weights={"1": 1}, seed=2) as deployment:
            for i in range(100):
                version = "23"[i % 2]
                assert await deployment.call(i, version=version) == (version, i)
            pinned = await anyio.to_thread.run_sync(lambda: deployment.call_sync(0, version="3"))
            assert pinned == ("3", 0)
            stats = deployment.statistics()
            assert stats.pinned == {"1": 0, "2": 50, "3": 51}
            assert stats.routed == {"1": 0, "2": 0, "3": 0}

    async def test_an_unknown_version_is_a_configuration_error(self) -> None:
        async with three_versions() as deployment:
            with pytest.raises(
                ConfigurationError, match=r"no version '9'; it has \['1', '2', '3'\]"
            ):
                await deployment.call(0, version="9")
            with pytest.raises(ConfigurationError, match="no version"):
                await deployment.call_many([0], version="9")
            assert deployment.statistics().total.submitted == 0


def disagreeing(items: list[int]) -> list[Any]:
    """The shadow: agrees with ``tagged("1")`` except on items with ``item % 10 < 3`` (30%)."""
    return [("1", item if item % 10 >= 3 else -item) for item in items]


class TestShadow:
    async def test_counts_a_known_disagreement_rate_and_keeps_the_last_few(self) -> None:
        primary = BatchedModel(tagged("1"), version="1")
        shadow = BatchedModel(disagreeing, version="s")
        deployment = Deployment(
            {"1": primary, "s": shadow}, shadow="s", shadow_fraction=0.25, seed=11,
            keep_disagreements=5,
        )  # fmt: skip
        n = 2000
        async with deployment:
            # one caller after another: which items are mirrored depends on the seed alone
            for i in range(n):
                assert await deployment.call(i) == ("1", i)  # never the shadow's output
            assert await deployment.wait_shadow(30)
            s = deployment.statistics().shadow
        assert s.version == "s" and s.fraction == 0.25
        assert within_binomial(s.mirrored, n, 0.25)
        assert s.dropped == s.errors == s.discarded == s.pending == 0
        assert s.compared == s.mirrored
        assert within_binomial(s.disagreed, s.compared, 0.3)
        assert s.disagreement_rate == s.disagreed / s.compared
        assert len(s.recent) == 5
        for d in s.recent:
            assert d.item % 10 < 3
            assert (d.primary, d.shadow) == (("1", d.item), ("1", -d.item))
            assert (d.primary_version, d.shadow_version) == ("1", "s")
        assert deployment.statistics().routed == {"1": n, "s": 0}

    async def test_a_failing_shadow_counts_errors_and_fails_no_primary_call(self) -> None:
        def broken(items: list[Any]) -> list[Any]:
            raise RuntimeError("shadow broke")

        deployment = Deployment(
            {"1": BatchedModel(tagged("1")), "2": BatchedModel(broken)}, shadow="2"
        )
        async with deployment:
            assert [await deployment.call(i) for i in range(20)] == [("1", i) for i in range(20)]
            assert await deployment.wait_shadow(30)
            s = deployment.statistics().shadow
        assert (s.mirrored, s.errors, s.agreed, s.disagreed) == (20, 20, 0, 0)

    async def test_a_compare_that_raises_counts_as_an_error(self) -> None:
        def compare(a: Any, b: Any) -> bool:
            raise ValueError("cannot compare")

        deployment = Deployment(
            {"1": BatchedModel(tagged("1")), "2": BatchedModel(tagged("1"))},
            shadow="2",
            compare=compare,
        )
        async with deployment:
            await deployment.call_many(range(10))
            assert await deployment.wait_shadow(30)
            assert deployment.statistics().shadow.errors == 10

    def test_a_hung_shadow_never_slows_or_fails_primary_calls(self) -> None:
        release = threading.Event()
        entered = threading.Event()

        def hung(items: list[Any]) -> list[Any]:
            entered.set()
            release.wait(30)
            return [("1", i) for i in items]

        deployment = Deployment(
            {"1": BatchedModel(tagged("1")), "2": BatchedModel(hung)},
            shadow="2",
            shadow_queue_size=4,
            shadow_workers=1,
        )
        try:
            with deployment:
                assert deployment.call_sync(-1) == ("1", -1)
                assert entered.wait(30)  # the shadow worker is stuck in the model now
                results = [deployment.call_sync(i) for i in range(200)]
                assert results == [("1", i) for i in range(200)]
                s = deployment.statistics().shadow
                assert s.mirrored == 1 + 4  # the stuck one, then the queue filled up
                assert s.dropped == 196
                release.set()
                assert deployment.wait_shadow_sync(30)
                s = deployment.statistics().shadow
                assert (s.agreed, s.pending) == (5, 0)
        finally:
            release.set()

    async def test_pinned_calls_and_calls_routed_to_the_shadow_are_not_mirrored(self) -> None:
        deployment = three_versions(weights={"1": 1, "2": 1}, shadow="2", seed=4)
        async with deployment:
            await deployment.call_many(range(5), version="1")
            routed = [(await deployment.call_versioned(i)).version for i in range(100)]
            assert await deployment.wait_shadow(30)
            s = deployment.statistics().shadow
        assert s.mirrored == routed.count("1")
        assert s.disagreed == s.mirrored  # ("2", i) != ("1", i)

    async def test_clear_shadow_stops_mirroring(self) -> None:
        deployment = three_versions(shadow="3")
        async with deployment:
            await deployment.call(1)
            deployment.clear_shadow()
            await deployment.call_many([2, 3])
            assert await deployment.wait_shadow(30)
            s = deployment.statistics().shadow
        assert (s.version, s.mirrored) == (None, 1)


class TestDefaultCompare:
    def test_plain_values_compare_by_equality(self) -> None:
        assert default_compare(1, 1) and not default_compare(1, 2)
        assert default_compare({"a": [1, (2, 3)]}, {"a": [1, (2, 3)]})
        assert not default_compare({"a": [1]}, {"b": [1]})
        assert not default_compare([1, 2], [1])

    def test_numpy_arrays_compare_with_allclose(self) -> None:
        np = pytest.importorskip("numpy")
        a = np.array([1.0, 2.0, np.nan], dtype=np.float32)
        assert default_compare(a, a + 1e-7)
        assert not default_compare(a, a + 1e-2)
        assert not default_compare(a, a[:2])
        assert default_compare({"y": a}, {"y": a.copy()})
        assert default_compare(np.array([1, 2]), np.array([1, 2]))
        assert not default_compare(np.array([1, 2]), np.array([1, 3]))

    def test_torch_tensors_compare_with_allclose(self) -> None:
        torch = pytest.importorskip("torch")
        a = torch.tensor([1.0, 2.0])
        assert default_compare(a, a + 1e-7)
        assert default_compare(a, a.double())
        assert not default_compare(a, a + 1e-2)
        assert not default_compare(a, a.reshape(2, 1))
        assert default_compare(torch.tensor([1, 2]), torch.tensor([1, 2]))


class TestChanges:
    async def test_set_weights_promote_and_rollback(self) -> None:
        async with three_versions(weights={"1": 9, "2": 1}, shadow="2") as deployment:
            assert deployment.routing.shares() == {"1": 0.9, "2": 0.1, "3": 0.0}
            promoted = deployment.promote("2")
            assert promoted == Routing({"1": 0.0, "2": 1.0, "3": 0.0})  # no longer the shadow
            assert deployment.routing == promoted and deployment.version == "2"
            assert {(await deployment.call_versioned(i)).version for i in range(30)} == {"2"}
            before = deployment.rollback()
            assert before == Routing({"1": 9.0, "2": 1.0, "3": 0.0}, "2", 1.0)
            assert deployment.rollback() == promoted  # a second rollback goes forward again
            assert deployment.set_weights({"3": 2}).weights == {"1": 0.0, "2": 0.0, "3": 2.0}
            assert await deployment.call(0) == ("3", 0)

    @pytest.mark.parametrize(
        ("weights", "message"),
        [
            ({"9": 1}, "no version '9'"),
            ({"1": -1}, "finite and >= 0"),
            ({"1": math.inf}, "finite and >= 0"),
            ({"1": "1"}, "must be a number"),
            ({"1": 0}, "a weight > 0"),
            ([("1", 1)], "must be a mapping"),
        ],
    )
    def test_bad_weights_are_refused_and_change_nothing(self, weights: Any, message: str) -> None:
        deployment = three_versions(weights={"1": 1, "2": 1})
        with pytest.raises(ConfigurationError, match=message):
            deployment.set_weights(weights)
        with pytest.raises(ConfigurationError, match=message):
            three_versions(weights=weights)
        assert deployment.routing.weights == {"1": 1, "2": 1, "3": 0}

    def test_bad_settings_are_refused(self) -> None:
        deployment = three_versions()
        for fraction in (-0.1, 1.5, True, "x"):
            with pytest.raises(ConfigurationError, match="fraction"):
                deployment.set_shadow("2", fraction=fraction)
        with pytest.raises(ConfigurationError, match="compare must be callable"):
            deployment.set_shadow("2", compare=3)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="no routing to roll back"):
            deployment.rollback()
        with pytest.raises(ConfigurationError, match="no version"):
            deployment.promote("7")
        with pytest.raises(ConfigurationError, match="shadow_queue_size"):
            three_versions(shadow_queue_size=0)
        with pytest.raises(ConfigurationError, match="shadow_timeout"):
            three_versions(shadow_timeout=-1)
        with pytest.raises(ConfigurationError, match="at least one version"):
            Deployment({})
        with pytest.raises(ConfigurationError, match="given twice"):
            Deployment([BatchedModel(tagged("1")), BatchedModel(tagged("1"))])
        with pytest.raises(ConfigurationError, match="is not a BatchedModel"):
            Deployment({"1": tagged("1")})  # type: ignore[dict-item]
        with pytest.raises(ConfigurationError, match="without '/'"):
            Deployment({"a/b": BatchedModel(tagged("1"))})
        assert deployment.routing.shadow is None

    async def test_a_change_loses_nothing_queued_on_the_old_version(self) -> None:
        gate = threading.Event()

        def slow(items: list[Any]) -> list[Any]:
            gate.wait(30)
            return [("1", i) for i in items]

        deployment = Deployment(
            {"1": BatchedModel(slow, max_batch_size=1), "2": BatchedModel(tagged("2"))}
        )
        results: list[Versioned[Any]] = []
        async with deployment:
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(lambda i=i: _append(results, deployment.call_versioned(i)))
                await anyio.wait_all_tasks_blocked()
                assert deployment.statistics().versions["1"].submitted == 10
                deployment.promote("2")
                tg.start_soon(lambda: _append(results, deployment.call_versioned(10)))
                await anyio.wait_all_tasks_blocked()
                gate.set()
        assert sorted(results, key=lambda r: r.value[1]) == [
            *(Versioned(("1", i), "1") for i in range(10)),
            Versioned(("2", 10), "2"),
        ]

    async def test_changes_under_async_and_thread_callers_lose_nothing(self) -> None:
        deployment = three_versions(weights={"1": 1}, seed=5)
        stop = threading.Event()
        changes = 0

        def changer() -> None:
            nonlocal changes
            steps = [
                lambda: deployment.set_weights({"1": 9, "2": 1}),
                lambda: deployment.set_shadow("3", fraction=0.5),
                lambda: deployment.promote("2"),
                deployment.rollback,
                lambda: deployment.set_weights({"1": 1, "3": 1}),
                deployment.clear_shadow,
            ]
            while not stop.is_set():
                steps[changes % len(steps)]()
                changes += 1

        def thread_caller(base: int, out: list[Versioned[Any]]) -> None:
            for i in range(300):
                out.append(deployment.call_sync_versioned(base + i, key=i if i % 3 else None))

        async_results: list[Versioned[Any]] = []
        thread_results: list[list[Versioned[Any]]] = [[], []]

        async def async_caller(base: int) -> None:
            for i in range(300):
                async_results.append(await deployment.call_versioned(base + i))

        async with deployment:
            changing = threading.Thread(target=changer, name="changer")
            changing.start()
            try:
                async with anyio.create_task_group() as tg:
                    for base in (0, 1000, 2000):
                        tg.start_soon(async_caller, base)
                    for n, out in enumerate(thread_results):
                        tg.start_soon(
                            anyio.to_thread.run_sync, thread_caller, 10_000 * (n + 1), out
                        )
            finally:
                stop.set()
                changing.join()
            assert await deployment.wait_shadow(30)
        every = async_results + thread_results[0] + thread_results[1]
        assert len(every) == 1500 and changes > 0
        for value, version in every:
            assert value[0] == version  # every result from the version it reports
        items = sorted(value[1] for value, _ in every)
        assert items == sorted([*range(300), *range(1000, 1300), *range(2000, 2300),
                                *range(10_000, 10_300), *range(20_000, 20_300)])  # fmt: skip
        stats = deployment.statistics()
        assert sum(stats.routed.values()) == 1500
        served = Counter(version for _, version in every)
        assert {v: s.completed - _shadowed(stats, v) for v, s in stats.versions.items()} == {
            v: served[v] for v in ("1", "2", "3")
        }
        assert stats.total.failed == stats.total.cancelled == stats.total.expired == 0


class TestLifecycle:
    async def test_statistics_add_up_the_versions(self) -> None:
        async with three_versions(weights={"1": 1, "2": 1}, seed=9) as deployment:
            await deployment.call_many(range(10))
            await deployment.call_many(range(3), version="3")
            stats = deployment.statistics()
        assert isinstance(stats, DeploymentStatistics)
        assert stats.total.completed == sum(s.completed for s in stats.versions.values()) == 13
        assert stats.total.batches == sum(s.batches for s in stats.versions.values())
        assert stats.total.end_to_end.count == 13
        assert stats.total.end_to_end.max == max(s.end_to_end.max for s in stats.versions.values())
        assert stats.model_version == "1" and stats.name == "clf"

    async def test_closed_deployment_refuses_calls(self) -> None:
        deployment = three_versions(shadow="2")
        assert deployment.call_sync(1) == ("1", 1)
        await deployment.aclose()
        with pytest.raises(ClosedError):
            await deployment.call(1)
        with pytest.raises(ClosedError):
            deployment.call_sync(1)

    def test_close_stops_background_engines_and_shadow_workers(self) -> None:
        deployment = three_versions(shadow="2")
        for i in range(20):
            deployment.call_sync(i)
        deployment.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("batchkit-shadow")]
        s = deployment.statistics().shadow
        assert s.mirrored == s.disagreed + s.discarded + s.errors
        assert s.pending == 0


async def concurrently(fn: Callable[[Any], Any], args: Any, tasks: int = 64) -> None:
    """Run ``fn(arg)`` for every arg from ``tasks`` tasks at once (so that batches form)."""
    pending = iter(args)

    async def worker() -> None:
        for arg in pending:
            await fn(arg)

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)


async def _append(out: list[Any], call: Any) -> None:
    out.append(await call)


def _shadowed(stats: DeploymentStatistics, version: str) -> int:
    """Items a version answered as the shadow (completed, not returned to a caller)."""
    s = stats.shadow
    return s.agreed + s.disagreed if version == "3" else 0


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
