"""Read a model's configuration: Triton's ``config.pbtxt``, or the same fields as JSON or YAML.

``config.pbtxt`` is parsed with protobuf's text format into Triton's ``ModelConfig`` message (the
generated module that ships with tritonclient); ``config.json`` and ``config.yaml`` hold the
same message in protobuf's JSON mapping (YAML needs pyyaml). Every error is a
``ConfigurationError`` that names the file and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._core import ConfigurationError

__all__ = (
    "CONFIG_FILES",
    "DEFAULT_FILENAMES",
    "DEFAULT_MAX_BATCH_SIZE",
    "ModelSpec",
    "TensorSpec",
    "default_spec",
    "read_config",
    "runtime_of_file",
    "select_versions",
    "spec_of",
)

# The configuration files a model folder may hold, in the order they are looked for.
CONFIG_FILES = ("config.pbtxt", "config.json", "config.yaml", "config.yml")
# The model file each runtime reads from a version folder by default (as Triton names them).
DEFAULT_FILENAMES = {
    "onnx": "model.onnx",
    "torchscript": "model.pt",
    "python": "model.py",
}
# max_batch_size of a model whose configuration declares none of it, nor its tensors.
DEFAULT_MAX_BATCH_SIZE = 64
_RUNTIME_OF_PLATFORM = {"onnxruntime_onnx": "onnx", "pytorch_libtorch": "torchscript"}
_RUNTIME_OF_BACKEND = {"onnxruntime": "onnx", "pytorch": "torchscript", "python": "python"}
_RUNTIME_OF_SUFFIX = {".onnx": "onnx", ".pt": "torchscript", ".pt2": "torchscript", ".py": "python"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, KServe datatype, and dims without the batch dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """What batchkit uses of a model's configuration (``source``: the file it came from)."""

    name: str
    runtime: str | None  # "onnx", "torchscript", "python"; None: from the model file's suffix
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_queue_delay: float = 0.0  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()
    version_policy: tuple[str, tuple[int, ...]] = ("latest", (1,))
    default_model_filename: str | None = None
    instances: int = 1
    gpu: bool = False
    graph_level: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def filename(self, runtime: str | None = None) -> str:
        """Return the model file's name in a version folder."""
        if self.default_model_filename:
            return self.default_model_filename
        kind = runtime or self.runtime
        return DEFAULT_FILENAMES.get(kind or "", "model.onnx")


def read_config(model_dir: str | os.PathLike[str]) -> ModelSpec:
    """Read the configuration of the model in ``model_dir`` (its folder name is its name).

    A folder without a configuration file gets an empty one (Triton's auto-complete: an ONNX
    model's signature then comes from its graph). Raises ``ConfigurationError``.
    """
    folder = Path(model_dir)
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            return spec_of(_parse(path), str(path), folder.name)
    return default_spec(folder.name, f"{folder} (no configuration)")


def default_spec(name: str, source: str) -> ModelSpec:
    """Return the spec of a model without a configuration file (auto-completed later)."""
    return spec_of(_message(), source, name)


def _message() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ConfigurationError(
            "reading a model configuration needs tritonclient's generated model config: "
            "pip install 'tritonclient[grpc]'"
        ) from None
    return model_config_pb2.ModelConfig()


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    message = _message()
    from google.protobuf import json_format, text_format

    if path.suffix == ".pbtxt":
        try:
            text_format.Parse(text, message)
        except text_format.ParseError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None
        return message
    data = _load_data(path, text)
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: the configuration must be a mapping, got {data!r}")
    _short_datatypes(data)
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise ConfigurationError(f"{path}: {str(exc).splitlines()[0]}") from None
    return message


