"""The pipe protocol, version 1: parsing request lines and building response lines (sans-IO).

Nothing here reads or writes a file descriptor, awaits, or knows about the engine beyond the
names of the models served. ``docs/pipe.md`` is the specification this module implements.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal

from .._core import Statistics
from .._target import Tensor, item_problem

__all__ = (
    "DTYPES",
    "PROTOCOL_VERSION",
    "Control",
    "Infer",
    "LineSplitter",
    "RequestError",
    "TooLong",
    "as_tensor",
    "check_declared",
    "decode_tensor",
    "encode_tensor",
    "error_line",
    "exception_line",
    "output_line",
    "parse_line",
    "recover_id",
    "response_line",
    "statistics_to_json",
)

PROTOCOL_VERSION = 1

# The tensor element types the protocol carries, by their numpy names. Binary data is
# little-endian, row-major (C order).
DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)

Id = str | int | float | None

_REQUEST_FIELDS = frozenset(
    {"id", "op", "model", "input", "tensor", "priority", "timeout", "target", "version", "key"}
)
_OPS = ("infer", "stats", "ping", "cancel")
# Routing keys name a user or a session: longer ones are refused.
_MAX_KEY = 256
# Only JSON's own whitespace makes a line blank (blank lines are skipped, not answered).
_BLANK = b" \t\r"
# The id of a damaged line is recovered only when it is the line's first member.
_LEADING_ID = re.compile(
    rb'\A[ \t\r]*\{[ \t\r]*"id"[ \t\r]*:[ \t\r]*'
    rb'("(?:[^"\\\x00-\x1f]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)'
)


class RequestError(Exception):
    """A request line the server cannot act on; answered with an error line.

    ``type`` is the error type on the wire (``InvalidJSON``, ``InvalidRequest``,
    ``InvalidTensor``, ``LineTooLong``, ``UnknownModel``); ``id`` the request's id when known.
    """

    def __init__(self, type: str, message: str, id: Id = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.id = id


@dataclass(frozen=True)
class Infer:
    """One item for one model."""

    id: Id
    model: str
    item: Any
    priority: float
    timeout: float | None
    binary: bool  # a tensor input sent base64: a tensor output goes back the same way
    version: str | None = None  # pin the item to this version of a deployment
    key: str | None = None  # route it sticky by this key (a deployment)
    from_tensor: bool = False  # the item came as a tensor (a numpy array), not as JSON


@dataclass(frozen=True)
class Control:
    """A ``stats``, ``ping`` or ``cancel`` request, answered by the server itself."""

    id: Id
    op: Literal["stats", "ping", "cancel"]
    model: str | None
    target: Id = None  # the id of the line to cancel


@dataclass(frozen=True)
class TooLong:
    """A line longer than the limit: only its first bytes are kept, to recover its id."""

    prefix: bytes
    limit: int


# -- splitting the input into lines -----------------------------------------------------------


class LineSplitter:
    """Cut a byte stream into lines of at most ``max_line_bytes`` (the newline not counted).

    ``feed`` chunks as they arrive and take lines with ``next_line`` until it returns None. A
    longer line comes out once as a ``TooLong`` and the rest of it is skipped without being
    kept. Blank lines are dropped. Memory stays within a chunk plus one line.
    """

    _PREFIX = 256

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._lines: deque[bytes | TooLong] = deque()
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._skipping = False

    def feed(self, chunk: bytes) -> None:
        """Add ``chunk``, the next bytes of the stream."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._add_partial(chunk[start:])
                return
            if self._skipping:
                self._skipping = False
            else:
                self._add_partial(chunk[start:end])
                if not self._skipping:
                    self._complete(b"".join(self._partial))
            self._partial, self._partial_len, self._skipping = [], 0, False
            start = end + 1

    def _add_partial(self, piece: bytes) -> None:
        if self._skipping or not piece:
            return
        self._partial.append(piece)
        self._partial_len += len(piece)
        if self._partial_len > self.max_line_bytes:
            prefix = b"".join(self._partial)[: self._PREFIX]
            self._lines.append(TooLong(prefix, self.max_line_bytes))
            self._partial, self._partial_len, self._skipping = [], 0, True

    def _complete(self, line: bytes) -> None:
        if line.strip(_BLANK):
            self._lines.append(line)

    def next_line(self) -> bytes | TooLong | None:
        """Return the next complete line, or None until more is fed."""
        return self._lines.popleft() if self._lines else None

    def end(self) -> int:
        """Take the unterminated last line as a line (at end of input); return its length."""
        if self._skipping:
            self._skipping = False
            return 0
        line = b"".join(self._partial)
        self._partial, self._partial_len = [], 0
        self._complete(line)
        return len(line)

    def discard_partial(self) -> int:
        """Drop the unterminated last line (when reading stops early); return its length."""
        size = self._partial_len
        self._partial, self._partial_len, self._skipping = [], 0, False
        return size

    @property
    def pending(self) -> int:
        """Return how many complete lines wait to be taken."""
        return len(self._lines)


