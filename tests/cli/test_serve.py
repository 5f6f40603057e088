"""The ``batchkit`` command: ``batchkit serve`` resolves its target and runs uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit.__main__ import main
from batchkit._cli._serve import app_for
from batchkit.asgi import KServeApp, ServedModel

pytest.importorskip("uvicorn")


@pytest.fixture
def target_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "served_here.py").write_text(
        textwrap.dedent(
            """
            from batchkit import BatchedModel
            from batchkit.asgi import KServeApp, ServedModel

            def double(xs):
                return [x * 2 for x in xs]

            model = BatchedModel(double, name="double")
            several = {"a": BatchedModel(double, name="a"), "b": BatchedModel(double, name="b")}
            served = ServedModel(model, name="renamed")
            app = KServeApp([model], metrics=False)

            async def raw_app(scope, receive, send):
                pass

            not_a_model = 3
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "served_here"


def test_targets_of_every_kind(target_module: str) -> None:
    app = app_for(f"{target_module}:model")
    assert [s.name for s in app.models] == ["double"]
    assert sorted(s.name for s in app_for(f"{target_module}:several").models) == ["a", "b"]
    assert [s.name for s in app_for(f"{target_module}:served").models] == ["renamed"]
    assert isinstance(app_for(f"{target_module}:app"), KServeApp)
    assert callable(app_for(f"{target_module}:raw_app"))
    assert [s.name for s in app_for(None).models] == ["demo"]


def test_bad_targets_say_what_is_wrong(target_module: str) -> None:
    with pytest.raises(ConfigurationError, match=r"not_a_model|3"):
        app_for(f"{target_module}:not_a_model")
    with pytest.raises(ConfigurationError, match="MODULE:ATTR"):
        app_for("no-colon")
    with pytest.raises(SystemExit):
        main(["serve", "served_missing_module:x", "--port", "1"])


def test_the_cli_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "serve" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(60)
def test_batchkit_serve_with_no_argument_serves_the_demo_model() -> None:
    import numpy as np
    import tritonclient.http as httpclient

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "batchkit", "serve", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # uvicorn logs this line once it listens
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited: {proc.wait()}")
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_ready()
            inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(np.ones((1, 16), np.float32))
            assert client.infer("demo", [inp]).as_numpy("OUTPUT0").tolist() == [[3.0] * 16]
        finally:
            client.close()
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        rest = proc.stderr.read() if proc.stderr is not None else ""
        if proc.stderr is not None:
            proc.stderr.close()
    assert "Application shutdown complete" in rest


def test_served_model_refuses_a_non_model() -> None:
    with pytest.raises(ConfigurationError, match="BatchedModel"):
        ServedModel(3)  # type: ignore[arg-type]
    model = BatchedModel(lambda xs: xs, name="m")
    with pytest.raises(ConfigurationError, match="'/'"):
        ServedModel(model, name="a/b")


def test_grpc_port_needs_a_kserve_app(target_module: str) -> None:
    with pytest.raises(SystemExit, match="gRPC serves a KServeApp"):
        main(["serve", f"{target_module}:raw_app", "--port", "1", "--grpc-port", "0"])


@pytest.mark.timeout(60)
def test_a_grpc_port_in_use_stops_the_server_with_the_reason() -> None:
    pytest.importorskip("grpc_health")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        grpc_port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-m", "batchkit", "serve", "--port",
             str(free_port()), "--grpc-port", str(grpc_port)],
            capture_output=True, text=True, timeout=50,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    assert proc.returncode != 0
    assert f"cannot serve gRPC on 127.0.0.1:{grpc_port}" in proc.stderr
    assert "Application startup failed" in proc.stderr


@pytest.mark.timeout(60)
def test_batchkit_serve_grpc_port_serves_the_demo_model_over_grpc() -> None:
    import numpy as np

    grpcclient = pytest.importorskip("tritonclient.grpc")
    grpc_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "batchkit", "serve", "--port", str(free_port()),
         "--grpc-port", str(grpc_port), "--grpc-max-message-size", "1000"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Uvicorn running on" in line:
                break
            if "batchkit gRPC running on" in line:
                assert f"127.0.0.1:{grpc_port}" in line
        else:
            pytest.fail(f"the server exited: {proc.wait()}")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        try:
            assert client.is_server_ready()
            inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(np.ones((1, 16), np.float32))
            assert client.infer("demo", [inp]).as_numpy("OUTPUT0").tolist() == [[3.0] * 16]
            big = grpcclient.InferInput("INPUT0", [1, 300], "FP32")  # 1,200 bytes > 1,000
            big.set_data_from_numpy(np.ones((1, 300), np.float32))
            with pytest.raises(grpcclient.InferenceServerException, match="larger than max"):
                client.infer("demo", [big])
        finally:
            client.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        if proc.stderr is not None:
            proc.stderr.read()
            proc.stderr.close()
