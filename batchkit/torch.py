"""Collate torch tensors into batches and split batched outputs back into one output per item.

Use ``stack`` and ``split`` as a model's ``collate`` and ``split``::

    model = BatchedModel(fn, collate=batchkit.torch.stack, split=batchkit.torch.split)

``pad`` batches items of different lengths (the model gets a ``Padded`` with the lengths), and
``grouped`` batches items of different shapes by running the model once per shape. Batches keep
the items' dtype (their common dtype, when they differ) and device; ``split`` returns views of
the output, not copies.

This module imports torch; ``import batchkit`` does not.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, overload

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("batchkit.torch needs torch: pip install 'batchkit[torch]'") from exc

from . import _collate
from ._core import ConfigurationError

__all__ = ("Padded", "grouped", "pad", "shape_of", "split", "stack")


@dataclass(frozen=True, eq=False)
class Padded:
    """A batch of items padded to one length, with each item's true length.

    - ``values``: the items stacked along a new leading dim, each padded along ``axis``.
    - ``lengths``: int64 tensor of shape ``(batch,)`` on the device of ``values``, each item's
      length along ``axis`` (``pack_padded_sequence`` wants ``lengths.cpu()``).
    - ``axis``: the padded dim of one item (so ``axis + 1`` in ``values``), never negative.

    A model that returns ``batch.with_values(output)`` lets ``split`` trim each item's output
    back to its length.
    """

    values: torch.Tensor
    lengths: torch.Tensor
    axis: int = 0

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """Return a bool tensor of shape ``(batch, padded_length)``: True where data is real.

        Computed on first access, on the device of ``lengths``. For torch's
        ``key_padding_mask``, which wants True at padding, pass ``~batch.mask``.
        """
        size = self.values.shape[self.axis + 1]
        return torch.arange(size, device=self.lengths.device) < self.lengths[:, None]

    def with_values(self, values: torch.Tensor, *, axis: int | None = None) -> Padded:
        """Return a ``Padded`` of ``values`` (the model's output) with these lengths.

        ``axis`` is the padded dim of one item's output (default: this batch's ``axis``);
        ``ConfigurationError`` if it is out of range.
        """
        if axis is None:
            return Padded(values, self.lengths, self.axis)
        row_axis = _collate.normalize_axis(axis, tuple(values.shape[1:]), "output rows")
        return Padded(values, self.lengths, row_axis)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Padded:
        """Return this batch with ``values`` and ``lengths`` moved to ``device``."""
        return Padded(
            self.values.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
            self.axis,
        )

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.values.shape))
        lengths = self.lengths.tolist()
        return (
            f"Padded(values={self.values.dtype}[{shape}] on {self.values.device}, "
            f"lengths={lengths}, axis={self.axis})"
        )


def shape_of(item: torch.Tensor) -> tuple[int, ...]:
    """Return the shape of ``item``: the default grouping key of ``grouped``."""
    return tuple(torch.as_tensor(item).shape)


def stack(items: Sequence[torch.Tensor], *, pin_memory: bool = False) -> torch.Tensor:
    """Stack tensors of one shape along a new leading dim, on their device.

    With ``pin_memory``, a CPU batch goes into page-locked memory, for a fast (and, with
    ``non_blocking=True``, asynchronous) copy to the GPU; without CUDA it is ignored. Raises
    ``ConfigurationError`` for no items, or for items of different shapes or devices (the
    message names them; see ``pad`` and ``grouped``).
    """
    tensors = _as_tensors(items, "stack")
    _collate.check_one_shape([_shape(t) for t in tensors])
    first = tensors[0]
    if not _pinned(first.device, pin_memory):
        return torch.stack(tensors)
    shape = (len(tensors), *first.shape)
    out = torch.empty(shape, dtype=_common_dtype(tensors), pin_memory=True)
    return torch.stack(tensors, out=out)


def pad(
    items: Sequence[torch.Tensor],
    *,
    axis: int = 0,
    value: float = 0,
    multiple_of: int | None = None,
    pin_memory: bool = False,
) -> Padded:
    """Pad tensors to the longest along ``axis``, stack them, and record each item's length.

    - ``axis``: the dim of one item to pad (negative counts from the end).
    - ``value``: the fill value of the padding.
    - ``multiple_of``: round the padded length up to a multiple of this (fewer distinct shapes
      for compiled models and CUDA graphs).
    - ``pin_memory``: as for ``stack``; pins ``lengths`` too.

    Returns a ``Padded``; the model reads ``batch.values``, ``batch.lengths`` and
    ``batch.mask``. Raises ``ConfigurationError`` for no items, a bad argument, items on
    different devices, or items whose shapes differ other than along ``axis``.
    """
    _collate.check_multiple_of(multiple_of)
    tensors = _as_tensors(items, "pad")
    ax, lengths, shape = _collate.pad_layout([_shape(t) for t in tensors], axis, multiple_of)
    first = tensors[0]
    pin = _pinned(first.device, pin_memory)
    dtype = _common_dtype(tensors)
    out = torch.full(shape, value, dtype=dtype, device=first.device, pin_memory=pin)
    for row, tensor, length in zip(out, tensors, lengths, strict=True):
        row.narrow(ax, 0, length).copy_(tensor)
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=first.device)
    return Padded(out, lengths_t.pin_memory() if pin else lengths_t, ax)


def split(
    output: Any, *, lengths: Sequence[int] | torch.Tensor | None = None, axis: int = 0
) -> list[Any]:
    """Turn a batched output into a list with one output per item.

    ``output`` may be:

    - a tensor: its rows along the first dim (views, not copies, detached from autograd: no
      caller gets a ``grad_fn``);
    - a ``Padded`` (see ``Padded.with_values``): its rows, each narrowed to its item's length;
    - a tuple or named tuple of these: one tuple of the same type per item;
    - a dict (any mapping) of these: one dict per item, with the same keys;
    - a list: already one output per item (exception instances included), returned as is.

    With ``lengths``, every tensor row is narrowed to ``lengths[i]`` along ``axis``, a dim of
    one item's output. Rows are views, so each keeps the whole batch's storage alive; ``clone()``
    one that you keep for long. Raises ``ConfigurationError`` for anything else, for parts with
    different batch sizes, or for lengths that do not fit.
    """
    return _collate.split(output, lengths, axis, _OPS)


@overload
def grouped(
    fn: Callable[[Any], Awaitable[Any]],
    *,
    key: Callable[[Any], Hashable] = ...,
    collate: Callable[[list[Any]], Any] = ...,
    split: Callable[[Any], Sequence[Any]] = ...,
) -> Callable[[Sequence[Any]], Coroutine[Any, Any, list[Any]]]: ...


@overload
def grouped(
    fn: Callable[[Any], Any],
    *,
    key: Callable[[Any], Hashable] = ...,
    collate: Callable[[list[Any]], Any] = ...,
    split: Callable[[Any], Sequence[Any]] = ...,
) -> Callable[[Sequence[Any]], list[Any]]: ...


def grouped(
    fn: Callable[[Any], Any],
    *,
    key: Callable[[Any], Hashable] = shape_of,
    collate: Callable[[list[Any]], Any] = stack,
    split: Callable[[Any], Sequence[Any]] = split,
) -> Callable[[Sequence[Any]], Any]:
    """Wrap a batched model so a list of items of mixed shapes runs as one call per shape.

    The wrapper takes a list of items, partitions it by ``key`` (default: the item's shape),
    calls ``fn(collate(group))`` once per group, in order of each group's first item, splits each
    output with ``split``, and returns the outputs in the items' order. Use it as
    ``BatchedModel(grouped(fn))``, without ``collate`` or ``split`` there. An async ``fn`` gives
    an async wrapper.

    A group whose output has the wrong length raises ``BatchSizeMismatch``; ``fn``'s own errors
    propagate and fail the whole batch.
    """
    return _collate.grouped(fn, key, collate, split)


# -- tensor library ------------------------------------------------------------------------------


def _as_tensors(items: Sequence[torch.Tensor], caller: str) -> list[torch.Tensor]:
    _collate.require_items(items, caller)
    tensors = [torch.as_tensor(item) for item in items]
    devices = list(dict.fromkeys(t.device for t in tensors))
    if len(devices) > 1:
        names = ", ".join(map(str, devices))
        raise ConfigurationError(f"{caller} needs items on one device, got devices {names}")
    return tensors


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _pinned(device: torch.device, pin_memory: bool) -> bool:
    # Pinning needs CUDA; a batch already on a GPU has nothing to pin.
    return pin_memory and device.type == "cpu" and torch.cuda.is_available()


def _int_list(lengths: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
            raise ConfigurationError(f"lengths must be a 1-d tensor of ints, got {lengths!r}")
        return [int(v) for v in lengths.tolist()]
    try:
        return [operator.index(v) for v in lengths]
    except TypeError:
        raise ConfigurationError(f"lengths must be a sequence of ints, got {lengths!r}") from None


def _tensor_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    if tensor.dim() == 0:
        raise ConfigurationError(f"split needs a batch dim, got a 0-d tensor {tensor!r}")
    return list(tensor.detach().unbind(0))  # no autograd graph reaches the callers


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _narrow(row: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    return row.narrow(axis, 0, length)


_OPS = _collate.ArrayOps(
    array_type=torch.Tensor,
    padded_type=Padded,
    noun="a tensor",
    shape=_shape,
    rows=_tensor_rows,
    narrow=_narrow,
    int_list=_int_list,
)
