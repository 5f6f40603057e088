"""Swapping torch models: state dicts, weight files, modules, in place, on CPU and CUDA."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")

import torch

import batchkit.torch as bt
from batchkit import (
    BatchedModel,
    ForbiddenPath,
    IncompatibleWeights,
    SwapError,
    ValidationFailed,
    Versioned,
    WarmupFailed,
    WeightsNotFound,
)

from ..support.helpers import wait_for

pytestmark = pytest.mark.anyio

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Probe:
    """What a test observes of a module's batches; shared by every copy of the module."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []  # bias at the start and end of each batch
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.hook: Any = None  # called at the start of each batch

    def __deepcopy__(self, memo: dict[int, Any]) -> Probe:
        return self


class Tagged(torch.nn.Module):
    """Answers every input with its layer's bias: the weights encode the version."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(features, 1)
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.probe = Probe()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            before = float(self.layer.bias)
            if self.probe.hook is not None:
                self.probe.hook()
            self.probe.entered.set()
            if self.probe.gate is not None:
                assert self.probe.gate.wait(10)
            out = self.layer(batch).squeeze(1) * self.scale
            self.probe.seen.append((before, float(self.layer.bias)))
            return out


def weights(version: float, features: int = 4) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.zeros(1, features), "layer.bias": torch.tensor([version])}


def tagged(version: float) -> Tagged:
    module = Tagged()
    module.load_state_dict(weights(version))
    return module


def served(module: torch.nn.Module, **kwargs: Any) -> BatchedModel[torch.Tensor, float]:
    return BatchedModel(
        module, collate=bt.stack, split=lambda out: out.tolist(), version="1", **kwargs
    )


X = torch.ones(4)


async def answers(model: BatchedModel[torch.Tensor, float]) -> Versioned[float]:
    return await model.call_versioned(X)


class TestStateDicts:
    async def test_a_state_dict_builds_a_new_module_in_eval_mode(self) -> None:
        old = tagged(1.0).train()
        async with served(old) as model:
            assert await answers(model) == Versioned(1.0, "1")
            await model.swap(weights(2.0), version="2", warmup=[X])
            assert await answers(model) == Versioned(2.0, "2")
            new = model.model
            assert isinstance(new, Tagged)
            assert new is not old and not new.training
            assert float(old.layer.bias.detach()) == 1.0  # the old module is untouched
            assert float(new.scale) == 1.0  # non-persistent buffers come from the template
            assert new.layer.weight.data_ptr() != old.layer.weight.data_ptr()

    async def test_a_module_is_put_in_eval_mode(self) -> None:
        async with served(tagged(1.0)) as model:
            new = tagged(5.0).train()
            await model.swap(new, version="5")
            assert model.model is new and not new.training
            assert await answers(model) == Versioned(5.0, "5")

    async def test_validation_compares_new_and_old_on_a_probe(self) -> None:
        def close_enough(new: Tagged, old: Tagged) -> bool:
            probe = torch.stack([X, X])
            return bool(torch.allclose(new(probe), old(probe), atol=1.5))

        async with served(tagged(1.0)) as model:
            await model.swap(weights(2.0), version="2", validate=close_enough)
            with pytest.raises(ValidationFailed):
                await model.swap(weights(9.0), version="9", validate=close_enough)
            assert await answers(model) == Versioned(2.0, "2")


class TestWeightFiles:
    async def test_paths_inside_weights_dir(self, tmp_path: Path) -> None:
        (tmp_path / "v").mkdir()
        torch.save(weights(2.0), tmp_path / "v" / "2.pt")
        torch.save(weights(3.0), tmp_path / "3.pt")
        async with served(tagged(1.0), weights_dir=tmp_path) as model:
            await model.swap("v/2.pt", version="2")
            assert await answers(model) == Versioned(2.0, "2")
            await model.swap(tmp_path / "3.pt", version="3")
            assert await answers(model) == Versioned(3.0, "3")

    async def test_any_path_without_weights_dir(self, tmp_path: Path) -> None:
        torch.save(weights(2.0), tmp_path / "2.pt")
        async with served(tagged(1.0)) as model:
            await model.swap(str(tmp_path / "2.pt"), version="2")
            assert await answers(model) == Versioned(2.0, "2")

    @pytest.fixture
    def files(self, tmp_path: Path) -> Path:
        root = tmp_path / "weights"
        root.mkdir()
        torch.save(weights(7.0), tmp_path / "outside.pt")
        (root / "link.pt").symlink_to(tmp_path / "outside.pt")
        torch.save([1, 2, 3], root / "list.pt")
        torch.save(torch.nn.Linear(4, 1), root / "module.pt")  # pickled: weights_only refuses
        (root / "garbage.pt").write_bytes(b"not a checkpoint")
        torch.save(weights(4.0, features=5), root / "wide.pt")
        torch.save({"other.weight": torch.zeros(1)}, root / "other.pt")
        return root

    @pytest.mark.parametrize(
        ("path", "error", "message"),
        [
            ("../outside.pt", ForbiddenPath, "outside weights_dir"),
            ("link.pt", ForbiddenPath, "outside weights_dir"),
            ("/etc/passwd", ForbiddenPath, "outside weights_dir"),
            ("missing.pt", WeightsNotFound, "no weights file"),
            ("list.pt", IncompatibleWeights, "holds a list, not a state dict"),
            ("module.pt", IncompatibleWeights, "cannot load weights"),
            ("garbage.pt", IncompatibleWeights, "cannot load weights"),
            ("wide.pt", IncompatibleWeights, r"wrong shapes layer\.weight \(1, 5\) != \(1, 4\)"),
            ("other.pt", IncompatibleWeights, r"missing layer\.weight, layer\.bias; unexpected"),
        ],
    )
    async def test_bad_weights_fail_typed_and_the_old_model_serves(
        self, files: Path, path: str, error: type[SwapError], message: str
    ) -> None:
        async with served(tagged(1.0), weights_dir=files) as model:
            with pytest.raises(error, match=message):
                await model.swap(path, version="2")
            assert isinstance(error("x"), SwapError)
            assert await answers(model) == Versioned(1.0, "1")
            assert model.statistics().failed_swaps == 1
            torch.save(weights(3.0), files / "good.pt")
            await model.swap("good.pt", version="3")
            assert await answers(model) == Versioned(3.0, "3")

    async def test_a_bad_in_place_swap_changes_nothing(self, files: Path) -> None:
        module = tagged(1.0)
        async with served(module, weights_dir=files) as model:
            with pytest.raises(IncompatibleWeights):
                await model.swap("wide.pt", version="2", in_place=True)
            assert await answers(model) == Versioned(1.0, "1")

    def test_not_a_state_dict(self) -> None:
        with served(tagged(1.0)) as model:
            with pytest.raises(IncompatibleWeights, match=r"layer\.bias are not tensors"):
                model.swap_sync({"layer.weight": torch.zeros(1, 4), "layer.bias": 1}, version="2")
            with pytest.raises(SwapError, match="expected a model function"):
                model.swap_sync(42, version="2")
            assert model.call_sync_versioned(X) == Versioned(1.0, "1")


class TestInPlace:
    async def test_in_place_keeps_the_module_and_rollback_restores_weights(self) -> None:
        module = tagged(1.0)
        async with served(module) as model:
            await model.swap(weights(2.0), version="2", in_place=True)
            assert model.model is module
            assert await answers(model) == Versioned(2.0, "2")
            assert await model.rollback() == "1"
            assert model.model is module
            assert await answers(model) == Versioned(1.0, "1")
            assert await model.rollback() == "2"
            assert await answers(model) == Versioned(2.0, "2")
            assert model.statistics().last_swap_pause_seconds > 0

    async def test_a_failed_warmup_copies_the_old_weights_back(self) -> None:
        module = tagged(1.0)

        def reject(new: Tagged, old: None) -> bool:
            assert old is None  # in place, the old weights are gone from the module
            return float(new.layer.bias) < 5

        async with served(module) as model:
            with pytest.raises(ValidationFailed):
                await model.swap(weights(9.0), version="9", in_place=True, validate=reject)
            assert await answers(model) == Versioned(1.0, "1")
            with pytest.raises(WarmupFailed):
                await model.swap(weights(2.0), version="2", in_place=True, warmup=[torch.ones(3)])
            assert await answers(model) == Versioned(1.0, "1")
            await model.swap(weights(2.0), version="2", in_place=True, warmup=[X])
            assert await answers(model) == Versioned(2.0, "2")

    async def test_in_place_holds_dispatch_and_waits_for_the_running_batch(self) -> None:
        module = tagged(1.0)
        probe = module.probe
        probe.gate = threading.Event()
        results: dict[str, Versioned[float]] = {}
        # Two batch slots: without the hold, the second call would start at once.
        async with served(module, max_concurrency=2) as model:

            async def call(name: str) -> None:
                results[name] = await answers(model)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "running")
                await anyio.to_thread.run_sync(probe.entered.wait)
                tg.start_soon(lambda: model.swap(weights(2.0), version="2", in_place=True))
                await wait_until(lambda: model.statistics().dispatch_held)
                tg.start_soon(call, "queued")
                await anyio.wait_all_tasks_blocked()
                stats = model.statistics()
                assert (stats.queue_depth, stats.in_flight_batches) == (1, 1)
                probe.gate.set()
            assert not model.statistics().dispatch_held
        assert results == {"running": Versioned(1.0, "1"), "queued": Versioned(2.0, "2")}
        # Each batch saw one set of weights from start to end.
        assert all(before == after for before, after in probe.seen)
        assert model.statistics().last_swap_pause_seconds > 0

    def test_sync_callers_waiting_beside_a_batch_run_after_the_swap(self) -> None:
        # A sync call runs its batch in its own thread; two more wait beside it. The in-place
        # swap holds dispatch: they go to the engine's queue and run once the copy is done.
        module = tagged(1.0)
        probe = module.probe
        probe.gate = threading.Event()
        with served(module) as model, ThreadPoolExecutor(4) as pool:
            first = pool.submit(model.call_sync_versioned, X)
            assert probe.entered.wait(10)
            beside = [pool.submit(model.call_sync_versioned, X) for _ in range(2)]
            wait_for(lambda: model.statistics().queue_depth == 2)
            swapping = pool.submit(model.swap_sync, weights(2.0), version="2", in_place=True)
            wait_for(lambda: model.statistics().dispatch_held)
            probe.gate.set()
            swapping.result(10)
            assert first.result(10) == Versioned(1.0, "1")
            assert [f.result(10) for f in beside] == [Versioned(2.0, "2")] * 2
        assert all(before == after for before, after in probe.seen)
        assert model.statistics().batch_sizes == {1: 1, 2: 1}

    async def test_an_engine_starting_during_an_in_place_copy_waits(self) -> None:
        module = tagged(1.0)
        model = served(module)
        answered: list[Versioned[float]] = []
        caller = threading.Thread(target=lambda: answered.append(model.call_sync_versioned(X)))

        def validate(new: Tagged, old: None) -> bool:
            caller.start()  # starts the background engine while the slot is held
            for _ in range(10_000):
                if model.statistics().queue_depth == 1:
                    return True  # queued, not run: the new weights are in, still unpublished
                threading.Event().wait(0.001)
            raise AssertionError("the call never reached the queue")

        try:
            await model.swap(weights(2.0), version="2", in_place=True, validate=validate)
            await anyio.to_thread.run_sync(caller.join)
        finally:
            await model.aclose()
        assert answered == [Versioned(2.0, "2")]

    def test_in_place_from_inside_the_model_is_refused(self) -> None:
        module = tagged(1.0)
        errors: list[BaseException] = []
        with served(module) as model:

            def swap_from_inside() -> None:
                module.probe.hook = None
                try:
                    model.swap_sync(weights(2.0), version="2", in_place=True)
                except SwapError as exc:
                    errors.append(exc)

            module.probe.hook = swap_from_inside
            assert model.call_sync_versioned(X) == Versioned(1.0, "1")
            assert model.call_sync_versioned(X) == Versioned(1.0, "1")
        assert len(errors) == 1
        assert "from inside the model" in str(errors[0])

    async def test_a_copy_failing_halfway_puts_the_old_weights_back(self) -> None:
        bad = {"layer.weight": torch.ones(1, 4), "layer.bias": torch.empty(1, device="meta")}
        async with served(tagged(1.0)) as model:
            with pytest.raises(SwapError):
                await model.swap(bad, version="2", in_place=True)
            assert await answers(model) == Versioned(1.0, "1")
            assert not model.statistics().dispatch_held


async def wait_until(condition: Any) -> None:
    """Wait, polling, until ``condition()`` holds (a state another thread reaches)."""
    for _ in range(10_000):
        if condition():
            return
        await anyio.sleep(0.001)
    raise AssertionError("the condition never held")


class Packed(torch.nn.Module):
    """Keeps its weight in a plain tensor attribute and builds its own state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.packed = torch.ones(2)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed.clone()

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        self.packed = state_dict[prefix + "weight"].clone()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.packed.sum().expand(batch.shape[0])


