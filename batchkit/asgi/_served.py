"""A model as the server serves it: the batched model, its name, and its declared signature."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._core import BatchedModel, ConfigurationError, Deployment
from ._tensors import MAX_DIMS, Tensor, as_output

__all__ = ("DEFAULT_INPUTS", "DEFAULT_MAX_ROWS", "DEFAULT_OUTPUTS", "ServedModel")

# The fewest rows a request may have by default, whatever the model's max_batch_size.
DEFAULT_MAX_ROWS = 64

# The signature of a model served without one: a vector of floats in, a vector out.
DEFAULT_INPUTS = (Tensor("INPUT0", "FP32", (-1,)),)
DEFAULT_OUTPUTS = (Tensor("OUTPUT0", "FP32", (-1,)),)


class ServedModel:
    """A ``BatchedModel`` with the signature the server validates requests against.

    ``inputs`` and ``outputs`` declare the tensors of one item (shapes without the batch
    dimension). Each item the model receives is one row of the request: the input's array when
    there is one input, else a dict of arrays by input name. Each output the model returns is
    an array-like when there is one output, else a mapping of output name to array-like.

    ``name`` is the name clients use (default: the model's name); the version is always the
    model's current ``version``, so a ``swap()`` is seen at once.

    ``model`` may be a ``Deployment``: the name then routes to its versions (by their weights,
    a request's routing key, or the version the request names); see docs/versions.md.

    ``max_rows`` bounds the batch dimension of one request (each row is one item queued for the
    model); a request with more rows is refused with 400, as Triton refuses a batch over its
    ``max_batch_size``. Default: ``max(max_batch_size, 64)``, so that a small request cannot
    queue millions of items (``shape [1000000, 0]`` holds no data at all).

    ``warmup``: items (rows, as the model receives them) that ``KServeApp`` runs through the
    model when it starts serving; the model's readiness answers 503 until they ran (see
    docs/operations.md).

    Raises ``ConfigurationError`` for an empty or duplicated tensor list, a tensor of more than
    31 dimensions (32 with the batch dimension), a bad ``max_rows`` or a ``warmup`` that is not
    a sequence.
    """

    def __init__(
        self,
        model: BatchedModel[Any, Any] | Deployment[Any, Any],
        *,
        inputs: Sequence[Tensor] = DEFAULT_INPUTS,
        outputs: Sequence[Tensor] = DEFAULT_OUTPUTS,
        name: str | None = None,
        max_rows: int | None = None,
        warmup: Sequence[Any] = (),
    ) -> None:
        if not isinstance(model, (BatchedModel, Deployment)):
            raise ConfigurationError(f"expected a BatchedModel or a Deployment, got {model!r}")
        if max_rows is None:
            max_rows = max(model.settings.max_batch_size, DEFAULT_MAX_ROWS)
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ConfigurationError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        if isinstance(warmup, (str, bytes)) or not isinstance(warmup, Sequence):
            raise ConfigurationError(f"warmup must be a sequence of items, got {warmup!r}")
        self.warmup = list(warmup)
        self.model = model
        self.name = model.name if name is None else name
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ConfigurationError(
                f"a model name must be a non-empty string without '/', got {self.name!r}"
            )
        self.inputs = _tensors("inputs", inputs)
        self.outputs = _tensors("outputs", outputs)
        self.input_by_name = {t.name: t for t in self.inputs}
        self.output_by_name = {t.name: t for t in self.outputs}
        # How a request reaches a Deployment's versions (`key`, `version`): see `routed()`.
        self.route: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<ServedModel {self.name!r} version {self.version!r}>"

    @property
    def max_elements(self) -> int | None:
        """Return the most tensor elements one request may carry, or None when unbounded.

        ``max_rows`` times the elements of each input's declared shape, when every input has a
        fixed shape and none is BYTES (whose strings are data of any length); else None.
        """
        total = 0
        for tensor in self.inputs:
            if tensor.datatype == "BYTES" or -1 in tensor.shape:
                return None
            total += math.prod(tensor.shape)
        return self.max_rows * total

    @property
    def version(self) -> str:
        """Return the version serving now (a routed request's pinned version)."""
        pinned = self.route.get("version")
        return pinned if pinned is not None else self.model.version

    def routed(self, *, version: str | None = None, key: str | None = None) -> ServedModel:
        """Return this model for one request pinned to ``version`` or routed by ``key``
        (a ``Deployment`` only; the model's calls then carry them)."""
        request = copy.copy(self)
        request.route = {"version": version, "key": key}
        return request

    def items(self, arrays: dict[str, Any], rows: int) -> list[Any]:
        """Split the decoded request ``arrays`` (batch first) into one item per row."""
        if len(self.inputs) == 1:
            return list(arrays[self.inputs[0].name])
        names = list(arrays)
        return [{name: arrays[name][i] for name in names} for i in range(rows)]

    def outputs_of(self, results: list[Any], wanted: list[Tensor]) -> dict[str, Any]:
        """Stack the model's outputs for the rows into one array per ``wanted`` output.

        Raises ``TypeError`` when an output is missing or does not fit its declaration.
        """
        single = self.outputs[0].name if len(self.outputs) == 1 else None
        stacked: dict[str, Any] = {}
        for tensor in wanted:
            rows = []
            for result in results:
                if isinstance(result, Mapping):
                    if tensor.name not in result:
                        raise TypeError(f"the output for a row has no {tensor.name!r}")
                    value = result[tensor.name]
                elif single is not None:
                    value = result
                else:
                    raise TypeError(
                        f"with several outputs the model must return a mapping per row, "
                        f"got {type(result).__name__}"
                    )
                array = as_output(tensor.name, tensor.datatype, value)
                if not tensor.matches(array.shape):
                    raise TypeError(
                        f"output {tensor.name!r} of a row has shape {list(array.shape)}, "
                        f"declared {list(tensor.shape)}"
                    )
                rows.append(array)
            if len(rows) > 1 and any(r.shape != rows[0].shape for r in rows):
                raise TypeError(f"output {tensor.name!r} has rows of different shapes")
            stacked[tensor.name] = np.stack(rows) if len(rows) > 1 else rows[0][np.newaxis]
        return stacked

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """Return the KServe v2 model metadata."""
        return {
            "name": self.name,
            "versions": versions,
            "platform": "batchkit",
            "inputs": [t.metadata() for t in self.inputs],
            "outputs": [t.metadata() for t in self.outputs],
        }

    def config(self) -> dict[str, Any]:
        """Return the model as Triton's model configuration JSON describes it."""
        pinned = self.route.get("version")
        model = self.model
        settings = (
            model.models[pinned].settings
            if pinned is not None and isinstance(model, Deployment)
            else model.settings
        )
        return {
            "name": self.name,
            "platform": "batchkit",
            "backend": "batchkit",
            "version_policy": {"specific": {"versions": [self.version]}},
            "max_batch_size": settings.max_batch_size,
            "input": [t.config() for t in self.inputs],
            "output": [t.config() for t in self.outputs],
            "dynamic_batching": {
                "preferred_batch_size": [settings.max_batch_size],
                "max_queue_delay_microseconds": round(settings.max_wait * 1e6),
                "preserve_ordering": False,
            },
            "instance_group": [
                {"name": self.name, "kind": "KIND_CPU", "count": settings.max_concurrency}
            ],
            "parameters": {},
        }


def _tensors(what: str, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    result = tuple(tensors)
    if not result or not all(isinstance(t, Tensor) for t in result):
        raise ConfigurationError(f"{what} must be a non-empty sequence of Tensor, got {tensors!r}")
    for tensor in result:  # numpy 1 builds no array of more than MAX_DIMS dimensions
        if len(tensor.shape) >= MAX_DIMS:
            raise ConfigurationError(
                f"tensor {tensor.name!r}: shape has {len(tensor.shape)} dimensions; with the "
                f"batch dimension a served tensor may have at most {MAX_DIMS}"
            )
    names = [t.name for t in result]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigurationError(f"{what} declare {duplicated} more than once")
    return result
