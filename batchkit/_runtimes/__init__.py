"""Model runtimes for the model repository: ONNX Runtime, TorchScript/``torch.export``, Python.

Each runtime module imports its library only when a model is loaded. A runtime is built from a
model file and its ``ModelSpec``, exposes its resolved ``inputs`` and ``outputs``, runs one batch
(``runtime(arrays_by_input_name) -> arrays_by_output_name``) and is released with ``close()``.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from .._core import ConfigurationError
from ._config import (
    CONFIG_FILES,
    ModelSpec,
    TensorSpec,
    default_spec,
    read_config,
    runtime_of_file,
    select_versions,
    spec_of,
)

__all__ = (
    "CONFIG_FILES",
    "ModelSpec",
    "Runtime",
    "TensorSpec",
    "default_spec",
    "load_runtime",
    "read_config",
    "runtime_of_file",
    "select_versions",
    "signature",
    "spec_of",
)


class Runtime(Protocol):
    """A loaded model version."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _kind(spec: ModelSpec, path: str | os.PathLike[str]) -> str:
    kind = spec.runtime or runtime_of_file(path)
    if kind is None:
        raise ConfigurationError(
            f"{spec.source}: platform/backend: missing, and the model file {path} does not "
            "name a runtime by its suffix (.onnx, .pt, .pt2, .py)"
        )
    return kind


def load_runtime(spec: ModelSpec, path: str | os.PathLike[str]) -> Runtime:
    """Load the model file ``path`` with the runtime ``spec`` names; raise
    ``ConfigurationError`` when it cannot be loaded or does not match ``spec``."""
    kind = _kind(spec, path)
    if not os.path.isfile(path):
        raise ConfigurationError(f"{path}: the model file is missing")
    if kind == "onnx":
        from ._onnx import OnnxRuntime

        return OnnxRuntime(path, spec)
    if kind == "torchscript":
        from ._torchscript import TorchRuntime

        return TorchRuntime(path, spec)
    from ._python import PythonRuntime

    return PythonRuntime(path, spec)


def signature(
    spec: ModelSpec, path: str | os.PathLike[str]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Return the inputs and outputs of the model, without loading it: the configuration's,
    or an ONNX graph's when the configuration declares none (as Triton completes them)."""
    if spec.inputs and spec.outputs:
        return spec.inputs, spec.outputs
    kind = _kind(spec, path)
    if kind != "onnx":
        raise ConfigurationError(
            f"{spec.source}: input/output: the configuration must declare the inputs and "
            f"outputs of a {kind} model"
        )
    if not os.path.isfile(path):
        raise ConfigurationError(f"{path}: the model file is missing")
    from ._onnx import onnx_signature

    inputs, outputs = onnx_signature(path)
    return spec.inputs or tuple(inputs), spec.outputs or tuple(outputs)
