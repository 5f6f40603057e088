"""Serve batched models over HTTP with the KServe v2 inference protocol, as Triton speaks it.

``KServeApp`` is a plain ASGI app: run it with any ASGI server (``batchkit serve`` uses
uvicorn) or mount it in your own Starlette/FastAPI app. Stock ``tritonclient.http`` clients
and Triton's perf_analyzer talk to it unchanged. ``open_grpc_server`` (or ``serving(...,
grpc_port=...)``, ``batchkit serve --grpc-port``) serves the same models over KServe v2 gRPC
for ``tritonclient.grpc``. See docs/serving.md and docs/grpc.md.

This module imports numpy; ``import batchkit`` does not.
"""

from __future__ import annotations

try:
    import numpy as _numpy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("batchkit.asgi needs numpy: pip install 'batchkit[server]'") from exc

from ._app import ASGIApp as ASGIApp
from ._app import KServeApp as KServeApp
from ._app import Receive as Receive
from ._app import Scope as Scope
from ._app import Send as Send
from ._disconnect import ClientDisconnected as ClientDisconnected
from ._disconnect import call_until_disconnect as call_until_disconnect
from ._model_repository import ModelRepository as ModelRepository
from ._served import ServedModel as ServedModel
from ._serving import ServingAddress as ServingAddress
from ._serving import open_grpc_server as open_grpc_server
from ._serving import serving as serving
from ._tensors import DATATYPES as _DATATYPES
from ._tensors import Tensor as Tensor

DATATYPES = tuple(_DATATYPES)
"""The KServe v2 datatypes a ``Tensor`` may declare."""

__all__ = (
    "ASGIApp",
    "DATATYPES",
    "ClientDisconnected",
    "KServeApp",
    "ModelRepository",
    "Receive",
    "Scope",
    "Send",
    "ServedModel",
    "ServingAddress",
    "Tensor",
    "open_grpc_server",
    "call_until_disconnect",
    "serving",
)
