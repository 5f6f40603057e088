"""``batchkit serve`` as operators run it, in a real subprocess: logs (text and JSON), request ids,
SIGTERM draining and the bounded shutdown, ``--version`` (docs/operations.md)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..support.helpers import wait_for

pytest.importorskip("uvicorn")

TARGET = """
import time
from batchkit import BatchedModel

def broken(xs):
    raise ValueError("broken weights")

def slow_double(xs):
    time.sleep(0.3)
    return [x * 2 for x in xs]

failing = BatchedModel(broken, name="broken", max_batch_size=4)
slow = BatchedModel(slow_double, name="slow", max_batch_size=1)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, out: Path) -> None:
        self.proc, self.port, self.log, self.stdout = proc, port, log, out

    def text(self) -> str:
        """Return what the server wrote to stderr: every log line but the access lines."""
        return self.log.read_text()

    def out(self) -> str:
        """Return what it wrote to stdout: the access lines."""
        return self.stdout.read_text()

    def request(
        self, method: str, path: str, payload: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            body = None if payload is None else json.dumps(payload)
            conn.request(method, path, body, headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@contextmanager
def serve(tmp_path: Path, target: str, *flags: str) -> Iterator[Served]:
    (tmp_path / "ops_target.py").write_text(textwrap.dedent(TARGET))
    port = free_port()
    log = tmp_path / "stderr.log"
    out = tmp_path / "stdout.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-W", "error", "-m", "batchkit", "serve", target]
    with log.open("wb") as err, out.open("wb") as stdout:
        proc = subprocess.Popen(
            [*command, "--port", str(port), *flags],
            stdout=stdout,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )
    served = Served(proc, port, log, out)
    try:
        wait_for(lambda: "serving" in served.text() or proc.poll() is not None, 30)
        assert proc.poll() is None, served.text()
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # no drain
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def infer_body(*values: float) -> dict[str, Any]:
    n = len(values)
    return {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [n, 1], "data": values}]}


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "batchkit", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("batchkit ")


@pytest.mark.timeout(60)
def test_a_failing_model_is_logged_in_json_with_the_clients_request_id(tmp_path: Path) -> None:
    with serve(tmp_path, "ops_target:failing", "--log-format", "json", "--drain-delay", "0") as s:
        for i in range(3):
            status, headers, body = s.request(
                "POST",
                "/v2/models/broken/infer",
                infer_body(1.0),
                {"X-Request-ID": f"client-{i}"},
            )
            assert status == 500 and headers["x-request-id"] == f"client-{i}"
            assert b"the server log has the details" in body
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
    lines = [json.loads(line) for line in s.text().splitlines()]  # one object per line
    startup = [r for r in lines if r["message"].startswith("batchkit ")]
    assert startup and startup[0]["models"] == [{"name": "broken", "version": "1"}]
    assert "request_id" not in startup[0]  # not about a request
    assert startup[0]["addresses"] == [f"http://127.0.0.1:{s.port}"]
    failures = [r for r in lines if "exception" in r]
    assert len(failures) == 3  # one per batch: each request ran alone
    for i, record in enumerate(failures):
        assert record["level"] == "ERROR" and record["logger"] == "batchkit.asgi"
        assert record["request_id"] == f"client-{i}"
        assert (record["model"], record["version"], record["batch_size"]) == ("broken", "1", 1)
        assert "Traceback" in record["exception"]
        assert "ValueError: broken weights" in record["exception"]
    assert not [r for r in lines if r["logger"] == "batchkit.access"]  # those go to stdout
    access = [json.loads(line) for line in s.out().splitlines()]
    assert {r["logger"] for r in access} == {"batchkit.access"}
    assert [(r["status"], r["request_id"]) for r in access] == [
        (500, f"client-{i}") for i in range(3)
    ]
    assert all(r["method"] == "POST" and r["rows"] == 1 for r in access)


@pytest.mark.timeout(60)
def test_a_failing_model_is_logged_in_text_and_the_access_log_can_be_off(tmp_path: Path) -> None:
    flags = ("--no-access-log", "--drain-delay", "0")
    with serve(tmp_path, "ops_target:failing", *flags) as s:
        status, _, _ = s.request(
            "POST", "/v2/models/broken/infer", infer_body(1.0), {"X-Request-ID": "abc-123"}
        )
        assert status == 500
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
    text = s.text()
    assert text.count("Traceback (most recent call last)") == 1
    (line,) = [line for line in text.splitlines() if " ERROR " in line]
    assert "[abc-123]" in line and "model 'broken' version 1 failed on a batch of 1" in line
    assert "ValueError: broken weights" in text
    assert "batchkit.access" not in text and s.out() == ""
    assert "serving 'broken' (version 1) on http://127.0.0.1:" in text