# -- requests --------------------------------------------------------------------------------


def parse_line(line: bytes | TooLong, models: Collection[str]) -> Infer | Control:
    """Parse one request line for a server of ``models``; raise ``RequestError`` if bad."""
    if isinstance(line, TooLong):
        id_, problem = _leading_id(line.prefix)
        note = "" if problem is None else f"; {problem}"
        raise RequestError(
            "LineTooLong", f"the line is longer than the limit of {line.limit} bytes{note}", id_
        )
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        id_, problem = _leading_id(line)
        note = "" if problem is None else f"; {problem}"
        raise RequestError("InvalidJSON", f"the line is not JSON: {exc}{note}", id_) from None
    if not isinstance(obj, dict):
        raise RequestError("InvalidRequest", f"a request must be a JSON object, got {_kind(obj)}")
    if "id" not in obj:
        raise RequestError("InvalidRequest", "the request has no 'id'")
    id_ = obj["id"]
    problem = _id_problem(id_)
    if problem is not None:
        raise RequestError("InvalidRequest", f"'id' must be {problem}, got {_show(id_)}")
    unknown = sorted(set(obj) - _REQUEST_FIELDS)
    if unknown:
        raise RequestError(
            "InvalidRequest",
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(_REQUEST_FIELDS))}",
            id_,
        )
    op = obj.get("op", "infer")
    if op not in _OPS:  # a tuple: compared by ==, so any JSON value may be tested
        raise RequestError("InvalidRequest", f"'op' must be one of {_OPS}, got {_show(op)}", id_)
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("InvalidRequest", f"'model' must be a string, got {_show(model)}", id_)
    if model is not None and model not in models:
        raise RequestError(
            "UnknownModel",
            f"no model named {_show(model)}; served: {', '.join(map(repr, sorted(models)))}",
            id_,
        )
    if (op == "cancel") != ("target" in obj):
        raise RequestError("InvalidRequest", "'target' goes with op 'cancel', always", id_)
    if op == "cancel":
        target = obj["target"]
        problem = _id_problem(target)
        if problem is not None:
            raise RequestError(
                "InvalidRequest", f"'target' must be {problem}, got {_show(target)}", id_
            )
        return Control(id_, op, model, target)
    if op != "infer":
        return Control(id_, op, model)
    return _parse_infer(obj, id_, model, models)


def _parse_infer(obj: dict[str, Any], id_: Id, model: str | None, models: Collection[str]) -> Infer:
    if model is None:
        if len(models) != 1:
            raise RequestError(
                "InvalidRequest",
                f"'model' is required when several models are served: "
                f"{', '.join(map(repr, sorted(models)))}",
                id_,
            )
        (model,) = models
    has_input, has_tensor = "input" in obj, "tensor" in obj
    if has_input == has_tensor:
        raise RequestError(
            "InvalidRequest", "give exactly one of 'input' (a JSON value) or 'tensor'", id_
        )
    priority = obj.get("priority", 0)
    as_float = _as_float(priority)
    if as_float is None or math.isnan(as_float):
        raise RequestError(
            "InvalidRequest",
            f"'priority' must be a number ({_FLOAT_RANGE}), got {_show(priority)}",
            id_,
        )
    timeout = obj.get("timeout")
    if timeout is not None:
        as_float = _as_float(timeout)
        if as_float is None or not math.isfinite(as_float) or as_float < 0:
            raise RequestError(
                "InvalidRequest",
                f"'timeout' must be a number >= 0 ({_FLOAT_RANGE}) or null, got {_show(timeout)}",
                id_,
            )
        timeout = as_float
    version, key = obj.get("version"), obj.get("key")
    if version is not None and (not isinstance(version, str) or not version):
        raise RequestError(
            "InvalidRequest", f"'version' must be a non-empty string, got {_show(version)}", id_
        )
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= _MAX_KEY):
        raise RequestError(
            "InvalidRequest", f"'key' must be a string of 1 to {_MAX_KEY} characters", id_
        )
    if has_input:
        return Infer(id_, model, obj["input"], priority, timeout, False, version, key)
    tensor = obj["tensor"]
    try:
        item = decode_tensor(tensor)
    except RequestError as exc:
        exc.id = id_
        raise
    binary = isinstance(tensor, dict) and isinstance(tensor.get("data"), str)
    return Infer(id_, model, item, priority, timeout, binary, version, key, True)


