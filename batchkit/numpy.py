"""Collate numpy arrays into batches and split batched outputs back into one output per item.

Use ``stack`` and ``split`` as a model's ``collate`` and ``split``::

    model = BatchedModel(fn, collate=batchkit.numpy.stack, split=batchkit.numpy.split)

``pad`` batches items of different lengths (the model gets a ``Padded`` with the lengths), and
``grouped`` batches items of different shapes by running the model once per shape.

This module imports numpy; ``import batchkit`` does not.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("batchkit.numpy needs numpy: pip install 'batchkit[numpy]'") from exc

from ._core._errors import BatchSizeMismatch, ConfigurationError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ("Padded", "grouped", "pad", "shape_of", "split", "stack")

_F = TypeVar("_F", bound=Callable[..., Any])


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
        _check_axis(axis)
        if not -values.ndim < axis < values.ndim - 1:
            raise ConfigurationError(
                f"axis {axis} is out of range for output rows of shape {values.shape[1:]}"
            )
        return Padded(values, self.lengths, axis % (values.ndim - 1))

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
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigurationError(
            f"stack needs items of one shape, got shapes {_describe(arrays)}; use pad() for "
            "items of different lengths or grouped() to batch by shape"
        )
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
    _check_multiple_of(multiple_of)
    arrays = _as_arrays(items, "pad")
    ax = _pad_axis(arrays, axis)
    lengths = [a.shape[ax] for a in arrays]
    size = _padded_size(max(lengths), multiple_of)
    shape = (len(arrays), *arrays[0].shape[:ax], size, *arrays[0].shape[ax + 1 :])
    dtype = functools.reduce(np.promote_types, (a.dtype for a in arrays))
    out = np.full(shape, value, dtype=dtype)
    for i, (array, length) in enumerate(zip(arrays, lengths, strict=True)):
        index: tuple[int | slice, ...] = (i, *[slice(None)] * ax, slice(0, length))
        out[index] = array
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
    _check_axis(axis)
    limits = None if lengths is None else _int_list(lengths)
    return _rows(output, limits, axis)


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
    if not callable(fn):
        raise ConfigurationError(f"grouped needs a callable model, got {fn!r}")
    if _is_async(fn):

        async def run_async(items: Sequence[Any]) -> list[Any]:
            results: list[Any] = [None] * len(items)
            for group in _partition(items, key):
                output = await fn(collate([items[i] for i in group]))
                _place(results, group, split(output))
            return results

        return _named(run_async, fn)

    def run(items: Sequence[Any]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        for group in _partition(items, key):
            _place(results, group, split(fn(collate([items[i] for i in group]))))
        return results

    return _named(run, fn)


# -- checks --------------------------------------------------------------------------------------


def _as_arrays(items: Sequence[ArrayLike], caller: str) -> list[NDArray[Any]]:
    if not items:
        raise ConfigurationError(f"{caller} needs at least one item, got {items!r}")
    return [np.asarray(item) for item in items]


def _describe(arrays: Sequence[NDArray[Any]]) -> str:
    shapes = list(dict.fromkeys(a.shape for a in arrays))
    shown = ", ".join(map(str, shapes[:5]))
    return shown + (f" and {len(shapes) - 5} more" if len(shapes) > 5 else "")


def _check_axis(axis: object) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ConfigurationError(f"axis must be an int, got {axis!r}")


def _check_multiple_of(multiple_of: object) -> None:
    if multiple_of is None:
        return
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ConfigurationError(f"multiple_of must be an int >= 1 or None, got {multiple_of!r}")


def _pad_axis(arrays: Sequence[NDArray[Any]], axis: int) -> int:
    _check_axis(axis)
    ndim: int = arrays[0].ndim
    if not -ndim <= axis < ndim:
        raise ConfigurationError(
            f"axis {axis} is out of range for items of shape {arrays[0].shape}"
        )
    ax = axis % ndim
    rest = {a.shape[:ax] + a.shape[ax + 1 :] if a.ndim == ndim else None for a in arrays}
    if len(rest) > 1:
        raise ConfigurationError(
            f"pad needs items whose shapes differ only along axis {axis}, got shapes "
            f"{_describe(arrays)}; use grouped() to batch by shape"
        )
    return ax


def _padded_size(longest: int, multiple_of: int | None) -> int:
    if multiple_of is None:
        return longest
    return -(-longest // multiple_of) * multiple_of


def _int_list(lengths: Sequence[int] | NDArray[Any]) -> list[int]:
    values = np.asarray(lengths)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ConfigurationError(f"lengths must be a 1-d sequence of ints, got {lengths!r}")
    return [int(v) for v in values]


# -- splitting -----------------------------------------------------------------------------------


def _rows(output: Any, lengths: list[int] | None, axis: int) -> list[Any]:
    if isinstance(output, Padded):
        return _trim(_array_rows(output.values), _int_list(output.lengths), output.axis)
    if isinstance(output, np.ndarray):
        rows = _array_rows(output)
        return rows if lengths is None else _trim(rows, lengths, axis)
    if isinstance(output, list):
        return output
    if isinstance(output, tuple):
        columns = [_rows(part, lengths, axis) for part in output]
        _check_counts(output, list(range(len(output))), columns)
        return [_like(output, parts) for parts in zip(*columns, strict=True)]
    if isinstance(output, Mapping):
        keys = list(output)
        columns = [_rows(output[k], lengths, axis) for k in keys]
        _check_counts(output, keys, columns)
        return [dict(zip(keys, parts, strict=True)) for parts in zip(*columns, strict=True)]
    raise ConfigurationError(
        f"split cannot split a {type(output).__name__}; return an array, a Padded, a tuple or "
        "dict of them, or a list with one output per item"
    )


def _array_rows(array: NDArray[Any]) -> list[NDArray[Any]]:
    if array.ndim == 0:
        raise ConfigurationError(f"split needs a batch axis, got a 0-d array {array!r}")
    return list(array)


def _trim(rows: list[NDArray[Any]], lengths: list[int], axis: int) -> list[NDArray[Any]]:
    if len(lengths) != len(rows):
        raise ConfigurationError(f"split got {len(lengths)} lengths for {len(rows)} rows")
    return [_trim_row(row, length, axis) for row, length in zip(rows, lengths, strict=True)]


def _trim_row(row: NDArray[Any], length: int, axis: int) -> NDArray[Any]:
    if not -row.ndim <= axis < row.ndim:
        raise ConfigurationError(
            f"axis {axis} is out of range for output rows of shape {row.shape}"
        )
    if not 0 <= length <= row.shape[axis]:
        raise ConfigurationError(
            f"length {length} does not fit output rows of size {row.shape[axis]} along axis {axis}"
        )
    index = (slice(None),) * (axis % row.ndim) + (slice(0, length),)
    return row[index]


def _like(output: tuple[Any, ...], parts: tuple[Any, ...]) -> tuple[Any, ...]:
    if hasattr(output, "_fields"):  # a named tuple: keep its type and field names
        return type(output)(*parts)
    return parts


def _check_counts(output: object, names: Sequence[object], columns: list[list[Any]]) -> None:
    if not columns:
        raise ConfigurationError(f"split got an empty {type(output).__name__}: nothing to split")
    counts = {len(c) for c in columns}
    if len(counts) > 1:
        sizes = ", ".join(f"{len(c)} for {name!r}" for name, c in zip(names, columns, strict=True))
        raise ConfigurationError(f"split got parts with different batch sizes: {sizes}")


# -- grouping ------------------------------------------------------------------------------------


def _partition(items: Sequence[Any], key: Callable[[Any], Hashable]) -> list[list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        k = key(item)
        try:
            groups.setdefault(k, []).append(i)
        except TypeError:
            raise ConfigurationError(
                f"grouped's key must return a hashable value, got {k!r}"
            ) from None
    return list(groups.values())


def _place(results: list[Any], group: list[int], outputs: Sequence[Any]) -> None:
    if len(outputs) != len(group):
        raise BatchSizeMismatch(expected=len(group), got=len(outputs))
    for i, out in zip(group, outputs, strict=True):
        results[i] = out


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _named(wrapper: _F, fn: object) -> _F:
    # The model's name in errors and statistics comes from the wrapped function.
    for attr in ("__name__", "__qualname__"):
        name = getattr(fn, attr, None)
        if isinstance(name, str):
            setattr(wrapper, attr, name)
    return wrapper
