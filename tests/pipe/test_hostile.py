"""Hostile input to the pipe server: every line gets one answer and the server keeps serving.

Each class here once ended the whole process (losing every response in flight) or left a line
unanswered so that the server could not exit at end of input: numbers beyond float range in
any numeric field, tensor shapes numpy cannot build, ids UTF-8 cannot carry.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchkit import BatchedModel, Deployment
from batchkit.pipe import serve

from . import test_server
from .test_server import by_id

start = test_server.start  # the fixture that starts `batchkit pipe` children

BIG = int("9" * 400)  # far beyond float range (about 1.8e308)


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"  # ensure_ascii: a lone surrogate as an escape


# (request line, id in the answer, error type, words the message must hold)
NUMBERS: list[tuple[bytes, Any, str, str]] = [
    (_line({"id": BIG, "input": 1}), None, "InvalidRequest", "'id'"),
    (_line({"id": -BIG, "op": "ping"}), None, "InvalidRequest", "'id'"),
    (_line({"id": "p", "input": 1, "priority": BIG}), "p", "InvalidRequest", "'priority'"),
    (_line({"id": "n", "input": 1, "priority": -BIG}), "n", "InvalidRequest", "'priority'"),
    (_line({"id": "t", "input": 1, "timeout": BIG}), "t", "InvalidRequest", "'timeout'"),
    (_line({"id": "c", "op": "cancel", "target": BIG}), "c", "InvalidRequest", "'target'"),
    # damaged lines: the leading id is recovered when it can be, and named when it cannot
    (_line({"id": BIG, "input": 1})[:-3] + b"\n", None, "InvalidJSON", "'id'"),
    (b'{"id": 5, "input": [' + str(BIG).encode() + b"\n", 5, "InvalidJSON", "not JSON"),
    (b'{"id": ' + b"7" * 5000 + b', "input": \n', None, "InvalidJSON", "'id'"),
]

SHAPES: list[tuple[list[Any], str]] = [
    ([0] * 65, "65 dimensions"),
    ([1] * 65, "65 dimensions"),
    ([0, 2**63], "below 2**63"),
    ([2**64, 0], "below 2**63"),
    ([0, BIG], "below 2**63"),
    ([-1, 0], ">= 0"),
    ([0, 2**62, 2**62], "too big"),
    ([2**40, 2**40, 0], "too big"),
]


def test_numbers_beyond_float_range_get_an_error_naming_the_field(start: Any) -> None:
    server = start("double")
    lines: list[bytes] = []
    for n, (line, _, _, _) in enumerate(NUMBERS):
        lines += [line, _line({"id": n, "input": n})]
    server.send_in_thread(lines)
    answers = server.responses(len(lines))
    assert server.rest_of_output() == b""
    assert server.wait() == 0
    errors = [a for a in answers if "error" in a]
    good = by_id([a for a in answers if "error" not in a])
    assert good == {n: {"id": n, "output": 2 * n, "version": "1"} for n in range(len(NUMBERS))}
    for _, id_, type_, words in NUMBERS:
        matching = [e for e in errors if e["id"] == id_ and e["error"]["type"] == type_]
        assert any(words in e["error"]["message"] for e in matching), (id_, type_, errors)
    assert len(errors) == len(NUMBERS)


@pytest.mark.parametrize("binary", [False, True])
def test_tensor_shapes_numpy_cannot_build_get_an_invalid_tensor_error(
    start: Any, binary: bool
) -> None:
    pytest.importorskip("numpy")
    server = start("tensors")
    lines: list[bytes] = []
    for n, (shape, _) in enumerate(SHAPES):
        data: Any = "" if binary else []
        lines.append(_line({"id": n, "tensor": {"dtype": "float32", "shape": shape, "data": data}}))
    lines.append(_line({"id": "ok", "tensor": {"dtype": "int8", "shape": [0, 3], "data": []}}))
    server.send_in_thread(lines)
    answers = by_id(server.responses(len(lines)))
    assert server.rest_of_output() == b""
    assert server.wait() == 0
    assert answers.pop("ok")["tensor"] == {"dtype": "int8", "shape": [0, 3], "data": []}
    for n, (_, words) in enumerate(SHAPES):
        error = answers[n]["error"]
        assert error["type"] == "InvalidTensor"
        assert words in error["message"], error


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ids_utf8_cannot_carry_are_written_back_as_json_escapes(start: Any, backend: str) -> None:
    server = start("several", backend=backend)
    ids = ["\ud800", "a\udfffb", "\udc80\ud800"]
    lines = [
        _line({"id": ids[0], "model": "double", "input": 4}),
        _line({"id": ids[1], "op": "ping"}),
        _line({"id": ids[2], "model": "nope", "input": 1}),  # an error line
        _line({"id": "echo", "model": "double", "input": "\ud83d"}),  # in the output
        _line({"id": "after", "model": "double", "input": 1}),
    ]
    server.send_in_thread(lines)
    answers = by_id(server.responses(len(lines)))
    assert server.rest_of_output() == b""
    assert server.wait() == 0
    assert answers[ids[0]] == {"id": ids[0], "output": 8, "version": "1"}
    assert "pong" in answers[ids[1]]
    assert answers[ids[2]]["error"]["type"] == "UnknownModel"
    assert answers["echo"]["output"] == "\ud83d\ud83d"
    assert answers["after"]["output"] == 2


# -- fuzzing every field ------------------------------------------------------------------------

_strings = st.sampled_from(["", "a", "\ud800", "\udfff\ud800", "é", "\x00", "m", "echo", "x" * 50])
_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400).map(lambda n: n * (-1) ** (n % 2)),
    st.floats(allow_nan=True, allow_infinity=True),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _strings)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_strings, inner, max_size=4)
    ),
    max_leaves=12,
)
_shapes = st.one_of(
    st.lists(st.integers(min_value=-2, max_value=3), max_size=4),
    st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**63, 2**64, BIG]), max_size=70),
    _json,
)
_tensors = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(["float32", "uint8", "int64", "bool"]), _json),
            "shape": _shapes,
            "data": st.one_of(st.sampled_from(["", "AAAA", "!!"]), _json),
        }
    ),
    _json,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "op": st.one_of(st.sampled_from(["infer", "ping", "stats", "cancel"]), _json),
        "model": st.one_of(st.sampled_from(["echo", "other", "routed"]), _json),
        "input": _json,
        "tensor": _tensors,
        "priority": st.one_of(_numbers, _json),
        "timeout": st.one_of(st.floats(min_value=0, max_value=5), _numbers, _json),
        "target": st.one_of(st.integers(min_value=0, max_value=30), _json),
        "version": st.one_of(st.sampled_from(["1", "2"]), _json),
        "key": st.one_of(_strings, _json),
        "bogus": _json,
    },
)


def _echo(items: list[Any]) -> list[Any]:
    return items


def _serve_file(lines: list[bytes], backend: str, models: Any = None) -> list[bytes]:
    """Serve ``lines`` from a file to a file, in this process; return the response lines."""
    if models is None:
        versions = {v: BatchedModel(_echo, name="routed", version=v) for v in ("1", "2")}
        models = {
            "echo": BatchedModel(_echo, name="echo", max_batch_size=8),
            "other": BatchedModel(_echo, name="other"),
            "routed": Deployment(versions, weights={"1": 1, "2": 1}, seed=0),
        }
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "in"), Path(tmp, "out")
        src.write_bytes(b"".join(lines))
        with src.open("rb") as i, dst.open("wb") as o:
            fds = {"input_fd": i.fileno(), "output_fd": o.fileno()}

            async def main() -> int:
                return await serve(models, **fds)

            assert anyio.run(main, backend=backend) == 0
        return dst.read_bytes().splitlines(keepends=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(st.tuples(st.booleans(), _fields), min_size=1, max_size=12),
    backend=st.sampled_from(["asyncio", "trio"]),
)
def test_fuzzed_lines_each_get_one_answer_and_the_server_exits_cleanly(
    requests: list[tuple[bool, dict[str, Any]]], backend: str
) -> None:
    lines, ids = [], []
    for n, (good_id, fields) in enumerate(requests):
        obj = {"id": n if good_id else f"s{n}\ud800", **fields}
        lines.append(json.dumps(obj).encode() + b"\n")
        ids.append(obj["id"])
    out = _serve_file(lines, backend)
    assert all(line.endswith(b"\n") for line in out)
    answers = [json.loads(line) for line in out]  # every line is JSON
    assert Counter(a["id"] for a in answers) == Counter(ids)  # exactly one answer each
    for answer in answers:
        assert answer.keys() - {"id", "version"} in (
            {"output"},
            {"tensor"},
            {"error"},
            {"pong"},
            {"stats"},
            {"cancelled"},
        ), answer
        if "error" in answer:
            assert answer["error"]["type"] != "InternalError", answer


class _Unprintable(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def _unprintable(items: list[Any]) -> list[Any]:
    return [_Unprintable() if item == "bad" else item for item in items]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_answer_that_cannot_be_built_is_an_internal_error_for_that_line_only(
    backend: str,
) -> None:
    model = BatchedModel(_unprintable, name="m")
    lines = [_line({"id": 1, "input": "bad"}), _line({"id": 2, "input": "fine"})]
    answers = by_id([json.loads(line) for line in _serve_file(lines, backend, model)])
    assert answers[1]["error"]["type"] == "InternalError"
    assert answers[2] == {"id": 2, "output": "fine", "version": "1"}


# -- items checked against what the model declares ----------------------------------------------


def test_a_bad_item_is_refused_alone_and_never_fails_the_batch_it_would_have_joined(
    start: Any,
) -> None:
    pytest.importorskip("numpy")
    server = start("declared", "--log-level", "debug")
    bad = {
        "int": ({"dtype": "int64", "shape": [3], "data": [1, 2, 3]}, "is FP32 (numpy float32)"),
        "long": ({"dtype": "float32", "shape": [4], "data": [1, 2, 3, 4]}, "shape [4]"),
        "deep": ({"dtype": "float32", "shape": [1, 3], "data": [1, 2, 3]}, "shape [1, 3]"),
        "empty": ({"dtype": "float32", "shape": [0], "data": []}, "expected [3]"),
    }
    lines = []
    for n in range(200):  # read together, so the good ones batch with each other
        lines.append(
            _line({"id": n, "tensor": {"dtype": "float32", "shape": [3], "data": [n] * 3}})
        )
        if n % 50 == 0:
            for key, (tensor, _) in bad.items():
                lines.append(_line({"id": f"{key}{n}", "tensor": tensor}))
            lines.append(_line({"id": f"json{n}", "input": [1.0, 2.0, 3.0]}))
    server.send_in_thread(lines)
    answers = by_id(server.responses(len(lines)))
    assert server.rest_of_output() == b""
    assert server.wait() == 0
    for n in range(200):
        assert answers.pop(n)["tensor"] == {"dtype": "float32", "shape": [3], "data": [2 * n] * 3}
    for n in range(0, 200, 50):
        json_error = answers.pop(f"json{n}")["error"]
        assert json_error["type"] == "InvalidRequest"
        assert "send the item under 'tensor'" in json_error["message"]
        for key, (_, words) in bad.items():
            error = answers.pop(f"{key}{n}")["error"]
            assert error["type"] == "InvalidTensor"
            assert words in error["message"], error
    assert answers == {}
