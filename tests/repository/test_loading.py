"""Loading a model repository: bad configurations and files reported in the index (the other
models keep serving), lazy loading, new versions picked up under load, load and unload."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

from batchkit import ConfigurationError
from batchkit.asgi import KServeApp, ModelRepository

from ..support import model_files as mf
from ..support.asgi import request, running_server
from ..support.helpers import wait_for

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("tritonclient.grpc.model_config_pb2")
httpclient = pytest.importorskip("tritonclient.http")
aio = pytest.importorskip("tritonclient.http.aio")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

AUTH = {"Authorization": "Bearer s3cret"}
pytestmark = pytest.mark.anyio


def x_body(x: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }


def mlp(root: Path, name: str = "mlp", version: int = 1, *, scale: float = 1.0) -> Path:
    mf.onnx_mlp(root / name / str(version) / "model.onnx", scale=scale)
    if not (root / name / "config.pbtxt").exists():
        mf.write_config(root / name, "pbtxt", mf.PBTXT_MLP, name)
    return root / name


def reasons(app_or_repo: Any) -> dict[tuple[str, str], str]:
    repo = app_or_repo
    return {(e["name"], e["version"]): e.get("reason", e["state"]) for e in repo.index()}


# -- bad configurations and files ------------------------------------------------------------

BAD_CONFIGS = [
    ("config.pbtxt", 'max_batch_sz: 4\n', "1:1", 'no field named "max_batch_sz"'),
    ("config.pbtxt", 'max_batch_size: 4\ninput [{ name: "x" dims: [4] }]\n', "input[0]",
     "data_type: missing"),
    ("config.pbtxt", 'max_batch_size: 0\ninput [{ name: "x" data_type: TYPE_FP32 dims: [4] }]',
     "max_batch_size", "must be >= 1"),
    ("config.pbtxt", 'max_batch_size: 4\ndynamic_batching { preferred_batch_size: [8] }',
     "dynamic_batching.preferred_batch_size", "8 is not in 1..max_batch_size (4)"),
    ("config.pbtxt", 'platform: "tensorflow_savedmodel"', "platform", "tensorflow_savedmodel"),
    ("config.pbtxt", 'name: "other"', "name", "differs from the model's folder name"),
    ("config.pbtxt", 'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_FP32 dims: [0] }]',
     "input[0] ('x').dims", "-1 or >= 1"),
    ("config.pbtxt", 'version_policy { latest { num_versions: 0 } }',
     "version_policy.latest.num_versions", ">= 1"),
    ("config.json", '{"max_batch_size": 4, "input": [{"name": "x", "data_type": "FP33"}]}',
     "data_type", "FP33"),
    ("config.json", '{"max_batch_size": 4,', "config.json", "not valid JSON"),
    ("config.json", '[1, 2]', "config.json", "must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize(("file", "text", "field", "problem"), BAD_CONFIGS)
async def test_a_bad_configuration_is_an_index_error_naming_its_file_and_field(
    tmp_path: Path, file: str, text: str, field: str, problem: str
) -> None:
    root = tmp_path / "repo"
    mlp(root, "good")
    mf.onnx_mlp(root / "bad" / "1" / "model.onnx")
    (root / "bad" / file).write_text(text)
    repo = ModelRepository(root)
    app = KServeApp(repo, metrics=False)
    async with app.lifespan():
        reason = reasons(repo)[("bad", "")]
        assert str(root / "bad" / file) in reason
        assert field in reason
        assert problem in reason
        assert (await request(app, "GET", "/v2/models/bad/ready")).status == 404
        assert (await request(app, "GET", "/v2/models/good/ready")).status == 200
        reply = await request(app, "POST", "/v2/models/good/infer", x_body(np.ones((1, 4))))
        assert reply.status == 200


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (
            'max_batch_size: 4\ninput [{ name: "z" data_type: TYPE_FP32 dims: [4] }]\n'
            'output [{ name: "y" data_type: TYPE_FP32 dims: [3] }]',
            "input 'z' is not in the graph, which has ['x']",
        ),
        (
            'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_INT32 dims: [4] }]\n'
            'output [{ name: "y" data_type: TYPE_FP32 dims: [3] }]',
            "input 'x' is INT32 [4], the graph's is FP32 [4]",
        ),
        (
            'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_FP32 dims: [5] }]\n'
            'output [{ name: "y" data_type: TYPE_FP32 dims: [3] }]',
            "input 'x' is FP32 [5], the graph's is FP32 [4]",
        ),
    ],
)
async def test_a_configuration_that_does_not_match_the_file(
    tmp_path: Path, anyio_backend: str, config: str, problem: str
) -> None:
    root = tmp_path / "repo"
    mf.onnx_mlp(root / "m" / "1" / "model.onnx")
    (root / "m" / "config.pbtxt").write_text(config)
    repo = ModelRepository(root)
    async with KServeApp(repo, metrics=False).lifespan():
        reason = reasons(repo)[("m", "1")]
        assert str(root / "m" / "1" / "model.onnx") in reason
        assert problem in reason
        assert not repo.is_ready("m")


async def test_a_fixed_batch_dimension_is_refused_at_load(
    tmp_path: Path, anyio_backend: str
) -> None:
    root = tmp_path / "repo"
    mf.onnx_mlp(root / "fixed" / "1" / "model.onnx", batch=1)
    repo = ModelRepository(root)
    async with KServeApp(repo, metrics=False).lifespan():
        assert "fixed batch dimension 1" in reasons(repo)[("fixed", "1")]


def test_a_corrupt_file_is_an_index_error_and_the_server_keeps_serving(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    mlp(root, "good")
    corrupt = root / "corrupt"
    mlp(root, "corrupt")
    (corrupt / "1" / "model.onnx").write_bytes(b"\x08\x07not an onnx file" * 10)
    (root / "missing" / "1").mkdir(parents=True)
    (root / "missing" / "config.pbtxt").write_text(mf.PBTXT_MLP.format(name="missing"))
    (root / "noversion").mkdir()
    (root / "noversion" / "config.pbtxt").write_text(mf.PBTXT_MLP.format(name="noversion"))
    app = KServeApp(ModelRepository(root), metrics=False, admin_token="s3cret")
    with running_server(app) as url:
        client = httpclient.InferenceServerClient(url)
        index = {(e["name"], e.get("version", "")): e for e in
                 client.get_model_repository_index(headers=AUTH)}  # fmt: skip
        assert index[("good", "1")]["state"] == "READY"
        assert index[("corrupt", "1")]["state"] == "UNAVAILABLE"
        assert "ONNX Runtime cannot load it" in index[("corrupt", "1")]["reason"]
        assert "model file is missing" in index[("missing", "1")]["reason"]
        assert "no version folder" in index[("noversion", "")]["reason"]
        for name in ("corrupt", "missing", "noversion"):
            assert not client.is_model_ready(name)
        assert client.is_server_ready()
        x = np.ones((2, 4), np.float32)
        tensor = httpclient.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_allclose(
            client.infer("good", [tensor]).as_numpy("y"), mf.mlp_reference(x), rtol=1e-6
        )
        client.close()


# -- lazy loading ------------------------------------------------------------------------------


def test_lazy_loading_under_200_concurrent_first_requests_loads_once(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    mf.python_model(root / "custom", offset=1.0)
    mf.write_config(root / "custom", "pbtxt", mf.PYTHON_CONFIG, "custom")
    loads = root / "custom" / "loads.txt"
    repo = ModelRepository(root, load="lazy")
    with running_server(KServeApp(repo, metrics=False)) as url:
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_live()  # answered once the app's lifespan has started
        client.close()
        assert not loads.exists()
        assert reasons(repo)[("custom", "1")] == "not loaded yet: the first request loads it"

        async def call_200() -> list[Any]:
            client = aio.InferenceServerClient(url, conn_limit=200)
            try:
                return await asyncio.gather(*(one(client, i) for i in range(200)))
            finally:
                await client.close()

        async def one(client: Any, i: int) -> Any:
            text = aio.InferInput("TEXT", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[b"x" * (i % 7)]], dtype=object))
            value = aio.InferInput("VALUE", [1, 2], "FP32")
            value.set_data_from_numpy(np.full((1, 2), i, np.float32))
            return await client.infer("custom", [text, value])

        results = asyncio.run(call_200())
        assert loads.read_text() == "load\n"
        for i, result in enumerate(results):
            assert result.as_numpy("LENGTH").tolist() == [[i % 7]]
            assert result.as_numpy("SHIFTED").tolist() == [[i + 1.0, i + 1.0]]
        assert ("custom", "1") not in {k for k, v in reasons(repo).items() if "loaded" in v}


async def test_a_lazy_load_that_fails_makes_the_model_not_ready(
    tmp_path: Path, anyio_backend: str
) -> None:
    root = tmp_path / "repo"
    mlp(root, "good")
    mlp(root, "broken")
    (root / "broken" / "1" / "model.onnx").write_bytes(b"garbage")
    (root / "broken" / "config.pbtxt").write_text(mf.PBTXT_MLP.format(name="broken"))
    repo = ModelRepository(root, load="lazy")
    app = KServeApp(repo, metrics=False)
    async with app.lifespan():
        assert (await request(app, "GET", "/v2/models/broken/ready")).status == 200
        reply = await request(app, "POST", "/v2/models/broken/infer", x_body(np.ones((1, 4))))
        assert reply.status == 500
        assert "ConfigurationError" in reply.error
        assert (await request(app, "GET", "/v2/models/broken/ready")).status == 503
        assert "ONNX Runtime cannot load it" in reasons(repo)[("broken", "1")]
        reply = await request(app, "POST", "/v2/models/good/infer", x_body(np.ones((1, 4))))
        assert reply.status == 200


# -- versions ----------------------------------------------------------------------------------


def test_a_new_version_under_load_is_picked_up_with_zero_failed_calls(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp", 1, scale=1.0)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    expected = {"1": mf.mlp_reference(x, 1.0), "2": mf.mlp_reference(x, 2.0)}
    app = KServeApp(ModelRepository(root), metrics=False, admin_token="s3cret")
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def hammer(url: str) -> None:
        client = httpclient.InferenceServerClient(url)
        tensor = httpclient.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            while not stop.is_set():
                try:
                    result = client.infer("mlp", [tensor])
                except Exception as exc:
                    failures.append(exc)
                    continue
                version = result.get_response()["model_version"]
                np.testing.assert_allclose(result.as_numpy("y"), expected[version], rtol=1e-6)
                seen.append(version)
        finally:
            client.close()

    with running_server(app) as url:
        threads = [threading.Thread(target=hammer, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(seen) >= 20)
            mlp(root, "mlp", 2, scale=2.0)
            admin = httpclient.InferenceServerClient(url)
            admin.load_model("mlp", headers=AUTH)
            count = len(seen)
            wait_for(lambda: len(seen) >= count + 40)
            admin.close()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        assert seen[0] == "1" and seen[-1] == "2"
        first_two = seen.index("2")
        assert set(seen[first_two + 4 * 2 :]) == {"2"}  # once published, only version 2
        client = httpclient.InferenceServerClient(url)
        assert client.get_model_metadata("mlp")["versions"] == ["2"]
        with pytest.raises(InferenceServerException, match="no version '1'"):
            tensor = httpclient.InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("mlp", [tensor], model_version="1")
        client.close()


async def test_version_policies(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "repo"
    for name, policy in [
        ("latest2", "latest { num_versions: 2 }"),
        ("all", "all {}"),
        ("specific", "specific { versions: [1, 3] }"),
        ("default", None),
    ]:
        for version in (1, 2, 3):
            mf.onnx_mlp(root / name / str(version) / "model.onnx", scale=version)
        config = mf.PBTXT_MLP.format(name=name).replace(
            "version_policy: { latest: { num_versions: 1 } }",
            f"version_policy: {{ {policy} }}" if policy else "",
        )
        (root / name / "config.pbtxt").write_text(config)
    repo = ModelRepository(root)
    app = KServeApp(repo, metrics=False, admin_token="s3cret")
    async with app.lifespan():

        async def versions(name: str) -> list[str]:
            reply = await request(app, "GET", f"/v2/models/{name}")
            return list(reply.json()["versions"])

        assert await versions("latest2") == ["2", "3"]
        assert await versions("all") == ["1", "2", "3"]
        assert await versions("specific") == ["1", "3"]
        assert await versions("default") == ["3"]
        x = np.ones((1, 4), np.float32)
        for version in ("1", "3"):
            reply = await request(
                app, "POST", f"/v2/models/specific/versions/{version}/infer", x_body(x)
            )
            assert reply.json()["model_version"] == version
            got = np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(1, 3)
            np.testing.assert_allclose(got, mf.mlp_reference(x, float(version)), rtol=1e-6)
        # a new version folder: picked up on load, per each policy
        for name in ("latest2", "all", "specific", "default"):
            mf.onnx_mlp(root / name / "4" / "model.onnx", scale=4.0)
            assert (await request(app, "POST", f"/v2/repository/models/{name}/load",
                                  {}, headers=AUTH)).status == 200  # fmt: skip
        assert await versions("latest2") == ["3", "4"]
        assert await versions("all") == ["1", "2", "3", "4"]
        assert await versions("specific") == ["1", "3"]
        assert await versions("default") == ["4"]
        # a specific version that is missing is an index error
        (root / "specific" / "config.pbtxt").write_text(
            mf.PBTXT_MLP.format(name="specific").replace(
                "latest: { num_versions: 1 }", "specific: { versions: [1, 7] }"
            )
        )
        reply = await request(app, "POST", "/v2/repository/models/specific/load", {}, headers=AUTH)
        assert reply.status == 400
        assert "version 7 is not in" in reply.error
        assert await versions("specific") == ["1"]


async def test_unload_and_load_again(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp")
    repo = ModelRepository(root)
    app = KServeApp(repo, metrics=False, admin_token="s3cret")
    async with app.lifespan():
        body = x_body(np.ones((1, 4)))
        reply = await request(app, "POST", "/v2/repository/models/mlp/unload", {}, headers=AUTH)
        assert reply.status == 200
        assert (await request(app, "GET", "/v2/models/mlp/ready")).status == 404
        assert (await request(app, "POST", "/v2/models/mlp/infer", body)).status == 404
        index = (await request(app, "POST", "/v2/repository/index", {}, headers=AUTH)).json()
        assert index == [{"name": "mlp", "version": "", "state": "UNAVAILABLE",
                          "reason": "unloaded"}]  # fmt: skip
        reply = await request(app, "POST", "/v2/repository/models/mlp/load", {}, headers=AUTH)
        assert reply.status == 200
        assert (await request(app, "POST", "/v2/models/mlp/infer", body)).status == 200
        # a model added to the folder after start is loaded by name
        mlp(root, "late")
        reply = await request(app, "POST", "/v2/repository/models/late/load", {}, headers=AUTH)
        assert reply.status == 200
        assert (await request(app, "POST", "/v2/models/late/infer", body)).status == 200
        reply = await request(app, "POST", "/v2/repository/models/nope/load", {}, headers=AUTH)
        assert reply.status == 404
        assert "no model 'nope'" in reply.error
        weights = {"parameters": {"weights": "v2.pt", "version": "2"}}
        reply = await request(app, "POST", "/v2/repository/models/mlp/load", weights, headers=AUTH)
        assert reply.status == 400
        assert "add a version folder" in reply.error
        ready = await request(app, "POST", "/v2/repository/index", {"ready": True}, headers=AUTH)
        assert {e["name"] for e in ready.json()} == {"mlp", "late"}


async def test_polling_picks_up_a_new_version(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp")
    repo = ModelRepository(root, poll=0.01)
    app = KServeApp(repo, metrics=False)
    async with app.lifespan():
        assert [s.version for s in app.models] == ["1"]
        mlp(root, "mlp", 2, scale=2.0)
        # the poll runs on this loop: wait for it in a thread (bounded)
        await anyio.to_thread.run_sync(wait_for, lambda: [s.version for s in app.models] == ["2"])
        x = np.ones((1, 4), np.float32)
        reply = await request(app, "POST", "/v2/models/mlp/infer", x_body(x))
        assert reply.json()["model_version"] == "2"


def test_the_python_api_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="is not a folder"):
        ModelRepository(tmp_path / "nowhere")
    with pytest.raises(ConfigurationError, match="load must be 'eager' or 'lazy'"):
        ModelRepository(tmp_path, load="soon")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="poll must be"):
        ModelRepository(tmp_path, poll=0)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="only an ONNX file"):
        ModelRepository(tmp_path / "model.pt")


async def test_repository_models_show_in_metrics(tmp_path: Path, anyio_backend: str) -> None:
    pytest.importorskip("prometheus_client")
    root = tmp_path / "repo"
    mlp(root, "mlp")
    app = KServeApp(ModelRepository(root), metrics=True)
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/mlp/infer", x_body(np.ones((3, 4))))
        assert reply.status == 200
        text = (await request(app, "GET", "/metrics")).body.decode()
        assert 'batchkit_items_total{model="mlp",outcome="completed",version="1"} 3.0' in text
        assert 'batchkit_http_requests_total{model="mlp",status="200",version="1"} 1.0' in text


async def test_settings_come_from_the_configuration(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp")  # preferred sizes [4, 8], max_batch_size 16, delay 500 us
    mf.onnx_mlp(root / "gpu" / "1" / "model.onnx")
    (root / "gpu" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 4\n'
        "instance_group [{ kind: KIND_GPU count: 2 }, { kind: KIND_CPU count: 1 }]\n"
        "optimization { graph { level: 2 } }\n"
        'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }\n'
        'parameters { key: "execution_mode" value: { string_value: "1" } }\n'
    )
    bad = {
        "level": ("optimization { graph { level: 5 } }", "optimization.graph.level: must be"),
        "mode": (
            'parameters { key: "execution_mode" value: { string_value: "fast" } }',
            "parameters.execution_mode: must be '0' (sequential) or '1' (parallel), got 'fast'",
        ),
        "threads": (
            'parameters { key: "intra_op_thread_count" value: { string_value: "two" } }',
            "parameters.intra_op_thread_count: must be an integer >= 0, got 'two'",
        ),
    }
    for name, (text, _) in bad.items():
        mf.onnx_mlp(root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(f"max_batch_size: 4\n{text}\n")
    repo = ModelRepository(root)
    app = KServeApp(repo, metrics=False)
    async with app.lifespan():
        settings = {s.name: s.model.settings for s in app.models}
        assert settings["mlp"].max_batch_size == 8
        assert settings["mlp"].max_wait == pytest.approx(500e-6)
        assert settings["gpu"].max_concurrency == 3
        x = np.ones((2, 4), np.float32)
        reply = await request(app, "POST", "/v2/models/gpu/infer", x_body(x))  # CPU fallback
        got = np.array(reply.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
        np.testing.assert_allclose(got, mf.mlp_reference(x), rtol=1e-6)
        for name, (_, problem) in bad.items():
            reason = reasons(repo)[(name, "1")]
            assert problem in reason
            assert str(root / name / "config.pbtxt") in reason


async def test_rows_of_different_shapes_batch_apart(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "repo"
    mf.python_model(root / "custom", offset=0.5)
    mf.write_config(
        root / "custom",
        "pbtxt",
        mf.PYTHON_CONFIG.replace("dims: [ 2 ]", "dims: [ -1 ]"),
        "custom",
    )
    app = KServeApp(ModelRepository(root), metrics=False)
    async with app.lifespan():
        replies: dict[int, Any] = {}

        async def one(width: int) -> None:
            body = {
                "inputs": [
                    {"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["ab"]},
                    {"name": "VALUE", "datatype": "FP32", "shape": [1, width],
                     "data": [float(width)] * width},
                ]
            }  # fmt: skip
            replies[width] = await request(app, "POST", "/v2/models/custom/infer", body)

        async with anyio.create_task_group() as group:
            for width in range(1, 9):
                group.start_soon(one, width)
        for width, reply in replies.items():
            shifted = next(o for o in reply.json()["outputs"] if o["name"] == "SHIFTED")
            assert shifted["shape"] == [1, width]
            assert shifted["data"] == [width + 0.5] * width


async def test_a_new_version_that_fails_leaves_the_old_one_serving(
    tmp_path: Path, anyio_backend: str
) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp", 1)
    app = KServeApp(ModelRepository(root), metrics=False, admin_token="s3cret")
    body = x_body(np.ones((1, 4)))
    async with app.lifespan():
        (root / "mlp" / "2").mkdir()
        (root / "mlp" / "2" / "model.onnx").write_bytes(b"corrupt")
        reply = await request(app, "POST", "/v2/repository/models/mlp/load", {}, headers=AUTH)
        assert reply.status == 400
        assert "ONNX Runtime cannot load it" in reply.error
        assert (await request(app, "POST", "/v2/models/mlp/infer", body)).json()[
            "model_version"
        ] == "1"
        index = (await request(app, "POST", "/v2/repository/index", {}, headers=AUTH)).json()
        assert [(e["version"], e["state"]) for e in index] == [
            ("1", "READY"),
            ("2", "UNAVAILABLE"),
        ]
        mf.onnx_mlp(root / "mlp" / "2" / "model.onnx", scale=2.0)  # fixed: loads on load
        reply = await request(app, "POST", "/v2/repository/models/mlp/load", {}, headers=AUTH)
        assert reply.status == 200
        reply = await request(app, "POST", "/v2/models/mlp/infer", body)
        assert reply.json()["model_version"] == "2"


async def test_a_changed_configuration_applies_on_load(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp")
    app = KServeApp(ModelRepository(root), metrics=False, admin_token="s3cret")
    async with app.lifespan():
        config = (await request(app, "GET", "/v2/models/mlp/config")).json()
        assert config["max_batch_size"] == 16
        text = (root / "mlp" / "config.pbtxt").read_text()
        (root / "mlp" / "config.pbtxt").write_text(
            text.replace("max_batch_size: 16", "max_batch_size: 32")
        )
        reply = await request(app, "POST", "/v2/repository/models/mlp/load", {}, headers=AUTH)
        assert reply.status == 200
        config = (await request(app, "GET", "/v2/models/mlp/config")).json()
        assert config["max_batch_size"] == 32
        assert [s.version for s in app.models] == ["1"]


async def test_a_failed_lazy_load_is_tried_again_on_load(
    tmp_path: Path, anyio_backend: str
) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp")
    good = (root / "mlp" / "1" / "model.onnx").read_bytes()
    (root / "mlp" / "1" / "model.onnx").write_bytes(b"corrupt")
    (root / "mlp" / "config.pbtxt").write_text(mf.PBTXT_MLP.format(name="mlp"))
    repo = ModelRepository(root, load="lazy")
    app = KServeApp(repo, metrics=False, admin_token="s3cret")
    body = x_body(np.ones((1, 4)))
    async with app.lifespan():
        assert (await request(app, "POST", "/v2/models/mlp/infer", body)).status == 500
        assert not repo.is_ready("mlp")
        (root / "mlp" / "1" / "model.onnx").write_bytes(good)
        reply = await request(app, "POST", "/v2/repository/models/mlp/load", {}, headers=AUTH)
        assert reply.status == 200
        assert (await request(app, "POST", "/v2/models/mlp/infer", body)).status == 200
        assert repo.is_ready("mlp")


async def test_the_repository_runs_once_at_a_time(tmp_path: Path, anyio_backend: str) -> None:
    mlp(tmp_path, "mlp")
    repo = ModelRepository(tmp_path)
    with pytest.raises(ConfigurationError, match="not running"):
        await repo.load_model("mlp")
    async with repo.running():
        with pytest.raises(ConfigurationError, match="running already"):
            async with repo.running():
                pass
        assert [s.version for s in repo.served["mlp"]] == ["1"]
    assert repo.served == {}


async def test_polling_survives_a_folder_that_goes_away(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    mlp(root, "mlp")
    repo = ModelRepository(root, poll=0.01)
    app = KServeApp(repo, metrics=False)
    async with app.lifespan():
        import shutil

        shutil.move(root, tmp_path / "elsewhere")
        await anyio.to_thread.run_sync(
            wait_for, lambda: "rescanning the model repository" in caplog.text
        )
        reply = await request(app, "POST", "/v2/models/mlp/infer", x_body(np.ones((1, 4))))
        assert reply.status == 200
