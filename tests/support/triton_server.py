"""A real Triton Inference Server for the tests: the ``tritonserver`` that nvidia-pytriton bundles.

``find_tritonserver()`` locates the binary (None without pytriton: the Triton tests skip);
``TritonServer`` writes a model repository of small Python-backend models, starts the server
on 127.0.0.1 (HTTP, gRPC and metrics on free ports), waits until it is ready, and stops it by
its PID. The Python backend's stub embeds this interpreter: it finds ``libpython`` through
``LD_LIBRARY_PATH`` (the interpreter's ``LIBDIR``) and this virtualenv (with numpy) through
``PATH``.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ("DATATYPES", "MODELS", "TritonServer", "find_tritonserver")

DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip


def find_tritonserver() -> Path | None:
    """Return pytriton's bundled package directory, or None when pytriton is not installed."""
    override = os.environ.get("BATCHKIT_PYTRITON_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "tritonserver" / "bin" / "tritonserver").exists() else None


# -- the models --------------------------------------------------------------------------------

_IDENTITY = """
import json
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.strings = config["input"][0]["data_type"] == "TYPE_STRING"

    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X")
            # DLPack passes every datatype as it is (BF16 included), but not strings.
            if self.strings:
                y = pb_utils.Tensor("Y", x.as_numpy())
            else:
                y = pb_utils.Tensor.from_dlpack("Y", x.to_dlpack())
            responses.append(pb_utils.InferenceResponse([y]))
        return responses
"""

_SCALE = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            k = pb_utils.get_input_tensor_by_name(r, "K").as_numpy()
            y = (x * k).astype(np.float32)
            s = y.sum(axis=1, keepdims=True).astype(np.float32)
            outputs = [pb_utils.Tensor("Y", y), pb_utils.Tensor("S", s)]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
"""

# Holds a request whose X is positive until the release file exists (the test's gate); reports
# the order it ran requests in, and the timeout each request carried (microseconds).
_SLOW = """
import itertools, json, os, time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.release = params["release_file"]["string_value"]
        self.started = params["started_file"]["string_value"]
        self.order = itertools.count()

    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            if (x > 0).any():
                open(self.started, "w").close()
                limit = time.monotonic() + 60
                while not os.path.exists(self.release) and time.monotonic() < limit:
                    time.sleep(0.005)
            order = np.full((x.shape[0], 1), next(self.order), np.int64)
            timeout = np.full((x.shape[0], 1), r.timeout(), np.uint64)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", x),
                pb_utils.Tensor("ORDER", order),
                pb_utils.Tensor("TIMEOUT", timeout),
            ]))
        return responses
"""

# Takes a while per request and says when it ran (CLOCK_MONOTONIC, shared by all processes).
_SLEEPY = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            start = time.monotonic()
            time.sleep(0.25)
            end = time.monotonic()
            n = x.shape[0]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", x),
                pb_utils.Tensor("START", np.full((n, 1), start)),
                pb_utils.Tensor("END", np.full((n, 1), end)),
            ]))
        return responses
"""

# Fails a request (only that one) when any of its values is negative.
_FAIL = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            if (x < 0).any():
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"negative input: {x.min()}")))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 10)]))
        return responses
