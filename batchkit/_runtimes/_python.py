"""Run a Python model file: ``model.py`` defining ``class Model`` with ``load()`` and
``__call__(batch)``.

``batch`` is a dict of batched numpy arrays by input name; the model returns a dict of batched
arrays by output name (or one array, when there is one output). ``load()`` runs once, when
the version is loaded. The file is imported under a private module name, so two versions of one
model never share module state.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Mapping
from typing import Any

from .._core import ConfigurationError
from ._config import ModelSpec, TensorSpec

__all__ = ("PythonRuntime",)

_count = itertools.count()


class PythonRuntime:
    """An instance of ``model.py``'s ``Model`` class, loaded. Raises ``ConfigurationError``."""

    def __init__(self, path: str | os.PathLike[str], spec: ModelSpec) -> None:
        if not spec.inputs or not spec.outputs:
            raise ConfigurationError(
                f"{spec.source}: input/output: a Python model's configuration must declare "
                "its inputs and outputs"
            )
        self.inputs: tuple[TensorSpec, ...] = spec.inputs
        self.outputs: tuple[TensorSpec, ...] = spec.outputs
        name = f"batchkit_model_{spec.name}_{next(_count)}".replace("-", "_")
        module_spec = importlib.util.spec_from_file_location(name, os.fspath(path))
        if module_spec is None or module_spec.loader is None:
            raise ConfigurationError(f"{path}: not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigurationError(
                f"{path}: importing it failed: {type(exc).__name__}: {exc}"
            ) from None
        cls = getattr(module, "Model", None)
        if not isinstance(cls, type) or not callable(getattr(cls, "load", None)):
            raise ConfigurationError(
                f"{path}: must define a class Model with load() and __call__(batch)"
            )
        try:
            self.model: Any = cls()
            self.model.load()
        except Exception as exc:
            raise ConfigurationError(
                f"{path}: Model().load() failed: {type(exc).__name__}: {exc}"
            ) from None

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one batch: arrays by input name in, arrays by output name out."""
        result = self.model(inputs)
        if not isinstance(result, Mapping):
            if len(self.outputs) != 1:
                raise TypeError(
                    f"with several outputs the model must return a dict, got {type(result)}"
                )
            return {self.outputs[0].name: result}
        return dict(result)

    def close(self) -> None:
        """Release the model (its ``close()`` runs when it has one)."""
        close = getattr(self.model, "close", None)
        if callable(close):
            close()
        self.model = None