def check_declared(request: Infer, inputs: tuple[Tensor, ...]) -> None:
    """Raise ``RequestError`` unless the item of ``request`` fits the model's declared inputs.

    Checked as each line is read, so that an item of the wrong dtype or shape is answered on
    its own and never joins (and fails) a batch of good ones.
    """
    model = request.model
    if len(inputs) != 1:
        names = ", ".join(repr(t.name) for t in inputs)
        raise RequestError(
            "InvalidRequest",
            f"model {model!r} declares {len(inputs)} inputs ({names}); a line carries one tensor",
            request.id,
        )
    (tensor,) = inputs
    if not request.from_tensor:
        raise RequestError(
            "InvalidRequest",
            f"model {model!r} declares the tensor input {tensor.name!r} ({tensor.datatype} "
            f"{list(tensor.shape)}): send the item under 'tensor'",
            request.id,
        )
    problem = item_problem(tensor, request.item.dtype.name, request.item.shape)
    if problem is not None:
        raise RequestError("InvalidTensor", f"model {model!r}: {problem}", request.id)


def recover_id(raw: bytes) -> Id:
    """Return the id of a damaged line when it is the line's first member, else None."""
    return _leading_id(raw)[0]


def _leading_id(raw: bytes) -> tuple[Id, str | None]:
    # The id of a damaged line, and why a leading id found there cannot be used (or None).
    match = _LEADING_ID.match(raw)
    if match is None:
        return None, None
    try:
        value = json.loads(match.group(1))
    except ValueError as exc:  # an integer of more digits than Python converts
        return None, f"its 'id' cannot be read: {exc}"
    problem = _id_problem(value)
    if problem is not None:
        return None, f"its 'id' must be {problem}, got {_show(value)}"
    return value, None


# Every number the protocol reads is used as a float (an int id is echoed as it came).
_FLOAT_RANGE = "within float range (about 1.8e308)"


def _id_problem(value: object) -> str | None:
    """Return what an id (or a cancel target) must be when ``value`` is not one, else None."""
    if isinstance(value, str):
        return None
    as_float = _as_float(value)
    if as_float is None or not math.isfinite(as_float):
        return f"a string or a number (finite, {_FLOAT_RANGE})"
    return None


def _as_float(value: object) -> float | None:
    """Return ``value`` as a float if it is a JSON number that fits one, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None


def _show(value: object, limit: int = 100) -> str:
    """Return a short repr of a value from a request, whatever its size or depth."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        digits = len(str(abs(value)))  # below the int-to-str limit: json.loads parsed it
        return f"an integer of {digits} digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"{_kind(value)} nested too deeply to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return kinds.get(type(value), "a number")


# -- tensors ---------------------------------------------------------------------------------


def decode_tensor(obj: object) -> Any:
    """Return the numpy array a tensor object describes; raise ``RequestError`` if it is bad.

    ``data`` is either the values as a JSON array (flat, or nested to ``shape``), or a base64
    string of the raw little-endian bytes.
    """
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise RequestError(
            "InvalidTensor",
            f"a tensor is an object with dtype, shape and data, got {_show(obj, 200)}",
        )
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise RequestError(
            "InvalidTensor",
            f"dtype must be one of {', '.join(sorted(DTYPES))}, got {_show(dtype)}",
        )
    _check_shape(shape)
    np = _numpy()
    size = math.prod(shape)
    if isinstance(data, str):
        return _from_base64(np, dtype, shape, size, data)
    if not isinstance(data, list):
        raise RequestError(
            "InvalidTensor", f"data must be a JSON array or a base64 string, got {_kind(data)}"
        )
    try:
        array = np.asarray(data, dtype=dtype)
    except RecursionError:
        raise RequestError("InvalidTensor", "data is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError("InvalidTensor", f"data does not fit dtype {dtype}: {exc}") from None
    if array.ndim > 1 and list(array.shape) != shape:
        raise RequestError(
            "InvalidTensor", f"data is nested as {list(array.shape)}, shape says {shape}"
        )
    if array.size != size:
        raise RequestError(
            "InvalidTensor", f"data holds {array.size} values, shape {shape} needs {size}"
        )
    return _reshape(array, shape)


# numpy's limits: dimensions (NPY_MAXDIMS) and the bytes of one array, counted without zeros.
_MAX_DIMS = 64
_MAX_BYTES = 2**63 - 1


def _check_shape(shape: object) -> None:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape
    ):
        raise RequestError(
            "InvalidTensor",
            f"shape must be a list of ints >= 0 and below 2**63, got {_show(shape, 200)}",
        )
    if len(shape) > _MAX_DIMS:
        raise RequestError(
            "InvalidTensor", f"shape has {len(shape)} dimensions, more than the {_MAX_DIMS} allowed"
        )
    # numpy refuses an array whose nonzero dimensions overflow, even when a zero makes it empty.
    if math.prod(d for d in shape if d) * 8 > _MAX_BYTES:
        raise RequestError(
            "InvalidTensor", f"shape {_show(shape, 200)} is too big for an array (even empty)"
        )


