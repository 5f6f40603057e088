"""Find what a ``MODULE:ATTR`` command-line argument names: a model, several, or an app.

Shared by the command-line adapters (``batchkit serve``, ``batchkit pipe``), so every command
accepts the same forms:

- a ``BatchedModel`` (``@batched`` functions are ``BatchedModel`` too), or, for the servers
  (``routed_models_of``), a ``Deployment`` of several versions;
- a mapping of names to models, or any other collection of models (each served under its name);
- a callable taking no arguments that returns one of the above (a factory);
- for the ASGI server only, an ASGI application (anything else callable with three arguments).

It also holds what a served model declares of its tensors (``Tensor``, public as
``batchkit.asgi.Tensor``) and the check of one item against it, shared by the adapters that
validate items before they join a batch: the KServe v2 server and the pipe server, which serves
a model wrapped with a declaration (a ``ServedModel``) the same way. No numpy here: datatypes
are named, and an item is checked by its dtype's name and its shape.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._core import BatchedModel, ConfigurationError, Deployment

__all__ = (
    "DATATYPE_DTYPES",
    "Tensor",
    "declared_inputs",
    "import_target",
    "item_problem",
    "models_of",
    "routed_models_of",
)


def import_target(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and return the object it names.

    The current directory is importable, as with ``python -m``. Raises ``ConfigurationError``
    with what is wrong (malformed spec, missing module, missing attribute).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"expected MODULE:ATTR, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigurationError(f"no module named {module_name!r} (from {spec!r})") from exc
        raise  # the module exists but an import inside it failed: show the real error
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def models_of(obj: Any, *, call_factory: bool = True) -> dict[str, BatchedModel[Any, Any]]:
    """Return the models ``obj`` holds, by name.

    Raises ``ConfigurationError`` when ``obj`` holds no model, something that is not a model,
    or two models with the same name.
    """
    return _models_of(obj, (BatchedModel,), call_factory, None)


def routed_models_of(
    obj: Any,
    *,
    call_factory: bool = True,
    inputs: dict[str, tuple[Tensor, ...]] | None = None,
) -> dict[str, BatchedModel[Any, Any] | Deployment[Any, Any]]:
    """Like ``models_of``, where a model may also be a ``Deployment`` of several versions.

    With ``inputs``, a model with a declaration (a ``batchkit.asgi.ServedModel``) is accepted
    too, served under its name, and its declared inputs are put in ``inputs`` by that name.
    """
    return _models_of(obj, (BatchedModel, Deployment), call_factory, inputs)


def _models_of(
    obj: Any,
    kinds: tuple[type[Any], ...],
    call_factory: bool,
    inputs: dict[str, tuple[Tensor, ...]] | None,
) -> dict[str, Any]:
    what = " or ".join(k.__name__ for k in kinds)
    one = _one_model(obj, kinds, inputs)
    if one is not None:
        return {one[0]: one[1]}
    if isinstance(obj, Mapping):
        models: dict[str, Any] = {}
        for key, value in obj.items():
            one = _one_model(value, kinds, inputs, str(key))
            if one is None:
                raise ConfigurationError(f"{key!r} is not a {what}: {value!r}")
            models[str(key)] = one[1]
        if not models:
            raise ConfigurationError("the mapping holds no models")
        return models
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        models = {}
        for value in obj:
            one = _one_model(value, kinds, inputs)
            if one is None:
                raise ConfigurationError(f"not a {what}: {value!r}")
            if one[0] in models:
                raise ConfigurationError(f"two models are named {one[0]!r}")
            models[one[0]] = one[1]
        if not models:
            raise ConfigurationError("the collection holds no models")
        return models
    if call_factory and callable(obj) and _takes_no_arguments(obj):
        return _models_of(obj(), kinds, False, inputs)
    raise ConfigurationError(f"expected a {what}, a collection of them or a factory, got {obj!r}")


def _one_model(
    obj: Any,
    kinds: tuple[type[Any], ...],
    inputs: dict[str, tuple[Tensor, ...]] | None,
    key: str | None = None,
) -> tuple[str, Any] | None:
    # A model and its name (the mapping's key, if given), or None if obj is not one model.
    if isinstance(obj, kinds):
        return (obj.name if key is None else key), obj
    declared = None if inputs is None else declared_inputs(obj)
    if declared is None or inputs is None:
        return None
    model, name, tensors = declared
    name = name if key is None else key
    inputs[name] = tensors
    return name, model


def _takes_no_arguments(fn: Any) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )


# -- what a served model declares ---------------------------------------------------------------

# Each KServe v2 datatype: the numpy dtype the model sees, and Triton's configuration name.
_DATATYPES: dict[str, tuple[str, str]] = {
    "BOOL": ("bool", "TYPE_BOOL"),
    "UINT8": ("uint8", "TYPE_UINT8"),
    "UINT16": ("uint16", "TYPE_UINT16"),
    "UINT32": ("uint32", "TYPE_UINT32"),
    "UINT64": ("uint64", "TYPE_UINT64"),
    "INT8": ("int8", "TYPE_INT8"),
    "INT16": ("int16", "TYPE_INT16"),
    "INT32": ("int32", "TYPE_INT32"),
    "INT64": ("int64", "TYPE_INT64"),
    "FP16": ("float16", "TYPE_FP16"),
    "FP32": ("float32", "TYPE_FP32"),
    "FP64": ("float64", "TYPE_FP64"),
    "BF16": ("float32", "TYPE_BF16"),
    "BYTES": ("object", "TYPE_STRING"),
}

DATATYPE_DTYPES = {name: dtype for name, (dtype, _) in _DATATYPES.items()}
"""The name of the numpy dtype a model sees for each datatype (BF16: float32, BYTES: object)."""


@dataclass(frozen=True)
class Tensor:
    """One declared input or output of a served model.

    ``shape`` is the shape of one item, without the batch dimension (as in Triton's model
    configuration); -1 marks a dimension of any size. ``datatype`` is a KServe v2 datatype:
    BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BF16 or
    BYTES. The model sees numpy arrays of the matching dtype (BF16 as float32, BYTES as an
    object array of ``bytes``). Raises ``ConfigurationError`` for a bad name, datatype or shape.
    """

    name: str
    datatype: str
    shape: Sequence[int]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"a tensor name must be a non-empty string, got {self.name!r}")
        if self.datatype not in _DATATYPES:
            raise ConfigurationError(
                f"tensor {self.name!r}: datatype must be one of {', '.join(_DATATYPES)}, "
                f"got {self.datatype!r}"
            )
        shape = tuple(self.shape) if isinstance(self.shape, Sequence) else None
        if shape is None or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise ConfigurationError(
                f"tensor {self.name!r}: shape must be a sequence of ints >= -1, got {self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)

    def metadata(self) -> dict[str, Any]:
        """Return the tensor as model metadata lists it (with the batch dimension, -1)."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}

    def config(self) -> dict[str, Any]:
        """Return the tensor as Triton's model configuration lists it (no batch dimension).

        A scalar (shape ``[]``) is ``dims: [1]`` with ``reshape: {shape: []}``, as Triton
        writes it: clients may send ``[B, 1]`` or ``[B]``.
        """
        config: dict[str, Any] = {
            "name": self.name,
            "data_type": _DATATYPES[self.datatype][1],
            "format": "FORMAT_NONE",
            "dims": list(self.shape) or [1],
            "is_shape_tensor": False,
        }
        if not self.shape:
            config["reshape"] = {"shape": []}
        return config

    def matches(self, shape: Sequence[int]) -> bool:
        """Return whether one item's ``shape`` fits the declared shape."""
        declared = self.shape
        return len(shape) == len(declared) and all(
            d == -1 or d == s for d, s in zip(declared, shape, strict=True)
        )

    @property
    def dtype(self) -> str:
        """Return the name of the numpy dtype the model sees for this tensor."""
        return DATATYPE_DTYPES[self.datatype]


def item_problem(tensor: Tensor, dtype: str, shape: Sequence[int]) -> str | None:
    """Return why an item of numpy ``dtype`` (its name) and ``shape`` does not fit ``tensor``.

    None when it fits. The item is one row: ``shape`` has no batch dimension.
    """
    if dtype != tensor.dtype:
        return f"input {tensor.name!r} is {tensor.datatype} (numpy {tensor.dtype}), got {dtype}"
    if not tensor.matches(shape):
        return (
            f"input {tensor.name!r} has shape {list(shape)}, expected {list(tensor.shape)} "
            "(-1 is any size)"
        )
    return None


def declared_inputs(obj: Any) -> tuple[BatchedModel[Any, Any], str, tuple[Tensor, ...]] | None:
    """Return the model, name and inputs of a model with a declaration (a ``ServedModel``).

    None for anything else, a plain ``BatchedModel`` included.
    """
    model = getattr(obj, "model", None)
    name = getattr(obj, "name", None)
    inputs = getattr(obj, "inputs", None)
    if (
        isinstance(model, BatchedModel)
        and isinstance(name, str)
        and isinstance(inputs, tuple)
        and inputs
        and all(isinstance(t, Tensor) for t in inputs)
    ):
        return model, name, inputs
    return None
