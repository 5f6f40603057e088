"""The KServe v2 inference request and response, with Triton's binary tensor data extension.

``parse_request`` turns the body of ``POST .../infer`` into decoded arrays and options;
``encode_response`` turns the outputs into the body and headers. Neither knows about ASGI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ._budget import Claim, cost_of_decode, cost_of_json
from ._errors import BadRequest
from ._served import ServedModel
from ._tensors import (
    CLASSIFIABLE,
    Tensor,
    check_shape,
    classify,
    decode_binary,
    decode_json,
    decode_raw,
    describe,
    encode_binary,
    encode_json,
)

__all__ = (
    "DEFAULT_PRIORITY",
    "HEADER_VALUES",
    "InferRequest",
    "RequestedOutput",
    "encode_response",
    "parse_request",
)

# Triton's priority is a uint64: 1 is the highest level, 0 (or none) the model's default level.
# The engine serves lower numbers first, so the default level is one past every explicit one.
_MAX_UINT64 = 2**64 - 1
DEFAULT_PRIORITY = 2**64
_MAX_DIM = 2**63 - 1  # Triton's dims are int64
_MAX_HEADER_DIGITS = 19
# The JSON values a request may hold beyond its tensor elements (names, shapes, parameters).
HEADER_VALUES = 65536

_UNSUPPORTED_PARAMETERS = (
    "shared_memory_region",
    "shared_memory_byte_size",
    "shared_memory_offset",
)
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True)
class RequestedOutput:
    """One output the request asks for: binary or JSON, and its top-k classification (0: no)."""

    tensor: Tensor
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    """A decoded inference request: one array per input (batch first) and the options.

    ``priority`` is the engine's (lower first): Triton's level, or ``DEFAULT_PRIORITY``.
    """

    id: str | None
    arrays: dict[str, Any]
    rows: int
    outputs: list[RequestedOutput]
    priority: int
    timeout: float | None


def parse_request(
    served: ServedModel,
    body: bytes | bytearray,
    header_length: str | None,
    claim: Claim | None = None,
) -> InferRequest:
    """Parse and validate an infer body against ``served``'s signature; raise ``BadRequest``.

    Binary input data is decoded from a writable buffer (the body itself when it is a
    ``bytearray``, else a copy), so the model may change its inputs in place whether they came
    as JSON or binary. A ``header_length`` of ``"0"`` is Triton's raw binary request: the body
    is all the binary data of the model's one input, and every output is binary.

    With a ``claim``, what parsing and decoding will allocate is charged to its budget first:
    the JSON by a scan of its bytes before ``json.loads`` builds any list, each tensor by its
    declared shape before it is decoded (``HTTPError`` 503 or 413 when the budget refuses).
    """
    binary: memoryview
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        size = _header_size(header_length, len(body))
        writable = body if isinstance(body, bytearray) else bytearray(body)
        if size == 0:
            return _raw_request(served, memoryview(writable), claim)
        header, binary = body[:size], memoryview(writable)[size:]
    _check_values(served, header)
    if claim is not None:
        claim.take(cost_of_json(header))
    request = _load_json(header)
    if not isinstance(request, dict):
        raise BadRequest(f"the request must be a JSON object, got {_short(request)}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {_short(request_id)}")
    parameters = _object(request.get("parameters"), "the request's 'parameters'")
    for key in _SEQUENCE_PARAMETERS:
        if parameters.get(key) not in (None, 0, "", False):
            raise BadRequest(f"model {served.name!r} is not a sequence model ({key!r} given)")
    arrays, rows = _inputs(served, request.get("inputs"), binary, header_length is not None, claim)
    outputs = _outputs(served, request.get("outputs"), parameters.get("binary_data_output", False))
    return InferRequest(
        request_id, arrays, rows, outputs, _priority(parameters), _timeout(parameters)
    )


def _raw_request(served: ServedModel, data: memoryview, claim: Claim | None) -> InferRequest:
    # Triton's raw binary request: no JSON header, one input of one row, every output binary.
    if len(served.inputs) != 1:
        raise BadRequest(
            "a raw binary request (Inference-Header-Content-Length: 0) needs a model with one "
            f"input; model {served.name!r} has {len(served.inputs)}"
        )
    tensor = served.inputs[0]
    if claim is not None:  # BYTES: one element, the whole body; else at most a byte each
        elements = 1 if tensor.datatype == "BYTES" else len(data)
        claim.take(cost_of_decode(tensor.datatype, elements, len(data)))
    array = decode_raw(tensor.name, tensor.datatype, tensor.shape, data)
    outputs = [RequestedOutput(t, True) for t in served.outputs]
    return InferRequest(None, {tensor.name: array}, 1, outputs, DEFAULT_PRIORITY, None)


def _check_values(served: ServedModel, header: bytes | bytearray) -> None:
    # A model whose inputs all have fixed shapes takes at most max_elements tensor elements a
    # request: a JSON document with far more values is refused before it is parsed.
    limit = served.max_elements
    if limit is None:
        return
    # elements, and members, are separated by commas (nesting alone adds none: json.loads
    # refuses it past a thousand levels)
    values = 1 + header.count(b",") + header.count(b":")
    if values > limit + HEADER_VALUES:
        raise BadRequest(
            f"the request's JSON holds up to {values} values, but model {served.name!r} takes at "
            f"most {limit} tensor elements a request ({served.max_rows} rows of its inputs' "
            f"shapes), and {HEADER_VALUES} more values for the rest of the request"
        )


def _load_json(header: bytes | bytearray) -> Any:
    try:
        return json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None


def _header_size(value: str, body_size: int) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_HEADER_DIGITS:
        raise BadRequest(
            "Inference-Header-Content-Length must be a decimal integer of at most "
            f"{_MAX_HEADER_DIGITS} digits, got {_short(value)}"
        )
    size = int(text)
    if not 0 <= size <= body_size:
        raise BadRequest(
            f"Inference-Header-Content-Length is {size}, but the body has {body_size} bytes"
        )
    return size


def _inputs(
    served: ServedModel,
    inputs: Any,
    binary: memoryview,
    has_binary: bool,
    claim: Claim | None = None,
) -> tuple[dict[str, Any], int]:
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(f"'inputs' must be a non-empty list, got {_short(inputs)}")
    arrays: dict[str, Any] = {}
    rows: int | None = None
    offset = 0
    for entry in inputs:
        tensor, shape = _input_header(served, entry, arrays)
        count = check_shape(tensor.name, shape)
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise BadRequest(
                f"input {tensor.name!r} has batch size {shape[0]}, other inputs have {rows}"
            )
        params = _object(entry.get("parameters"), f"the parameters of input {tensor.name!r}")
        for key in _UNSUPPORTED_PARAMETERS:
            if key in params:
                raise BadRequest(f"input {tensor.name!r}: shared memory is not supported")
        size = params.get("binary_data_size")
        if size is not None:
            if not has_binary:
                raise BadRequest(
                    f"input {tensor.name!r} has 'binary_data_size' but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(
                    f"input {tensor.name!r}: 'binary_data_size' must be an integer >= 0, "
                    f"got {_short(size)}"
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {tensor.name!r}: 'binary_data_size' is {size} but only "
                    f"{len(binary) - offset} bytes of binary data remain"
                )
            if "data" in entry:
                raise BadRequest(f"input {tensor.name!r} has both 'data' and binary data")
            data = binary[offset : offset + size]
            offset += size
            if claim is not None:
                claim.take(cost_of_decode(tensor.datatype, count, size))
            arrays[tensor.name] = decode_binary(tensor.name, tensor.datatype, shape, data)
        elif "data" in entry:  # its cost is in the JSON document's, charged before parsing
            arrays[tensor.name] = decode_json(tensor.name, tensor.datatype, shape, entry["data"])
        else:
            raise BadRequest(f"input {tensor.name!r} has no 'data' and no binary data")
    if offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    missing = [t.name for t in served.inputs if t.name not in arrays]
    if missing:
        raise BadRequest(f"model {served.name!r} expects inputs {missing} as well")
    assert rows is not None
    return arrays, rows


def _input_header(
    served: ServedModel, entry: Any, seen: dict[str, Any]
) -> tuple[Tensor, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise BadRequest(f"each input must be a JSON object, got {_short(entry)}")
    name = entry.get("name")
    tensor = served.input_by_name.get(name) if isinstance(name, str) else None
    if tensor is None:
        raise BadRequest(
            f"model {served.name!r} has no input {_short(name)}; "
            f"its inputs are {list(served.input_by_name)}"
        )
    if name in seen:
        raise BadRequest(f"input {name!r} is given more than once")
    datatype = entry.get("datatype")
    if datatype != tensor.datatype:
        raise BadRequest(
            f"input {name!r} has datatype {_short(datatype)}, expected {tensor.datatype}"
        )
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape
        )
    ):
        raise BadRequest(
            f"input {name!r}: 'shape' must be a non-empty list of integers in [0, 2**63), "
            f"got {_short(shape)}"
        )
    if not tensor.shape and shape[1:] == [1]:
        shape = shape[:1]  # a scalar may come as [B, 1] (Triton's dims [1], reshape [])
    if shape[0] < 1 or not tensor.matches(shape[1:]):
        raise BadRequest(
            f"input {name!r} has shape {shape}, expected {[-1, *tensor.shape]} "
            "(a batch dimension >= 1, then the item's shape; -1 is any size)"
        )
    if shape[0] > served.max_rows:
        raise BadRequest(
            f"input {name!r} has {shape[0]} rows (its batch dimension), more than model "
            f"{served.name!r} accepts in one request: max_rows={served.max_rows} "
            "(a setting of its ServedModel)"
        )
    return tensor, tuple(shape)


def _outputs(served: ServedModel, outputs: Any, binary_default: Any) -> list[RequestedOutput]:
    # binary_data_output applies to the outputs the request does not list (all, if it lists
    # none); a listed output is JSON unless its own binary_data says otherwise, as in Triton.
    if not isinstance(binary_default, bool):
        raise BadRequest(f"'binary_data_output' must be a boolean, got {_short(binary_default)}")
    if outputs is None:
        return [RequestedOutput(t, binary_default) for t in served.outputs]
    if not isinstance(outputs, list):
        raise BadRequest(f"'outputs' must be a list, got {_short(outputs)}")
    wanted: list[RequestedOutput] = []
    for entry in outputs:
        if not isinstance(entry, dict):
            raise BadRequest(f"each requested output must be a JSON object, got {_short(entry)}")
        name = entry.get("name")
        tensor = served.output_by_name.get(name) if isinstance(name, str) else None
        if tensor is None:
            raise BadRequest(
                f"model {served.name!r} has no output {_short(name)}; "
                f"its outputs are {list(served.output_by_name)}"
            )
        if any(w.tensor.name == name for w in wanted):
            raise BadRequest(f"output {name!r} is requested more than once")
        params = _object(entry.get("parameters"), f"the parameters of output {name!r}")
        for key in _UNSUPPORTED_PARAMETERS:
            if key in params:
                raise BadRequest(f"output {name!r}: shared memory is not supported")
        binary = params.get("binary_data", False)
        if not isinstance(binary, bool):
            raise BadRequest(
                f"output {name!r}: 'binary_data' must be a boolean, got {_short(binary)}"
            )
        wanted.append(RequestedOutput(tensor, binary, _classification(tensor, params)))
    return wanted or [RequestedOutput(t, binary_default) for t in served.outputs]


def _classification(tensor: Tensor, params: dict[str, Any]) -> int:
    count = params.get("classification", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _MAX_UINT64:
        raise BadRequest(
            f"output {tensor.name!r}: 'classification' must be an integer >= 0 (the number of "
            f"top classes), got {_short(count)}"
        )
    if count and tensor.datatype not in CLASSIFIABLE:
        raise BadRequest(
            f"output {tensor.name!r}: classification needs a numeric output, not {tensor.datatype}"
        )
    return count


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {_short(value)}")
    return value


def _priority(parameters: dict[str, Any]) -> int:
    priority = parameters.get("priority", 0)
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not 0 <= priority <= _MAX_UINT64
    ):
        raise BadRequest(
            "'priority' must be an integer in [0, 2**64): 1 is the highest level, 0 the "
            f"default (after every explicit level), got {_short(priority)}"
        )
    return priority if priority else DEFAULT_PRIORITY


def _timeout(parameters: dict[str, Any]) -> float | None:
    # Triton reads the request timeout as an unsigned integer of microseconds (uint64); 0 means
    # none. A float, a bool or a negative number is not one (Triton answers 400 too).
    timeout = parameters.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= _MAX_UINT64:
        raise BadRequest(
            "'timeout' must be an integer number of microseconds in [0, 2**64) (0: none), "
            f"got {_short(timeout)}"
        )
    if timeout == 0:
        return None
    return timeout / 1e6


def encode_response(
    served_name: str,
    version: str,
    request: InferRequest,
    arrays: dict[str, Any],
    versions: list[str] | None = None,
) -> tuple[bytes, int | None]:
    """Return the response body, and the JSON header's length when binary data follows it."""
    outputs = []
    chunks: list[bytes] = []
    for wanted in request.outputs:
        tensor = wanted.tensor
        array, datatype = arrays[tensor.name], tensor.datatype
        if wanted.classification:
            array, datatype = classify(array, wanted.classification), "BYTES"
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": datatype,
            "shape": list(array.shape),
        }
        if wanted.binary:
            data = encode_binary(datatype, array)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = encode_json(tensor.name, datatype, array)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": served_name, "model_version": version}
    if request.id is not None:
        response["id"] = request.id
    if versions is not None:
        response["parameters"] = {"model_versions": versions}
    response["outputs"] = outputs
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _short(value: Any) -> str:
    return describe(value)
