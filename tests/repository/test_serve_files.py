"""Model files served with no code: a repository folder (ONNX, TorchScript, Python), served by a
real uvicorn server and called with the stock tritonclient.http; outputs equal the files run
directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchkit.asgi import KServeApp, ModelRepository

from ..support import model_files as mf
from ..support.asgi import running_server

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("tritonclient.grpc.model_config_pb2")
httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

AUTH = {"Authorization": "Bearer s3cret"}


def infer(client: Any, name: str, x: np.ndarray[Any, Any], **kw: Any) -> Any:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    return client.infer(name, [tensor], **kw)


def mlp_repository(root: Path, style: str = "pbtxt") -> Path:
    mf.onnx_mlp(root / "mlp" / "1" / "model.onnx")
    if style == "pbtxt":
        mf.write_config(root / "mlp", "pbtxt", mf.PBTXT_MLP, "mlp")
    else:
        config = {
            "name": "mlp",
            "backend": "onnxruntime",
            "max_batch_size": 16,
            "input": [{"name": "x", "data_type": "FP32", "dims": [4]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}],
            "dynamic_batching": {"max_queue_delay_microseconds": 500, "preferred_batch_size": [8]},
        }
        mf.write_config(root / "mlp", style, config, "mlp")
    return root


@pytest.mark.parametrize("style", ["pbtxt", "json", "yaml"])
def test_an_onnx_model_serves_what_onnx_runtime_computes(tmp_path: Path, style: str) -> None:
    if style == "yaml":
        pytest.importorskip("yaml")
    root = mlp_repository(tmp_path / "repo", style)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    import onnxruntime

    direct = onnxruntime.InferenceSession(str(root / "mlp" / "1" / "model.onnx"))
    expected = direct.run(["y"], {"x": x})[0]
    with running_server(KServeApp(ModelRepository(root), metrics=False)) as url:
        client = httpclient.InferenceServerClient(url)
        assert client.is_model_ready("mlp")
        result = infer(client, "mlp", x)
        np.testing.assert_array_equal(result.as_numpy("y"), expected)
        np.testing.assert_allclose(expected, mf.mlp_reference(x), rtol=1e-5, atol=1e-6)
        assert result.get_response()["model_version"] == "1"
        metadata = client.get_model_metadata("mlp")
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        config = client.get_model_config("mlp")
        assert config["max_batch_size"] == 16
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 500
        # Triton refuses a request over max_batch_size; so does batchkit
        with pytest.raises(InferenceServerException, match="16"):
            infer(client, "mlp", np.zeros((17, 4), np.float32))
        client.close()


def test_without_inputs_and_outputs_the_onnx_graph_gives_them(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    mf.onnx_two_inputs(root / "pair" / "1" / "model.onnx")  # no config at all
    mf.onnx_mlp(root / "mlp" / "1" / "model.onnx")
    (root / "mlp" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    with running_server(KServeApp(ModelRepository(root), metrics=False)) as url:
        client = httpclient.InferenceServerClient(url)
        metadata = client.get_model_metadata("pair")
        assert metadata["inputs"] == [
            {"name": "a", "datatype": "INT64", "shape": [-1, 2]},
            {"name": "b", "datatype": "INT64", "shape": [-1, 2]},
        ]
        assert [o["name"] for o in metadata["outputs"]] == ["sum", "prod"]
        a = np.array([[1, 2], [3, 4]], np.int64)
        b = np.array([[5, 6], [7, 8]], np.int64)
        inputs = [httpclient.InferInput(n, [2, 2], "INT64") for n in "ab"]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("pair", inputs)
        np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
        np.testing.assert_array_equal(result.as_numpy("prod"), a * b)
        x = np.ones((3, 4), np.float32)
        np.testing.assert_allclose(infer(client, "mlp", x).as_numpy("y"), mf.mlp_reference(x))
        client.close()


def test_torchscript_and_python_models(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    root = tmp_path / "repo"
    script = mf.torch_module(root / "scripted" / "1" / "model.pt")
    mf.write_config(root / "scripted", "json", mf.TORCH_CONFIG, "scripted")
    mf.python_model(root / "custom", offset=10.0)
    mf.write_config(root / "custom", "pbtxt", mf.PYTHON_CONFIG, "custom")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    direct = mf.load_script(script)(torch.from_numpy(x))
    with running_server(KServeApp(ModelRepository(root), metrics=False)) as url:
        client = httpclient.InferenceServerClient(url)
        tensor = httpclient.InferInput("INPUT__0", [2, 3], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("scripted", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), direct[0].numpy())
        np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), direct[1].numpy())

        text = httpclient.InferInput("TEXT", [3, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"a"], [b"abc"], [b""]], dtype=object))
        value = httpclient.InferInput("VALUE", [3, 2], "FP32")
        value.set_data_from_numpy(np.zeros((3, 2), np.float32))
        result = client.infer("custom", [text, value])
        np.testing.assert_array_equal(result.as_numpy("LENGTH"), [[1], [3], [0]])
        np.testing.assert_array_equal(result.as_numpy("SHIFTED"), np.full((3, 2), 10.0))
        client.close()


def test_a_torch_export_program(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return torch.tanh(x) * 3

    root = tmp_path / "repo"
    (root / "exported" / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Net(), (torch.ones(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "exported" / "1" / "model.pt2"))
    (root / "exported" / "config.pbtxt").write_text(
        'platform: "pytorch_libtorch"\nmax_batch_size: 8\ndefault_model_filename: "model.pt2"\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [3] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [3] }]\n'
    )
    x = np.linspace(-2, 2, 15, dtype=np.float32).reshape(5, 3)
    with running_server(KServeApp(ModelRepository(root), metrics=False)) as url:
        client = httpclient.InferenceServerClient(url)
        result = infer(client, "exported", x)
        expected = program.module()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)
        client.close()


def test_onnx_string_tensors(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "strings",
        [info("text", TensorProto.STRING, ["n", 2])],
        [info("same", TensorProto.STRING, ["n", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (tmp_path / "repo" / "echo" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "repo" / "echo" / "1" / "model.onnx"))
    with running_server(KServeApp(ModelRepository(tmp_path / "repo"), metrics=False)) as url:
        client = httpclient.InferenceServerClient(url)
        data = np.array([["héllo".encode(), b"a"], [b"", b"xyz"]], dtype=object)
        tensor = httpclient.InferInput("text", [2, 2], "BYTES")
        tensor.set_data_from_numpy(data)
        np.testing.assert_array_equal(client.infer("echo", [tensor]).as_numpy("same"), data)
        client.close()


def test_a_repository_over_grpc(tmp_path: Path) -> None:
    """The same folder over gRPC, beside HTTP: stock tritonclient.grpc sees the model, its
    configuration and the outputs ONNX Runtime computes; the repository RPCs list and reload it."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from batchkit.asgi import serving

    root = mlp_repository(tmp_path / "repo")
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    app = KServeApp(ModelRepository(root), metrics=False, admin_token="s3cret")
    with serving(app, grpc_port=0) as address:
        client = grpcclient.InferenceServerClient(address.grpc)
        try:
            assert client.is_model_ready("mlp")
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer("mlp", [tensor])
            np.testing.assert_allclose(result.as_numpy("y"), mf.mlp_reference(x), rtol=1e-5)
            assert result.get_response().model_version == "1"
            assert client.get_model_config("mlp").config.max_batch_size == 16
            auth = {"authorization": AUTH["Authorization"]}
            index = client.get_model_repository_index(headers=auth)
            assert [(m.name, m.state) for m in index.models] == [("mlp", "READY")]
            mf.onnx_mlp(root / "mlp" / "2" / "model.onnx")  # a new version folder
            client.load_model("mlp", headers=auth)
            assert client.infer("mlp", [tensor]).get_response().model_version == "2"
        finally:
            client.close()
