"""KServe v2 tensors: datatypes, declared specs, and decoding/encoding JSON and binary data.

Every decoding error is a ``BadRequest`` whose message names the tensor and the bad value, so
the app answers it as a 400 as it is.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._target import Tensor
from ._errors import BadRequest

__all__ = (
    "DATATYPES",
    "MAX_DIMS",
    "Tensor",
    "check_shape",
    "decode_binary",
    "decode_json",
    "decode_raw",
    "describe",
    "encode_binary",
    "encode_json",
)


@dataclass(frozen=True)
class _Datatype:
    name: str
    dtype: np.dtype[Any]  # what the model sees (BF16: float32; BYTES: object of bytes)
    wire: np.dtype[Any] | None  # the little-endian layout on the wire (None: BYTES)
    config: str  # Triton's model configuration name
    json_kinds: str  # numpy kinds accepted from JSON data


def _dt(name: str, dtype: str, wire: str | None, config: str, kinds: str) -> _Datatype:
    return _Datatype(name, np.dtype(dtype), None if wire is None else np.dtype(wire), config, kinds)


DATATYPES: dict[str, _Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", "bool", "|b1", "TYPE_BOOL", "b"),
        _dt("UINT8", "uint8", "|u1", "TYPE_UINT8", "iu"),
        _dt("UINT16", "uint16", "<u2", "TYPE_UINT16", "iu"),
        _dt("UINT32", "uint32", "<u4", "TYPE_UINT32", "iu"),
        _dt("UINT64", "uint64", "<u8", "TYPE_UINT64", "iu"),
        _dt("INT8", "int8", "|i1", "TYPE_INT8", "iu"),
        _dt("INT16", "int16", "<i2", "TYPE_INT16", "iu"),
        _dt("INT32", "int32", "<i4", "TYPE_INT32", "iu"),
        _dt("INT64", "int64", "<i8", "TYPE_INT64", "iu"),
        _dt("FP16", "float16", "<f2", "TYPE_FP16", "iuf"),
        _dt("FP32", "float32", "<f4", "TYPE_FP32", "iuf"),
        _dt("FP64", "float64", "<f8", "TYPE_FP64", "iuf"),
        _dt("BF16", "float32", "<u2", "TYPE_BF16", "iuf"),
        _dt("BYTES", "object", None, "TYPE_STRING", "U"),
    )
}


def element_count(shape: Sequence[int]) -> int:
    """Return the number of elements of a tensor of ``shape``."""
    return math.prod(shape)


# The most dimensions a tensor may have (numpy 1's limit; numpy 2 allows 64).
MAX_DIMS = 32
_MAX_ARRAY_BYTES = 2**63 - 1


def check_shape(name: str, shape: Sequence[int]) -> int:
    """Return the element count of tensor ``name``; ``BadRequest`` if numpy cannot build it.

    numpy refuses more than ``MAX_DIMS`` dimensions, and shapes whose dimensions other than
    zeros multiply past 2**63 bytes (8 a element, the widest it decodes through), even when a
    zero makes the tensor empty: ``[1, 0, 2**62, 2**62]`` holds no element, yet no array has it.
    """
    if len(shape) > MAX_DIMS:
        raise BadRequest(
            f"input {name!r} has {len(shape)} dimensions, more than the {MAX_DIMS} allowed"
        )
    if math.prod(d for d in shape if d) * 8 > _MAX_ARRAY_BYTES:
        raise BadRequest(
            f"input {name!r}: shape {describe(list(shape))} is too large for an array (its "
            "dimensions other than 0 multiply past 2**63 bytes)"
        )
    return math.prod(shape)


# -- decoding -------------------------------------------------------------------------------------


def decode_binary(
    name: str, datatype: str, shape: tuple[int, ...], data: bytes | memoryview
) -> Any:
    """Decode the binary data of input ``name``; raise ``BadRequest`` on a size mismatch.

    Sizes are checked before anything is allocated. The array is a view of ``data`` where the
    layout allows: pass a writable buffer (a ``bytearray`` or a view of one) so that the model
    gets a writable array, as it does from JSON data.
    """
    spec = DATATYPES[datatype]
    count = element_count(shape)
    if spec.wire is None:
        return _decode_bytes(name, shape, count, data)
    expected = count * spec.wire.itemsize
    if len(data) != expected:
        raise BadRequest(
            f"input {name!r}: {len(data)} bytes of binary data for shape {list(shape)} of "
            f"{datatype}, expected {expected}"
        )
    array = np.frombuffer(data, dtype=spec.wire).reshape(shape)
    if datatype == "BF16":
        return _bf16_to_float32(array)
    if datatype == "BOOL":
        return array.astype(np.bool_)  # any nonzero byte is True
    return array.astype(spec.dtype, copy=False)


def decode_raw(
    name: str, datatype: str, item_shape: Sequence[int], data: bytes | memoryview
) -> Any:
    """Decode Triton's raw binary request: ``data`` is one row of input ``name``, declared
    ``item_shape``; return it with its batch dimension of 1.

    As in Triton, the shape is deduced from the declared one: at most one -1 dimension, sized
    by the data's length; a BYTES input must be declared ``[1]`` (or a scalar), and all of
    ``data`` is its one element (no length prefix). Raises ``BadRequest`` otherwise.
    """
    declared = list(item_shape)
    if datatype == "BYTES":
        if declared not in ([], [1]):
            raise BadRequest(
                f"a raw binary request for BYTES input {name!r} needs it declared with shape "
                f"[1], not {declared}"
            )
        out = np.empty(1, dtype=object)
        out[0] = bytes(data)
        return out.reshape((1, *declared))
    wire = DATATYPES[datatype].wire
    assert wire is not None
    variable = [i for i, d in enumerate(declared) if d == -1]
    if len(variable) > 1:
        raise BadRequest(
            f"a raw binary request cannot tell the shape of input {name!r}: {declared} has "
            "more than one -1 dimension"
        )
    if variable:
        row = math.prod(d for d in declared if d != -1) * wire.itemsize
        if row == 0 or len(data) % row:
            raise BadRequest(
                f"input {name!r}: {len(data)} bytes of raw binary data are not a whole number "
                f"of {datatype} items of shape {declared}"
            )
        declared[variable[0]] = len(data) // row
    return decode_binary(name, datatype, (1, *declared), data)


def _decode_bytes(name: str, shape: tuple[int, ...], count: int, data: bytes | memoryview) -> Any:
    if count > len(data) // 4:  # each element has a 4-byte length prefix
        raise BadRequest(
            f"input {name!r}: {len(data)} bytes of binary data cannot hold the {count} BYTES "
            f"elements of shape {list(shape)} (each needs a 4-byte length prefix)"
        )
    out = np.empty(count, dtype=object)
    offset, end, unpack = 0, len(data), struct.Struct("<I").unpack_from
    for i in range(count):
        if offset + 4 > end:
            raise BadRequest(
                f"input {name!r}: binary BYTES data ends after {i} of {count} elements"
            )
        (size,) = unpack(data, offset)
        offset += 4
        if offset + size > end:
            raise BadRequest(
                f"input {name!r}: BYTES element {i} claims {size} bytes, only {end - offset} remain"
            )
        out[i] = bytes(data[offset : offset + size])
        offset += size
    if offset != end:
        raise BadRequest(
            f"input {name!r}: {end - offset} bytes left over after {count} BYTES elements"
        )
    return out.reshape(shape)


def decode_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Any:
    """Decode the JSON ``data`` (flat or nested lists) of input ``name`` to an array."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list, got {_short(data)}")
    count = element_count(shape)
    if datatype == "BYTES":
        return _decode_json_bytes(name, shape, count, data)
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(
            f"input {name!r}: 'data' is ragged or mixes types: {_short(data)}"
        ) from None
    if array.size != count or (array.ndim != 1 and array.shape != shape):
        raise BadRequest(
            f"input {name!r}: 'data' holds {array.size} elements in shape {list(array.shape)}, "
            f"expected {count} for shape {list(shape)}"
        )
    spec = DATATYPES[datatype]
    if count and spec.json_kinds == "iu" and array.dtype.kind in "fO":
        array = _exact_integers(name, datatype, data, array)
    if count and array.dtype.kind not in spec.json_kinds:
        raise BadRequest(
            f"input {name!r}: 'data' for {datatype} must hold "
            f"{_KIND_WORDS[spec.json_kinds]}, got {_short(data)}"
        )
    array = array.reshape(shape)
    if spec.json_kinds == "iu" and count:
        info = np.iinfo(spec.dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(
                f"input {name!r}: a value is out of range for {datatype} "
                f"([{info.min}, {info.max}]): {_short(data)}"
            )
    return array.astype(spec.dtype)


def _decode_json_bytes(name: str, shape: tuple[int, ...], count: int, data: list[Any]) -> Any:
    # Every element must be a string: numpy would turn 1 and true into "1" and "True".
    try:
        array = np.array(data, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(f"input {name!r}: 'data' is ragged: {_short(data)}") from None
    if array.size != count or (array.ndim != 1 and array.shape != shape):
        raise BadRequest(
            f"input {name!r}: 'data' holds {array.size} elements in shape {list(array.shape)}, "
            f"expected {count} for shape {list(shape)}"
        )
    flat = array.reshape(-1)
    for i, element in enumerate(flat.tolist()):
        if not isinstance(element, str):
            raise BadRequest(
                f"input {name!r}: 'data' for BYTES must hold strings, element {i} is "
                f"{_short(element)}"
            )
        try:
            flat[i] = element.encode()
        except UnicodeEncodeError:
            raise BadRequest(
                f"input {name!r}: BYTES element {i} is not valid Unicode text ({element!r}); "
                "send bytes that are not UTF-8 as binary data"
            ) from None
    return flat.reshape(shape)


def _exact_integers(name: str, datatype: str, data: Any, array: Any) -> Any:
    # Integers beyond int64 (UINT64's upper half) make numpy fall back to float or object.
    if not all(type(v) is int for v in np.asarray(data, dtype=object).reshape(-1).tolist()):
        return array
    try:
        return np.array(data, dtype=DATATYPES[datatype].dtype)
    except OverflowError:
        raise BadRequest(
            f"input {name!r}: a value is out of range for {datatype}: {_short(data)}"
        ) from None


_KIND_WORDS = {"b": "booleans", "iu": "integers", "iuf": "numbers", "U": "strings"}


def _short(value: Any) -> str:
    return describe(value, json_style=False)


def describe(value: Any, width: int = 80, *, json_style: bool = True) -> str:
    """Return at most ``width`` characters showing a client's value, for an error message.

    Bounded in time and depth whatever the value holds (a list of millions, nesting a thousand
    deep, a string of megabytes): only what fits in ``width`` is rendered. JSON spelling when
    ``json_style`` (null, true), else Python's (None, True).
    """
    text = _render(value, width + 1, 8, json_style)
    return text if len(text) <= width else text[: width - 3] + "..."


def _render(value: Any, room: int, depth: int, json_style: bool) -> str:
    if isinstance(value, str):
        clipped = value[:room]
        return _json_string(clipped) if json_style else repr(clipped)
    if value is None or isinstance(value, bool):
        return ("null" if value is None else str(value).lower()) if json_style else repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= _MAX_INT_BITS else "<a huge integer>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
        if depth == 0:
            return f"{opening}...{closing}" if value else opening + closing
        parts: list[str] = []
        used = 2
        items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        for key, item in items:
            if used >= room:
                parts.append("...")
                break
            text = _render(item, room - used, depth - 1, json_style)
            if key is not None:
                text = f"{_render(key, room - used, 0, json_style)}: {text}"
            parts.append(text)
            used += len(text) + 2
        return opening + ", ".join(parts) + closing
    return f"<{type(value).__name__}>"


_MAX_INT_BITS = 14_000  # about the 4300 digits int() and str() allow


def _json_string(text: str) -> str:
    try:
        return json.dumps(text)
    except UnicodeEncodeError:  # pragma: no cover - json.dumps escapes, it does not encode
        return repr(text)


def _bf16_to_float32(bits: Any) -> Any:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16(values: Any) -> Any:
    # Round to nearest, ties to even, as ml_dtypes and torch do; NaN stays NaN.
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(values)
    if nan.any():
        rounded = np.where(nan, (bits >> 16) | 0x0040, rounded)
    return rounded.astype("<u2")


# -- encoding -------------------------------------------------------------------------------------


def as_output(name: str, datatype: str, value: Any) -> Any:
    """Convert one item's output to an array of the declared datatype (``TypeError`` if not)."""
    spec = DATATYPES[datatype]
    if datatype == "BYTES":
        array = np.asarray(value, dtype=object)
        flat = array.reshape(-1)
        for i, element in enumerate(flat.tolist()):
            if isinstance(element, str):
                flat[i] = element.encode()
            elif not isinstance(element, bytes):
                raise TypeError(f"output {name!r}: a BYTES element is {type(element).__name__}")
        return flat.reshape(array.shape)
    return np.asarray(value, dtype=spec.dtype)


def encode_binary(datatype: str, array: Any) -> bytes:
    """Return the binary tensor data of ``array`` (row-major, little-endian)."""
    spec = DATATYPES[datatype]
    if spec.wire is None:
        pack = struct.Struct("<I").pack
        return b"".join(pack(len(b)) + b for b in array.reshape(-1).tolist())
    if datatype == "BF16":
        return bytes(_float32_to_bf16(array).tobytes())
    return bytes(np.ascontiguousarray(array, dtype=spec.wire).tobytes())


def encode_json(name: str, datatype: str, array: Any) -> list[Any]:
    """Return ``array`` as flat JSON data; raise ``BadRequest`` for BYTES that are not UTF-8."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        try:
            return [b.decode() for b in flat.tolist()]
        except UnicodeDecodeError:
            raise BadRequest(
                f"output {name!r} holds bytes that are not UTF-8: request it with "
                "the 'binary_data' parameter"
            ) from None
    if datatype == "BF16":
        return _bf16_to_float32(_float32_to_bf16(flat)).tolist()  # type: ignore[no-any-return]
    return flat.tolist()  # type: ignore[no-any-return]


# -- classification -------------------------------------------------------------------------------

CLASSIFIABLE = frozenset(DATATYPES) - {"BOOL", "BYTES"}


def classify(array: Any, count: int) -> Any:
    """Return the top ``count`` classes of each row of ``array``, as Triton's classification.

    Each row's elements (flattened) are ranked by value, highest first, ties by index; each of
    the top ``min(count, elements)`` becomes ``b"value:index"`` (floats as ``%f``, integers as
    they are). The result is a BYTES (object) array of shape ``[rows, k]``.
    """
    rows = array.reshape(array.shape[0], -1)
    k = min(count, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    floating = rows.dtype.kind == "f"
    for r, row in enumerate(rows):
        # A stable ascending sort of the reversed row, read backwards: highest first, and
        # equal values in index order.
        reverse = np.argsort(row[::-1], kind="stable")[::-1][:k]
        for j, rev in enumerate(reverse.tolist()):
            index = len(row) - 1 - rev
            value = row[index].item()
            text = f"{value:f}" if floating else str(value)
            out[r, j] = f"{text}:{index}".encode()
    return out
