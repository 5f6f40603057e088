"""The same model repository served by real Triton and by batchkit (``nox -s triton``).

PyTriton's bundled Triton has only the Python backend: the model here is a ``model.py`` that
defines both Triton's ``TritonPythonModel`` and batchkit's ``Model``; both servers read the same
``config.pbtxt``, and answer the same outputs and configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchkit.asgi import KServeApp, ModelRepository

from ..support.asgi import running_server
from ..support.triton_server import TritonServer, find_tritonserver

pytestmark = pytest.mark.triton
httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

DUAL_MODEL = """
import numpy as np

def compute(x):
    return (x * 3 + 1).astype(np.float32), x.sum(axis=1, keepdims=True).astype(np.float32)

class Model:  # batchkit's Python model
    def load(self):
        pass

    def __call__(self, batch):
        y, s = compute(batch["X"])
        return {"Y": y, "S": s}

class TritonPythonModel:  # Triton's Python backend
    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for r in requests:
            y, s = compute(pb_utils.get_input_tensor_by_name(r, "X").as_numpy())
            outputs = [pb_utils.Tensor("Y", y), pb_utils.Tensor("S", s)]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
"""

DUAL_CONFIG = """
name: "dual"
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [
  { name: "Y" data_type: TYPE_FP32 dims: [ 3 ] },
  { name: "S" data_type: TYPE_FP32 dims: [ 1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""


@pytest.fixture
def dual_triton(tmp_path: Path) -> Iterator[TritonServer]:
    package = find_tritonserver()
    if package is None:
        pytest.skip("no tritonserver: nvidia-pytriton is not installed (run `nox -s triton`)")
    server = TritonServer(package, tmp_path / "triton", models=[])
    (server.repository / "dual" / "1").mkdir(parents=True)
    (server.repository / "dual" / "config.pbtxt").write_text(DUAL_CONFIG)
    (server.repository / "dual" / "1" / "model.py").write_text(DUAL_MODEL)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ask(url: str, x: np.ndarray[Any, Any]) -> tuple[Any, dict[str, Any]]:
    client = httpclient.InferenceServerClient(url)
    try:
        tensor = httpclient.InferInput("X", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("dual", [tensor])
        return (result.as_numpy("Y"), result.as_numpy("S")), client.get_model_config("dual")
    finally:
        client.close()


def test_one_python_model_served_by_triton_and_batchkit(dual_triton: TritonServer) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    (triton_y, triton_s), triton_config = ask(dual_triton.http_url.removeprefix("http://"), x)
    with running_server(KServeApp(ModelRepository(dual_triton.repository), metrics=False)) as url:
        (ours_y, ours_s), our_config = ask(url, x)
    np.testing.assert_array_equal(ours_y, triton_y)
    np.testing.assert_array_equal(ours_s, triton_s)
    for key in ("name", "backend", "max_batch_size"):
        assert our_config[key] == triton_config[key], key
    for key in ("input", "output"):
        assert [
            (t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in our_config[key]
        ] == [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in triton_config[key]]
    delay = "max_queue_delay_microseconds"
    assert int(our_config["dynamic_batching"][delay]) == int(
        triton_config["dynamic_batching"][delay]
    )


def test_every_config_triton_accepts_reads_the_same(triton_server: TritonServer) -> None:
    """The Triton tests' own repository (Triton loaded all of it): batchkit reads each config
    with the meaning Triton gives it."""
    from batchkit._runtimes import read_config

    client = httpclient.InferenceServerClient(triton_server.http_url.removeprefix("http://"))
    try:
        folders = sorted(p for p in triton_server.repository.iterdir() if p.is_dir())
        assert folders
        for folder in folders:
            spec = read_config(folder)
            theirs = client.get_model_config(folder.name)
            assert spec.max_batch_size == theirs["max_batch_size"]
            assert [t.name for t in spec.inputs] == [t["name"] for t in theirs["input"]]
            assert [list(t.dims) for t in spec.outputs] == [
                [int(d) for d in t["dims"]] for t in theirs["output"]
            ]
            assert spec.instances == sum(g["count"] for g in theirs["instance_group"])
    finally:
        client.close()