def _load_data(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{path}: not valid JSON: {exc}") from None
    try:
        import yaml
    except ImportError:
        raise ConfigurationError(f"{path}: reading YAML needs pyyaml: pip install pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {exc}") from None


def _short_datatypes(data: dict[str, Any]) -> None:
    """Let JSON and YAML write ``data_type: FP32`` for ``TYPE_FP32`` (and BYTES for STRING)."""
    for key in ("input", "output"):
        tensors = data.get(key)
        if not isinstance(tensors, list):
            continue
        for tensor in tensors:
            if not isinstance(tensor, dict):
                continue
            for name in ("data_type", "dataType"):
                value = tensor.get(name)
                if isinstance(value, str) and not value.startswith("TYPE_"):
                    tensor[name] = "TYPE_STRING" if value == "BYTES" else f"TYPE_{value}"


def spec_of(message: Any, source: str, folder_name: str) -> ModelSpec:
    """Return the ``ModelSpec`` of a parsed ``ModelConfig`` message read from ``source``."""

    def bad(what: str) -> ConfigurationError:
        return ConfigurationError(f"{source}: {what}")

    name = message.name or folder_name
    if name != folder_name:
        raise bad(f"name: {name!r} differs from the model's folder name {folder_name!r}")
    max_batch_size = message.max_batch_size
    if max_batch_size == 0 and not message.input and not message.output:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE  # auto-completed, as Triton does
    if max_batch_size < 1:
        raise bad(
            f"max_batch_size: must be >= 1 (batchkit batches along a first, dynamic "
            f"dimension), got {max_batch_size}"
        )
    delay, preferred = 0.0, tuple[int, ...]()
    if message.HasField("dynamic_batching"):
        batching = message.dynamic_batching
        delay = batching.max_queue_delay_microseconds / 1e6
        preferred = tuple(batching.preferred_batch_size)
        for size in preferred:
            if not 1 <= size <= max_batch_size:
                raise bad(
                    f"dynamic_batching.preferred_batch_size: {size} is not in "
                    f"1..max_batch_size ({max_batch_size})"
                )
    instances = sum(max(1, g.count) for g in message.instance_group) or 1
    gpu = any(g.kind == g.KIND_GPU for g in message.instance_group)
    parameters = {key: value.string_value for key, value in message.parameters.items()}
    return ModelSpec(
        name=name,
        runtime=_runtime_of(message, bad),
        max_batch_size=max_batch_size,
        inputs=_tensors(message.input, "input", bad),
        outputs=_tensors(message.output, "output", bad),
        max_queue_delay=delay,
        preferred_batch_sizes=preferred,
        version_policy=_version_policy(message, bad),
        default_model_filename=message.default_model_filename or None,
        instances=instances,
        gpu=gpu,
        graph_level=message.optimization.graph.level,
        parameters=parameters,
        source=source,
    )


def _runtime_of(message: Any, bad: Any) -> str | None:
    platform, backend = message.platform, message.backend
    runtime = None
    if platform:
        runtime = _RUNTIME_OF_PLATFORM.get(platform)
        if runtime is None:
            raise bad(f"platform: {platform!r} is not one of {sorted(_RUNTIME_OF_PLATFORM)}")
    if backend:
        by_backend = _RUNTIME_OF_BACKEND.get(backend)
        if by_backend is None:
            raise bad(f"backend: {backend!r} is not one of {sorted(_RUNTIME_OF_BACKEND)}")
        if runtime is not None and by_backend != runtime:
            raise bad(f"backend: {backend!r} does not match platform {platform!r}")
        runtime = by_backend
    if runtime is None and message.default_model_filename:
        runtime = _RUNTIME_OF_SUFFIX.get(Path(message.default_model_filename).suffix)
    return runtime


def runtime_of_file(path: str | os.PathLike[str]) -> str | None:
    """Return the runtime a model file's suffix names (None: unknown)."""
    return _RUNTIME_OF_SUFFIX.get(Path(path).suffix)


def _tensors(tensors: Any, what: str, bad: Any) -> tuple[TensorSpec, ...]:
    from tritonclient.grpc import model_config_pb2

    result = []
    for i, tensor in enumerate(tensors):
        label = f"{what}[{i}]" + (f" ({tensor.name!r})" if tensor.name else "")
        if not tensor.name:
            raise bad(f"{label}.name: missing")
        if tensor.data_type == model_config_pb2.TYPE_INVALID:
            raise bad(f"{label}.data_type: missing")
        if tensor.HasField("reshape"):
            raise bad(f"{label}.reshape: not supported by batchkit")
        if not tensor.dims:
            raise bad(f"{label}.dims: missing")
        if any(d < -1 or d == 0 for d in tensor.dims):
            raise bad(f"{label}.dims: each must be -1 or >= 1, got {list(tensor.dims)}")
        type_name = model_config_pb2.DataType.Name(tensor.data_type)
        datatype = "BYTES" if type_name == "TYPE_STRING" else type_name.removeprefix("TYPE_")
        result.append(TensorSpec(tensor.name, datatype, tuple(tensor.dims)))
    names = [t.name for t in result]
    for name in names:
        if names.count(name) > 1:
            raise bad(f"{what}: {name!r} is declared more than once")
    return tuple(result)


def _version_policy(message: Any, bad: Any) -> tuple[str, tuple[int, ...]]:
    policy = message.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice is None:
        return ("latest", (1,))
    if choice == "all":
        return ("all", ())
    if choice == "latest":
        count = policy.latest.num_versions
        if count < 1:
            raise bad(f"version_policy.latest.num_versions: must be >= 1, got {count}")
        return ("latest", (count,))
    versions = tuple(policy.specific.versions)
    if not versions or any(v < 0 for v in versions):
        raise bad(
            f"version_policy.specific.versions: must list versions >= 0, got {list(versions)}"
        )
    return ("specific", versions)


def select_versions(policy: tuple[str, tuple[int, ...]], available: list[int]) -> list[int]:
    """Return the versions ``policy`` serves out of ``available``, ascending."""
    kind, args = policy
    found = sorted(available)
    if kind == "all":
        return found
    if kind == "latest":
        return found[-args[0] :]
    return [v for v in found if v in args]
