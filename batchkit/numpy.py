"""Collate numpy arrays into batches and split batched outputs back into one output per item.

Use ``stack`` and ``split`` as a model's ``collate`` and ``split``::

    model = BatchedModel(fn, collate=batchkit.numpy.stack, split=batchkit.numpy.split)

``pad`` batches items of different lengths (the model gets a ``Padded`` with the lengths), and
``grouped`` batches items of different shapes by running the model once per shape.

This module imports numpy; ``import batchkit`` does not.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("batchkit.numpy needs numpy: pip install 'batchkit[numpy]'") from exc

from . import _collate
from ._core import ConfigurationError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ("Padded", "grouped", "pad", "shape_of", "split", "stack")


@dataclass(frozen=True, eq=False)
class Padded:
    """A batch of items padded to one length, with each item's true length.

    - ``values``: the items stacked along a new leading axis, each padded along ``axis``.
    - ``lengths``: int64 array of shape ``(batch,)``, each item's length along ``axis``.
    - ``axis``: the padded axis of one item (so ``axis + 1`` in ``values``), never negative.

    A model that returns ``batch.with_values(output)`` lets ``split`` trim each item's output
    back to its length.
    """

    values: NDArray[Any]
    lengths: NDArray[np.int64]
    axis: int = 0

    @functools.cached_property
    def mask(self) -> NDArray[np.bool_]:
        """Return a bool array of shape ``(batch, padded_length)``: True where data is real.

        Computed on first access. (Where an API wants True at padding, as torch's
        ``key_padding_mask`` does, pass ``~batch.mask``.)
        """
        size = self.values.shape[self.axis + 1]
        return np.arange(size) < self.lengths[:, None]

    def with_values(self, values: NDArray[Any], *, axis: int | None = None) -> Padded:
        """Return a ``Padded`` of ``values`` (the model's output) with these lengths.

        ``axis`` is the padded axis of one item's output (default: this batch's ``axis``);
        ``ConfigurationError`` if it is out of range.
        """
        if axis is None:
            return Padded(values, self.lengths, self.axis)
        row_axis = _collate.normalize_axis(axis, values.shape[1:], "output rows")
        return Padded(values, self.lengths, row_axis)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.values.shape))
        lengths = self.lengths.tolist()
        return f"Padded(values={self.values.dtype}[{shape}], lengths={lengths}, axis={self.axis})"


def shape_of(item: ArrayLike) -> tuple[int, ...]:
    """Return the shape of ``item``: the default grouping key of ``grouped``."""
    return tuple(np.shape(item))


def stack(items: Sequence[ArrayLike]) -> NDArray[Any]:
    """Stack items of one shape along a new leading axis.

    Items are anything ``numpy.asarray`` accepts. Raises ``ConfigurationError`` for no items or
    for items of different shapes (the message names them; see ``pad`` and ``grouped``).
    """
    arrays = _as_arrays(items, "stack")
    _collate.check_one_shape([a.shape for a in arrays])
    return np.stack(arrays)


def pad(
    items: Sequence[ArrayLike],
    *,
    axis: int = 0,
    value: float = 0,
    multiple_of: int | None = None,
) -> Padded:
    """Pad items to the longest along ``axis``, stack them, and record each item's length.

    - ``axis``: the axis of one item to pad (negative counts from the end).
    - ``value``: the fill value of the padding.
    - ``multiple_of``: round the padded length up to a multiple of this (fewer distinct shapes
      for compiled models).

    The dtype is the items' common dtype. Returns a ``Padded``; the model reads
    ``batch.values``, ``batch.lengths`` and ``batch.mask``. Raises ``ConfigurationError`` for no
    items, a bad argument, or items whose shapes differ other than along ``axis``.
    """
    _collate.check_multiple_of(multiple_of)
    arrays = _as_arrays(items, "pad")
    ax, lengths, shape = _collate.pad_layout([a.shape for a in arrays], axis, multiple_of)
    dtype = functools.reduce(np.promote_types, (a.dtype for a in arrays))
    out = np.full(shape, value, dtype=dtype)
    for row, array, length in zip(out, arrays, lengths, strict=True):
        _narrow(row, ax, length)[...] = array
    return Padded(out, np.asarray(lengths, dtype=np.int64), ax)


def split(
    output: Any, *, lengths: Sequence[int] | NDArray[Any] | None = None, axis: int = 0
) -> list[Any]:
    """Turn a batched output into a list with one output per item.

    ``output`` may be:

    - an array: its rows along the first axis (views, not copies);
    - a ``Padded`` (see ``Padded.with_values``): its rows, each trimmed to its item's length;
    - a tuple or named tuple of these: one tuple of the same type per item;
    - a dict (any mapping) of these: one dict per item, with the same keys;
    - a list: already one output per item (exception instances included), returned as is.

    With ``lengths``, every array row is trimmed to ``lengths[i]`` along ``axis``, an axis of
    one item's output. Raises ``ConfigurationError`` for anything else, for parts with
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


# -- array library -------------------------------------------------------------------------------


def _as_arrays(items: Sequence[ArrayLike], caller: str) -> list[NDArray[Any]]:
    _collate.require_items(items, caller)
    return [np.asarray(item) for item in items]


def _int_list(lengths: Sequence[int] | NDArray[Any]) -> list[int]:
    values = np.asarray(lengths)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ConfigurationError(f"lengths must be a 1-d sequence of ints, got {lengths!r}")
    return [int(v) for v in values]


def _array_rows(array: NDArray[Any]) -> list[NDArray[Any]]:
    if array.ndim == 0:
        raise ConfigurationError(f"split needs a batch axis, got a 0-d array {array!r}")
    return list(array)


def _row_shape(row: NDArray[Any]) -> tuple[int, ...]:
    return tuple(row.shape)


def _narrow(row: NDArray[Any], axis: int, length: int) -> NDArray[Any]:
    return row[(slice(None),) * axis + (slice(0, length),)]


_OPS = _collate.ArrayOps(
    array_type=np.ndarray,
    padded_type=Padded,
    noun="an array",
    shape=_row_shape,
    rows=_array_rows,
    narrow=_narrow,
    int_list=_int_list,
)