def _reshape(array: Any, shape: list[int]) -> Any:
    try:
        return array.reshape(shape)
    except ValueError as exc:  # a limit of this numpy that the checks above do not know
        raise RequestError("InvalidTensor", f"shape {shape} cannot be built: {exc}") from None


def _from_base64(np: Any, dtype: str, shape: list[int], size: int, data: str) -> Any:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("InvalidTensor", f"data is not valid base64: {exc}") from None
    wire = np.dtype(dtype).newbyteorder("<")
    if len(raw) != size * wire.itemsize:
        raise RequestError(
            "InvalidTensor",
            f"data holds {len(raw)} bytes, shape {shape} of {dtype} needs {size * wire.itemsize}",
        )
    return _reshape(np.frombuffer(bytearray(raw), dtype=wire).astype(dtype, copy=False), shape)


def encode_tensor(array: Any, *, binary: bool) -> dict[str, Any]:
    """Return the tensor object for a numpy array (base64 data if ``binary``)."""
    np = _numpy()
    array = np.asarray(array)
    shape = list(array.shape)
    if binary:
        wire = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data: Any = base64.b64encode(np.ascontiguousarray(wire).tobytes()).decode("ascii")
    else:
        data = array.reshape(-1).tolist()
    return {"dtype": array.dtype.name, "shape": shape, "data": data}


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - depends on the environment
        raise RequestError(
            "InvalidTensor", "tensors need numpy on the server: pip install 'batchkit[numpy]'"
        ) from None
    return numpy


def as_tensor(value: Any) -> Any | None:
    """Return ``value`` as a numpy array if it is a numpy array or a torch tensor we carry."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return value if value.dtype.name in DTYPES else None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        return array if array.dtype.name in DTYPES else None
    return None


def _json_default(value: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    raise TypeError(f"an output of type {type(value).__name__} is not JSON serializable")


# -- responses -------------------------------------------------------------------------------


def response_line(obj: Mapping[str, Any]) -> bytes:
    """Encode one response object as a line; raise ``ValueError``/``TypeError`` if it cannot.

    Text goes out as UTF-8. A string UTF-8 cannot carry (a lone surrogate such as ``"\\ud800"``,
    which JSON input may hold) is written as JSON escapes instead, so it reads back as it came.
    """
    text = json.dumps(
        obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        text = json.dumps(
            obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
        )
        return text.encode("ascii") + b"\n"


def output_line(id_: Id, value: Any, version: str, *, binary: bool) -> bytes:
    """Return the response line for one output; an output JSON cannot carry is an error."""
    try:
        tensor = as_tensor(value)
        if tensor is not None:
            return response_line(
                {"id": id_, "tensor": encode_tensor(tensor, binary=binary), "version": version}
            )
        return response_line({"id": id_, "output": value, "version": version})
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        hint = " (NaN and infinity need a tensor with base64 data)" if "float" in str(exc) else ""
        return error_line(
            id_, "OutputError", f"the output cannot be sent as JSON: {exc}{hint}", version=version
        )


def error_line(id_: Id, type: str, message: str, **extra: Any) -> bytes:
    """Return an error response line; ``extra`` members (version, ...) join the error object."""
    error: dict[str, Any] = {"type": type, "message": message}
    error.update((k, v) for k, v in extra.items() if v is not None)
    return response_line({"id": id_, "error": error})


def exception_line(id_: Id, exc: BaseException) -> bytes:
    """Return the error line for an exception raised to the caller of one item."""
    extra: dict[str, Any] = {}
    for attr in ("version", "batch_size", "retry_after"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) or (
            _as_float(value) is not None and math.isfinite(value)  # type: ignore[arg-type]
        ):
            extra[attr] = value
    message = str(exc) or type(exc).__name__
    return error_line(id_, type(exc).__name__, message, **extra)


def statistics_to_json(stats: Statistics) -> dict[str, Any]:
    """Return a ``Statistics`` snapshot as a JSON object (mapping keys become strings)."""
    out: dict[str, Any] = _to_json(stats)
    out["mean_batch_size"] = stats.mean_batch_size
    out["pending"] = stats.pending
    return out


def _to_json(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value
