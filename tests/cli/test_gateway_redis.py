"""Rate limits shared through a real Redis by real ``batchkit serve`` replicas, and the keys
file reloaded by SIGHUP (docs/security.md).

A ``redis-server`` is started by the tests on 127.0.0.1 (`.ci/run` and nox install it from
Debian's packages); where it is not installed these tests skip and say so.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (apt-get install redis-server)"
)
pytest.importorskip("redis", reason="the gateway's Redis store needs `pip install redis`")

BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}]}
).encode()
KEY = {"X-API-Key": "team-secret"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server(port: int | None = None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run a throwaway redis-server on 127.0.0.1; yield its port and process."""
    assert REDIS is not None
    port = port or free_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


@contextmanager
def serve(*args: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run ``batchkit serve`` (the demo model) with ``args``; yield its port and process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "serve", "--port", str(port), *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    reader = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited ({proc.wait()}): {''.join(lines)}")
        # Keep reading its log, so that a full pipe never blocks it.
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
        reader.start()
        proc.log = lines  # type: ignore[attr-defined]
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(20)
        if reader is not None:
            reader.join(10)
        if proc.stderr is not None:
            proc.stderr.close()


def post(port: int, headers: dict[str, str] | None = None, timeout: float = 10) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/demo/infer", BODY, {**KEY, **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def write_keys(path: Path, revoked: bool = False) -> Path:
    entry = {"name": "team", "key": "team-secret", "revoked": revoked}
    path.write_text(json.dumps({"keys": [entry]}))
    return path


@needs_redis
@pytest.mark.timeout(120)
def test_two_replicas_share_one_limit_through_redis(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys.json")
    rate, burst, seconds = 40.0, 10, 3.0
    with redis_server() as (redis_port, _):
        store = f"redis://127.0.0.1:{redis_port}/0"
        options = ["--api-keys", str(keys), "--rate-limit", f"{rate:g}/s"]
        options += ["--rate-limit-burst", str(burst), "--rate-limit-store", store]
        with serve(*options) as (a, _), serve(*options) as (b, _):
            counts: Counter[tuple[int, int]] = Counter()
            lock = threading.Lock()
            start = time.monotonic()
            stop = start + seconds

            def load(port: int) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    while time.monotonic() < stop:
                        conn.request("POST", "/v2/models/demo/infer", BODY, KEY)
                        response = conn.getresponse()
                        response.read()
                        with lock:
                            counts[(port, response.status)] += 1
                finally:
                    conn.close()

            threads = [threading.Thread(target=load, args=(p,)) for p in (a, b) * 3]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            elapsed = time.monotonic() - start
    allowed = counts[(a, 200)] + counts[(b, 200)]
    limited = counts[(a, 429)] + counts[(b, 429)]
    assert set(status for _, status in counts) <= {200, 429}, counts
    assert counts[(a, 200)] and counts[(b, 200)] and limited  # both replicas served and refused
    expected = burst + rate * elapsed
    assert abs(allowed - expected) <= 0.05 * expected, (allowed, expected, counts)


@needs_redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_down_or_hung_follows_the_policy_and_recovers(tmp_path: Path, policy: str) -> None:
    keys = write_keys(tmp_path / "keys.json")
    with redis_server() as (redis_port, redis_proc):
        store = f"redis://127.0.0.1:{redis_port}/0"
        options = ["--api-keys", str(keys), "--rate-limit", "1/min", "--rate-limit-store", store]
        with serve(*options, "--rate-limit-on-error", policy) as (port, server):
            assert [post(port), post(port)] == [200, 429]
            down = 200 if policy == "open" else 503
            redis_proc.send_signal(signal.SIGSTOP)  # hung: every call must time out, not wait
            t0 = time.monotonic()
            assert post(port) == down
            assert time.monotonic() - t0 < 5
            redis_proc.send_signal(signal.SIGCONT)
            assert post(port) == 429  # back, with the count it kept
            redis_proc.kill()
            redis_proc.wait(10)
            assert [post(port), post(port)] == [down, down]
            with redis_server(redis_port):  # a fresh, empty Redis on the same address
                assert [post(port), post(port)] == [200, 429]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            metrics = conn.getresponse().read().decode()
            conn.close()
    assert "batchkit_gateway_store_errors_total" in metrics
    errors = [line for line in metrics.splitlines() if line.startswith("batchkit_gateway_store")]
    assert float(errors[0].split()[-1]) >= 3, errors
    assert any("rate-limit store failed" in line for line in server.log)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_sighup_reloads_the_keys_file(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys.json")
    with serve("--api-keys", str(keys)) as (port, server):
        assert post(port) == 200
        assert post(port, {"X-API-Key": "other"}) == 401
        write_keys(keys, revoked=True)
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15  # the signal is handled between two requests
        while post(port) != 403:
            assert time.monotonic() < deadline, "the keys file was not reloaded"
            time.sleep(0.05)
        keys.write_text("{broken")
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not any("was not reloaded" in line for line in server.log):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "no log line for the failed reload"
            time.sleep(0.05)
        assert post(port) == 403  # the keys loaded before are kept
        assert server.poll() is None
