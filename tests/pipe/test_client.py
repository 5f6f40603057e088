"""The pipe client against a real server subprocess, on asyncio and on trio."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchkit import (
    ClosedError,
    ConfigurationError,
    DeadlineExceeded,
    ModelError,
    QueueFull,
    RemoteInvalidInput,
    RemoteRejected,
    RemoteUnavailable,
)
from batchkit.pipe import PipeClient, ResponseError, ServerExited, SyncPipeClient
from batchkit.pipe._client import _error_from

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


def client(target: str, **options: Any) -> PipeClient:
    return PipeClient(f"tests.support.pipe_targets:{target}", cwd=ROOT, **options)


async def wait_until_submitted(c: PipeClient, model: str, n: int) -> None:
    """Ask the server for statistics until ``n`` items reached ``model`` (round trips only)."""
    for _ in range(1000):
        if (await c.statistics(model)).submitted >= n:
            return
    raise AssertionError(f"{model} never saw {n} items")


async def test_many_calls_in_flight_are_batched_and_matched_by_id() -> None:
    async with client("double") as c:
        assert c.pid is not None
        items = list(range(500))
        assert await c.call_many(items) == [2 * x for x in items]
        assert await c.call("ab") == "abab"
        assert tuple(await c.call_versioned(3, priority=-1, timeout=30)) == (6, "1")
        stats = await c.statistics()
        assert stats.completed == 502
        assert stats.mean_batch_size > 1
        pong = await c.ping()
        assert pong["protocol"] == 1
        assert pong["models"] == {"double": "1"}


async def test_error_responses_raise_what_the_model_would_raise_in_process() -> None:
    async with client("several") as c:
        with pytest.raises(DeadlineExceeded):
            await c.call(1, model="hang", timeout=0.01)
        with pytest.raises(ModelError, match="boom in the batch") as model_error:
            await c.call("boom", model="faulty")
        assert model_error.value.version == "7"
        with pytest.raises(ResponseError, match="negative: -1") as remote:
            await c.call(-1, model="faulty")
        assert (remote.value.type, remote.value.message) == ("ValueError", "negative: -1")
        with pytest.raises(ResponseError) as unknown:
            await c.call(1, model="nope")
        assert unknown.value.type == "UnknownModel"
        with pytest.raises(ResponseError) as unnamed:
            await c.call(1)
        assert unnamed.value.type == "InvalidRequest"
        with pytest.raises(ConfigurationError, match="name the model"):
            await c.statistics()
        with pytest.raises(TypeError, match="not JSON serializable"):
            await c.call({1, 2}, model="double")
        results = await c.call_many([1, -2, 3], model="faulty", return_exceptions=True)
        assert results[0] == 2 and results[2] == 4
        assert isinstance(results[1], ResponseError)
        with pytest.raises(ResponseError, match="negative"):
            await c.call_many([1, -2, 3], model="faulty")
        assert await c.call(4, model="double") == 8  # still serving


async def test_leaving_the_block_answers_the_calls_in_flight() -> None:
    results: dict[int, Any] = {}

    async def call(c: PipeClient, n: int) -> None:
        results[n] = await c.call(n)

    async with anyio.create_task_group() as tg:
        async with client("double") as c:
            for n in range(50):
                tg.start_soon(call, c, n)
            await anyio.wait_all_tasks_blocked()
            pid = c.pid
        # The child got end of input, answered every line and exited by itself.
    assert results == {n: 2 * n for n in range(50)}
    assert c.pid is None and pid is not None
    with pytest.raises(ClosedError):
        await c.call(1)


async def test_a_killed_child_fails_its_calls_and_the_next_call_restarts_it() -> None:
    async with client("several") as c:
        first = c.pid
        assert first is not None
        errors: list[Exception] = []

        async def stuck() -> None:
            try:
                await c.call(1, model="hang")
            except ServerExited as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await wait_until_submitted(c, "hang", 1)
            os.kill(first, signal.SIGKILL)  # the child's own pid, from its handle
        assert len(errors) == 1
        assert "status -9 before answering" in str(errors[0])
        assert await c.call(5, model="double") == 10
        assert c.pid not in (None, first)
        assert c.restarts == 1


async def test_a_cancelled_call_leaves_the_client_serving() -> None:
    async with client("several") as c:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(c.call, 1, model="hang"))
            await wait_until_submitted(c, "hang", 1)
            tg.cancel_scope.cancel()
        assert await c.call(2, model="double") == 4
        with anyio.move_on_after(0.05) as scope:  # a bound, not an ordering: it must expire
            await c.call_many([1, 2], model="hang")
        assert scope.cancelled_caught
        assert await c.call_many([3, 4], model="double") == [6, 8]


async def test_without_restart_a_dead_child_fails_every_later_call() -> None:
    async with client("double", restart=False) as c:
        pid = c.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(2):
            with pytest.raises(ServerExited, match="status -9"):
                await c.call(1)
        assert c.restarts == 0


async def test_a_child_that_cannot_start_fails_on_enter() -> None:
    with pytest.raises(ServerExited, match=r"status 2 .*while starting") as exited:
        async with client("missing", stderr=subprocess.DEVNULL):
            raise AssertionError("unreachable")
    assert exited.value.returncode == 2


async def test_tensors_round_trip_as_numpy_arrays() -> None:
    np = pytest.importorskip("numpy")
    async with client("tensors") as c:
        array = np.arange(12, dtype=np.float32).reshape(3, 4)
        out = await c.call(array)
        assert out.dtype == np.float32
        assert (out == array * 2).all()
        assert await c.call([1, 2]) == [1, 2, 1, 2]  # a plain list is JSON, not a tensor


def test_the_sync_client_serves_many_threads() -> None:
    with SyncPipeClient("tests.support.pipe_targets:double", cwd=ROOT) as c:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(c.call, range(200)))
        assert results == [2 * n for n in range(200)]
        assert c.call_many([1, 2]) == [2, 4]
        assert tuple(c.call_versioned(1)) == (2, "1")
        assert c.statistics().completed == 203
        assert c.ping()["protocol"] == 1
        assert c.pid is not None
    with pytest.raises(ClosedError):
        c.call(1)


def test_a_sync_client_that_cannot_start_leaves_no_thread() -> None:
    with pytest.raises(ServerExited, match="status 2"):
        SyncPipeClient(
            "tests.support.pipe_targets:missing", cwd=ROOT, stderr=subprocess.DEVNULL
        ).__enter__()


def test_client_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="not both or neither"):
        PipeClient()
    with pytest.raises(ConfigurationError, match="not both or neither"):
        PipeClient("m:x", command=["x"])
    with pytest.raises(ConfigurationError, match="startup_timeout must be a number > 0, got 0"):
        PipeClient("m:x", startup_timeout=0)


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        ({"type": "DeadlineExceeded", "message": "m"}, DeadlineExceeded),
        ({"type": "ModelError", "message": "m", "batch_size": 4, "version": "2"}, ModelError),
        ({"type": "BatchSizeMismatch", "message": "m", "batch_size": 4}, ModelError),
        ({"type": "RemoteUnavailable", "message": "m", "batch_size": 1}, RemoteUnavailable),
        ({"type": "RemoteRejected", "message": "m", "retry_after": 2.5}, RemoteRejected),
        ({"type": "RemoteInvalidInput", "message": "m"}, RemoteInvalidInput),
        ({"type": "QueueFull", "message": "m", "retry_after": 3.0}, QueueFull),
        ({"type": "ClosedError", "message": "m"}, ClosedError),
        ({"type": "KeyError", "message": "m"}, ResponseError),
    ],
)
def test_error_responses_map_to_the_errors_of_the_core(
    error: dict[str, Any], raised: type[Exception]
) -> None:
    exc = _error_from(error)
    assert type(exc) is raised
    assert "m" in str(exc)
    for attr in ("batch_size", "version", "retry_after"):
        if attr in error:
            assert getattr(exc, attr) == error[attr]
