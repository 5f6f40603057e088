"""KServe v2 gRPC tensors: a ``ModelInferRequest`` to an ``InferRequest``, outputs to a response.

The request is checked by the same code as an HTTP request (``_protocol``: names, datatypes,
shapes, row limits, ``priority``, ``timeout``, classification; ``_tensors``: decoding and
encoding), so both protocols take the same tensors and answer the same messages. Inputs come as
``raw_input_contents`` (what tritonclient sends: one buffer per input, in order) or in the typed
``contents`` fields; FP16 and BF16, which have no typed field, may come as ``fp32_contents``.
Outputs go as ``raw_output_contents``, as Triton sends them, or in the typed fields for an output
requested with the parameter ``binary_data: false``.

Needs the generated protobuf modules that ``tritonclient[grpc]`` ships; imported by ``_grpc``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import BadRequest
from ._protocol import (
    _SEQUENCE_PARAMETERS,
    _UNSUPPORTED_PARAMETERS,
    InferRequest,
    RequestedOutput,
    _classification,
    _input_header,
    _priority,
    _short,
    _timeout,
)
from ._served import ServedModel
from ._tensors import classify, decode_binary, decode_json, encode_binary

__all__ = ("encode_infer_response", "parameters_of", "parse_infer_request")

# The typed field of InferTensorContents that carries each datatype (None: raw only in Triton;
# batchkit also takes FP16 and BF16 as fp32_contents).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BF16": "fp32_contents",
    "BYTES": "bytes_contents",
}


def parameters_of(parameters: Any) -> dict[str, Any]:
    """Return a protobuf map of ``InferParameter`` as a plain dict of Python values."""
    result: dict[str, Any] = {}
    for key, value in parameters.items():
        which = value.WhichOneof("parameter_choice")
        result[key] = None if which is None else getattr(value, which)
    return result


def parse_infer_request(served: ServedModel, request: Any) -> InferRequest:
    """Decode and validate a ``ModelInferRequest`` against ``served``; raise ``BadRequest``."""
    parameters = parameters_of(request.parameters)
    for key in _SEQUENCE_PARAMETERS:
        if parameters.get(key) not in (None, 0, "", False):
            raise BadRequest(f"model {served.name!r} is not a sequence model ({key!r} given)")
    inputs = request.inputs
    if not inputs:
        raise BadRequest("'inputs' must be a non-empty list, got []")
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise BadRequest(
            f"the request has {len(raw)} raw_input_contents for {len(inputs)} inputs: send every "
            "input's data as raw contents, or none"
        )
    arrays: dict[str, Any] = {}
    rows: int | None = None
    for i, entry in enumerate(inputs):
        header = {"name": entry.name, "datatype": entry.datatype, "shape": list(entry.shape)}
        tensor, shape = _input_header(served, header, arrays)
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise BadRequest(
                f"input {tensor.name!r} has batch size {shape[0]}, other inputs have {rows}"
            )
        params = parameters_of(entry.parameters)
        for key in _UNSUPPORTED_PARAMETERS:
            if key in params:
                raise BadRequest(f"input {tensor.name!r}: shared memory is not supported")
        given = [f.name for f, _ in entry.contents.ListFields()]
        if raw:
            if given:
                raise BadRequest(
                    f"input {tensor.name!r} has both typed contents and raw_input_contents"
                )
            # a writable copy, so the model may change its inputs in place
            arrays[tensor.name] = decode_binary(
                tensor.name, tensor.datatype, shape, memoryview(bytearray(raw[i]))
            )
        else:
            arrays[tensor.name] = _typed(tensor.name, tensor.datatype, shape, entry, given)
    missing = [t.name for t in served.inputs if t.name not in arrays]
    if missing:
        raise BadRequest(f"model {served.name!r} expects inputs {missing} as well")
    assert rows is not None
    outputs = _outputs(served, request.outputs)
    return InferRequest(
        request.id or None, arrays, rows, outputs, _priority(parameters), _timeout(parameters)
    )


def _typed(name: str, datatype: str, shape: tuple[int, ...], entry: Any, given: list[str]) -> Any:
    field = CONTENTS_FIELD[datatype]
    wrong = [g for g in given if g != field]
    if wrong:
        raise BadRequest(
            f"input {name!r}: {datatype} data goes in contents.{field} (or raw_input_contents), "
            f"got contents.{wrong[0]}"
        )
    values = getattr(entry.contents, field)
    if datatype != "BYTES":
        return decode_json(name, datatype, shape, list(values))
    count = int(np.prod(shape))
    if len(values) != count:
        raise BadRequest(
            f"input {name!r}: 'data' holds {len(values)} elements in shape [{len(values)}], "
            f"expected {count} for shape {list(shape)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = list(values)
    return array.reshape(shape)


def _outputs(served: ServedModel, outputs: Any) -> list[RequestedOutput]:
    # ``binary`` means raw contents here: the default, as Triton answers.
    wanted: list[RequestedOutput] = []
    for entry in outputs:
        tensor = served.output_by_name.get(entry.name)
        if tensor is None:
            raise BadRequest(
                f"model {served.name!r} has no output {_short(entry.name)}; "
                f"its outputs are {list(served.output_by_name)}"
            )
        if any(w.tensor.name == entry.name for w in wanted):
            raise BadRequest(f"output {entry.name!r} is requested more than once")
        params = parameters_of(entry.parameters)
        for key in _UNSUPPORTED_PARAMETERS:
            if key in params:
                raise BadRequest(f"output {entry.name!r}: shared memory is not supported")
        binary = params.get("binary_data", True)
        if not isinstance(binary, bool):
            raise BadRequest(
                f"output {entry.name!r}: 'binary_data' must be a boolean, got {_short(binary)}"
            )
        wanted.append(RequestedOutput(tensor, binary, _classification(tensor, params)))
    if len({w.binary for w in wanted}) > 1:
        # raw_output_contents pair with the outputs by index: all of them are raw, or none
        raise BadRequest("request every output raw, or every output with 'binary_data' false")
    return wanted or [RequestedOutput(t, True) for t in served.outputs]


def encode_infer_response(
    pb: Any,
    name: str,
    version: str,
    request: InferRequest,
    arrays: dict[str, Any],
    versions: list[str] | None = None,
) -> Any:
    """Return the ``ModelInferResponse`` (of the generated module ``pb``) for the outputs."""
    response = pb.ModelInferResponse(model_name=name, model_version=version)
    if request.id is not None:
        response.id = request.id
    if versions is not None:
        response.parameters["model_versions"].string_param = ",".join(versions)
    raw: list[bytes] = []
    for wanted in request.outputs:
        tensor = wanted.tensor
        array, datatype = arrays[tensor.name], tensor.datatype
        if wanted.classification:
            array, datatype = classify(array, wanted.classification), "BYTES"
        output = response.outputs.add(name=tensor.name, datatype=datatype, shape=array.shape)
        if wanted.binary:
            raw.append(encode_binary(datatype, array))
        else:
            _fill_contents(output.contents, datatype, array)
    if raw:
        response.raw_output_contents.extend(raw)
    return response


def _fill_contents(contents: Any, datatype: str, array: Any) -> None:
    flat = array.reshape(-1)
    if datatype in ("FP16", "BF16"):
        flat = np.frombuffer(encode_binary(datatype, flat), dtype="<u2")
        flat = (
            flat.view("<f2").astype(np.float32)
            if datatype == "FP16"
            else (flat.astype(np.uint32) << 16).view(np.float32)
        )
    getattr(contents, CONTENTS_FIELD[datatype]).extend(flat.tolist())
