"""Tiny model files built in code for the model repository tests: ONNX graphs (onnx.helper),
a scripted torch module, a Python model file, and their configurations in both styles."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# y = x @ W + b, then relu: the ONNX MLP's weights (4 features in, 3 out).
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
BIAS = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def onnx_mlp(path: Path, *, scale: float = 1.0, batch: str | int = "batch") -> Path:
    """Write an ONNX graph: ``y = relu(x @ (W * scale) + b)``, x FP32 [batch, 4], y [batch, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [
            numpy_helper.from_array(WEIGHTS * np.float32(scale), "W"),
            numpy_helper.from_array(BIAS, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_reference(x: np.ndarray[Any, Any], scale: float = 1.0) -> np.ndarray[Any, Any]:
    """Run the ONNX MLP directly with ONNX Runtime's math, in numpy."""
    return np.maximum(x @ (WEIGHTS * np.float32(scale)) + BIAS, 0).astype(np.float32)


def onnx_two_inputs(path: Path) -> Path:
    """Write an ONNX graph with two inputs and two outputs: sum = a + b, prod = a * b (INT64)."""
    import onnx
    from onnx import TensorProto, helper

    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        "two",
        [info("a", TensorProto.INT64, ["n", 2]), info("b", TensorProto.INT64, ["n", 2])],
        [info("sum", TensorProto.INT64, ["n", 2]), info("prod", TensorProto.INT64, ["n", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


PBTXT_MLP = """
name: "{name}"
backend: "onnxruntime"
max_batch_size: 16
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 500 preferred_batch_size: [ 4, 8 ] }}
version_policy: {{ latest: {{ num_versions: 1 }} }}
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
"""


def torch_module(path: Path) -> Path:
    """Write a scripted torch module: ``(x * 2 + 1, x.sum(-1, keepdim=True))``."""
    import torch

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2 + 1, x.sum(-1, keepdim=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript, still loads it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Net()), str(path))
    return path


TORCH_CONFIG = {
    "name": "{name}",
    "platform": "pytorch_libtorch",
    "max_batch_size": 8,
    "input": [{"name": "INPUT__0", "data_type": "FP32", "dims": [3]}],
    "output": [
        {"name": "OUTPUT__0", "data_type": "FP32", "dims": [3]},
        {"name": "OUTPUT__1", "data_type": "FP32", "dims": [1]},
    ],
}


PYTHON_MODEL = textwrap.dedent(
    """
    import os
    import numpy as np

    class Model:
        def load(self):
            # one line per load, so that tests can count loads from outside
            with open(os.path.join(os.path.dirname(__file__), "..", "loads.txt"), "a") as f:
                f.write("load\\n")
            self.offset = {offset}

        def __call__(self, batch):
            text = batch["TEXT"]
            return {{
                "LENGTH": np.array([[len(t)] for t in text.reshape(-1)], dtype=np.int32),
                "SHIFTED": batch["VALUE"] + self.offset,
            }}
    """
)

PYTHON_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 32
input [
  {{ name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "VALUE" data_type: TYPE_FP32 dims: [ 2 ] }}
]
output [
  {{ name: "LENGTH" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "SHIFTED" data_type: TYPE_FP32 dims: [ 2 ] }}
]
"""


def python_model(folder: Path, version: int = 1, offset: float = 1.0) -> Path:
    path = folder / str(version) / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PYTHON_MODEL.format(offset=offset))
    return path


def write_config(folder: Path, style: str, config: str | dict[str, Any], name: str) -> Path:
    """Write ``config`` (pbtxt text, or a JSON-able dict) as ``config.<style>``."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, str):
        assert style == "pbtxt"
        path = folder / "config.pbtxt"
        path.write_text(config.format(name=name))
        return path
    data = json.loads(json.dumps(config).replace("{name}", name))
    if style == "json":
        path = folder / "config.json"
        path.write_text(json.dumps(data))
    else:
        import yaml

        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(data))
    return path


def load_script(path: Path) -> Any:
    """Load a TorchScript file directly (torch 2.10+ warns that TorchScript is deprecated)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))
