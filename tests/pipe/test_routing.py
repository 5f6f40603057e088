"""A ``Deployment`` served by ``batchkit pipe`` (a real child process): the model's name routes
to its versions, ``version`` pins a line, ``key`` keeps a line on one version, ``stats`` shows
the split; the pipe client passes ``version`` and ``key`` through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchkit.pipe import PipeClient

ROOT = Path(__file__).resolve().parents[2]
TARGETS = "tests.support.routing_targets"

pytestmark = pytest.mark.anyio


def run_pipe(target: str, lines: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Send ``lines`` to a ``batchkit pipe`` child and read every answer, then ask for its
    ``stats`` (answered as ``"stats"``) and close its input; return the responses by id."""
    with subprocess.Popen(
        [sys.executable, "-m", "batchkit", "pipe", f"{TARGETS}:{target}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=dict(os.environ),
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write("".join(json.dumps(line) + "\n" for line in lines).encode())
            proc.stdin.flush()
            responses = [json.loads(proc.stdout.readline()) for _ in lines]
            proc.stdin.write(b'{"id": "stats", "op": "stats"}\n')
            proc.stdin.close()
            responses += [json.loads(line) for line in proc.stdout]
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert len(responses) == len(lines) + 1
    return {r["id"]: r for r in responses}


def test_lines_route_pin_and_stick_by_model_name() -> None:
    lines: list[dict[str, Any]] = [{"id": i, "model": "clf", "input": i} for i in range(200)]
    lines += [{"id": f"p{i}", "model": "clf", "input": i, "version": "2"} for i in range(20)]
    lines += [{"id": f"k{i}", "model": "clf", "input": i, "key": "user-9"} for i in range(20)]
    lines += [
        {"id": "bad", "model": "clf", "input": 0, "version": "9"},
        {"id": "plain", "model": "plain", "input": 1, "version": "7"},
        {"id": "plain-bad", "model": "plain", "input": 1, "version": "8"},
        {"id": "bad-key", "model": "clf", "input": 0, "key": 5},
    ]
    out = run_pipe("both", lines)
    routed = Counter(out[i]["version"] for i in range(200))
    for i in range(200):
        assert out[i]["output"] == f"{out[i]['version']}:{i}"
    assert set(routed) == {"1", "2"}
    assert {out[f"p{i}"]["version"] for i in range(20)} == {"2"}
    assert len({out[f"k{i}"]["version"] for i in range(20)}) == 1
    assert out["bad"]["error"]["type"] == "UnknownVersion"
    assert "has no version '9'" in out["bad"]["error"]["message"]
    assert out["plain"]["output"] == "p:1"
    assert out["plain-bad"]["error"]["type"] == "UnknownVersion"
    assert out["bad-key"]["error"]["type"] == "InvalidRequest"
    summary = out["stats"]["stats"]["models"]["clf"]["deployment"]
    assert summary["pinned"] == {"1": 0, "2": 20}
    assert sum(summary["routed"].values()) == 220
    assert summary["routing"]["weights"] == {"1": 0.5, "2": 0.5}


async def test_the_pipe_client_pins_and_keys_calls() -> None:
    async with PipeClient(f"{TARGETS}:deployment", cwd=ROOT) as client:
        for i in range(10):
            assert await client.call(i, version="1") == f"1:{i}"
        keyed = {(await client.call_versioned(0, key="user-3")).version for _ in range(10)}
        assert len(keyed) == 1
        stats = await client.statistics()
        assert stats.completed == 20
