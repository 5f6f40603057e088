"""Forward assembled batches to an NVIDIA Triton Inference Server (needs ``batchkit[triton]``).

``TritonModel`` is a model function: give it to ``BatchedModel``, ``@batched`` or a server
adapter, and each batch batchkit assembles goes to Triton as one inference request. See
``docs/triton.md``.
"""

from __future__ import annotations

from ._model import TensorSpec as TensorSpec
from ._model import TritonModel as TritonModel

__all__ = ("TensorSpec", "TritonModel")
