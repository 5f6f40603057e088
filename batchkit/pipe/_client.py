"""The pipe client: a pipe server as a child process, called like a model, many calls at once.

Each call writes one request line with a fresh id and waits for the response with that id; one
task per child writes the lines (joined when several are ready) and one reads the responses.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from types import MappingProxyType, TracebackType
from typing import IO, Any

import anyio
import anyio.abc
import anyio.from_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from .._core import (
    ClosedError,
    ConfigurationError,
    DeadlineExceeded,
    LatencyHistogram,
    LatencySummary,
    ModelError,
    QueueFull,
    RemoteError,
    RemoteInvalidInput,
    RemoteRejected,
    RemoteUnavailable,
    Statistics,
    Versioned,
)
from ._errors import PipeProtocolError, ResponseError, ServerExited
from ._protocol import PROTOCOL_VERSION, RequestError, as_tensor, decode_tensor, encode_tensor

__all__ = ("PipeClient", "SyncPipeClient")

log = logging.getLogger("batchkit.pipe")

# The longest response line accepted.
_MAX_RESPONSE_BYTES = 1 << 30
# Once the child closed its output, how long it may take to exit before it is killed.
_EXIT_WAIT = 5.0


class _Pending:
    __slots__ = ("error", "event", "response")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.response: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def outcome(self) -> dict[str, Any]:
        """Return the response object, or raise why there is none (the server exited)."""
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


class _Child:
    """One server process: its pending calls, and the tasks that write and read its pipes."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.pending: dict[int, _Pending] = {}
        self.exited: ServerExited | None = None  # set once it ended and its calls were failed
        self.ended = anyio.Event()
        self._outbox: list[bytes] = []
        self._wake = anyio.Event()
        self._closing = False

    def send(self, line: bytes) -> None:
        self._outbox.append(line)
        self._wake.set()

    def close_input(self) -> None:
        """Send end of input once the lines queued are written: the server drains and exits."""
        self._closing = True
        self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop)
                task_status.started()
                await self._read_loop()
                tg.cancel_scope.cancel()
            with anyio.move_on_after(_EXIT_WAIT):  # its output ended: it is exiting
                await self.process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._reap()

    async def _reap(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.aclose()
        code = self.process.returncode
        message = f"the pipe server (pid {self.process.pid}) exited with status {code}"
        self.exited = ServerExited(message, returncode=code)
        pending, self.pending = self.pending, {}
        for call in pending.values():
            call.error = ServerExited(message + " before answering", returncode=code)
            call.event.set()
        self.ended.set()

    async def _write_loop(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            while True:
                self._wake = anyio.Event()
                if self._outbox:
                    data = b"".join(self._outbox)
                    self._outbox.clear()
                    await stdin.send(data)
                elif self._closing:
                    await stdin.aclose()
                    return
                else:
                    await self._wake.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the child is gone; the reader sees its output end and fails the calls

    async def _read_loop(self) -> None:
        assert self.process.stdout is not None
        stream = BufferedByteReceiveStream(self.process.stdout)
        while True:
            try:
                line = await stream.receive_until(b"\n", _MAX_RESPONSE_BYTES)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                return
            try:
                response = json.loads(line)
                call = self.pending.pop(response["id"], None)
            except (ValueError, TypeError, KeyError):
                log.error("not a protocol line from the pipe server: %r", line[:200])
                continue
            if call is None:
                if response["id"] is None:
                    log.error("the pipe server could not read a request: %s", response)
                continue  # a call that was cancelled
            call.response = response
            call.event.set()


class PipeClient:
    """Start a pipe server as a child process and call its models from async code.

    ``target`` is the ``MODULE:ATTR`` the server serves (run as ``python -m batchkit pipe
    TARGET *server_args`` with this interpreter); or give the whole ``command`` instead.
    ``env``, ``cwd`` and ``stderr`` go to the child (by default its log goes to our stderr).

    Use it as ``async with PipeClient(...) as client:``, which starts the child and waits for
    it to answer a ping (up to ``startup_timeout`` seconds). Leaving the block ends the child's
    input: it answers every call still in flight and exits; if it has not exited after
    ``close_timeout`` seconds it is sent SIGTERM, then killed. The child is only ever stopped
    through its own process handle.

    Calls made while the child is running share it: many lines are in flight at once, so the
    server batches them. If the child dies, the calls waiting on it raise ``ServerExited``;
    with ``restart`` (the default) the next call starts a new child, else every later call
    raises ``ServerExited`` too.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        command: Sequence[str] | None = None,
        server_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stderr: int | IO[Any] | None = None,
        restart: bool = True,
        startup_timeout: float = 60.0,
        close_timeout: float = 30.0,
    ) -> None:
        if (target is None) == (command is None):
            raise ConfigurationError(
                f"give a MODULE:ATTR target or a command, not both or neither "
                f"(got target={target!r}, command={command!r})"
            )
        if command is None:
            command = [sys.executable, "-m", "batchkit", "pipe", str(target), *server_args]
        elif server_args:
            raise ConfigurationError(f"server_args go with a target, got {server_args!r}")
        for name, value in (("startup_timeout", startup_timeout), ("close_timeout", close_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")
        self.command: tuple[str, ...] = tuple(command)
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._stderr = stderr
        self._restart = restart
        self._startup_timeout = float(startup_timeout)
        self._close_timeout = float(close_timeout)
        self._ids = itertools.count()
        self._child: _Child | None = None
        self._starting = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._restarts = 0

    @property
    def pid(self) -> int | None:
        """Return the process id of the running child (None before it starts, or after)."""
        child = self._child
        return None if child is None or child.exited else child.process.pid

    @property
    def restarts(self) -> int:
        """Return how many times a child was started to replace one that ended."""
        return self._restarts

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {' '.join(self.command)!r} pid={self.pid}>"

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> PipeClient:
        if self._tg is not None or self._closed:
            raise ClosedError("a PipeClient is entered once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await self._ensure_child()
        except BaseException:
            self._closed = True
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        tg, child = self._tg, self._child
        assert tg is not None
        try:
            if child is not None and child.exited is None:
                with anyio.CancelScope(shield=True):
                    await self._stop_child(child)
        finally:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def _stop_child(self, child: _Child) -> None:
        child.close_input()
        with anyio.move_on_after(self._close_timeout):
            await child.ended.wait()
            return
        log.warning("the pipe server (pid %d) did not exit: terminating it", child.process.pid)
        if child.process.returncode is None:
            child.process.terminate()
        with anyio.move_on_after(self._close_timeout):
            await child.ended.wait()
            return
        if child.process.returncode is None:
            child.process.kill()
        await child.ended.wait()

    async def _ensure_child(self) -> _Child:
        if self._closed:
            raise ClosedError("the PipeClient is closed")
        child = self._child
        if child is not None and child.exited is None:
            return child
        async with self._starting:
            child = self._child
            if child is not None and child.exited is None:
                return child
            if child is not None and not self._restart:
                assert child.exited is not None
                raise ServerExited(str(child.exited), returncode=child.exited.returncode)
            new = await self._start_child()
            if child is not None:
                self._restarts += 1
            self._child = new
            return new

    async def _start_child(self) -> _Child:
        assert self._tg is not None
        process = await anyio.open_process(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self._env,
            cwd=self._cwd,
        )
        child = _Child(process)
        await self._tg.start(child.run)
        try:
            with anyio.fail_after(self._startup_timeout):
                response = await self._exchange(child, {"op": "ping"})
        except TimeoutError:
            process.kill()
            await child.ended.wait()
            raise ServerExited(
                f"the pipe server (pid {process.pid}) did not answer within "
                f"{self._startup_timeout:g} s of starting: {' '.join(self.command)}"
            ) from None
        except ServerExited as exc:
            raise ServerExited(
                f"the pipe server (pid {process.pid}) exited with status {exc.returncode} while "
                f"starting (its stderr says why): {' '.join(self.command)}",
                returncode=exc.returncode,
            ) from None
        protocol = response.get("pong", {}).get("protocol")
        if protocol != PROTOCOL_VERSION:
            process.kill()
            await child.ended.wait()
            raise PipeProtocolError(
                f"the pipe server speaks protocol {protocol!r}, this client {PROTOCOL_VERSION}"
            )
        return child

    # -- calls ---------------------------------------------------------------------------------

    async def _exchange(self, child: _Child, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request to ``child`` and return its response object."""
        calls = self._send(child, [payload])
        try:
            await calls[0][1].event.wait()
        finally:
            self._forget(child, calls)
        return calls[0][1].outcome()

    def _forget(self, child: _Child, calls: list[tuple[int, _Pending]]) -> None:
        """Stop waiting for ``calls``; ask the server to cancel those it has not answered."""
        for id_, _ in calls:
            if child.pending.pop(id_, None) is not None and child.exited is None:
                cancel = {"id": next(self._ids), "op": "cancel", "target": id_}
                child.send(_encode(cancel))  # its answer, and the target's, are ignored

    def _send(self, child: _Child, payloads: list[dict[str, Any]]) -> list[tuple[int, _Pending]]:
        """Write one request line per payload to ``child``; return each line's id and call."""
        lines = [(next(self._ids), payload) for payload in payloads]
        data = b"".join(_encode({"id": id_, **payload}) for id_, payload in lines)  # may raise
        if child.exited is not None:
            raise ServerExited(str(child.exited), returncode=child.exited.returncode)
        calls = [(id_, _Pending()) for id_, _ in lines]
        child.pending.update(calls)
        child.send(data)
        return calls

    async def _request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._exchange(await self._ensure_child(), payload)

    async def call(
        self,
        item: Any,
        *,
        model: str | None = None,
        priority: float = 0,
        timeout: float | None = None,
        version: str | None = None,
        key: str | None = None,
    ) -> Any:
        """Send one item to ``model`` (optional when the server has one) and return its output.

        ``item`` is sent as JSON, or as a tensor with base64 data when it is a numpy array (or
        a torch tensor); a tensor output comes back as a numpy array. ``priority`` and
        ``timeout`` mean what they mean for ``BatchedModel.call`` (the timeout runs on the
        server, from when it reads the line).

        Raises what the model's caller would get in its own process: ``DeadlineExceeded``,
        ``ModelError`` (with ``version``), ``ClosedError``; ``ResponseError`` for any other error
        response (an exception the model returned for this item, an unknown model);
        ``ServerExited`` if the server ended first; ``TypeError`` if ``item`` is not JSON.

        For a ``Deployment`` served by that name, ``version`` pins the item to one of its
        versions and ``key`` routes it sticky (see docs/versions.md).
        """
        result = await self.call_versioned(
            item, model=model, priority=priority, timeout=timeout, version=version, key=key
        )
        return result.value

    async def call_versioned(
        self,
        item: Any,
        *,
        model: str | None = None,
        priority: float = 0,
        timeout: float | None = None,
        version: str | None = None,
        key: str | None = None,
    ) -> Versioned[Any]:
        """Like ``call()``, and return the output with the model version that produced it."""
        payload = _infer_payload(item, model, priority, timeout, version, key)
        response = await self._request(payload)
        return _versioned_of(response)

    async def call_many(
        self,
        items: Iterable[Any],
        *,
        model: str | None = None,
        priority: float = 0,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send all ``items`` at once and return their outputs in order.

        The first failure is raised and the calls not yet answered are abandoned, unless
        ``return_exceptions`` is true: then each failure takes its item's place in the list.
        """
        payloads = [_infer_payload(item, model, priority, timeout) for item in items]
        child = await self._ensure_child()
        calls = self._send(child, payloads)
        results: list[Any] = []
        try:
            for _, call in calls:
                await call.event.wait()
                try:
                    results.append(_versioned_of(call.outcome()).value)
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
        finally:
            self._forget(child, calls)
        return results

    async def statistics(self, model: str | None = None) -> Statistics:
        """Return the server's statistics snapshot of ``model`` (optional with one model)."""
        payload: dict[str, Any] = {"op": "stats"}
        if model is not None:
            payload["model"] = model
        response = await self._request(payload)
        if "error" in response:
            raise _error_from(response["error"])
        models = response["stats"]["models"]
        if model is None:
            if len(models) != 1:
                raise ConfigurationError(
                    f"name the model: the server serves {', '.join(map(repr, sorted(models)))}"
                )
            (model,) = models
        return _statistics_from_json(models[model])

    async def ping(self) -> dict[str, Any]:
        """Return the server's answer to a ping: protocol version and models with versions."""
        response = await self._request({"op": "ping"})
        return dict(response["pong"])


class SyncPipeClient:
    """The same client for sync code: ``with SyncPipeClient(...) as client: client.call(x)``.

    It runs a ``PipeClient`` on an event loop in a background thread, so calls from many
    threads are in flight together. Takes the arguments of ``PipeClient``.
    """

    def __init__(self, target: str | None = None, **options: Any) -> None:
        self._client = PipeClient(target, **options)
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._entered: Any = None

    @property
    def pid(self) -> int | None:
        """Return the process id of the running child (None before it starts, or after)."""
        return self._client.pid

    @property
    def restarts(self) -> int:
        """Return how many times a child was started to replace one that ended."""
        return self._client.restarts

    def __enter__(self) -> SyncPipeClient:
        portal_cm = anyio.from_thread.start_blocking_portal(name="batchkit-pipe-client")
        portal = portal_cm.__enter__()
        try:
            entered = portal.wrap_async_context_manager(self._client)
            entered.__enter__()
        except BaseException:
            portal_cm.__exit__(*sys.exc_info())
            raise
        self._portal_cm, self._portal, self._entered = portal_cm, portal, entered
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child as leaving ``async with PipeClient`` does, and the loop thread."""
        portal_cm, entered = self._portal_cm, self._entered
        self._portal_cm = self._portal = self._entered = None
        if portal_cm is None:
            return
        try:
            entered.__exit__(None, None, None)
        finally:
            portal_cm.__exit__(None, None, None)

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        portal = self._portal
        if portal is None:
            raise ClosedError("the SyncPipeClient is not open: use `with SyncPipeClient(...)`")
        return portal.call(lambda: fn(*args, **kwargs))

    def call(
        self,
        item: Any,
        *,
        model: str | None = None,
        priority: float = 0,
        timeout: float | None = None,
        version: str | None = None,
        key: str | None = None,
    ) -> Any:
        """Send one item and return its output; blocks this thread (see ``PipeClient.call``)."""
        return self.call_versioned(
            item, model=model, priority=priority, timeout=timeout, version=version, key=key
        ).value

    def call_versioned(
        self,
        item: Any,
        *,
        model: str | None = None,
        priority: float = 0,
        timeout: float | None = None,
        version: str | None = None,
        key: str | None = None,
    ) -> Versioned[Any]:
        """Like ``call()``, and return the output with the model version that produced it."""
        result: Versioned[Any] = self._run(
            self._client.call_versioned,
            item,
            model=model,
            priority=priority,
            timeout=timeout,
            version=version,
            key=key,
        )
        return result

    def call_many(
        self,
        items: Iterable[Any],
        *,
        model: str | None = None,
        priority: float = 0,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Send all ``items`` at once and return their outputs in order (see ``call_many``)."""
        results: list[Any] = self._run(
            self._client.call_many,
            list(items),
            model=model,
            priority=priority,
            timeout=timeout,
            return_exceptions=return_exceptions,
        )
        return results

    def statistics(self, model: str | None = None) -> Statistics:
        """Return the server's statistics snapshot of ``model`` (optional with one model)."""
        stats: Statistics = self._run(self._client.statistics, model)
        return stats

    def ping(self) -> dict[str, Any]:
        """Return the server's answer to a ping."""
        pong: dict[str, Any] = self._run(self._client.ping)
        return pong


def _infer_payload(
    item: Any,
    model: str | None,
    priority: float,
    timeout: float | None,
    version: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if model is not None:
        payload["model"] = model
    if version is not None:
        payload["version"] = version
    if key is not None:
        payload["key"] = key
    tensor = as_tensor(item)
    if tensor is not None:
        payload["tensor"] = encode_tensor(tensor, binary=True)
    else:
        payload["input"] = item
    if priority != 0:
        payload["priority"] = priority
    if timeout is not None:
        payload["timeout"] = timeout
    return payload


def _versioned_of(response: Mapping[str, Any]) -> Versioned[Any]:
    """Return the output a response carries, or raise the error it carries."""
    error = response.get("error")
    if error is not None:
        raise _error_from(error)
    try:
        tensor = response.get("tensor")
        value = response["output"] if tensor is None else decode_tensor(tensor)
        return Versioned(value, response["version"])
    except (RequestError, KeyError) as exc:
        raise PipeProtocolError(f"a malformed response: {response!r:.300}") from exc


def _encode(request: dict[str, Any]) -> bytes:
    # The id goes first, so the server can recover it even from a damaged line.
    text = json.dumps(
        request, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )
    return text.encode("utf-8") + b"\n"


def _json_default(value: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"an item of type {type(value).__name__} is not JSON serializable")


# Error types raised as themselves (BatchSizeMismatch, whose fields differ, as a ModelError).
_MODEL_ERRORS: dict[str, type[ModelError]] = {
    "ModelError": ModelError,
    "BatchSizeMismatch": ModelError,
    "RemoteError": RemoteError,
    "RemoteUnavailable": RemoteUnavailable,
    "RemoteInvalidInput": RemoteInvalidInput,
}


def _error_from(error: Mapping[str, Any]) -> Exception:
    type_, message = str(error.get("type")), str(error.get("message"))
    version = error.get("version")
    if type_ == "DeadlineExceeded":
        return DeadlineExceeded(message)
    batch_size = int(error.get("batch_size", 0))
    if type_ == "RemoteRejected":
        retry_after = float(error.get("retry_after", 1.0))
        return RemoteRejected(
            message, batch_size=batch_size, version=version, retry_after=retry_after
        )
    model_error = _MODEL_ERRORS.get(type_)
    if model_error is not None:
        return model_error(message, batch_size=batch_size, version=version)
    if type_ == "ClosedError":
        return ClosedError(message)
    if type_ == "QueueFull":
        return QueueFull(message, retry_after=float(error.get("retry_after", 1.0)))
    return ResponseError(type_, message, version=version)


def _statistics_from_json(obj: Mapping[str, Any]) -> Statistics:
    """Rebuild a ``Statistics`` from ``stats`` JSON (fields this version lacks are dropped)."""
    values: dict[str, Any] = {}
    for field in fields(Statistics):
        if field.name not in obj:
            continue
        value = obj[field.name]
        if field.name == "batch_sizes":
            value = MappingProxyType({int(k): v for k, v in value.items()})
        elif field.name == "histograms":
            value = MappingProxyType(
                {
                    name: LatencyHistogram(tuple(h["bounds"]), tuple(h["counts"]), h["sum"])
                    for name, h in value.items()
                }
            )
        elif isinstance(value, dict):
            value = LatencySummary(**{f.name: value[f.name] for f in fields(LatencySummary)})
        values[field.name] = value
    return Statistics(**values)
