"""Collation logic that does not depend on the array library, for ``batchkit.numpy`` and ``.torch``.

Standard library only: this module must import neither numpy nor torch. Where the libraries
differ (taking rows, narrowing a row, reading lengths), the caller passes an ``ArrayOps``.
Shapes arrive here as plain tuples of ints.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from ._core import BatchSizeMismatch, ConfigurationError

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ArrayOps:
    """What ``split`` needs from one array library.

    - ``array_type``: the library's array class.
    - ``padded_type``: its ``Padded`` class (with ``values``, ``lengths`` and ``axis``).
    - ``noun``: how the split error names an array ("an array", "a tensor").
    - ``shape``: the shape of an array, as a tuple of ints.
    - ``rows``: an array's rows along its first axis; ``ConfigurationError`` for a 0-d array.
    - ``narrow``: ``narrow(row, axis, length)``, the first ``length`` entries of ``row`` along
      ``axis`` (already checked to fit and never negative).
    - ``int_list``: the user's ``lengths`` as a list of ints; ``ConfigurationError`` otherwise.
    """

    array_type: type[Any]
    padded_type: type[Any]
    noun: str
    shape: Callable[[Any], tuple[int, ...]]
    rows: Callable[[Any], list[Any]]
    narrow: Callable[[Any, int, int], Any]
    int_list: Callable[[Any], list[int]]


class PadLayout(NamedTuple):
    """Where ``pad`` puts items: the padded axis, each item's length, the batch's shape."""

    axis: int
    lengths: list[int]
    shape: tuple[int, ...]


# -- checks --------------------------------------------------------------------------------------


def require_items(items: Sequence[Any], caller: str) -> None:
    """Raise ``ConfigurationError`` if ``caller`` got no items."""
    if not items:
        raise ConfigurationError(f"{caller} needs at least one item, got {items!r}")


def check_axis(axis: object) -> None:
    """Raise ``ConfigurationError`` unless ``axis`` is an int (a bool is not)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ConfigurationError(f"axis must be an int, got {axis!r}")


def check_multiple_of(multiple_of: object) -> None:
    """Raise ``ConfigurationError`` unless ``multiple_of`` is None or an int >= 1."""
    if multiple_of is None:
        return
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ConfigurationError(f"multiple_of must be an int >= 1 or None, got {multiple_of!r}")


def normalize_axis(axis: int, shape: tuple[int, ...], what: str) -> int:
    """Return ``axis`` of an array of ``shape`` as a non-negative axis.

    ``ConfigurationError`` if it is not an int or out of range; ``what`` names the arrays.
    """
    check_axis(axis)
    if not -len(shape) <= axis < len(shape):
        raise ConfigurationError(f"axis {axis} is out of range for {what} of shape {shape}")
    return axis % len(shape)


def check_one_shape(shapes: Sequence[tuple[int, ...]]) -> None:
    """Raise ``ConfigurationError`` for ``stack`` unless all ``shapes`` are the same."""
    if len(set(shapes)) > 1:
        raise ConfigurationError(
            f"stack needs items of one shape, got shapes {_describe(shapes)}; use pad() for "
            "items of different lengths or grouped() to batch by shape"
        )


def pad_layout(shapes: Sequence[tuple[int, ...]], axis: int, multiple_of: int | None) -> PadLayout:
    """Return where ``pad`` puts items of ``shapes`` (at least one), padded along ``axis``.

    ``ConfigurationError`` for a bad ``axis`` or for shapes that differ other than along it.
    """
    first = shapes[0]
    ax = normalize_axis(axis, first, "items")
    rest = {s[:ax] + s[ax + 1 :] if len(s) == len(first) else None for s in shapes}
    if len(rest) > 1:
        raise ConfigurationError(
            f"pad needs items whose shapes differ only along axis {axis}, got shapes "
            f"{_describe(shapes)}; use grouped() to batch by shape"
        )
    lengths = [s[ax] for s in shapes]
    size = _padded_size(max(lengths), multiple_of)
    return PadLayout(ax, lengths, (len(shapes), *first[:ax], size, *first[ax + 1 :]))


def _describe(shapes: Sequence[tuple[int, ...]]) -> str:
    distinct = list(dict.fromkeys(shapes))
    shown = ", ".join(map(str, distinct[:5]))
    return shown + (f" and {len(distinct) - 5} more" if len(distinct) > 5 else "")


def _padded_size(longest: int, multiple_of: int | None) -> int:
    if multiple_of is None:
        return longest
    return -(-longest // multiple_of) * multiple_of


# -- splitting -----------------------------------------------------------------------------------


def split(output: Any, lengths: Any, axis: int, ops: ArrayOps) -> list[Any]:
    """Turn a batched ``output`` into one output per item: ``split`` of ``ops``'s library."""
    check_axis(axis)
    limits = None if lengths is None else ops.int_list(lengths)
    return _rows(output, limits, axis, ops)


def _rows(output: Any, lengths: list[int] | None, axis: int, ops: ArrayOps) -> list[Any]:
    if isinstance(output, ops.padded_type):
        rows = ops.rows(output.values)
        return _trim(rows, ops.int_list(output.lengths), output.axis, ops)
    if isinstance(output, ops.array_type):
        rows = ops.rows(output)
        return rows if lengths is None else _trim(rows, lengths, axis, ops)
    if isinstance(output, list):
        return output
    if isinstance(output, tuple):
        columns = [_rows(part, lengths, axis, ops) for part in output]
        _check_counts(output, list(range(len(output))), columns)
        return [_like(output, parts) for parts in zip(*columns, strict=True)]
    if isinstance(output, Mapping):
        keys = list(output)
        columns = [_rows(output[k], lengths, axis, ops) for k in keys]
        _check_counts(output, keys, columns)
        return [dict(zip(keys, parts, strict=True)) for parts in zip(*columns, strict=True)]
    raise ConfigurationError(
        f"split cannot split a {type(output).__name__}; return {ops.noun}, a Padded, a tuple or "
        "dict of them, or a list with one output per item"
    )


def _trim(rows: list[Any], lengths: list[int], axis: int, ops: ArrayOps) -> list[Any]:
    if len(lengths) != len(rows):
        raise ConfigurationError(f"split got {len(lengths)} lengths for {len(rows)} rows")
    return [_trim_row(row, length, axis, ops) for row, length in zip(rows, lengths, strict=True)]


def _trim_row(row: Any, length: int, axis: int, ops: ArrayOps) -> Any:
    shape = ops.shape(row)
    ax = normalize_axis(axis, shape, "output rows")
    if not 0 <= length <= shape[ax]:
        raise ConfigurationError(
            f"length {length} does not fit output rows of size {shape[ax]} along axis {axis}"
        )
    return ops.narrow(row, ax, length)


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


def grouped(
    fn: Callable[[Any], Any],
    key: Callable[[Any], Hashable],
    collate: Callable[[list[Any]], Any],
    split: Callable[[Any], Sequence[Any]],
) -> Callable[[Sequence[Any]], Any]:
    """Wrap ``fn`` to run once per group of items with one ``key``: ``grouped`` of both modules.

    An async ``fn`` gives an async wrapper. ``ConfigurationError`` if ``fn`` is not callable.
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