"""


def _config(
    name: str,
    inputs: Iterable[tuple[str, str, str]],
    outputs: Iterable[tuple[str, str, str]],
    *,
    max_batch_size: int,
    extra: str = "",
    instances: int = 1,
) -> str:
    def tensors(items: Iterable[tuple[str, str, str]]) -> str:
        return ", ".join(
            f'{{ name: "{n}" data_type: TYPE_{"STRING" if t == "BYTES" else t} dims: [ {d} ] }}'
            for n, t, d in items
        )

    return textwrap.dedent(
        f"""\
        name: "{name}"
        backend: "python"
        max_batch_size: {max_batch_size}
        input [ {tensors(inputs)} ]
        output [ {tensors(outputs)} ]
        instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
        """
    ) + textwrap.dedent(extra)


def _models(state: Path) -> dict[str, tuple[str, str]]:
    """Return name -> (config.pbtxt, model.py) of every test model."""
    models = {
        f"id_{dt.lower()}": (
            _config(
                f"id_{dt.lower()}", [("X", dt, "3")], [("Y", dt, "3")], max_batch_size=64,
                extra="dynamic_batching { }\n",
            ),
            _IDENTITY,
        )
        for dt in DATATYPES
    }  # fmt: skip
    models["scale"] = (
        _config(
            "scale",
            [("X", "FP32", "4"), ("K", "FP32", "1")],
            [("Y", "FP32", "4"), ("S", "FP32", "1")],
            max_batch_size=8,
            extra="dynamic_batching { }\n",
        ),
        _SCALE,
    )
    models["slow"] = (
        _config(
            "slow",
            [("X", "FP32", "1")],
            [("Y", "FP32", "1"), ("ORDER", "INT64", "1"), ("TIMEOUT", "UINT64", "1")],
            max_batch_size=1,
            extra=f"""\
            dynamic_batching {{
              priority_levels: 3
              default_priority_level: 2
              default_queue_policy {{
                timeout_action: REJECT
                default_timeout_microseconds: 60000000
                allow_timeout_override: true
              }}
            }}
            parameters {{ key: "release_file" value: {{ string_value: "{state / "release"}" }} }}
            parameters {{ key: "started_file" value: {{ string_value: "{state / "started"}" }} }}
            """,
        ),
        _SLOW,
    )
    models["sleepy"] = (
        _config(
            "sleepy",
            [("X", "FP32", "1")],
            [("Y", "FP32", "1"), ("START", "FP64", "1"), ("END", "FP64", "1")],
            max_batch_size=2,
            instances=4,
        ),
        _SLEEPY,
    )
    models["fail"] = (
        _config("fail", [("X", "FP32", "1")], [("Y", "FP32", "1")], max_batch_size=4),
        _FAIL,
    )
    return models


MODELS = tuple(_models(Path("/")))


# -- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """A ``tritonserver`` process serving the test models from ``workdir``, on 127.0.0.1.

    ``models`` limits the repository to those names (default: all). Start with ``start()``,
    stop with ``stop()`` (SIGTERM to its PID, then SIGKILL after a grace period); the ports
    stay the same across restarts.
    """

    def __init__(self, package: Path, workdir: Path, models: Iterable[str] | None = None) -> None:
        self.package = package
        self.workdir = workdir
        self.state = workdir / "state"
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "tritonserver.log"
        self._write_repository(None if models is None else set(models))
        self._write_backend()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def _write_repository(self, names: set[str] | None) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.repository = self.workdir / "models"
        for name, (config, code) in _models(self.state).items():
            if names is not None and name not in names:
                continue
            (self.repository / name / "1").mkdir(parents=True, exist_ok=True)
            (self.repository / name / "config.pbtxt").write_text(config)
            (self.repository / name / "1" / "model.py").write_text(textwrap.dedent(code))

    def _write_backend(self) -> None:
        # Triton looks for the stub next to the backend library: assemble that directory.
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        source = self.package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        links = {
            "libtriton_python.so": source / "backends" / "python" / "libtriton_python.so",
            "triton_python_backend_utils.py": source
            / "backends"
            / "python"
            / "triton_python_backend_utils.py",
            "triton_python_backend_stub": source
            / "python_backend_stubs"
            / version
            / "triton_python_backend_stub",
        }
        for name, target in links.items():
            link = backend / name
            if not link.exists():
                link.symlink_to(target)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The stub's embedded interpreter finds its prefix (this virtualenv) through PATH.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and return once it and every model are ready."""
        assert self.process is None, "already started"
        binary = self.package / "tritonserver" / "bin" / "tritonserver"
        command = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.workdir / 'backends'}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.environment()
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"tritonserver exited with {code}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tritonserver not ready after {timeout} s:\n{self.tail()}")
            time.sleep(0.1)  # polling another process's readiness: nothing to wake us

    def _ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            status = conn.getresponse().status
            conn.close()
        except OSError:
            return False
        return status == 200

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after ``grace`` seconds."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def metric(self, name: str, model: str) -> float:
        """Return the value of the Prometheus metric ``name`` for ``model``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        for line in text.splitlines():
            if line.startswith(name + "{") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name} for {model!r} not in the metrics")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
