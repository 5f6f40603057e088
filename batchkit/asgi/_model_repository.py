"""``ModelRepository``: serve the model files of a folder laid out as Triton's model repository.

::

    <repository>/<model>/config.pbtxt          (or config.json / config.yaml, or none for ONNX)
    <repository>/<model>/<version>/model.onnx  (model.pt, model.pt2, model.py)

Each model gets one ``BatchedModel`` per version its ``version_policy`` serves. A new version
replaces the oldest one it displaces through ``swap()`` (prepared off the hot path, published
between batches), so calls in flight never fail; versions beyond the old count get a model of
their own. A model that cannot be read or loaded is listed in ``index()`` with its error and
never stops the others.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import numpy as np

from .._core import BatchedModel, ConfigurationError, SwapError
from .._runtimes import (
    ModelSpec,
    Runtime,
    default_spec,
    load_runtime,
    read_config,
    runtime_of_file,
    select_versions,
    signature,
)
from ._served import ServedModel
from ._tensors import Tensor

__all__ = ("ModelRepository",)

logger = logging.getLogger("batchkit.asgi")

LoadMode = Literal["eager", "lazy"]


class _Version:
    """One model version as the batched model runs it: its runtime, loaded once (lazily or
    not), and the batch function over the server's rows."""

    def __init__(self, spec: ModelSpec, path: Path, version: str) -> None:
        self.spec, self.path, self.version = spec, path, version
        self.inputs, self.outputs = signature(spec, path)
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self.error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._runtime is not None

    def load(self) -> Runtime:
        """Load the runtime once (concurrent callers wait for that one load); raise
        ``ConfigurationError`` when it fails, and again on every later call."""
        runtime = self._runtime
        if runtime is not None:
            return runtime
        with self._lock:
            if self._runtime is None:
                if self.error is not None:
                    raise ConfigurationError(self.error)
                try:
                    runtime = load_runtime(self.spec, self.path)
                    _check_signature(self, runtime)
                except Exception as exc:
                    self.error = _describe(exc)
                    logger.error("batchkit: loading %s failed: %s", self.path, self.error)
                    raise ConfigurationError(self.error) from exc
                self._runtime = runtime
                logger.info("batchkit: loaded %s", self.path)
            return self._runtime

    def __call__(self, items: list[Any]) -> list[Any]:
        runtime = self.load()
        names = [t.name for t in self.inputs]
        rows = [{names[0]: item} if len(names) == 1 else item for item in items]
        # Rows of different shapes (a -1 dimension) run as separate batches of equal shapes.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(tuple(np.shape(row[n]) for n in names), []).append(i)
        results: list[Any] = [None] * len(rows)
        for indices in groups.values():
            batch = {n: np.stack([rows[i][n] for i in indices]) for n in names}
            outputs = runtime(batch)
            for j, i in enumerate(indices):
                if len(self.outputs) == 1:
                    results[i] = outputs[self.outputs[0].name][j]
                else:
                    results[i] = {t.name: outputs[t.name][j] for t in self.outputs}
        return results


def _check_signature(version: _Version, runtime: Runtime) -> None:
    if (tuple(runtime.inputs), tuple(runtime.outputs)) != (version.inputs, version.outputs):
        raise ConfigurationError(
            f"{version.path}: its inputs/outputs {list(runtime.inputs)} -> "
            f"{list(runtime.outputs)} differ from the served signature {list(version.inputs)} "
            f"-> {list(version.outputs)}"
        )


_PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "python": "python"}


