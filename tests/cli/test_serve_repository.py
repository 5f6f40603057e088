"""``batchkit serve --model-repository DIR`` and ``batchkit serve model.onnx``: real
subprocesses called with the stock tritonclient.http."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchkit.__main__ import main

from ..support import model_files as mf
from .test_serve import free_port

pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("tritonclient.grpc.model_config_pb2")
httpclient = pytest.importorskip("tritonclient.http")


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-W", "error", "-m", "batchkit", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # uvicorn logs this line once it listens
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"the server exited: {proc.wait()}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        if proc.stderr is not None:
            proc.stderr.close()


def infer_mlp(client: Any, name: str, x: np.ndarray[Any, Any]) -> Any:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(name, [tensor])


@pytest.mark.timeout(90)
def test_serve_a_model_repository_lazily(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    mf.onnx_mlp(root / "mlp" / "1" / "model.onnx")
    mf.write_config(root / "mlp", "pbtxt", mf.PBTXT_MLP, "mlp")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    (root / "broken" / "config.pbtxt").write_text("max_batch_size: 4\n")
    auth = {"Authorization": "Bearer t0ken"}
    with serving(
        "--model-repository", str(root), "--load", "lazy", env={"BATCHKIT_ADMIN_TOKEN": "t0ken"}
    ) as url:
        client = httpclient.InferenceServerClient(url)
        index = {e["name"]: e for e in client.get_model_repository_index(headers=auth)}
        assert index["mlp"]["reason"] == "not loaded yet: the first request loads it"
        assert "not a readable ONNX model" in index["broken"]["reason"]
        x = np.ones((3, 4), np.float32)
        np.testing.assert_allclose(
            infer_mlp(client, "mlp", x).as_numpy("y"),
            mf.mlp_reference(x),
            rtol=1e-6,
        )
        index = {e["name"]: e for e in client.get_model_repository_index(headers=auth)}
        assert index["mlp"] == {"name": "mlp", "version": "1", "state": "READY"}
        assert not client.is_model_ready("broken")
        client.close()


@pytest.mark.timeout(90)
def test_serve_one_onnx_file(tmp_path: Path) -> None:
    path = mf.onnx_mlp(tmp_path / "classifier.onnx")
    with serving(str(path)) as url:
        client = httpclient.InferenceServerClient(url)
        assert client.is_model_ready("classifier")
        assert client.get_model_metadata("classifier")["versions"] == ["1"]
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_allclose(
            infer_mlp(client, "classifier", x).as_numpy("y"),
            mf.mlp_reference(x),
            rtol=1e-6,
        )
        client.close()


def test_bad_repository_arguments_say_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit, match="is not a folder"):
        main(["serve", "--model-repository", str(tmp_path / "nowhere"), "--port", "1"])
    with pytest.raises(SystemExit, match="not both"):
        main(["serve", "m:x", "--model-repository", str(tmp_path), "--port", "1"])
    with pytest.raises(SystemExit, match="poll must be"):
        main(["serve", "--model-repository", str(tmp_path), "--poll-repository", "0"])
    with pytest.raises(SystemExit):
        main(["serve", "--model-repository", str(tmp_path), "--load", "later"])
    assert "invalid choice: 'later'" in capsys.readouterr().err
