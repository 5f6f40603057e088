"""Swapping the model in its slot: prepare off the hot path, check, publish between batches.

Every method here blocks: ``BatchedModel.swap()`` runs them in a worker thread, ``swap_sync()``
in the caller's thread. Swaps and rollbacks of one model are serialized by a lock.

Weights (a state dict, a path, an in-place copy) are torch's business. The core declares what
it needs as the ``WeightOps`` protocol; ``batchkit._torch_weights`` implements it, and is
imported by name only when the model is a ``torch.nn.Module`` (as anyio loads its backends), so
the core itself never imports torch and mypy checks every call through the protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol, TypeVar

import anyio.from_thread
from anyio.lowlevel import EventLoopToken

from ._config import Settings
from ._engine import Engine
from ._errors import ClosedError, SwapError, ValidationFailed, WarmupFailed
from ._info import info_method
from ._invoke import run_sync_batch, split_outputs
from ._slot import Installed, ModelSlot
from ._stats import Recorder

__all__ = ("Swapper", "WeightOps", "is_async_callable")

# The module that implements ``WeightOps`` for torch modules, as its ``WEIGHT_OPS`` attribute.
_TORCH_WEIGHTS = "batchkit._torch_weights"

T = TypeVar("T")


class WeightOps(Protocol):
    """The weight operations a swap needs from a model library (implemented for torch).

    ``model`` is the library's module type, ``state`` its weights (a name -> tensor mapping),
    ``device`` its device type; the core holds them without looking inside.
    """

    def device_of(self, model: Any) -> Any:
        """Return the device ``model``'s weights live on."""
        ...

    def load_state(self, source: Any, weights_dir: str | os.PathLike[str] | None) -> Any:
        """Return the weights ``source`` gives (a mapping, a module, or a path to load, only
        inside ``weights_dir`` when it is set)."""
        ...

    def check_fits(self, model: Any, state: Any) -> None:
        """Raise ``IncompatibleWeights`` unless ``state`` fits ``model``'s tensors exactly."""
        ...

    def stage(self, state: Any, device: Any) -> Any:
        """Return ``state`` ready to copy to ``device`` (pinned host memory for CUDA)."""
        ...

    def build(self, template: Any, state: Any, device: Any) -> Any:
        """Return a new model shaped like ``template`` holding ``state``, on ``device``."""
        ...

    def place(self, model: Any, device: Any) -> Any:
        """Return ``model`` on ``device``, ready for inference (itself, or a copy)."""
        ...

    def snapshot(self, model: Any) -> Any:
        """Return a host copy of ``model``'s weights, to copy back in later."""
        ...

    def copy_into(self, model: Any, state: Any) -> None:
        """Copy ``state`` into ``model``'s own tensors, and return once the copies are done."""
        ...

    def inference(self) -> AbstractContextManager[Any]:
        """Return the context a batch runs in, entered in the thread that calls the model
        (torch: no autograd, so outputs carry no graph and convert to numpy)."""
        ...


