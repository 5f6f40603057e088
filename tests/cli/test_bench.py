"""``batchkit bench`` against a live ``batchkit serve`` on loopback, checked through its JSON."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("tritonclient.http")
np = pytest.importorskip("numpy")

SERVED = textwrap.dedent(
    """
    import time

    from batchkit import BatchedModel
    from batchkit.asgi import KServeApp, ServedModel, Tensor

    def double(rows):
        return [row * 2 for row in rows]

    def slow(rows):
        time.sleep(0.02)
        return [row for row in rows]

    def mixed(items):
        return [{"SUM": item["A"] + item["B"].astype("int64"), "NAME": item["S"]} for item in items]

    mixed_signature = {
        "inputs": [Tensor("A", "INT64", [2]), Tensor("B", "INT32", [2]), Tensor("S", "BYTES", [1])],
        "outputs": [Tensor("SUM", "INT64", [2]), Tensor("NAME", "BYTES", [1])],
    }
    models = [
        ServedModel(BatchedModel(double, name="double", max_batch_size=64)),
        # One batch at a time, at most one item queued: concurrent callers get 503s.
        ServedModel(BatchedModel(slow, name="tight", max_batch_size=1, max_queue_size=1)),
        ServedModel(BatchedModel(mixed, name="mixed"), **mixed_signature),
    ]
    """
)


def pythonpath(where: Path) -> str:
    """``where`` first, then the caller's PYTHONPATH (a checkout run without installing)."""
    return os.pathsep.join(p for p in (str(where), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Run ``batchkit serve --grpc-port 0`` on free loopback ports; yield the HTTP and gRPC
    ``host:port``."""
    where = tmp_path_factory.mktemp("served")
    (where / "bench_models.py").write_text(SERVED)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "serve", "bench_models:models", "--port", str(port),
         "--grpc-port", "0"],
        cwd=where,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath(where)},
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        grpc = ""
        for line in proc.stderr:  # the gRPC line, then uvicorn's once HTTP listens
            if "batchkit gRPC running on" in line:
                grpc = line.split("running on ")[1].split()[0]
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited: {proc.wait()}")
        # drain the rest (access log lines), so the server never blocks writing it
        drain = threading.Thread(target=proc.stderr.read, name="stderr-drain")
        drain.start()
        yield f"127.0.0.1:{port}", grpc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        drain.join(10)
        proc.stderr.close()


@pytest.fixture(scope="module")
def server(served: tuple[str, str]) -> str:
    """The HTTP ``host:port`` of the served models."""
    return served[0]


def bench(tmp_path: Path, *args: str, timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    """Run ``batchkit bench ARGS --json``; return its exit status, the JSON and stderr."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "batchkit", "bench", *args, "--quiet", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, report, proc.stdout + proc.stderr


def check_step(step: dict[str, Any]) -> None:
    """The figures of one step are consistent with each other."""
    assert step["sent"] == step["ok"] + step["failed"] == step["ok"] + sum(step["errors"].values())
    lat = step["latency"]
    if step["ok"]:
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert step["throughput"] == pytest.approx(step["ok"] / step["duration"])


def test_a_healthy_server_closed_loop(server: str, tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, server, "--model", "double", "--concurrency", "1,8", "--duration", "1",
        "--warmup", "0.2",
    )  # fmt: skip
    assert status == 0, output
    assert report["model"] == "double" and report["mode"] == "closed"
    assert [s["concurrency"] for s in report["steps"]] == [1, 8]
    for step in report["steps"]:
        check_step(step)
        assert step["failed"] == 0 and step["ok"] > 0
        assert step["server_batch_size"] >= 1
    assert report["steps"][1]["server_batch_size"] > 1  # 8 in flight share batches
    assert report["failed"] == 0


def test_json_tensors_a_request_count_and_every_input_kind(server: str, tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, server, "-m", "mixed", "--concurrency", "4", "--requests", "200",
        "--json-tensors", "--warmup", "0",
    )  # fmt: skip
    assert status == 0, output
    (step,) = report["steps"]
    check_step(step)
    assert step["sent"] == step["ok"] == 200


@pytest.mark.parametrize("kind", ["json", "npz"])
def test_inputs_from_a_file(server: str, tmp_path: Path, kind: str) -> None:
    values = {"A": [[1, 2]], "B": [[3, 4]], "S": [["x"]]}
    if kind == "json":
        path = tmp_path / "inputs.json"
        path.write_text(json.dumps(values))
    else:
        path = tmp_path / "inputs.npz"
        np.savez(path, A=np.array([[1, 2]]), B=np.array([[3, 4]]), S=np.array([[b"x"]]))
    status, report, output = bench(
        tmp_path, server, "-m", "mixed", "--concurrency", "2", "--requests", "20",
        "--input-file", str(path), "--warmup", "0",
    )  # fmt: skip
    assert status == 0, output
    assert report["steps"][0]["ok"] == 20


def test_rejections_are_counted_and_fail_the_run(server: str, tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, server, "-m", "tight", "--concurrency", "16", "--duration", "1", "--warmup", "0",
    )  # fmt: skip
    assert status == 1, output
    (step,) = report["steps"]
    check_step(step)
    assert step["errors"]["reject"] > 0
    assert step["errors"]["timeout"] == step["errors"]["other"] == 0
    assert "503" in step["error_samples"]["reject"]
    assert step["ok"] > 0
    assert report["failed"] == step["errors"]["reject"]
    assert "request(s) failed" in output


def test_open_loop_holds_the_target_rate(server: str, tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, server, "-m", "double", "--rate", "300", "--duration", "2", "--warmup", "0.3",
    )  # fmt: skip
    assert status == 0, output
    (step,) = report["steps"]
    check_step(step)
    assert report["mode"] == "open" and step["target_rate"] == 300
    assert step["sent"] == 600
    assert abs(step["achieved_rate"] - 300) / 300 < 0.10


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, f"127.0.0.1:{free_port()}", "-m", "x", "--duration", "1"
    )
    assert status == 2
    assert "cannot read the metadata of model 'x'" in output
    assert report == {}


def test_an_unknown_model_is_a_clear_error(server: str, tmp_path: Path) -> None:
    status, _, output = bench(tmp_path, server, "-m", "nope", "--duration", "1")
    assert status == 2
    assert "'nope'" in output


@pytest.mark.parametrize(
    "args",
    [
        ["--duration", "1"],
        ["127.0.0.1:1", "-m", "x", "--concurrency", "0"],
        ["127.0.0.1:1", "-m", "x", "--concurrency", "a,b"],
        ["127.0.0.1:1", "-m", "x", "--rate", "-5"],
        ["127.0.0.1:1", "-m", "x", "--rate", "5", "--concurrency", "2"],
        ["127.0.0.1:1", "-m", "x", "--duration", "0"],
    ],
)
def test_bad_arguments(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batchkit", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "batchkit bench" in proc.stderr or "usage:" in proc.stderr


def test_compare_serves_the_demo_model_twice(tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, "--compare", "--concurrency", "1,16", "--duration", "1", "--warmup", "0.2",
    )  # fmt: skip
    assert status == 0, output
    batched, unbatched = report["compare"]["batched"], report["compare"]["unbatched"]
    assert [s["model"] for s in batched] == ["demo", "demo"]
    assert [s["model"] for s in unbatched] == ["demo_unbatched", "demo_unbatched"]
    for step in batched + unbatched:
        check_step(step)
        assert step["failed"] == 0
    assert unbatched[1]["server_batch_size"] == 1.0
    assert batched[1]["server_batch_size"] > 1
    # 16 in flight on a model costing 2 ms per batch: batching must pay off.
    assert batched[1]["throughput"] > 1.5 * unbatched[1]["throughput"]
    assert "speedup" in output


def test_plot(server: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    status, _, output = bench(
        tmp_path, server, "-m", "double", "--concurrency", "1,2", "--requests", "20",
        "--warmup", "0", "--plot", str(png),
    )  # fmt: skip
    assert status == 0, output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpc_closed_loop_with_the_batch_size_from_metrics(
    served: tuple[str, str], tmp_path: Path
) -> None:
    pytest.importorskip("tritonclient.grpc")
    http, grpc = served
    status, report, output = bench(
        tmp_path, grpc, "--protocol", "grpc", "-m", "double", "--concurrency", "1,8",
        "--requests", "200", "--warmup", "0", "--metrics-url", http,
    )  # fmt: skip
    assert status == 0, output
    for step in report["steps"]:
        check_step(step)
        assert step["ok"] == 200 and step["failed"] == 0
        assert step["server_batch_size"] >= 1
    status, report, output = bench(
        tmp_path, grpc, "--protocol", "grpc", "-m", "mixed", "--concurrency", "2",
        "--requests", "20", "--warmup", "0",
    )  # fmt: skip
    assert status == 0, output
    assert report["steps"][0]["ok"] == 20
    assert report["steps"][0]["server_batch_size"] is None  # no --metrics-url


def test_grpc_rejections_are_counted(served: tuple[str, str], tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    status, report, output = bench(
        tmp_path, served[1], "--protocol", "grpc", "-m", "tight", "--concurrency", "16",
        "--duration", "1", "--warmup", "0",
    )  # fmt: skip
    assert status == 1, output
    (step,) = report["steps"]
    check_step(step)
    assert step["errors"]["reject"] > 0
    assert step["errors"]["other"] == 0
    assert "UNAVAILABLE" in step["error_samples"]["reject"]


def test_grpc_refuses_json_tensors(tmp_path: Path) -> None:
    status, _, output = bench(
        tmp_path, "127.0.0.1:1", "--protocol", "grpc", "-m", "x", "--json-tensors"
    )
    assert status == 2
    assert "--json-tensors is for HTTP" in output


def test_compare_over_grpc(tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    status, report, output = bench(
        tmp_path, "--compare", "--protocol", "grpc", "--concurrency", "16", "--duration", "1",
        "--warmup", "0.2",
    )  # fmt: skip
    assert status == 0, output
    (batched,), (unbatched,) = report["compare"]["batched"], report["compare"]["unbatched"]
    for step in (batched, unbatched):
        check_step(step)
        assert step["failed"] == 0
    assert unbatched["server_batch_size"] == 1.0
    assert batched["server_batch_size"] > 1


# -- the URL, --plot, and the table on a narrow terminal ---------------------------------------


def bench_env(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchkit", "bench", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


def test_the_url_may_carry_a_scheme(server: str, tmp_path: Path) -> None:
    status, report, output = bench(
        tmp_path, f"http://{server}", "--model", "double", "--concurrency", "2",
        "--requests", "20", "--warmup", "0",
    )  # fmt: skip
    assert status == 0, output
    assert report["steps"][0]["ok"] == 20
    assert report["steps"][0]["server_batch_size"] is not None  # /metrics, over the same scheme


@pytest.mark.parametrize("scheme", ["", "http://", "https://"])
def test_an_unreachable_server_exits_2_with_one_line(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}127.0.0.1:{free_port()}"  # nothing listens there
    out = bench_env(tmp_path, url, "--model", "double", "--requests", "1", "--warmup", "0")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot read the metadata of model 'double' at {url}" in lines[0]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("bad url", "no valid host name or address"),
        ("ftp://127.0.0.1:8000", "the scheme must be http or https, got 'ftp'"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://127.0.0.1:8000/v2/models", "without a path"),
        ("http://user:pw@127.0.0.1:8000", "credentials"),
        ("http://:8000", "no valid host name"),
    ],
)
def test_an_invalid_url_exits_2_with_one_line(tmp_path: Path, url: str, message: str) -> None:
    out = bench_env(tmp_path, url, "--model", "double", "--requests", "1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_plot_without_matplotlib_fails_before_measuring(server: str, tmp_path: Path) -> None:
    shim = tmp_path / "no_matplotlib"
    (shim / "matplotlib").mkdir(parents=True)
    (shim / "matplotlib" / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    path = os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])
    out = bench_env(
        tmp_path, server, "--model", "double", "--concurrency", "1", "--duration", "20",
        "--plot", "out.png",
        "--json", "out.json", env={"PYTHONPATH": path},
    )  # fmt: skip
    assert out.returncode == 2
    assert "--plot needs matplotlib" in out.stderr
    assert not (tmp_path / "out.json").exists()  # no step ran (it would take 20 s)


def run_on_a_terminal(tmp_path: Path, *args: str, columns: int) -> str:
    """Run ``batchkit bench ARGS`` with its stdout on a pseudo-terminal ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "bench", *args],
        stdout=slave,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # colours and cursor moves


def test_table_headers_fit_an_80_column_terminal(server: str, tmp_path: Path) -> None:
    pytest.importorskip("rich")
    out = run_on_a_terminal(
        tmp_path, server, "--model", "double", "--concurrency", "1,2", "--requests", "10",
        "--warmup", "0", "--quiet", columns=80,
    )  # fmt: skip
    assert all(len(line) <= 80 for line in out.splitlines()), out
    header = "in flight req/s p50 ms p90 ms p99 ms max ms reject timeout other server batch"
    assert set(header.split()) <= set(out.split()), out
    assert "\u2026" not in out  # nothing cut short with an ellipsis