class TestModulesWithTheirOwnStateDict:
    @pytest.mark.parametrize("in_place", [False, True])
    async def test_weights_are_loaded_by_the_module(self, in_place: bool) -> None:
        async with served(Packed()) as model:
            assert await answers(model) == Versioned(2.0, "1")
            new = {"weight": torch.full((2,), 3.0)}
            await model.swap(new, version="2", in_place=in_place)
            assert await answers(model) == Versioned(6.0, "2")
            await model.rollback()
            assert await answers(model) == Versioned(2.0, "1")


class TestTorchSwapsUnderLoad:
    SWAPS = 50

    async def test_state_dict_swaps_under_load(self) -> None:
        refs: list[weakref.ref[Any]] = []
        done = anyio.Event()
        results: list[Versioned[float]] = []
        errors: list[BaseException] = []
        module = tagged(1.0)

        async with served(module, max_batch_size=8) as model:

            async def caller() -> None:
                while not done.is_set():
                    try:
                        results.append(await answers(model))
                    except Exception as exc:
                        errors.append(exc)

            async def swapper() -> None:
                try:
                    for n in range(2, self.SWAPS + 2):
                        await answers(model)
                        in_place = n % 5 == 0
                        await model.swap(weights(float(n)), version=str(n), in_place=in_place)
                        refs.append(weakref.ref(model.model))
                finally:
                    done.set()

            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(caller)
                tg.start_soon(swapper)

        assert errors == []
        assert [r for r in results if r.value != float(r.version)] == []
        assert len({r.version for r in results}) >= self.SWAPS // 2
        stats = model.statistics()
        assert (stats.swaps, stats.failed, stats.completed) == (self.SWAPS, 0, stats.submitted)
        gc.collect()
        assert len({id(m) for ref in refs if (m := ref()) is not None}) <= 2


@pytest.mark.gpu
@needs_cuda
class TestCuda:
    async def test_state_dict_swap_onto_cuda(self) -> None:
        module = tagged(1.0).cuda()
        async with served(module) as model:
            stream = torch.cuda.current_stream()
            await model.swap(weights(2.0), version="2", warmup=[X.cuda()])
            new = model.model
            assert all(p.is_cuda for p in new.parameters())
            assert new.scale.is_cuda
            assert await model.call_versioned(X.cuda()) == Versioned(2.0, "2")
            assert torch.cuda.current_stream() == stream

    async def test_in_place_on_cuda(self) -> None:
        module = tagged(1.0).cuda()
        async with served(module) as model:
            await model.swap(weights(3.0), version="3", in_place=True)
            assert model.model is module
            assert await model.call_versioned(X.cuda()) == Versioned(3.0, "3")
            await model.rollback()
            assert await model.call_versioned(X.cuda()) == Versioned(1.0, "1")

    async def test_cuda_without_an_index_is_the_current_device(self) -> None:
        module = tagged(1.0).cuda()
        async with served(module) as model:
            new = tagged(2.0).cuda()
            await model.swap(new, version="2", device="cuda")
            assert model.model is new  # already there: not copied

    async def test_a_cpu_module_moves_to_the_serving_device(self) -> None:
        async with served(tagged(1.0).cuda()) as model:
            await model.swap(tagged(4.0), version="4")
            assert next(model.model.parameters()).is_cuda
            assert await model.call_versioned(X.cuda()) == Versioned(4.0, "4")