class Swapper:
    """Serialize the swaps and rollbacks of one model's slot."""

    def __init__(
        self,
        settings: Settings,
        slot: ModelSlot,
        recorder: Recorder,
        engine: Callable[[], Engine | None],
    ) -> None:
        self._settings = settings
        self._slot = slot
        self._rec = recorder
        self._engine = engine
        self._lock = threading.Lock()

    def swap(
        self,
        new: Any,
        version: str,
        *,
        in_place: bool,
        warmup: Sequence[Any] | None,
        validate: Callable[[Any, Any], Any] | None,
        device: Any,
        token: EventLoopToken | None,
    ) -> None:
        """Prepare ``new`` as ``version``, check it, and publish it; raise ``SwapError``."""
        runner = _Runner(self._engine(), token)
        with self._lock:
            if in_place:
                self._timed(version, self._swap_in_place, new, version, warmup, validate, runner)
            else:
                self._timed(version, self._swap, new, version, warmup, validate, device, runner)

    def rollback(self, token: EventLoopToken | None) -> str:
        """Publish the previous installation again and return its version."""
        runner = _Runner(self._engine(), token)
        with self._lock:
            previous = self._slot.previous
            if previous is None:
                raise SwapError(f"model {self._settings.name!r} has no previous version to restore")
            if previous.weights is not None:  # replaced in place: copy its weights back in
                self._timed(
                    previous.version,
                    self._swap_in_place,
                    previous.weights,
                    previous.version,
                    None,
                    None,
                    runner,
                )
            else:
                self._timed(previous.version, self._restore, previous)
            return previous.version

    # -- the steps -----------------------------------------------------------------------------

    def _timed(self, version: str, step: Callable[..., None], *args: Any) -> None:
        start = time.perf_counter()
        try:
            step(*args)
        except SwapError:
            self._rec.failed_swaps += 1
            raise
        except Exception as exc:
            self._rec.failed_swaps += 1
            raise SwapError(
                f"swapping model {self._settings.name!r} to version {version!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._rec.swaps += 1
        self._rec.last_swap_seconds = time.perf_counter() - start

    def _swap(
        self,
        new: Any,
        version: str,
        warmup: Sequence[Any] | None,
        validate: Callable[[Any, Any], Any] | None,
        device: Any,
        runner: _Runner,
    ) -> None:
        current = self._slot.current
        installed = in_background(
            self._settings.name,
            self._prepare,
            current,
            new,
            version,
            warmup,
            validate,
            device,
            runner,
        )
        self._publish(installed, current)
        self._rec.last_swap_pause_seconds = 0.0

    def _prepare(
        self,
        current: Installed,
        new: Any,
        version: str,
        warmup: Sequence[Any] | None,
        validate: Callable[[Any, Any], Any] | None,
        device: Any,
        runner: _Runner,
    ) -> Installed:
        if callable(new) and not isinstance(new, (str, os.PathLike)):
            model = new
            helpers = weight_ops_for(new)
            if helpers is not None:
                if device is None and weight_ops_for(current.model) is not None:
                    device = helpers.device_of(current.model)
                model = helpers.place(new, device)
        else:
            helpers = self._weights_helpers(current.model, "swapping in weights")
            state = helpers.load_state(new, self._settings.weights_dir)
            model = helpers.build(current.model, state, device)
        installed = Installed(model, is_async_callable(model), version)
        self._check(installed, current.model, warmup, validate, runner)
        return installed

    def _swap_in_place(
        self,
        new: Any,
        version: str,
        warmup: Sequence[Any] | None,
        validate: Callable[[Any, Any], Any] | None,
        runner: _Runner,
    ) -> None:
        current = self._slot.current
        module = current.model
        helpers = self._weights_helpers(module, "swapping in place")
        state, old_weights = in_background(
            self._settings.name, self._stage_in_place, helpers, module, new
        )
        installed = Installed(module, current.is_async, version)
        with self._held():  # at normal priority: callers wait for this part
            try:
                helpers.copy_into(module, state)
                self._check(installed, None, warmup, validate, runner)
            except BaseException:
                helpers.copy_into(module, old_weights)
                raise
            restore = Installed(module, current.is_async, current.version, weights=old_weights)
            self._publish(installed, restore)

    def _stage_in_place(self, helpers: WeightOps, module: Any, new: Any) -> tuple[Any, Any]:
        state = helpers.load_state(new, self._settings.weights_dir)
        helpers.check_fits(module, state)
        return helpers.stage(state, helpers.device_of(module)), helpers.snapshot(module)

    def _restore(self, previous: Installed) -> None:
        self._publish(previous, self._slot.current)
        self._rec.last_swap_pause_seconds = 0.0

    def _publish(self, installed: Installed, previous: Installed) -> None:
        keep = previous if self._settings.keep_previous else None
        self._slot.publish(installed, previous=keep)

    def _check(
        self,
        installed: Installed,
        old: Any,
        warmup: Sequence[Any] | None,
        validate: Callable[[Any, Any], Any] | None,
        runner: _Runner,
    ) -> None:
        name, version = self._settings.name, installed.version
        if warmup is not None:
            items = list(warmup)
            try:
                outputs = runner.run_batch(self._settings, installed, items)
            except Exception as exc:
                raise WarmupFailed(
                    f"model {name!r} version {version!r} failed its warm-up batch of "
                    f"{len(items)}: {type(exc).__name__}: {exc}"
                ) from exc
            for out in outputs:
                if isinstance(out, Exception):
                    raise WarmupFailed(
                        f"model {name!r} version {version!r} returned an error for a warm-up "
                        f"item: {type(out).__name__}: {out}"
                    ) from out
        if validate is not None:
            try:
                with (installed.inference or nullcontext)():  # a sync callback, in this thread
                    verdict = runner.call(validate, installed.model, old)
            except Exception as exc:
                raise ValidationFailed(
                    f"validating model {name!r} version {version!r} raised "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if verdict is False:
                raise ValidationFailed(
                    f"the validation callback rejected model {name!r} version {version!r}"
                )

    @contextmanager
    def _held(self) -> Iterator[None]:
        """Hold the slot: no batch starts (in any engine, even one starting meanwhile), and
        inside the block no batch runs: the running ones finish first."""
        engine = self._engine()
        if engine is not None and getattr(engine.in_model, "active", False):
            raise SwapError(
                f"an in-place swap of model {self._settings.name!r} from inside the model would "
                "wait for its own batch to end; swap from outside the model"
            )
        start = time.perf_counter()
        self._slot.held = True
        try:
            engine = self._engine()
            if engine is not None and engine.token is not None:
                try:
                    idle = engine.handoff.run(engine.when_idle)
                except ClosedError:  # its loop has ended: nothing runs
                    pass
                else:
                    idle.result()  # the batches in flight finish first
            yield
        finally:
            self._slot.held = False
            self._rec.last_swap_pause_seconds = time.perf_counter() - start
            # An engine that entered before `held` went False may have workers waiting on it.
            engine = self._engine()
            if engine is not None and engine.token is not None:
                try:
                    engine.handoff.run(engine.wake)
                except ClosedError:
                    pass

    def _weights_helpers(self, model: Any, what: str) -> WeightOps:
        helpers = weight_ops_for(model)
        if helpers is None:
            raise SwapError(
                f"{what} needs a torch.nn.Module model; model {self._settings.name!r} serves "
                f"{model!r} (pass a new model function instead)"
            )
        return helpers


class _Runner:
    """Run the new model's warm-up and the validation callback, sync or async.

    Coroutines run on the engine's loop when it runs (where the model normally runs), else on
    the swapping caller's loop, else on a fresh loop.
    """

    def __init__(self, engine: Engine | None, token: EventLoopToken | None) -> None:
        self._token = engine.token if engine is not None else token

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        if not inspect.isawaitable(result):
            return result
        if self._token is not None:
            try:
                return anyio.from_thread.run(_await, result, token=self._token)
            except anyio.RunFinishedError:
                pass
        # No loop to borrow: a fresh one, in a fresh thread (this one may run a loop already).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _await(result)).result()

    def run_batch(self, settings: Settings, installed: Installed, items: list[Any]) -> Any:
        if not installed.is_async:
            return run_sync_batch(settings, installed.model, items, installed.inference)
        collate = settings.collate
        out = self.call(installed.model, collate(items) if collate is not None else items)
        return split_outputs(settings, out, len(items))


def in_background(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a new thread at the lowest CPU priority, and return its result.

    Preparing a model (loading, copying, warming up) competes for the CPU with the batches
    being served; at the lowest priority it takes only what they leave. The thread is new
    because a thread's priority cannot be raised back without privileges.
    """
    result: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            if hasattr(os, "setpriority"):  # Linux: per thread, by its native id
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOWEST_PRIORITY)
        except OSError:  # not permitted here: run at the normal priority
            pass
        try:
            result.set_result(fn(*args))
        except BaseException as exc:
            result.set_exception(exc)

    thread = threading.Thread(target=run, name=f"batchkit-{name}-swap", daemon=True)
    thread.start()
    thread.join()
    return result.result()


_LOWEST_PRIORITY = 19


async def _await(awaitable: Any) -> Any:
    return await awaitable


def weight_ops_for(model: Any) -> WeightOps | None:
    """Return the weight operations for ``model``: torch's for a ``torch.nn.Module``, else None.

    torch is never imported here: a model can only be a torch module once torch is loaded.
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return None
    ops: WeightOps = importlib.import_module(_TORCH_WEIGHTS).WEIGHT_OPS
    return ops


def is_async_callable(fn: object) -> bool:
    """Return whether calling ``fn`` returns a coroutine (an async function or ``__call__``).

    For a model that opts in to ``call_with_info``, that method decides.
    """
    with_info = info_method(fn)
    if with_info is not None:
        return inspect.iscoroutinefunction(with_info)
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )
