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
import inspect
import operator
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("batchkit.torch needs torch: pip install 'batchkit[torch]'") from exc

from ._core._errors import BatchSizeMismatch, ConfigurationError

__all__ = ("Padded", "grouped", "pad", "shape_of", "split", "stack")

_F = TypeVar("_F", bound=Callable[..., Any])


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
        _check_axis(axis)
        if not -values.dim() < axis < values.dim() - 1:
            raise ConfigurationError(
                f"axis {axis} is out of range for output rows of shape {tuple(values.shape[1:])}"
            )
        return Padded(values, self.lengths, axis % (values.dim() - 1))

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
    if len({t.shape for t in tensors}) > 1:
        raise ConfigurationError(
            f"stack needs items of one shape, got shapes {_describe(tensors)}; use pad() for "
            "items of different lengths or grouped() to batch by shape"
        )
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
    _check_multiple_of(multiple_of)
    tensors = _as_tensors(items, "pad")
    ax = _pad_axis(tensors, axis)
    lengths = [t.shape[ax] for t in tensors]
    size = _padded_size(max(lengths), multiple_of)
    first = tensors[0]
    shape = (len(tensors), *first.shape[:ax], size, *first.shape[ax + 1 :])
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

    - a tensor: its rows along the first dim (views, not copies);
    - a ``Padded`` (see ``Padded.with_values``): its rows, each narrowed to its item's length;
    - a tuple or named tuple of these: one tuple of the same type per item;
    - a dict (any mapping) of these: one dict per item, with the same keys;
    - a list: already one output per item (exception instances included), returned as is.

    With ``lengths``, every tensor row is narrowed to ``lengths[i]`` along ``axis``, a dim of
    one item's output. Rows are views, so each keeps the whole batch's storage alive; ``clone()``
    one that you keep for long. Raises ``ConfigurationError`` for anything else, for parts with
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


def _as_tensors(items: Sequence[torch.Tensor], caller: str) -> list[torch.Tensor]:
    if not items:
        raise ConfigurationError(f"{caller} needs at least one item, got {items!r}")
    tensors = [torch.as_tensor(item) for item in items]
    devices = list(dict.fromkeys(t.device for t in tensors))
    if len(devices) > 1:
        names = ", ".join(map(str, devices))
        raise ConfigurationError(f"{caller} needs items on one device, got devices {names}")
    return tensors


def _describe(tensors: Sequence[torch.Tensor]) -> str:
    shapes = list(dict.fromkeys(tuple(t.shape) for t in tensors))
    shown = ", ".join(map(str, shapes[:5]))
    return shown + (f" and {len(shapes) - 5} more" if len(shapes) > 5 else "")


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _pinned(device: torch.device, pin_memory: bool) -> bool:
    # Pinning needs CUDA; a batch already on a GPU has nothing to pin.
    return pin_memory and device.type == "cpu" and torch.cuda.is_available()


def _check_axis(axis: object) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ConfigurationError(f"axis must be an int, got {axis!r}")


def _check_multiple_of(multiple_of: object) -> None:
    if multiple_of is None:
        return
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ConfigurationError(f"multiple_of must be an int >= 1 or None, got {multiple_of!r}")


def _pad_axis(tensors: Sequence[torch.Tensor], axis: int) -> int:
    _check_axis(axis)
    ndim: int = tensors[0].dim()
    if not -ndim <= axis < ndim:
        raise ConfigurationError(
            f"axis {axis} is out of range for items of shape {tuple(tensors[0].shape)}"
        )
    ax = axis % ndim
    rest = {t.shape[:ax] + t.shape[ax + 1 :] if t.dim() == ndim else None for t in tensors}
    if len(rest) > 1:
        raise ConfigurationError(
            f"pad needs items whose shapes differ only along axis {axis}, got shapes "
            f"{_describe(tensors)}; use grouped() to batch by shape"
        )
    return ax


def _padded_size(longest: int, multiple_of: int | None) -> int:
    if multiple_of is None:
        return longest
    return -(-longest // multiple_of) * multiple_of


def _int_list(lengths: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
            raise ConfigurationError(f"lengths must be a 1-d tensor of ints, got {lengths!r}")
        return [int(v) for v in lengths.tolist()]
    try:
        return [operator.index(v) for v in lengths]
    except TypeError:
        raise ConfigurationError(f"lengths must be a sequence of ints, got {lengths!r}") from None


# -- splitting -----------------------------------------------------------------------------------


def _rows(output: Any, lengths: list[int] | None, axis: int) -> list[Any]:
    if isinstance(output, Padded):
        return _trim(_tensor_rows(output.values), _int_list(output.lengths), output.axis)
    if isinstance(output, torch.Tensor):
        rows = _tensor_rows(output)
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
        f"split cannot split a {type(output).__name__}; return a tensor, a Padded, a tuple or "
        "dict of them, or a list with one output per item"
    )


def _tensor_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    if tensor.dim() == 0:
        raise ConfigurationError(f"split needs a batch dim, got a 0-d tensor {tensor!r}")
    return list(tensor.unbind(0))


def _trim(rows: list[torch.Tensor], lengths: list[int], axis: int) -> list[torch.Tensor]:
    if len(lengths) != len(rows):
        raise ConfigurationError(f"split got {len(lengths)} lengths for {len(rows)} rows")
    return [_trim_row(row, length, axis) for row, length in zip(rows, lengths, strict=True)]


def _trim_row(row: torch.Tensor, length: int, axis: int) -> torch.Tensor:
    if not -row.dim() <= axis < row.dim():
        raise ConfigurationError(
            f"axis {axis} is out of range for output rows of shape {tuple(row.shape)}"
        )
    if not 0 <= length <= row.shape[axis]:
        raise ConfigurationError(
            f"length {length} does not fit output rows of size {row.shape[axis]} along axis {axis}"
        )
    return row.narrow(axis, 0, length)


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
