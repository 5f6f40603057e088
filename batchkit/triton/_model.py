"""``TritonModel``: a model function that forwards each batch to a Triton Inference Server."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import numpy as np
from tritonclient.utils import triton_to_np_dtype

from .._core import (
    BatchInfo,
    ClosedError,
    ConfigurationError,
    DeadlineExceeded,
    RemoteError,
    RemoteInvalidInput,
    RemoteUnavailable,
    WrongLoopError,
)
from ._errors import is_transient, translate
from ._transport import GrpcTransport, HttpTransport, Transport

__all__ = ("TensorSpec", "TritonModel")

logger = logging.getLogger("batchkit.triton")

_PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model: name, KServe datatype, shape of one item.

    ``shape`` excludes the batch dimension when the model batches (``max_batch_size`` > 0);
    -1 marks a variable dimension.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    priority_levels: int
    default_priority_level: int
    platform: str


class _Connection:
    """A transport and the model's signature, bound to the event loop they were made in.

    The transport closes with ``close()``, or else when its loop shuts down: ``_closer`` is an
    async generator parked at its ``yield``, which asyncio finalizes (running its ``finally``)
    in ``loop.shutdown_asyncgens()``, as ``asyncio.run`` and ``anyio.run`` do. So a model used by
    a background engine closes its client with that engine's loop.
    """

    def __init__(
        self,
        transport: Transport,
        signature: _Signature,
        loop: asyncio.AbstractEventLoop,
        max_in_flight: int,
    ) -> None:
        self.transport = transport
        self.signature = signature
        self.loop = loop
        self.slots = anyio.Semaphore(max_in_flight)
        self._closer = self._close_at_shutdown()

    async def start(self) -> None:
        await self._closer.asend(None)

    async def _close_at_shutdown(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await self.transport.close()

    async def close(self) -> None:
        await self._closer.aclose()


class TritonModel:
    """Forward assembled batches to a model served by a Triton Inference Server.

    Use it wherever a model function goes: ``BatchedModel(TritonModel(...))``, ``@batched``,
    the ASGI and pipe servers. batchkit keeps the queue, priorities, deadlines and per-item
    errors in your process; each batch goes to Triton as one inference request with binary
    tensors (split into requests of at most the model's ``max_batch_size`` rows, up to
    ``max_in_flight`` requests at once).

    Items and outputs follow the server adapters' convention: with one input, an item is that
    input's array for one row (without the batch dimension); with several, a mapping of input
    name to array. Likewise each output is the output's array for the row, or a mapping of
    output name to array when the model has several (or ``outputs`` names several).

    ``url`` is ``grpc://host:port`` or ``http://host:port`` (a bare ``host:port`` uses
    ``protocol``, default gRPC). ``version`` picks a model version (default: the server's
    choice). ``priority`` maps a batch's most urgent batchkit priority (lower is more urgent)
    to Triton's priority level (1 is the most urgent, 0 the model's default); by default it is
    the model's default level moved by the rounded batchkit priority, clamped to the model's
    ``priority_levels``, and 0 for models without priority levels (a batchkit server gets
    level ``2**63 + round(p)``, which keeps every batchkit priority's order). The batch's earliest
    deadline goes to Triton as the request's ``timeout``.

    Connection failures (refused, reset, server gone) are retried ``retries`` times with
    exponential backoff from ``backoff`` seconds, within the batch's deadline; the server's
    verdicts (bad input, rejected, timed out, model failed) are not retried. A failed request
    fails only its own items, with ``RemoteUnavailable``, ``RemoteRejected``,
    ``RemoteInvalidInput``, ``DeadlineExceeded`` or ``RemoteError``.

    tritonclient's asyncio clients are asyncio-only: the engine running this model must run
    on asyncio (``WrongLoopError`` otherwise). Enter it (``async with``) or ``connect()`` to
    read the model's metadata and config up front; otherwise the first batch does. ``aclose()``
    closes the client; a client that a background engine's loop made closes with that loop.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: str | None = None,
        protocol: str | None = None,
        outputs: Sequence[str] | None = None,
        max_in_flight: int = 4,
        priority: Callable[[float], int] | None = None,
        retries: int = 3,
        backoff: float = 0.05,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.protocol, self.address = _parse_url(url, protocol)
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
        if version is not None and (not isinstance(version, str) or not version):
            raise ConfigurationError(f"version must be a non-empty string or None, got {version!r}")
        _check_int("max_in_flight", max_in_flight, 1)
        _check_int("retries", retries, 0)
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not backoff > 0:
            raise ConfigurationError(f"backoff must be a number of seconds > 0, got {backoff!r}")
        if priority is not None and not callable(priority):
            raise ConfigurationError(f"priority must be callable, got {priority!r}")
        if outputs is not None and (isinstance(outputs, str) or not list(outputs)):
            raise ConfigurationError(f"outputs must be a non-empty list of names, got {outputs!r}")
        self.model_name = model
        self.version = version or ""
        self._wanted = None if outputs is None else list(outputs)
        self._max_in_flight = max_in_flight
        self._priority = priority
        self._retries = retries
        self._backoff = float(backoff)
        self._headers = dict(headers) if headers else None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False
        self.__name__ = model  # BatchedModel's default name

    def __repr__(self) -> str:
        return f"<TritonModel {self.model_name!r} at {self.url}>"

    @property
    def url(self) -> str:
        """Return the server's URL, scheme included."""
        return f"{self.protocol}://{self.address}"

    @property
    def _where(self) -> str:
        return f"model {self.model_name!r} at {self.url}"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> TritonModel:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect, and read the model's metadata and config (retrying connection failures).

        Raises ``RemoteUnavailable`` when the server cannot be reached or the model is not
        ready, and ``WrongLoopError`` outside asyncio.
        """
        await self._connection()

    async def ready(self) -> bool:
        """Return whether the server is live and ready and the model ready (no retries)."""
        loop = _running_loop()
        conn = self._conn
        if conn is not None and conn.loop is loop:
            transport = conn.transport
            try:
                return await transport.ready(self.model_name, self.version)
            except Exception:
                return False
        transport = self._new_transport()
        try:
            return await transport.ready(self.model_name, self.version)
        except Exception:
            return False
        finally:
            await transport.close()

    async def aclose(self) -> None:
        """Close the client; later batches fail with ``ClosedError``."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if conn.loop is loop:
            await conn.close()
        elif not conn.loop.is_closed():  # made on another loop (a background engine's)
            try:
                closing = asyncio.run_coroutine_threadsafe(conn.close(), conn.loop)
            except RuntimeError:
                return
            await anyio.to_thread.run_sync(closing.result, 10.0)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Return the model's inputs (after ``connect()`` or a first batch)."""
        return self._signature().inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Return the outputs this model returns (after ``connect()`` or a first batch)."""
        return self._signature().outputs

    @property
    def max_batch_size(self) -> int:
        """Return the server's ``max_batch_size`` for the model (0: it does not batch)."""
        return self._signature().max_batch_size

    def _signature(self) -> _Signature:
        if self._conn is None:
            raise ClosedError(f"{self._where} is not connected yet: call connect() first")
        return self._conn.signature

    # -- the model function --------------------------------------------------------------------

    async def __call__(self, items: Sequence[Any]) -> list[Any]:
        """Run ``items`` on the server (priority 0, no deadline); return one output per item.

        A failed request's items get its error in their slots (see the class docstring).
        """
        return await self.call_with_info(items, None)

    async def call_with_info(self, items: Sequence[Any], info: BatchInfo | None) -> list[Any]:
        """Run ``items`` with the batch's priority and deadline from ``info``.

        The engine calls this (``batchkit.SupportsBatchInfo``) instead of ``__call__``.
        """
        n = len(items)
        try:
            conn = await self._connection()
        except (RemoteUnavailable, ClosedError) as exc:
            return [_copy(exc, n) for _ in range(n)]
        size = conn.signature.max_batch_size or 1
        results: list[Any] = [None] * n
        if n <= size:
            await self._chunk(conn, items, 0, results, info)
            return results
        async with anyio.create_task_group() as tg:
            for start in range(0, n, size):
                tg.start_soon(self._chunk, conn, items[start : start + size], start, results, info)
        return results

    async def _chunk(
        self,
        conn: _Connection,
        items: Sequence[Any],
        start: int,
        results: list[Any],
        info: BatchInfo | None,
    ) -> None:
        """Send ``items`` as one request; put its outputs (or its error) in ``results``."""
        n = len(items)
        try:
            inputs = _assemble(conn.signature, items)
        except RemoteInvalidInput as exc:
            results[start : start + n] = [_copy(exc) for _ in range(n)]
            return
        try:
            async with conn.slots:
                arrays = await self._send(conn, inputs, n, info)
        except Exception as exc:
            results[start : start + n] = [self._error(exc, n) for _ in range(n)]
            return
        results[start : start + n] = _rows(conn.signature, arrays, n)

    async def _send(
        self,
        conn: _Connection,
        inputs: dict[str, tuple[str, np.ndarray[Any, Any]]],
        n: int,
        info: BatchInfo | None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        priority = self._triton_priority(conn.signature, 0 if info is None else info.priority)
        deadline = None if info is None else info.deadline
        outputs = [t.name for t in conn.signature.outputs]
        attempt = 0
        while True:
            timeout_us = None
            if deadline is not None:
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise DeadlineExceeded(f"the deadline passed before {self._where} was sent")
                timeout_us = max(1, math.ceil(left * 1e6))
            try:
                return await conn.transport.infer(
                    self.model_name, self.version, inputs, outputs, priority, timeout_us
                )
            except Exception as exc:
                delay = self._backoff * 2**attempt
                late = deadline is not None and anyio.current_time() + delay >= deadline
                if attempt >= self._retries or late or not is_transient(exc):
                    raise
                logger.info(
                    "batchkit: %s unreachable (%s); retry in %.3f s", self._where, exc, delay
                )
                attempt += 1
                await anyio.sleep(delay)

    def _error(self, exc: Exception, n: int) -> Exception:
        if isinstance(exc, DeadlineExceeded):
            return _copy(exc)
        return translate(exc, self._where, n)

    def _triton_priority(self, signature: _Signature, priority: float) -> int:
        if self._priority is not None:
            return int(self._priority(priority))
        if signature.platform == "batchkit":
            # batchkit's own server takes any level in [1, 2**64) as Triton's schedule policy
            # does (lower first; 0 is its default level, after all of them): batchkit's 0 is
            # the middle level, so that every batchkit priority keeps its order there.
            return min(2**64 - 1, max(1, 2**63 + round(priority)))
        levels = signature.priority_levels
        if not levels or priority == 0:
            return 0
        default = signature.default_priority_level or (levels + 1) // 2
        return min(levels, max(1, default + round(priority)))

    # -- connecting ----------------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        loop = _running_loop()
        if self._closed:
            raise ClosedError(f"{self._where}: the TritonModel was closed")
        conn = self._conn
        if conn is not None and conn.loop is loop:
            return conn
        connecting = self._connecting
        if connecting is None or connecting.get_loop() is not loop:
            connecting = self._connecting = loop.create_task(self._connect(loop))
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
                if not connecting.cancelled() and connecting.exception() is None:
                    self._conn = connecting.result()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        transport = self._new_transport()
        try:
            signature = await self._read_signature(transport)
        except BaseException:
            await transport.close()
            raise
        conn = _Connection(transport, signature, loop, self._max_in_flight)
        await conn.start()
        return conn

    async def _read_signature(self, transport: Transport) -> _Signature:
        attempt = 0
        while True:
            try:
                if not await transport.ready(self.model_name, self.version):
                    raise RemoteUnavailable(
                        f"{self._where} is not ready (the server or the model)", batch_size=0
                    )
                meta = await transport.metadata(self.model_name, self.version)
                config = await transport.config(self.model_name, self.version)
                return self._parse(meta, config)
            except RemoteUnavailable:
                raise
            except Exception as exc:
                if attempt >= self._retries or not is_transient(exc):
                    error = translate(exc, self._where, 0)
                    if not isinstance(error, RemoteUnavailable):
                        error = RemoteUnavailable(
                            f"{self._where} cannot be used: {error}", batch_size=0
                        )
                        error.__cause__ = exc
                    raise error from exc
                delay = self._backoff * 2**attempt
                logger.info(
                    "batchkit: %s unreachable (%s); retry in %.3f s", self._where, exc, delay
                )
                await anyio.sleep(delay)
                attempt += 1

    def _parse(self, meta: Mapping[str, Any], config: Mapping[str, Any]) -> _Signature:
        max_batch_size = int(config.get("max_batch_size", 0) or 0)
        batched = max_batch_size > 0

        def specs(tensors: Any) -> tuple[TensorSpec, ...]:
            result = []
            for t in tensors:
                shape = tuple(int(d) for d in t["shape"])
                result.append(TensorSpec(t["name"], t["datatype"], shape[1:] if batched else shape))
            return tuple(result)

        inputs, outputs = specs(meta.get("inputs", ())), specs(meta.get("outputs", ()))
        if self._wanted is not None:
            by_name = {t.name: t for t in outputs}
            missing = [name for name in self._wanted if name not in by_name]
            if missing:
                raise ConfigurationError(
                    f"{self._where} has no output {missing}; it has {sorted(by_name)}"
                )
            outputs = tuple(by_name[name] for name in self._wanted)
        batching = config.get("dynamic_batching") or {}
        return _Signature(
            inputs,
            outputs,
            max_batch_size,
            int(batching.get("priority_levels", 0) or 0),
            int(batching.get("default_priority_level", 0) or 0),
            str(config.get("platform") or meta.get("platform") or ""),
        )

    def _new_transport(self) -> Transport:
        if self.protocol == "grpc":
            return GrpcTransport(self.address, self._headers)
        return HttpTransport(self.address, self._headers, conn_limit=max(100, self._max_in_flight))


def _assemble(
    signature: _Signature, items: Sequence[Any]
) -> dict[str, tuple[str, np.ndarray[Any, Any]]]:
    """Build the request's input arrays from the items (stacked, unless the model does not
    batch: then the single item is the whole tensor)."""
    single = signature.inputs[0].name if len(signature.inputs) == 1 else None
    arrays: dict[str, tuple[str, np.ndarray[Any, Any]]] = {}
    for spec in signature.inputs:
        dtype = np.object_ if spec.datatype == "BYTES" else triton_to_np_dtype(spec.datatype)
        rows = []
        for item in items:
            if single is None or isinstance(item, Mapping):
                if not isinstance(item, Mapping) or spec.name not in item:
                    raise RemoteInvalidInput(
                        f"each item needs input {spec.name!r}: the model takes "
                        f"{[t.name for t in signature.inputs]}, got {type(item).__name__}",
                        batch_size=len(items),
                    )
                item = item[spec.name]
            rows.append(np.asarray(item, dtype=dtype))
        if any(row.shape != rows[0].shape for row in rows):
            raise RemoteInvalidInput(
                f"the rows of input {spec.name!r} have different shapes "
                f"{sorted({row.shape for row in rows})}: one request needs equal shapes",
                batch_size=len(items),
            )
        array = np.stack(rows) if signature.max_batch_size > 0 else rows[0]
        arrays[spec.name] = (spec.datatype, array)
    return arrays


def _rows(signature: _Signature, arrays: dict[str, np.ndarray[Any, Any]], n: int) -> list[Any]:
    """Split the response's output arrays into one output per item."""
    if signature.max_batch_size == 0:
        per_row = {name: [array] for name, array in arrays.items()}
    else:
        per_row = {name: list(array) for name, array in arrays.items()}
    if len(arrays) == 1:
        (rows,) = per_row.values()
        return rows
    return [{name: per_row[name][i] for name in arrays} for i in range(n)]


def _copy(exc: Exception, batch_size: int | None = None) -> Exception:
    """Return a fresh copy of ``exc`` (one per caller: raising one instance from several
    tasks would mix their tracebacks), with the same cause."""
    if isinstance(exc, RemoteError):
        size = exc.batch_size if batch_size is None else batch_size
        error: Exception = type(exc)(str(exc), batch_size=size)
    else:
        error = type(exc)(str(exc))
    error.__cause__ = exc.__cause__
    return error


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise WrongLoopError(
            "TritonModel needs asyncio (tritonclient's asyncio clients run on asyncio only); "
            "run the model's engine on asyncio"
        ) from None


def _parse_url(url: str, protocol: str | None) -> tuple[str, str]:
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"url must be a non-empty string, got {url!r}")
    if protocol is not None and protocol not in _PROTOCOLS:
        raise ConfigurationError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    scheme, sep, address = url.partition("://")
    if not sep:
        scheme, address = protocol or "grpc", url
    if scheme not in _PROTOCOLS:
        raise ConfigurationError(f"url must start with grpc:// or http://, got {url!r}")
    if protocol is not None and protocol != scheme:
        raise ConfigurationError(f"url {url!r} contradicts protocol={protocol!r}")
    address = address.rstrip("/")
    if not address or "/" in address:
        raise ConfigurationError(f"url must be scheme://host:port, got {url!r}")
    return scheme, address


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{field} must be an int >= {minimum}, got {value!r}")