@pytest.mark.timeout(90)
def test_sigterm_drains_then_finishes_or_fails_every_request_and_exits_0(tmp_path: Path) -> None:
    drain, timeout = 0.6, 0.6
    flags = ("--drain-delay", str(drain), "--shutdown-timeout", str(timeout))
    outcomes: list[tuple[float, int, bytes]] = []
    sent: list[threading.Event] = []

    def client(s: Served, x: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        try:
            conn.request("POST", "/v2/models/slow/infer", json.dumps(infer_body(x)))
            sent[int(x)].set()
            response = conn.getresponse()
            outcomes.append((x, response.status, response.read()))
        finally:
            conn.close()

    with serve(tmp_path, "ops_target:slow", "--log-format", "json", *flags) as s:
        threads = []
        sent.extend(threading.Event() for _ in range(7))
        for x in range(6):  # 6 x 0.3 s of work, one at a time: more than drain + timeout
            threads.append(threading.Thread(target=client, args=(s, float(x))))
            threads[-1].start()
        for x in range(6):
            assert sent[x].wait(10)
        s.proc.send_signal(signal.SIGTERM)
        killed = time.monotonic()
        ready, _, _ = s.request("GET", "/v2/health/ready")
        ready_after = time.monotonic() - killed
        assert ready == 503  # the first probe after SIGTERM
        assert s.request("GET", "/v2/health/live")[0] == 200
        threads.append(threading.Thread(target=client, args=(s, 6.0)))  # accepted while draining
        threads[-1].start()
        assert sent[6].wait(10)
        for thread in threads:
            thread.join(30)
        status = s.proc.wait(20)
        exited_after = time.monotonic() - killed
    assert status == 0
    assert len(outcomes) == 7  # every accepted request got an answer: none dropped
    ok = [x for x, code, _ in outcomes if code == 200]
    failed = [(x, body) for x, code, body in outcomes if code != 200]
    assert ok and failed
    for x, code, body in outcomes:
        if code == 200:
            assert json.loads(body)["outputs"][0]["data"] == [x * 2]
        else:
            assert code == 503
            assert "the server shut down before the model answered" in json.loads(body)["error"]
    lines = [json.loads(line) for line in s.text().splitlines()]
    messages = [r["message"] for r in lines]
    assert any(m.startswith("SIGTERM: draining for 0.6s") for m in messages)
    (abort,) = [r for r in lines if "shutdown timeout" in r["message"]]
    assert abort["level"] == "WARNING"
    assert f"{len(failed)} requests still waiting" in abort["message"]
    # exits once the batch running at the timeout ends (a thread cannot be interrupted)
    assert exited_after < drain + timeout + 0.3 + 5.0, exited_after
    print(f"ready 503 after {ready_after * 1000:.1f} ms; exit after {exited_after:.2f} s")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_skips_the_rest_of_the_drain(tmp_path: Path, second: int) -> None:
    with serve(tmp_path, "ops_target:slow", "--drain-delay", "600") as s:
        s.proc.send_signal(signal.SIGTERM)
        assert s.request("GET", "/v2/health/ready")[0] == 503
        assert s.request("POST", "/v2/models/slow/infer", infer_body(2.0))[0] == 200
        s.proc.send_signal(second)
        assert s.proc.wait(20) == 0


@pytest.mark.timeout(60)
def test_sigint_stops_without_a_drain(tmp_path: Path) -> None:
    with serve(tmp_path, "ops_target:slow", "--drain-delay", "600") as s:
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(20) == 0
    assert "draining" not in s.text()


@pytest.mark.timeout(60)
def test_bad_drain_settings_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ops_target.py").write_text(textwrap.dedent(TARGET))
    out = subprocess.run(
        [sys.executable, "-m", "batchkit", "serve", "ops_target:slow", "--drain-delay", "-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        },
    )
    assert out.returncode != 0 and "--drain-delay must be >= 0" in out.stderr


async def hammer(port: int, payload: bytes, n: int, connections: int = 32) -> list[int]:
    """Send ``n`` POSTs over ``connections`` keep-alive connections; return the statuses."""
    import asyncio

    head = (
        f"POST /v2/models/broken/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    statuses: list[int] = []
    left = iter(range(n))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in left:
                writer.write(head + payload)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                statuses.append(int(status_line.split()[1]))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


@pytest.mark.timeout(300)
def test_ten_thousand_failing_requests_write_a_bounded_number_of_tracebacks(
    tmp_path: Path,
) -> None:
    import asyncio

    flags = ("--log-format", "json", "--no-access-log", "--drain-delay", "0")
    with serve(tmp_path, "ops_target:failing", *flags) as s:
        payload = json.dumps(infer_body(1.0)).encode()
        statuses = asyncio.run(hammer(s.port, payload, 10_000))
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    assert statuses == [500] * 10_000
    records = [json.loads(line) for line in s.text().splitlines()]
    assert len([r for r in records if "exception" in r]) == 5  # the burst of the minute