class _ServedFile(ServedModel):
    """A served model file: its metadata and configuration say what its config file says."""

    def __init__(self, spec: ModelSpec, model: BatchedModel[Any, Any], **kw: Any) -> None:
        super().__init__(model, **kw)
        self.spec = spec
        self.batched = model  # a model file is one BatchedModel, never a Deployment

    def _platform(self) -> str:
        function = self.batched.model
        kind = runtime_of_file(function.path) if isinstance(function, _Version) else None
        return _PLATFORMS.get(self.spec.runtime or kind or "", "batchkit")

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        return {**super().metadata(versions), "platform": self._platform()}

    def config(self) -> dict[str, Any]:
        config = super().config()
        spec = self.spec
        platform = self._platform()
        config.update(
            platform=platform if platform != "python" else "",
            backend={"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}.get(
                platform, platform
            ),
            max_batch_size=spec.max_batch_size,
            parameters={k: {"string_value": v} for k, v in spec.parameters.items()},
        )
        config["dynamic_batching"].update(
            preferred_batch_size=list(spec.preferred_batch_sizes),
            max_queue_delay_microseconds=round(spec.max_queue_delay * 1e6),
        )
        if spec.default_model_filename:
            config["default_model_filename"] = spec.default_model_filename
        return config


@dataclass
class _Slot:
    """One served version: its batched model, run by a task of the repository."""

    served: _ServedFile
    function: _Version
    stop: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Model:
    name: str
    slots: list[_Slot] = field(default_factory=list)
    error: str | None = None  # the model's own (its configuration, its versions)
    version_errors: dict[str, str] = field(default_factory=dict)
    unloaded: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class ModelRepository:
    """The models of a folder laid out as Triton's model repository, for ``KServeApp``.

    ``path``: the repository folder, or one model file (``model.onnx``: served as the model
    named after the file, version 1, its signature from its graph).
    ``load``: ``"eager"`` loads every served version when the server starts; ``"lazy"`` loads
    a version on its first request (concurrent first requests wait for one load).
    ``poll``: seconds between rescans of the folder for new or removed versions and models
    (None: only when the repository's load endpoint asks).

    Serve it with ``KServeApp(ModelRepository(path))``: the app's lifespan loads the models
    and runs their engines. Raises ``ConfigurationError`` when ``path`` is not a folder or a
    model file, or for a bad ``load`` or ``poll``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        load: LoadMode = "eager",
        poll: float | None = None,
    ) -> None:
        if load not in ("eager", "lazy"):
            raise ConfigurationError(f"load must be 'eager' or 'lazy', got {load!r}")
        if poll is not None and (
            isinstance(poll, bool) or not isinstance(poll, (int, float)) or not poll > 0
        ):
            raise ConfigurationError(f"poll must be a number of seconds > 0 or None, got {poll!r}")
        root = Path(path)
        self._file: Path | None = None
        if root.is_file():
            if runtime_of_file(root) != "onnx":
                raise ConfigurationError(
                    f"{root}: only an ONNX file (.onnx) can be served alone; put other model "
                    "files in a model repository folder with a configuration"
                )
            self._file = root
        elif not root.is_dir():
            raise ConfigurationError(f"the model repository {str(root)!r} is not a folder")
        self.path = root
        self.load_mode: LoadMode = load
        self.poll = poll
        self.served: dict[str, list[ServedModel]] = {}
        self._models: dict[str, _Model] = {}
        self._group: Any = None

    def __repr__(self) -> str:
        return f"<ModelRepository {str(self.path)!r} load={self.load_mode!r}>"

    # -- the folder ----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Return the names of the models in the folder (sorted)."""
        if self._file is not None:
            return [self._file.stem]
        return sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def _read(self, name: str) -> tuple[ModelSpec, dict[int, Path]]:
        """Return the spec of model ``name`` and its version folders' model files."""
        if self._file is not None:
            spec = default_spec(name, f"{self._file} (no configuration)")
            return spec, {1: self._file}
        folder = self.path / name
        if not folder.is_dir():
            raise ConfigurationError(f"{folder}: no such model folder")
        spec = read_config(folder)
        versions = {}
        for child in folder.iterdir():
            if child.is_dir() and child.name.isdigit():
                versions[int(child.name)] = child / spec.filename(
                    spec.runtime or _runtime_in(child)
                )
        return spec, versions

    # -- running -------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ModelRepository]:
        """Load the models and run their engines in the current event loop for the block.

        Raises ``ConfigurationError`` when the repository is running already.
        """
        if self._group is not None:
            raise ConfigurationError(f"{self!r} is running already")
        async with anyio.create_task_group() as group:
            self._group = group
            try:
                for name in self.names():
                    await self.load_model(name)
                if self.poll is not None:
                    group.start_soon(self._poll, self.poll)
                yield self
            finally:
                for model in list(self._models.values()):
                    await self._stop(model, list(model.slots))
                group.cancel_scope.cancel()
                self._group = None

    async def _poll(self, every: float) -> None:
        while True:
            await anyio.sleep(every)
            try:
                await self.reload()
            except Exception:  # the folder went away, say: keep serving, try again later
                logger.exception("batchkit: rescanning the model repository %s failed", self.path)

    async def reload(self) -> None:
        """Rescan the folder: load new models and versions, drop removed ones (not the models
        unloaded through the repository endpoint)."""
        names = self.names()
        for name in names:
            model = self._models.get(name)
            if model is None or not model.unloaded:
                await self.load_model(name)
        for name in list(self._models):
            if name not in names:
                await self.unload_model(name)
                del self._models[name]

    async def load_model(self, name: str) -> None:
        """(Re)read model ``name`` from the folder and serve the versions its policy selects.

        Errors are kept for ``index()`` (and logged), never raised: the versions already served
        keep serving. Raises ``ConfigurationError`` only when the folder has no such model.
        """
        if self._group is None:
            raise ConfigurationError(
                f"{self!r} is not running: load models inside running() (the app's lifespan)"
            )
        if name not in self.names():
            raise ConfigurationError(f"the model repository has no model {name!r}")
        model = self._models.setdefault(name, _Model(name))
        async with model.lock:
            model.unloaded = False
            try:
                spec, files = self._read(name)
            except Exception as exc:  # any file the folder holds: an index error, not a crash
                model.error = _describe(exc)
                logger.error("batchkit: model %r: %s", name, model.error)
                return
            model.error = None
            model.version_errors = {}
            wanted = select_versions(spec.version_policy, list(files))
            if spec.version_policy[0] == "specific":
                for v in spec.version_policy[1]:
                    if v not in files:
                        model.version_errors[str(v)] = f"version {v} is not in {self.path / name}"
            if not wanted and not model.version_errors:
                model.error = f"{self.path / name}: no version folder (1, 2, ...) to serve"
            # A version served with another configuration is loaded again with this one, and
            # one whose lazy load failed is tried again.
            kept = {
                s.served.version
                for s in model.slots
                if s.served.spec == spec and s.function.error is None
            }
            fresh = []
            for v in wanted:
                if str(v) not in kept:
                    version = await self._prepare(model, spec, files[v], str(v))
                    if version is not None:
                        fresh.append(version)
            ready = {str(v) for v in wanted} - set(model.version_errors)
            stale = [
                s
                for s in model.slots
                if s.served.version not in ready or s.served.version not in kept
            ]
            for version in fresh:
                await self._publish(model, spec, version, stale)
            if any(s not in stale for s in model.slots):
                await self._stop(model, stale)
            elif stale:  # nothing new could be loaded: the old versions keep serving
                logger.warning(
                    "batchkit: model %r keeps serving version(s) %s: the versions to replace "
                    "them failed to load",
                    name,
                    [s.served.version for s in stale],
                )

    async def _prepare(
        self, model: _Model, spec: ModelSpec, path: Path, version: str
    ) -> _Version | None:
        try:
            function = _Version(spec, path, version)
            if self.load_mode == "eager":
                await anyio.to_thread.run_sync(function.load)
        except Exception as exc:  # a broken file: an index error, not a crash
            model.version_errors[version] = _describe(exc)
            logger.error("batchkit: model %r version %s: %s", model.name, version, _describe(exc))
            return None
        return function

    async def _publish(
        self, model: _Model, spec: ModelSpec, function: _Version, stale: list[_Slot]
    ) -> None:
        for slot in stale:
            same = slot.served.spec == spec and (
                slot.function.inputs,
                slot.function.outputs,
            ) == (function.inputs, function.outputs)
            if same:  # swap in place of the version it displaces: no call fails
                stale.remove(slot)
                try:
                    await slot.served.batched.swap(function, version=function.version)
                except SwapError as exc:
                    model.version_errors[function.version] = str(exc)
                    stale.append(slot)
                    return
                slot.function = function
                self._sync(model)
                return
        batched: BatchedModel[Any, Any] = BatchedModel(
            function,
            name=model.name,
            version=function.version,
            max_batch_size=max(spec.preferred_batch_sizes, default=spec.max_batch_size),
            max_wait=spec.max_queue_delay,
            max_concurrency=spec.instances,
            keep_previous=False,
        )
        served = _ServedFile(
            spec,
            batched,
            inputs=[Tensor(t.name, t.datatype, t.dims) for t in function.inputs],
            outputs=[Tensor(t.name, t.datatype, t.dims) for t in function.outputs],
            name=model.name,
            max_rows=spec.max_batch_size,
        )
        slot = _Slot(served, function)
        await self._group.start(self._run, slot)
        model.slots.append(slot)
        self._sync(model)

    async def _run(self, slot: _Slot, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with slot.served.model:
                task_status.started()
                await slot.stop.wait()
        finally:
            slot.stopped.set()

    async def _stop(self, model: _Model, slots: Sequence[_Slot]) -> None:
        for slot in slots:
            model.slots.remove(slot)
        self._sync(model)
        for slot in slots:  # drain what was queued, then end the engine
            slot.stop.set()
            await slot.stopped.wait()

    def _sync(self, model: _Model) -> None:
        if model.slots:
            self.served[model.name] = [s.served for s in model.slots]
        else:
            self.served.pop(model.name, None)

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of model ``name`` until it is loaded again."""
        model = self._models.get(name)
        if model is None:
            raise ConfigurationError(f"the model repository has no loaded model {name!r}")
        async with model.lock:
            model.unloaded = True
            await self._stop(model, list(model.slots))

    # -- state ---------------------------------------------------------------------------------

    def is_ready(self, name: str) -> bool:
        """Return whether model ``name`` serves: loaded, and its lazy load has not failed."""
        model = self._models.get(name)
        if model is None or model.unloaded or not model.slots:
            return False
        return any(s.function.error is None for s in model.slots)

    def index(self, *, ready: bool = False) -> list[dict[str, Any]]:
        """Return the repository index: every model and version, its state, and its error."""
        entries = []
        names = set(self._models)
        try:
            names |= set(self.names())
        except OSError:
            pass
        for name in sorted(names):
            model = self._models.get(name, _Model(name))
            for entry in _entries(model):
                if not ready or entry["state"] == "READY":
                    entries.append(entry)
        return entries


def _entries(model: _Model) -> list[dict[str, Any]]:
    if model.unloaded:
        return [{"name": model.name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
    entries = []
    for slot in sorted(model.slots, key=lambda s: int(s.served.version)):
        entry: dict[str, Any] = {
            "name": model.name,
            "version": slot.served.version,
            "state": "READY",
        }
        if slot.function.error is not None:
            entry.update(state="UNAVAILABLE", reason=slot.function.error)
        elif not slot.function.loaded:
            entry["reason"] = "not loaded yet: the first request loads it"
        entries.append(entry)
    for version, error in sorted(model.version_errors.items()):
        entries.append(
            {"name": model.name, "version": version, "state": "UNAVAILABLE", "reason": error}
        )
    if model.error is not None:
        entries.append(
            {"name": model.name, "version": "", "state": "UNAVAILABLE", "reason": model.error}
        )
    elif not entries:
        entries.append(
            {"name": model.name, "version": "", "state": "UNAVAILABLE", "reason": "not loaded"}
        )
    return entries


def _describe(exc: Exception) -> str:
    """Return the error to show in the index: a ``ConfigurationError`` names its file already."""
    if isinstance(exc, ConfigurationError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _runtime_in(folder: Path) -> str | None:
    for child in sorted(folder.iterdir()):
        if child.stem == "model" and runtime_of_file(child) is not None:
            return runtime_of_file(child)
    return None
