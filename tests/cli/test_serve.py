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
