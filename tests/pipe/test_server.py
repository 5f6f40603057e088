"""The pipe server, driven as a real subprocess through its stdin, stdout, stderr and signals.

No test orders events with a timer: the model under test waits on a gate the test opens, and
the test waits for the server's own log lines ("input paused", "reading no more input").
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit.pipe import serve

ROOT = Path(__file__).resolve().parents[2]
TARGETS = "tests.support.pipe_targets"


class Server:
    """A ``batchkit pipe`` child: send lines, read responses, watch its log, open its gate."""

    def __init__(self, target: str, *args: str, gate: bool = False, backend: str = "asyncio"):
        env = dict(os.environ)
        pass_fds: tuple[int, ...] = ()
        self._gate_w: int | None = None
        if gate:
            gate_r, self._gate_w = os.pipe()
            env["BATCHKIT_TEST_GATE_FD"] = str(gate_r)
            pass_fds = (gate_r,)
        command = [sys.executable, "-m", "batchkit", "pipe", f"{TARGETS}:{target}", *args]
        self.proc = subprocess.Popen(
            [*command, "--backend", backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
            pass_fds=pass_fds,
        )
        for fd in pass_fds:
            os.close(fd)
        self.log: list[str] = []
        self._log_lines: queue.Queue[str | None] = queue.Queue()
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.log.append(line)
            self._log_lines.put(line)
        self._log_lines.put(None)

    def wait_for_log(self, text: str) -> str:
        """Return the first log line (from now on) containing ``text``; fail at the child's end."""
        while True:
            line = self._log_lines.get(timeout=30)
            if line is None:
                raise AssertionError(f"the server exited without logging {text!r}: {self.log}")
            if text in line:
                return line

    def send(self, *lines: bytes | str | dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(_line(x) for x in lines))
        self.proc.stdin.flush()

    def send_in_thread(self, lines: list[bytes], *, close: bool = True) -> threading.Thread:
        """Write ``lines`` from a thread (it may block on a full pipe), then end the input."""

        def write() -> None:
            assert self.proc.stdin is not None
            try:
                for line in lines:
                    self.proc.stdin.write(line)
                    self.written += 1
                self.proc.stdin.flush()
                if close:
                    self.proc.stdin.close()
            except BrokenPipeError:
                pass

        self.written = 0
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    def close_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def response(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.endswith(b"\n"), f"the output ended: {line!r}; log: {''.join(self.log)}"
        obj: dict[str, Any] = json.loads(line)
        return obj

    def responses(self, n: int) -> list[dict[str, Any]]:
        return [self.response() for _ in range(n)]

    def rest_of_output(self) -> bytes:
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def open_gate(self) -> None:
        assert self._gate_w is not None
        os.write(self._gate_w, b"x")

    def wait(self) -> int:
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        self._stderr_thread.join(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self._gate_w is not None:
            os.close(self._gate_w)
            self._gate_w = None


def _line(x: bytes | str | dict[str, Any]) -> bytes:
    if isinstance(x, dict):
        return json.dumps(x).encode() + b"\n"
    if isinstance(x, str):
        return x.encode() + b"\n"
    return x


@pytest.fixture
def start() -> Iterator[Any]:
    """Start servers; each is killed (by its handle) and reaped at teardown if still running."""
    servers: list[Server] = []

    def start(target: str, *args: str, **kwargs: Any) -> Server:
        server = Server(target, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def by_id(responses: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    ids = Counter(json.dumps(r["id"]) for r in responses)
    duplicated = [i for i, n in ids.items() if n > 1]
    assert not duplicated, f"answered more than once: {duplicated}"
    return {r["id"]: r for r in responses}


# -- many lines in flight ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_thousands_of_concurrent_lines_are_each_answered_once_with_their_output(
    start: Any, backend: str
) -> None:
    rng = random.Random(5)
    server = start("double", "--max-in-flight", "4096", backend=backend)
    requests: dict[Any, dict[str, Any]] = {}
    lines = []
    for n in range(3000):
        request: dict[str, Any] = {"id": f"r{n}" if n % 2 else n, "input": rng.randint(-999, 999)}
        if rng.random() < 0.7:
            request["priority"] = rng.choice([rng.randint(-5, 5), rng.uniform(-5, 5)])
        if rng.random() < 0.5:
            request["timeout"] = rng.choice([0, 0.001, 30])
        requests[request["id"]] = request
        lines.append(_line(request))
    writer = server.send_in_thread(lines, close=False)
    answered = by_id(server.responses(len(requests)))
    writer.join(timeout=30)
    assert answered.keys() == requests.keys()
    expired = 0
    for id_, response in answered.items():
        request = requests[id_]
        if "error" in response:  # only a call with a short timeout may expire
            assert response["error"]["type"] == "DeadlineExceeded", response
            assert request.get("timeout") in (0, 0.001), (request, response)
            expired += 1
        else:
            assert response == {"id": id_, "output": request["input"] * 2, "version": "1"}
    server.send({"id": "stats", "op": "stats"})
    stats = server.response()["stats"]
    model = stats["models"]["double"]
    assert model["completed"] + model["expired"] == len(requests)
    assert model["expired"] == expired
    assert model["mean_batch_size"] > 1  # lines in flight together were batched
    assert stats["pipe"]["lines"] == len(requests) + 1
    server.close_input()
    assert server.rest_of_output() == b""
    assert server.wait() == 0


def wait_for_a_running_batch(server: Server) -> None:
    """Ask for statistics until the gated model runs a batch (round trips, no timer)."""
    for _ in range(1000):
        server.send({"id": "stats", "op": "stats"})
        if server.response()["stats"]["models"]["gated"]["in_flight_batches"] == 1:
            return
    raise AssertionError("no batch started")


def test_priorities_order_a_backlog(start: Any) -> None:
    server = start("gated", gate=True)
    # The first item holds the model at the gate while the others queue up behind it.
    server.send({"id": "first", "input": 0})
    wait_for_a_running_batch(server)
    server.send(*({"id": n, "input": n, "priority": -n} for n in range(1, 6)))
    server.send({"id": "ping", "op": "ping"})
    assert server.response()["id"] == "ping"
    server.open_gate()
    order = [r["id"] for r in server.responses(6)]
    assert order == ["first", 5, 4, 3, 2, 1]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cancel_request_withdraws_a_line_in_flight(start: Any, backend: str) -> None:
    server = start("gated", gate=True, backend=backend)
    server.send({"id": "held", "input": 0})  # holds the model at the gate
    wait_for_a_running_batch(server)
    server.send({"id": "queued", "input": 1}, {"id": "kept", "input": 2})
    for _ in range(1000):  # until both are queued in the engine
        server.send({"id": "stats", "op": "stats"})
        if server.response()["stats"]["models"]["gated"]["submitted"] == 3:
            break
    server.send({"id": "c1", "op": "cancel", "target": "queued"})
    answered = by_id(server.responses(2))
    assert answered["c1"] == {"id": "c1", "cancelled": True}
    assert answered["queued"]["error"] == {
        "type": "Cancelled",
        "message": "cancelled by a cancel request",
    }
    server.send({"id": "c2", "op": "cancel", "target": "queued"})  # answered already
    assert server.response() == {"id": "c2", "cancelled": False}
    server.open_gate()
    answered = by_id(server.responses(2))
    assert answered == {
        "held": {"id": "held", "output": 0, "version": "1"},
        "kept": {"id": "kept", "output": 2, "version": "1"},
    }
    server.send({"id": "s", "op": "stats"})
    stats = server.response()["stats"]["models"]["gated"]
    computed = sum(int(size) * n for size, n in stats["batch_sizes"].items())
    assert (computed, stats["cancelled"]) == (2, 1)  # "queued" never reached the model
    server.close_input()
    assert server.wait() == 0


def test_a_cancel_request_right_behind_its_target_cancels_it(start: Any) -> None:
    server = start("gated", gate=True)  # the gate never opens: only cancelling answers "a"
    server.send({"id": "a", "input": 0}, {"id": "c", "op": "cancel", "target": "a"})
    answered = by_id(server.responses(2))
    assert answered["c"] == {"id": "c", "cancelled": True}
    assert answered["a"]["error"]["type"] == "Cancelled"
    server.close_input()
    assert server.wait() == 0


# -- bad input ------------------------------------------------------------------------------


def test_garbage_and_damaged_lines_get_one_error_each_and_the_server_goes_on(start: Any) -> None:
    server = start("several", "--max-line-bytes", "4096")
    rng = random.Random(7)
    cases: list[tuple[bytes, Any, str | None]] = [  # line, id in the answer, error type
        (b"not json", None, "InvalidJSON"),
        (b'{"id": 7, "model": "double", "input": [1,', 7, "InvalidJSON"),  # truncated
        (b'{"id": "t", "inp', "t", "InvalidJSON"),
        (b'{"model": "double", "input": 1, "id": 8', None, "InvalidJSON"),  # id not first
        (b"\xff\xfe{}", None, "InvalidJSON"),
        (b"[1, 2]", None, "InvalidRequest"),
        (b"null", None, "InvalidRequest"),
        (b'"id"', None, "InvalidRequest"),
        (b'{"model": "double", "input": 1}', None, "InvalidRequest"),
        (b'{"id": [1], "model": "double", "input": 1}', None, "InvalidRequest"),
        (b'{"id": true, "model": "double", "input": 1}', None, "InvalidRequest"),
        (b'{"id": 9, "input": 1}', 9, "InvalidRequest"),  # several models: name one
        (b'{"id": 10, "model": "nope", "input": 1}', 10, "UnknownModel"),
        (b'{"id": 11, "model": "double", "input": 1, "priorty": 1}', 11, "InvalidRequest"),
        (b'{"id": 12, "model": "double", "input": 1, "priority": "high"}', 12, "InvalidRequest"),
        (b'{"id": 13, "model": "double", "input": 1, "timeout": -1}', 13, "InvalidRequest"),
        (b'{"id": 14, "model": "double"}', 14, "InvalidRequest"),
        (b'{"id": 15, "op": "reboot"}', 15, "InvalidRequest"),
        (b'{"id": 19, "op": "cancel"}', 19, "InvalidRequest"),
        (b'{"id": 20, "op": "cancel", "target": null}', 20, "InvalidRequest"),
        (
            b'{"id": 16, "model": "double", "tensor": {"dtype": "float32", "shape": [2, 2],'
            b' "data": [1, 2, 3]}}',
            16,
            "InvalidTensor",
        ),
        (
            b'{"id": 17, "model": "double", "tensor": {"dtype": "float32", "shape": [2],'
            b' "data": "AAAA"}}',
            17,
            "InvalidTensor",
        ),
        (b'{"id": 18, "model": "double", "input": "' + b"x" * 5000 + b'"}', 18, "LineTooLong"),
        (b"y" * 10_000, None, "LineTooLong"),
    ]
    lines: list[bytes] = []
    expected: list[tuple[Any, str | None, Any]] = []  # (id, error type, output)
    for n in range(300):
        if n % 3 == 0:
            lines.append(_line({"id": f"ok{n}", "model": "double", "input": n}))
            expected.append((f"ok{n}", None, 2 * n))
        elif n % 3 == 1 and n // 3 < len(cases):
            line, id_, error = cases[n // 3]
            lines.append(line + b"\n")
            expected.append((id_, error, None))
        else:  # random bytes: never a newline, never blank
            junk = bytes(
                rng.choice(b'{}[]":,0123456789abc\x00\xff ') for _ in range(rng.randint(1, 60))
            )
            lines.append(b"#" + junk + b"\n")
            expected.append((None, "InvalidJSON", None))
    lines.append(b"\n   \n\t\r\n")  # blank lines are skipped, not answered
    lines.append(b'{"id": "last", "model": "double", "input": 21}')  # no final newline
    expected.append(("last", None, 42))
    server.send_in_thread(lines)
    responses = server.responses(len(expected))
    assert server.rest_of_output() == b""  # exactly one response per line
    assert server.wait() == 0
    valid = by_id([r for r in responses if r["id"] is not None])
    for id_, error, output in expected:
        if id_ is None:
            continue
        if error is None:
            assert valid[id_] == {"id": id_, "output": output, "version": "1"}
        else:
            assert valid[id_]["error"]["type"] == error, valid[id_]
    anonymous = Counter(r["error"]["type"] for r in responses if r["id"] is None)
    assert anonymous == Counter(e for i, e, _ in expected if i is None)


def test_model_errors_fail_only_the_items_they_concern(start: Any) -> None:
    server = start("faulty")
    server.send(
        {"id": "ok", "input": 1},
        {"id": "neg", "input": -1},
        {"id": "boom", "input": "boom"},
        {"id": "ok2", "input": 2},
    )
    answered = by_id(server.responses(4))
    assert answered["ok"] == {"id": "ok", "output": 2, "version": "7"}
    assert answered["ok2"] == {"id": "ok2", "output": 3, "version": "7"}
    assert answered["neg"]["error"] == {"type": "ValueError", "message": "negative: -1"}
    boom = answered["boom"]["error"]
    assert boom["type"] == "ModelError"
    assert boom["version"] == "7"
    assert "boom in the batch" in boom["message"]
    server.close_input()
    assert server.wait() == 0


def test_output_printed_by_the_model_goes_to_stderr_not_to_the_protocol(start: Any) -> None:
    server = start("printer")
    server.send({"id": 1, "input": "a"})
    server.close_input()
    assert server.response() == {"id": 1, "output": {"item": "a", "stdin": ""}, "version": "1"}
    assert server.rest_of_output() == b""
    assert server.wait() == 0
    server.stop()  # joins the stderr reader
    log = "".join(server.log)
    assert "print() from the model" in log
    assert "os.write(1) from the model" in log


def test_tensors_as_json_arrays_and_as_base64(start: Any) -> None:
    np = pytest.importorskip("numpy")
    import base64

    server = start("tensors")
    data = np.arange(6, dtype="<f4").reshape(2, 3)
    server.send(
        {"id": "list", "tensor": {"dtype": "float32", "shape": [2, 3], "data": data.tolist()}},
        {"id": "flat", "tensor": {"dtype": "int16", "shape": [3], "data": [1, 2, 3]}},
        {
            "id": "b64",
            "tensor": {
                "dtype": "float32",
                "shape": [2, 3],
                "data": base64.b64encode(data.tobytes()).decode(),
            },
        },
        {"id": "json", "input": 4},
    )
    answered = by_id(server.responses(4))
    assert answered["list"]["tensor"] == {
        "dtype": "float32",
        "shape": [2, 3],
        "data": [0.0, 2.0, 4.0, 6.0, 8.0, 10.0],
    }
    assert answered["flat"]["tensor"] == {"dtype": "int16", "shape": [3], "data": [2, 4, 6]}
    b64 = answered["b64"]["tensor"]
    assert (b64["dtype"], b64["shape"]) == ("float32", [2, 3])
    out = np.frombuffer(base64.b64decode(b64["data"]), dtype="<f4").reshape(2, 3)
    assert (out == data * 2).all()
    assert answered["json"]["output"] == 8
    server.close_input()
    assert server.wait() == 0


# -- draining -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_end_of_input_drains_everything_in_flight_then_exits_0(start: Any, backend: str) -> None:
    server = start("gated", "--log-level", "debug", gate=True, backend=backend)
    server.send(*({"id": n, "input": n} for n in range(50)))
    server.close_input()
    server.wait_for_log("end of input: draining 50 requests")
    server.open_gate()
    answered = by_id(server.responses(50))
    assert answered == {n: {"id": n, "output": n, "version": "1"} for n in range(50)}
    assert server.rest_of_output() == b""
    assert server.wait() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_reading_and_drains_what_is_in_flight(start: Any, signum: int) -> None:
    server = start("gated", gate=True)
    server.send(*({"id": n, "input": n} for n in range(50)))
    server.send({"id": "ping", "op": "ping"})
    assert server.response()["id"] == "ping"  # every line before it has been read
    server.proc.send_signal(signum)
    server.wait_for_log("reading no more input; draining 50 requests")
    server.send({"id": "late", "input": 1})  # after the signal: never read
    server.open_gate()
    answered = by_id(server.responses(50))
    assert answered == {n: {"id": n, "output": n, "version": "1"} for n in range(50)}
    assert server.rest_of_output() == b""  # the late line got no answer: it was not read
    assert server.wait() == 0  # without end of input


@pytest.mark.parametrize("model", ["gated", "blocking"])  # async, and sync in a thread
def test_the_grace_period_bounds_the_drain(start: Any, model: str) -> None:
    server = start(model, "--grace", "0.2", gate=True)  # the gate never opens
    server.send(*({"id": n, "input": n} for n in range(20)))
    server.send({"id": "ping", "op": "ping"})
    assert server.response()["id"] == "ping"
    server.proc.send_signal(signal.SIGTERM)
    answered = by_id(server.responses(20))
    assert {r["error"]["type"] for r in answered.values()} == {"Cancelled"}
    assert answered.keys() == set(range(20))
    assert server.rest_of_output() == b""
    assert server.wait() == 1


@pytest.mark.parametrize("model", ["gated", "blocking"])
def test_a_batch_left_by_its_callers_does_not_hold_the_exit(start: Any, model: str) -> None:
    server = start(model, gate=True)  # the gate never opens: the batch never ends
    server.send({"id": 1, "input": 1, "timeout": 0.05})
    assert server.response()["error"]["type"] == "DeadlineExceeded"
    server.close_input()
    assert server.rest_of_output() == b""
    assert server.wait() == 0


def test_a_closed_output_stops_the_server(start: Any) -> None:
    server = start("double")
    assert server.proc.stdout is not None
    server.proc.stdout.close()
    server.send({"id": 1, "input": 1})
    assert server.wait() == 1
    server.stop()
    assert "the output was closed" in "".join(server.log)


# -- backpressure ---------------------------------------------------------------------------


@pytest.mark.parametrize("held_by", ["model", "output"])
def test_reading_pauses_at_max_in_flight(start: Any, held_by: str) -> None:
    """Input stops being read while max_in_flight lines are unanswered: the writer blocks.

    Either the model holds every item (a gate), or nobody reads the server's output, so its
    writes block once the pipe is full. Batches can then never exceed max_in_flight.
    """
    max_in_flight = 8
    server = start(
        "gated",
        "--max-in-flight",
        str(max_in_flight),
        "--log-level",
        "debug",
        gate=held_by == "model",
    )
    pad = "p" * 2000
    total = 2000  # 4 MB of requests: far more than any pipe buffer or read chunk holds
    lines = [_line({"id": n, "input": f"{n}{pad}"}) for n in range(total)]
    writer = server.send_in_thread([*lines, _line({"id": "stats", "op": "stats"})])
    server.wait_for_log(f"input paused: {max_in_flight} requests in flight")
    # The server now reads nothing until a response is written: the writer is stuck.
    assert writer.is_alive()
    assert server.written < total
    if held_by == "model":
        server.open_gate()
    responses = server.responses(total + 1)
    stats = by_id(responses).pop("stats")["stats"]
    assert by_id(responses).keys() == {*range(total), "stats"}
    assert all(r["output"] == f"{r['id']}{pad}" for r in responses if r["id"] != "stats")
    assert stats["pipe"]["peak_in_flight"] == max_in_flight
    sizes = [int(size) for size in stats["models"]["gated"]["batch_sizes"]]
    assert max(sizes) <= max_in_flight
    writer.join(timeout=30)
    assert server.wait() == 0


# -- the command line -----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchkit", *args],
        cwd=ROOT,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.support.pipe_targets", "expected MODULE:ATTR"),
        ("tests.no_such_module:x", "no module named 'tests.no_such_module'"),
        ("tests.support.pipe_targets:missing", "has no attribute 'missing'"),
        ("tests.support.pipe_targets:os", "expected a BatchedModel"),
    ],
)
def test_a_bad_target_exits_2_with_the_reason_on_stderr(target: str, message: str) -> None:
    out = run_cli("pipe", target)
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stdout == ""


def test_the_cli_needs_a_subcommand_and_documents_pipe() -> None:
    assert run_cli().returncode == 2
    help_text = run_cli("pipe", "--help")
    assert help_text.returncode == 0
    assert "--max-in-flight" in help_text.stdout


# -- serve() in this process ------------------------------------------------------------------


def _double(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


@pytest.mark.anyio
async def test_serve_in_this_event_loop_over_pipes() -> None:
    model = BatchedModel(_double, name="double")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        lines = [_line({"id": n, "input": n}) for n in range(100)]
        os.write(in_w, b"".join([*lines, b'{"id": "p", "op": "ping"}\n']))
        os.close(in_w)
        assert await serve(model, input_fd=in_r, output_fd=out_w) == 0
        os.close(out_w)
        with os.fdopen(out_r, "rb") as out:
            responses = [json.loads(line) for line in out]
    finally:
        os.close(in_r)
    answered = by_id(responses)
    assert answered.pop("p")["pong"]["models"] == {"double": "1"}
    assert answered == {n: {"id": n, "output": 2 * n, "version": "1"} for n in range(100)}


@pytest.mark.anyio
async def test_serve_reads_and_writes_regular_files(tmp_path: Path) -> None:
    requests, responses = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_bytes(b"".join(_line({"id": n, "input": n}) for n in range(20)))
    with requests.open("rb") as src, responses.open("wb") as dst:
        status = await serve(
            {"d": BatchedModel(_double)}, input_fd=src.fileno(), output_fd=dst.fileno()
        )
    assert status == 0
    answered = by_id([json.loads(line) for line in responses.read_bytes().splitlines()])
    assert answered == {n: {"id": n, "output": 2 * n, "version": "1"} for n in range(20)}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_in_flight": 0}, "max_in_flight must be an int >= 1, got 0"),
        ({"max_line_bytes": 1.5}, "max_line_bytes must be an int >= 1, got 1.5"),
        ({"grace": -1}, "grace must be a number of seconds >= 0, got -1"),
    ],
)
async def test_serve_checks_its_settings(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await serve(BatchedModel(_double), **options)
    with pytest.raises(ConfigurationError, match="holds no models"):
        await serve({})


# -- the documentation ----------------------------------------------------------------------


def test_the_shell_example_in_the_docs_runs_as_shown() -> None:
    text = (ROOT / "docs" / "pipe.md").read_text()
    block = re.search(r"```sh\n\$ (.*?)\n(\{.*?)```", text, re.S)
    assert block is not None
    command, shown = block.group(1).replace("\\\n", " "), block.group(2)
    command = command.replace("| batchkit pipe", f"| {sys.executable} -m batchkit pipe")
    out = subprocess.run(
        ["sh", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    # Responses come in completion order: compare them as a set of lines.
    assert sorted(out.stdout.splitlines()) == sorted(shown.splitlines())
    assert "(pipe.md)" in (ROOT / "docs" / "index.md").read_text()
