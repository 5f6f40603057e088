"""Run an ONNX model with ONNX Runtime (imported here only, when a model is loaded).

One ``InferenceSession`` per loaded version, with the configuration's threads, graph
optimization level and providers (CUDA first when the model asks for a GPU and ONNX Runtime has
it, then CPU). Inputs and outputs are batched numpy arrays by name.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._core import ConfigurationError
from ._config import ModelSpec, TensorSpec

__all__ = ("OnnxRuntime", "onnx_signature")

# ONNX Runtime's type strings, and ONNX's element types, as KServe datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_ONNX_TYPES = {
    1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64",
}  # fmt: skip


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigurationError(
            "serving ONNX models needs onnxruntime: pip install 'batchkit[onnx]'"
        ) from None
    return onnxruntime


def onnx_signature(path: str | os.PathLike[str]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Return the inputs and outputs of the ONNX graph in ``path`` (dims without the batch
    dimension), without creating a session. Raises ``ConfigurationError``."""
    try:
        import onnx
    except ImportError:
        raise ConfigurationError(
            f"{path}: the configuration declares no inputs/outputs; reading them from the graph "
            "needs onnx: pip install 'batchkit[onnx]'"
        ) from None
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:
        raise ConfigurationError(f"{path}: not a readable ONNX model: {exc}") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def specs(values: Any) -> list[TensorSpec]:
        result = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            datatype = _ONNX_TYPES.get(tensor.elem_type)
            if datatype is None:
                raise ConfigurationError(
                    f"{path}: {value.name!r} has ONNX element type {tensor.elem_type}, which "
                    "batchkit cannot serve"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            _check_batch_dim(path, value.name, dims[:1])
            result.append(TensorSpec(value.name, datatype, tuple(dims[1:])))
        return result

    return specs(graph.input), specs(graph.output)


def _check_batch_dim(path: Any, name: str, first: list[Any]) -> None:
    if not first:
        raise ConfigurationError(
            f"{path}: {name!r} has no batch dimension; batchkit needs a dynamic first dimension"
        )
    if isinstance(first[0], int) and first[0] >= 0:
        raise ConfigurationError(
            f"{path}: {name!r} has a fixed batch dimension {first[0]}; batchkit needs a "
            "dynamic first dimension (export the model with dynamic_axes / dim_param)"
        )


# Triton's optimization.graph.level: -1 basic, 1 basic and extended, 2 none, unset (0) all.
_GRAPH_LEVELS = {
    -1: "ORT_ENABLE_BASIC",
    0: "ORT_ENABLE_ALL",
    1: "ORT_ENABLE_EXTENDED",
    2: "ORT_DISABLE_ALL",
}
_EXECUTION_MODES = {"0": "ORT_SEQUENTIAL", "1": "ORT_PARALLEL"}


class OnnxRuntime:
    """An ONNX Runtime session over one version's ``model.onnx``.

    Raises ``ConfigurationError`` when the file cannot be loaded, a dimension is fixed where the
    batch goes, or the configuration's inputs/outputs do not match the graph.
    """

    def __init__(self, path: str | os.PathLike[str], spec: ModelSpec) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        params = spec.parameters
        for key, attr in (
            ("intra_op_thread_count", "intra_op_num_threads"),
            ("inter_op_thread_count", "inter_op_num_threads"),
        ):
            if key in params:
                setattr(options, attr, _int_parameter(spec, key, params[key]))
        level = _GRAPH_LEVELS.get(spec.graph_level)
        if level is None:
            raise ConfigurationError(
                f"{spec.source}: optimization.graph.level: must be -1, 0, 1 or 2, got "
                f"{spec.graph_level}"
            )
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        mode = params.get("execution_mode", "0")
        if mode not in _EXECUTION_MODES:
            raise ConfigurationError(
                f"{spec.source}: parameters.execution_mode: must be '0' (sequential) or '1' "
                f"(parallel), got {mode!r}"
            )
        options.execution_mode = getattr(ort.ExecutionMode, _EXECUTION_MODES[mode])
        providers = ["CPUExecutionProvider"]
        if spec.gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        except Exception as exc:
            raise ConfigurationError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        self.providers = tuple(self.session.get_providers())
        self.inputs = self._check(path, spec.inputs, self.session.get_inputs(), "input")
        self.outputs = self._check(path, spec.outputs, self.session.get_outputs(), "output")
        self._output_names = [t.name for t in self.outputs]
        self._strings = [t.name for t in self.inputs if t.datatype == "BYTES"]

    @staticmethod
    def _check(
        path: Any, declared: tuple[TensorSpec, ...], actual: Any, what: str
    ) -> tuple[TensorSpec, ...]:
        graph = {}
        for arg in actual:
            datatype = _ORT_TYPES.get(arg.type)
            if datatype is None:
                raise ConfigurationError(f"{path}: {what} {arg.name!r} has type {arg.type}")
            dims = [d if isinstance(d, int) else -1 for d in arg.shape]
            _check_batch_dim(path, arg.name, list(arg.shape[:1]))
            graph[arg.name] = TensorSpec(arg.name, datatype, tuple(dims[1:]))
        if not declared:
            return tuple(graph.values())
        for tensor in declared:
            found = graph.get(tensor.name)
            if found is None:
                raise ConfigurationError(
                    f"{path}: the configuration's {what} {tensor.name!r} is not in the graph, "
                    f"which has {sorted(graph)}"
                )
            fits = len(found.dims) == len(tensor.dims) and all(
                g in (-1, d) or d == -1 for g, d in zip(found.dims, tensor.dims, strict=True)
            )
            if found.datatype != tensor.datatype or not fits:
                raise ConfigurationError(
                    f"{path}: the configuration's {what} {tensor.name!r} is {tensor.datatype} "
                    f"{list(tensor.dims)}, the graph's is {found.datatype} {list(found.dims)}"
                )
        if what == "input" and len(declared) != len(graph):
            missing = sorted(set(graph) - {t.name for t in declared})
            raise ConfigurationError(
                f"{path}: the graph's inputs {missing} are missing from the configuration"
            )
        return declared

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one batch: arrays by input name in, arrays by output name out.

        BYTES inputs arrive as ``bytes``; ONNX Runtime's string tensors take ``str`` (UTF-8).
        """
        for name in self._strings:
            array = inputs[name]
            text = [b.decode() if isinstance(b, bytes) else b for b in array.reshape(-1).tolist()]
            inputs = {**inputs, name: np.array(text, dtype=object).reshape(array.shape)}
        results = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Release the session."""
        self.session = None


def _int_parameter(spec: ModelSpec, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigurationError(
            f"{spec.source}: parameters.{key}: must be an integer >= 0, got {value!r}"
        )
    return number
