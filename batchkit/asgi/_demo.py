"""The demo model ``batchkit serve`` runs when given no target (needs numpy).

A stand-in for a small model on an accelerator: each batch costs a fixed 2 ms (as a kernel
launch and a transfer would) plus a little numpy work per item, so batching pays off the way it
does on real hardware. It scales and shifts a vector of 16 floats: ``y = 2 * x + 1``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .._core import BatchedModel
from ._served import ServedModel
from ._tensors import Tensor

__all__ = ("BATCH_COST", "demo_models")

BATCH_COST = 0.002


def _affine(rows: list[Any]) -> list[Any]:
    time.sleep(BATCH_COST)  # the fixed cost of one batch on the stand-in accelerator
    return list(np.stack(rows) * 2.0 + 1.0)


def demo_models(*, unbatched: bool = False) -> list[ServedModel]:
    """Return the demo model ``demo`` (and ``demo_unbatched``, ``max_batch_size=1``)."""
    signature: dict[str, Any] = {
        "inputs": [Tensor("INPUT0", "FP32", [16])],
        "outputs": [Tensor("OUTPUT0", "FP32", [16])],
    }
    served = [ServedModel(BatchedModel(_affine, name="demo", max_batch_size=64), **signature)]
    if unbatched:
        model = BatchedModel(_affine, name="demo_unbatched", max_batch_size=1)
        served.append(ServedModel(model, **signature))
    return served
