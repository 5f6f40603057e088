"""Scenario 11: model files served from a model repository (ONNX Runtime and TorchScript).

The MLP of scenario 2 (256-1024-256, the same weights) is written as an ONNX graph and as a
TorchScript module into one model repository, served by ``batchkit serve --model-repository``
in a subprocess and called by 32 concurrent ``tritonclient.http.aio`` requests, one item each:
ONNX Runtime batched (``max_batch_size: 64``) and unbatched (``max_batch_size: 1``), and the
TorchScript MLP batched. In this process, the same ONNX file through the repository's
``BatchedModel`` (64 concurrent asyncio callers) is compared with the raw ONNX Runtime session
called once per item. Rounds interleave; every figure compared comes from this run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ._measure import Findings, median, percentile, rotated
from .mlp import HIDDEN, IN_FEATURES, MLP

aio = pytest.importorskip("tritonclient.http.aio")
pytest.importorskip("uvicorn")
pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 32
ROUNDS = 3
REQUESTS = {"onnx": 1500, "onnx_unbatched": 600, "torchscript": 1500}
IN_PROCESS_CALLERS = 64
IN_PROCESS_ITEMS = 3000


def write_repository(root: Path) -> tuple[Path, Any]:
    """Write the MLP as mlp/ (ONNX, batched), mlp_unbatched/ (ONNX, max_batch_size 1) and
    mlp_torch/ (TorchScript); return the ONNX file and the weights."""
    import torch
    from onnx import TensorProto, helper, numpy_helper, save

    mlp = MLP(seed=0)
    first, second = mlp.net[0], mlp.net[2]
    weights = [
        numpy_helper.from_array(first.weight.detach().numpy().T.copy(), "W1"),
        numpy_helper.from_array(first.bias.detach().numpy(), "b1"),
        numpy_helper.from_array(second.weight.detach().numpy().T.copy(), "W2"),
        numpy_helper.from_array(second.bias.detach().numpy(), "b2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "W2"], ["y0"]),
            helper.make_node("Add", ["y0", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    tensors = (
        f'input [{{ name: "x" data_type: TYPE_FP32 dims: [{IN_FEATURES}] }}]\n'
        f'output [{{ name: "y" data_type: TYPE_FP32 dims: [{IN_FEATURES}] }}]\n'
    )
    threads = 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    for name, batch in (("mlp", 64), ("mlp_unbatched", 1)):
        (root / name / "1").mkdir(parents=True)
        save(model, str(root / name / "1" / "model.onnx"))
        (root / name / "config.pbtxt").write_text(
            f'backend: "onnxruntime"\nmax_batch_size: {batch}\n{tensors}{threads}'
        )
    (root / "mlp_torch" / "1").mkdir(parents=True)
    import warnings

    with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(mlp.net), str(root / "mlp_torch" / "1" / "model.pt"))
    (root / "mlp_torch" / "config.pbtxt").write_text(
        f'platform: "pytorch_libtorch"\nmax_batch_size: 64\n{tensors}'
    )
    mlp.close()
    return root / "mlp" / "1" / "model.onnx", weights


async def drive(client: Any, model: str, n: int) -> tuple[float, list[float]]:
    data = np.ones((1, IN_FEATURES), dtype=np.float32)
    latencies: list[float] = []
    remaining = iter(range(n))
    clock = time.perf_counter

    async def worker() -> None:
        for _ in remaining:
            inp = aio.InferInput("x", [1, IN_FEATURES], "FP32")
            inp.set_data_from_numpy(data)
            t0 = clock()
            result = await client.infer(model, [inp])
            latencies.append(clock() - t0)
            assert result.as_numpy("y").shape == (1, IN_FEATURES)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return clock() - start, latencies


async def measure_http(url: str, f: Findings) -> None:
    names = {"onnx": "mlp", "onnx_unbatched": "mlp_unbatched", "torchscript": "mlp_torch"}
    rps: dict[str, list[float]] = {k: [] for k in names}
    lat: dict[str, list[float]] = {k: [] for k in names}
    client = aio.InferenceServerClient(url, conn_limit=CONCURRENCY)
    try:
        for name in names.values():  # warm-up: connections, sessions, torch
            await drive(client, name, 200)
        for round_no in range(ROUNDS):
            for key in rotated(round_no, list(names)):
                seconds, latencies = await drive(client, names[key], REQUESTS[key])
                rps[key].append(REQUESTS[key] / seconds)
                lat[key].extend(latencies)
    finally:
        await client.close()
    for key in names:
        f.figure(f"{key}_rps", f"{key}: requests/s, median round", median(rps[key]), "/s")
        f.figure(f"{key}_p99", f"{key}: latency p99", 1e3 * percentile(lat[key], 0.99), "ms")
    f.figure(
        "onnx_batched_speedup", "ONNX Runtime: batched / unbatched requests/s",
        median(rps["onnx"]) / median(rps["onnx_unbatched"]), "x",
    )  # fmt: skip
    f.figure(
        "onnx_vs_torchscript", "batched: ONNX Runtime / TorchScript requests/s",
        median(rps["onnx"]) / median(rps["torchscript"]), "x",
    )  # fmt: skip


async def batched_items_per_second(model: Any, items: list[Any]) -> float:
    remaining = iter(items)

    async def caller() -> None:
        for item in remaining:
            await model.call(item)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(IN_PROCESS_CALLERS)))
    return len(items) / (time.perf_counter() - start)


def measure_in_process(root: Path, onnx_file: Path, f: Findings) -> None:
    from batchkit.asgi import KServeApp, ModelRepository

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    items = list(np.random.default_rng(0).normal(size=(IN_PROCESS_ITEMS, IN_FEATURES)).astype(
        np.float32))  # fmt: skip
    raw: list[float] = []
    batched: list[float] = []

    def run_raw() -> float:
        start = time.perf_counter()
        for item in items:
            session.run(["y"], {"x": item[np.newaxis]})
        return len(items) / (time.perf_counter() - start)

    async def run_batched() -> None:
        app = KServeApp(ModelRepository(root), metrics=False)
        async with app.lifespan():
            model = next(s.model for s in app.models if s.name == "mlp")
            await batched_items_per_second(model, items[:200])  # warm-up
            for round_no in range(ROUNDS):
                for side in rotated(round_no, ["raw", "batched"]):
                    if side == "raw":
                        raw.append(run_raw())
                    else:
                        batched.append(await batched_items_per_second(model, items))

    asyncio.run(run_batched())
    f.figure("raw_items", "raw ONNX Runtime session, one item per run: items/s", median(raw),
             "items/s")  # fmt: skip
    f.figure("batched_items", "the repository's BatchedModel, 64 callers: items/s",
             median(batched), "items/s")  # fmt: skip
    f.figure("in_process_speedup", "batchkit batched / raw session per item",
             median(batched) / median(raw), "x")  # fmt: skip


@pytest.mark.timeout(900)
def test_model_repository_throughput(benchmark: Any, tmp_path: Path) -> None:
    root = tmp_path / "models"
    onnx_file, _ = write_repository(root)
    f = Findings("model_repository", "Model files: ONNX Runtime and TorchScript from a model "
                 "repository", order=11, number="11")  # fmt: skip
    f.setup(f"the MLP of scenario 2 ({IN_FEATURES}-{HIDDEN}-{IN_FEATURES}, same weights) as "
            "ONNX and TorchScript, one intra-op thread each")  # fmt: skip
    f.setup(f"HTTP: `batchkit serve --model-repository` in a subprocess, {CONCURRENCY} "
            f"tritonclient.http.aio requests in flight, one item each; {ROUNDS} interleaved "
            "rounds")  # fmt: skip
    f.setup(f"in process: {IN_PROCESS_CALLERS} asyncio callers on the repository's model vs "
            "the raw session called once per item, in the same rounds")  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "serve", "--model-repository", str(root),
         "--port", str(port), "--log-level", "warning", "--no-metrics"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        url = f"127.0.0.1:{port}"
        asyncio.run(wait_ready(url, proc))

        def run() -> None:
            asyncio.run(measure_http(url, f))
            measure_in_process(root, onnx_file, f)

        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    f.save(benchmark)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    client = aio.InferenceServerClient(url)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if await client.is_server_ready():
                    return
            except Exception:
                pass
            await asyncio.sleep(0.05)  # another process's readiness: nothing to wake us
        raise RuntimeError("the server never became ready")
    finally:
        await client.close()
