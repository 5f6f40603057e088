"""The models the serving benchmark's server runs.

Served with ``batchkit serve benchmarks.serving_models:models``:

- ``trivial`` / ``trivial_unbatched``: returns its FP32[16] input (the protocol's cost alone).
- ``mlp`` / ``mlp_unbatched``: the torch MLP of ``benchmarks/mlp.py`` on FP32[256] rows, one
  torch thread, run in batchkit's worker thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchkit import BatchedModel
from batchkit.asgi import ServedModel, Tensor

from .mlp import IN_FEATURES, MLP


def _identity(rows: list[Any]) -> list[Any]:
    return rows


def models() -> list[ServedModel]:
    """Build the benchmark's served models (a factory: torch loads in the server process)."""
    mlp = MLP()

    def run_mlp(rows: list[Any]) -> list[Any]:
        items = [mlp._torch.from_numpy(r) for r in rows]
        return [np.asarray(out) for out in mlp.forward(items)]

    small = {
        "inputs": [Tensor("INPUT0", "FP32", [16])],
        "outputs": [Tensor("OUTPUT0", "FP32", [16])],
    }
    wide = {
        "inputs": [Tensor("INPUT0", "FP32", [IN_FEATURES])],
        "outputs": [Tensor("OUTPUT0", "FP32", [IN_FEATURES])],
    }
    return [
        ServedModel(BatchedModel(_identity, name="trivial", max_batch_size=64), **small),
        ServedModel(BatchedModel(_identity, name="trivial_unbatched", max_batch_size=1), **small),
        ServedModel(BatchedModel(run_mlp, name="mlp", max_batch_size=64), **wide),
        ServedModel(BatchedModel(run_mlp, name="mlp_unbatched", max_batch_size=1), **wide),
    ]


def grpc_models() -> list[ServedModel]:
    """The gRPC benchmark's model: ``id_fp32``, the identity on FP32[3] rows, batched up to 64,
    named and shaped as the Triton test model it is compared with (no torch)."""
    return [
        ServedModel(
            BatchedModel(_identity, name="id_fp32", max_batch_size=64),
            inputs=[Tensor("X", "FP32", [3])],
            outputs=[Tensor("Y", "FP32", [3])],
        )
    ]
