"""The model repository's configuration reader (batchkit._runtimes): one meaning in three
file styles, and the version policies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchkit._runtimes import read_config, select_versions

pytest.importorskip("tritonclient.grpc.model_config_pb2")

PBTXT = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [ { name: "a" data_type: TYPE_FP32 dims: [ -1, 4 ] },
        { name: "b" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2500 preferred_batch_size: [ 8, 16 ] }
version_policy { specific { versions: [ 2, 5 ] } }
instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_GPU } ]
optimization { graph { level: -1 } }
parameters { key: "intra_op_thread_count" value: { string_value: "3" } }
default_model_filename: "net.onnx"
"""

DATA = {
    "name": "m",
    "platform": "onnxruntime_onnx",
    "max_batch_size": 32,
    "input": [
        {"name": "a", "data_type": "FP32", "dims": [-1, 4]},
        {"name": "b", "data_type": "BYTES", "dims": [1]},
    ],
    "output": [{"name": "y", "data_type": "TYPE_INT64", "dims": [2]}],
    "dynamic_batching": {"max_queue_delay_microseconds": 2500, "preferred_batch_size": [8, 16]},
    "version_policy": {"specific": {"versions": [2, 5]}},
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1, "kind": "KIND_GPU"}],
    "optimization": {"graph": {"level": -1}},
    "parameters": {"intra_op_thread_count": {"string_value": "3"}},
    "defaultModelFilename": "net.onnx",  # protobuf's JSON mapping takes either spelling
}


def test_pbtxt_json_and_yaml_mean_the_same(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    specs = []
    for style, text in [
        ("pbtxt", PBTXT),
        ("json", json.dumps(DATA)),
        ("yaml", yaml.safe_dump(DATA)),
    ]:
        folder = tmp_path / style / "m"
        folder.mkdir(parents=True)
        (folder / f"config.{style}").write_text(text)
        spec = read_config(folder)
        assert spec.source == str(folder / f"config.{style}")
        specs.append(dataclasses.replace(spec, source=""))
    assert specs[0] == specs[1] == specs[2]
    spec = specs[0]
    assert spec.runtime == "onnx"
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [
        ("a", "FP32", (-1, 4)),
        ("b", "BYTES", (1,)),
    ]
    assert spec.max_queue_delay == pytest.approx(0.0025)
    assert spec.preferred_batch_sizes == (8, 16)
    assert spec.version_policy == ("specific", (2, 5))
    assert (spec.instances, spec.gpu, spec.graph_level) == (3, True, -1)
    assert spec.parameters == {"intra_op_thread_count": "3"}
    assert spec.filename() == "net.onnx"


def test_a_folder_without_a_configuration(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    spec = read_config(tmp_path / "plain")
    assert (spec.name, spec.runtime, spec.max_batch_size, spec.inputs) == ("plain", None, 64, ())
    assert spec.version_policy == ("latest", (1,))


versions = st.lists(st.integers(0, 50), unique=True, max_size=12)


@given(versions, st.integers(1, 15))
def test_latest_serves_the_highest_n(available: list[int], n: int) -> None:
    chosen = select_versions(("latest", (n,)), available)
    assert chosen == sorted(available)[-n:]
    assert len(chosen) == min(n, len(available))


@given(versions, versions)
def test_specific_serves_what_exists_of_the_list(available: list[int], wanted: list[int]) -> None:
    chosen = select_versions(("specific", tuple(wanted)), available)
    assert chosen == sorted(set(available) & set(wanted))
    assert select_versions(("all", ()), available) == sorted(available)
