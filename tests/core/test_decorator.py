"""@batched on functions and methods, sync and async."""

from __future__ import annotations

import gc
import threading
import weakref

import anyio
import pytest

from batchkit import AsyncBatched, BatchedModel, ConfigurationError, SyncBatched, batched


class TestFunctions:
    def test_bare_decorator_on_a_sync_function(self) -> None:
        @batched
        def square(xs: list[int]) -> list[int]:
            return [x * x for x in xs]

        try:
            assert isinstance(square, SyncBatched)
            assert isinstance(square, BatchedModel)
            assert square(3) == 9
            assert square.__name__ == "square"
            assert square.name.endswith("square")
        finally:
            square.close()

    def test_settings_reach_the_model(self) -> None:
        @batched(max_batch_size=3, name="sq", max_wait=0.01)
        def square(xs: list[int]) -> list[int]:
            return [x * x for x in xs]

        with square:
            assert square.call_many_sync(range(7)) == [x * x for x in range(7)]
            assert max(square.statistics().batch_sizes) <= 3
        assert square.settings.max_batch_size == 3
        assert square.name == "sq"

    def test_bad_settings_are_rejected_at_decoration(self) -> None:
        with pytest.raises(ConfigurationError, match="max_batch_size must be >= 1, got 0"):

            @batched(max_batch_size=0)
            def f(xs: list[int]) -> list[int]:
                return xs

    @pytest.mark.anyio
    async def test_async_function_is_awaited(self) -> None:
        @batched(max_batch_size=16)
        async def shout(words: list[str]) -> list[str]:
            return [w.upper() for w in words]

        assert isinstance(shout, AsyncBatched)
        async with shout:
            results: dict[str, str] = {}
            async with anyio.create_task_group() as tg:
                for word in ("a", "b", "c"):

                    async def one(word: str = word) -> None:
                        results[word] = await shout(word)

                    tg.start_soon(one)
        assert results == {"a": "A", "b": "B", "c": "C"}

    @pytest.mark.anyio
    async def test_sync_function_from_async_code(self) -> None:
        @batched
        def inc(xs: list[int]) -> list[int]:
            return [x + 1 for x in xs]

        async with inc:
            assert await inc.call(1) == 2


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.batches: list[list[int]] = []

    @batched(max_batch_size=8)
    def scale(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        return [x * self.factor for x in xs]

    @batched
    async def ascale(self, xs: list[int]) -> list[int]:
        return [x * self.factor for x in xs]


class Slotted:
    __slots__ = ("__weakref__", "factor")

    def __init__(self, factor: int) -> None:
        self.factor = factor

    @batched
    def scale(self, xs: list[int]) -> list[int]:
        return [x * self.factor for x in xs]


class TestMethods:
    def test_each_instance_has_its_own_engine(self) -> None:
        a, b = Scaler(2), Scaler(3)
        try:
            assert a.scale(5) == 10
            assert b.scale(5) == 15
            assert a.scale is a.scale
            assert a.scale is not b.scale
            assert a.batches == [[5]] and b.batches == [[5]]
            engines = [t for t in threading.enumerate() if t.name == f"batchkit-{a.scale.name}"]
            assert len(engines) == 2
        finally:
            a.scale.close()
            b.scale.close()

    def test_class_access_returns_the_decorated_object(self) -> None:
        assert isinstance(Scaler.scale, SyncBatched)
        assert isinstance(Scaler.__dict__["scale"], SyncBatched)

    def test_settings_are_shared_by_instances(self) -> None:
        a = Scaler(1)
        assert a.scale.settings.max_batch_size == 8

    @pytest.mark.anyio
    async def test_async_method(self) -> None:
        s = Scaler(4)
        async with s.ascale:
            assert await s.ascale(2) == 8

    def test_slots_class(self) -> None:
        s = Slotted(5)
        try:
            assert s.scale(2) == 10
            assert s.scale is s.scale
        finally:
            s.scale.close()

    def test_instance_model_dies_with_its_instance(self) -> None:
        s = Scaler(2)
        model_ref = weakref.ref(s.scale)
        del s
        gc.collect()
        assert model_ref() is None
