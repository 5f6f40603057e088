"""One seam per protocol: the few calls ``TritonModel`` makes, over tritonclient's asyncio clients.

``GrpcTransport`` and ``HttpTransport`` wrap ``tritonclient.grpc.aio`` and
``tritonclient.http.aio``; both send tensors as binary data. A transport belongs to the event
loop it was made in (gRPC channels and aiohttp sessions are bound to one loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

__all__ = ("GrpcTransport", "HttpTransport", "Transport")

_INT32_MAX = 2**31 - 1
# tritonclient's own channel defaults, plus reconnection that keeps trying every 2 s at most
# (gRPC's default backs off to 120 s: a server back after an outage would wait that long).
_GRPC_CHANNEL = [
    ("grpc.max_send_message_length", _INT32_MAX),
    ("grpc.max_receive_message_length", _INT32_MAX),
    ("grpc.keepalive_time_ms", _INT32_MAX),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class Transport(Protocol):
    """What ``TritonModel`` needs from a client."""

    async def ready(self, model: str, version: str) -> bool:
        """Return whether the server is live and ready, and the model ready."""
        ...

    async def metadata(self, model: str, version: str) -> dict[str, Any]:
        """Return the model's KServe v2 metadata (shapes as ints)."""
        ...

    async def config(self, model: str, version: str) -> dict[str, Any]:
        """Return the model's configuration (Triton's model config JSON)."""
        ...

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, tuple[str, np.ndarray[Any, Any]]],
        outputs: list[str],
        priority: int,
        timeout_us: int | None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Send one inference request; return the requested outputs by name."""
        ...

    async def close(self) -> None:
        """Close the connection."""
        ...


class GrpcTransport:
    """The gRPC protocol, through ``tritonclient.grpc.aio``."""

    def __init__(self, url: str, headers: Mapping[str, str] | None) -> None:
        import tritonclient.grpc as grpc
        import tritonclient.grpc.aio as grpc_aio

        self._types = grpc
        self._client = grpc_aio.InferenceServerClient(url, channel_args=_GRPC_CHANNEL)
        self._headers = dict(headers) if headers else None

    async def ready(self, model: str, version: str) -> bool:
        client, headers = self._client, self._headers
        return bool(
            await client.is_server_live(headers=headers)
            and await client.is_server_ready(headers=headers)
            and await client.is_model_ready(model, version, headers=headers)
        )

    async def metadata(self, model: str, version: str) -> dict[str, Any]:
        meta = await self._client.get_model_metadata(
            model, version, headers=self._headers, as_json=True
        )
        for tensor in (*meta.get("inputs", ()), *meta.get("outputs", ())):
            tensor["shape"] = [int(d) for d in tensor.get("shape", ())]  # int64 comes as str
        return dict(meta)

    async def config(self, model: str, version: str) -> dict[str, Any]:
        reply = await self._client.get_model_config(
            model, version, headers=self._headers, as_json=True
        )
        return dict(reply.get("config", {}))

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, tuple[str, np.ndarray[Any, Any]]],
        outputs: list[str],
        priority: int,
        timeout_us: int | None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        grpc = self._types
        tensors = []
        for name, (datatype, array) in inputs.items():
            tensor = grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = await self._client.infer(
            model,
            tensors,
            model_version=version,
            outputs=[grpc.InferRequestedOutput(name) for name in outputs],
            priority=priority,
            timeout=timeout_us,
            headers=self._headers,
        )
        return {name: result.as_numpy(name) for name in outputs}

    async def close(self) -> None:
        await self._client.close()


class HttpTransport:
    """The HTTP/REST protocol, through ``tritonclient.http.aio`` (binary tensor extension)."""

    def __init__(self, url: str, headers: Mapping[str, str] | None, conn_limit: int) -> None:
        import tritonclient.http as http
        import tritonclient.http.aio as http_aio

        self._types = http
        self._client = http_aio.InferenceServerClient(url, conn_limit=conn_limit)
        self._headers = dict(headers) if headers else None

    async def ready(self, model: str, version: str) -> bool:
        client, headers = self._client, self._headers
        return bool(
            await client.is_server_live(headers=headers)
            and await client.is_server_ready(headers=headers)
            and await client.is_model_ready(model, version, headers=headers)
        )

    async def metadata(self, model: str, version: str) -> dict[str, Any]:
        return dict(await self._client.get_model_metadata(model, version, headers=self._headers))

    async def config(self, model: str, version: str) -> dict[str, Any]:
        return dict(await self._client.get_model_config(model, version, headers=self._headers))

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, tuple[str, np.ndarray[Any, Any]]],
        outputs: list[str],
        priority: int,
        timeout_us: int | None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        http = self._types
        tensors = []
        for name, (datatype, array) in inputs.items():
            tensor = http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            tensors.append(tensor)
        result = await self._client.infer(
            model,
            tensors,
            model_version=version,
            outputs=[http.InferRequestedOutput(name, binary_data=True) for name in outputs],
            priority=priority,
            timeout=timeout_us,
            headers=self._headers,
        )
        return {name: result.as_numpy(name) for name in outputs}

    async def close(self) -> None:
        await self._client.close()
