"""The pipe protocol (sans-IO): line splitting, request parsing, tensors, response lines."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchkit import BatchedModel
from batchkit.pipe._client import _statistics_from_json
from batchkit.pipe._protocol import (
    Control,
    Infer,
    LineSplitter,
    RequestError,
    TooLong,
    decode_tensor,
    encode_tensor,
    error_line,
    exception_line,
    output_line,
    parse_line,
    recover_id,
    statistics_to_json,
)

MODELS = ("m",)

# -- splitting ------------------------------------------------------------------------------


def split_all(chunks: list[bytes], limit: int) -> list[bytes | TooLong]:
    splitter = LineSplitter(limit)
    out: list[bytes | TooLong] = []
    for chunk in chunks:
        splitter.feed(chunk)
        while (line := splitter.next_line()) is not None:
            out.append(line)
    splitter.end()
    while (line := splitter.next_line()) is not None:
        out.append(line)
    return out


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    limit=st.integers(min_value=1, max_value=50),
)
def test_lines_come_out_whole_however_the_input_is_chunked(
    lines: list[bytes], cuts: list[int], limit: int
) -> None:
    stream = b"\n".join(lines)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    expected = [line for line in lines if len(line) > limit or line.strip(b" \t\r")]
    got = split_all(chunks, limit)
    assert len(got) == len(expected)
    for line, out in zip(expected, got, strict=True):
        if len(line) > limit:  # reported once, with the start of the line (for its id)
            assert isinstance(out, TooLong)
            assert line.startswith(out.prefix) and len(out.prefix) > min(limit, 255)
        else:
            assert out == line


def test_a_long_line_is_not_kept_and_only_its_prefix_is_remembered() -> None:
    splitter = LineSplitter(10)
    splitter.feed(b'{"id": 5, ')
    splitter.feed(b"x" * 100_000)
    assert splitter.pending == 1
    too_long = splitter.next_line()
    assert isinstance(too_long, TooLong)
    assert too_long.prefix.startswith(b'{"id": 5, ')
    assert len(too_long.prefix) <= 256
    splitter.feed(b"y" * 100_000 + b"\nok\n")
    assert splitter.next_line() == b"ok"
    assert splitter.discard_partial() == 0


# -- requests -------------------------------------------------------------------------------


def test_an_inference_request_with_defaults() -> None:
    assert parse_line(b'{"id": 1, "input": [1, 2]}', MODELS) == Infer(
        1, "m", [1, 2], 0, None, False
    )
    assert parse_line(
        b'{"id": "a", "model": "m", "input": null, "priority": -2.5, "timeout": 0}', MODELS
    ) == Infer("a", "m", None, -2.5, 0, False)


def test_control_requests() -> None:
    assert parse_line(b'{"id": 1.5, "op": "ping"}', MODELS) == Control(1.5, "ping", None)
    assert parse_line(b'{"id": 2, "op": "stats", "model": "m"}', MODELS) == Control(2, "stats", "m")
    assert parse_line(b'{"id": 2, "op": "stats"}', ("a", "b")) == Control(2, "stats", None)
    assert parse_line(b'{"id": 3, "op": "cancel", "target": "x"}', MODELS) == Control(
        3, "cancel", None, "x"
    )


@pytest.mark.parametrize(
    ("line", "error", "id_", "message"),
    [
        (b"{", "InvalidJSON", None, "not JSON"),
        (b'{"id": NaN, "input": 1}', "InvalidRequest", None, "'id' must be a string or a number"),
        (b'{"id": 1, "input": 1, "priority": NaN}', "InvalidRequest", 1, "'priority'"),
        (b'{"id": 1, "input": 1, "priority": true}', "InvalidRequest", 1, "'priority'"),
        (b'{"id": 1, "input": 1, "timeout": Infinity}', "InvalidRequest", 1, "'timeout'"),
        (b'{"id": 1, "input": 1, "tensor": {}}', "InvalidRequest", 1, "exactly one of"),
        (b'{"id": 1, "input": 1, "model": 3}', "InvalidRequest", 1, "'model' must be a string"),
        (
            b'{"id": 1, "input": 1, "x": 0, "y": 0}',
            "InvalidRequest",
            1,
            "unknown field(s) 'x', 'y'",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(line: bytes, error: str, id_: Any, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_line(line, MODELS)
    assert (caught.value.type, caught.value.id) == (error, id_)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("raw", "id_"),
    [
        (b'{"id": 12, "input": [', 12),
        (b'  {"id":"a\\"b", "in', 'a"b'),
        (b'{"id": -1.5e3,', -1500.0),
        (b'{"id": "unterminated', None),
        (b'{"input": 1, "id": 3', None),  # not first: a nested "id" could be mistaken for it
        (b'{"id": true', None),
        (b"garbage", None),
    ],
)
def test_the_id_of_a_damaged_line_is_recovered_only_when_it_comes_first(
    raw: bytes, id_: Any
) -> None:
    assert recover_id(raw) == id_


# -- tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"dtype": "float32", "shape": [2]}, "an object with dtype, shape and data"),
        ({"dtype": "complex64", "shape": [1], "data": [1]}, "dtype must be one of"),
        ({"dtype": "float32", "shape": [-1], "data": [1]}, "shape must be a list of ints >= 0"),
        ({"dtype": "float32", "shape": [2, 2], "data": [[1, 2, 3], [4, 5, 6]]}, "nested as"),
        ({"dtype": "float32", "shape": [2], "data": [[1], [2, 3]]}, "does not fit dtype"),
        ({"dtype": "uint8", "shape": [1], "data": [300]}, "does not fit dtype"),
        ({"dtype": "float32", "shape": [3], "data": [1, 2]}, "holds 2 values, shape [3] needs 3"),
        ({"dtype": "float32", "shape": [1], "data": "!!"}, "not valid base64"),
        ({"dtype": "float32", "shape": [2], "data": "AAAAAA=="}, "holds 4 bytes"),
        ({"dtype": "float32", "shape": [1], "data": {"x": 1}}, "got an object"),
    ],
)
def test_bad_tensors_say_what_is_wrong(tensor: dict[str, Any], message: str) -> None:
    pytest.importorskip("numpy")
    with pytest.raises(RequestError) as caught:
        decode_tensor(tensor)
    assert caught.value.type == "InvalidTensor"
    assert message in caught.value.message


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint16", "int64", "float16", "float64"])
@pytest.mark.parametrize("binary", [False, True])
def test_tensors_round_trip(dtype: str, binary: bool) -> None:
    np = pytest.importorskip("numpy")
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    wire = json.loads(json.dumps(encode_tensor(array, binary=binary)))
    assert isinstance(wire["data"], str) == binary
    back = decode_tensor(wire)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert (back == array).all()
    assert back.flags.writeable


def test_a_base64_tensor_is_little_endian() -> None:
    np = pytest.importorskip("numpy")
    wire = encode_tensor(np.array([1], dtype=">u2"), binary=True)
    assert wire == {"dtype": "uint16", "shape": [1], "data": "AQA="}
    assert decode_tensor(wire).tolist() == [1]


# -- responses ------------------------------------------------------------------------------


def test_output_lines() -> None:
    assert output_line(1, {"a": [1, "x"]}, "v2", binary=False) == (
        b'{"id":1,"output":{"a":[1,"x"]},"version":"v2"}\n'
    )
    assert (
        output_line("é", "ü", "1", binary=False)
        == '{"id":"é","output":"ü","version":"1"}\n'.encode()
    )


def test_an_output_json_cannot_carry_is_an_error_for_that_item() -> None:
    nan = json.loads(output_line(1, math.nan, "1", binary=False))
    assert nan["error"]["type"] == "OutputError"
    assert "base64" in nan["error"]["message"]
    assert nan["error"]["version"] == "1"
    unserializable = json.loads(output_line(2, {1, 2}, "1", binary=False))
    assert "an output of type set is not JSON serializable" in unserializable["error"]["message"]


def test_numpy_and_torch_outputs() -> None:
    np = pytest.importorskip("numpy")
    assert json.loads(output_line(1, np.float32(1.5), "1", binary=False))["output"] == 1.5
    assert json.loads(output_line(1, {"v": np.arange(2)}, "1", binary=False))["output"] == {
        "v": [0, 1]
    }
    tensor = json.loads(output_line(1, np.zeros((1, 2), "int32"), "1", binary=False))["tensor"]
    assert tensor == {"dtype": "int32", "shape": [1, 2], "data": [0, 0]}
    torch = pytest.importorskip("torch")
    from_torch = json.loads(output_line(1, torch.ones(2), "1", binary=True))["tensor"]
    assert (from_torch["dtype"], from_torch["shape"]) == ("float32", [2])


def test_error_lines_carry_what_the_exception_knows() -> None:
    from batchkit import ModelError

    line = json.loads(exception_line(3, ModelError("it broke", batch_size=4, version="9")))
    assert line == {
        "id": 3,
        "error": {"type": "ModelError", "message": "it broke", "version": "9", "batch_size": 4},
    }
    assert json.loads(exception_line(None, KeyError()))["error"]["message"] == "KeyError"
    assert json.loads(error_line(None, "X", "y")) == {
        "id": None,
        "error": {"type": "X", "message": "y"},
    }


def test_statistics_survive_the_round_trip_through_json() -> None:
    model = BatchedModel(lambda xs: xs, name="m")
    model.record_histograms()
    with model:
        model.call_many_sync([1, 2, 3])
        stats = model.statistics()
    wire = json.loads(json.dumps(statistics_to_json(stats)))
    assert wire["batch_sizes"] == {str(k): v for k, v in stats.batch_sizes.items()}
    assert wire["mean_batch_size"] == stats.mean_batch_size
    assert wire["histograms"]["compute"]["counts"]
    assert _statistics_from_json(wire) == stats


def test_the_pipe_adapter_and_the_command_line_import_no_heavy_module() -> None:
    import subprocess
    import sys

    code = (
        "import sys, batchkit.pipe, batchkit.__main__; "
        "print([m for m in ('numpy', 'torch', 'trio') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
