"""The model repository endpoints: load a new version (swap weights), unload, index, auth."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchkit import BatchedModel
from batchkit.asgi import KServeApp, ServedModel, Tensor

from ..support.asgi import request

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer s3cret"}
BODY = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}


def linear_app(tmp_path: Path, **options: Any) -> tuple[KServeApp, Any]:
    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
    model = BatchedModel(
        net,
        name="lin",
        collate=lambda items: torch.from_numpy(np.stack(items)),
        split=lambda out: list(out.detach().numpy()),
    )
    doubled = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        doubled.weight.copy_(2 * torch.eye(2))
    (tmp_path / "weights").mkdir(parents=True)
    torch.save(doubled.state_dict(), tmp_path / "weights" / "v2.pt")
    torch.save(doubled.state_dict(), tmp_path / "outside.pt")
    served = ServedModel(
        model, inputs=[Tensor("X", "FP32", [2])], outputs=[Tensor("Y", "FP32", [2])]
    )
    app = KServeApp([served], metrics=False, weights_dir=tmp_path / "weights", **options)
    return app, model


async def test_load_swaps_in_a_new_version_and_unload_stops_serving(tmp_path: Path) -> None:
    app, model = linear_app(tmp_path, admin_token="s3cret")
    async with app.lifespan():
        before = (await request(app, "POST", "/v2/models/lin/infer", BODY)).json()
        assert (before["model_version"], before["outputs"][0]["data"]) == ("1", [1.0, 2.0])
        load = {"parameters": {"weights": "v2.pt", "version": "2"}}
        reply = await request(app, "POST", "/v2/repository/models/lin/load", load, headers=AUTH)
        assert reply.status == 200, reply.body
        after = (await request(app, "POST", "/v2/models/lin/infer", BODY)).json()
        assert (after["model_version"], after["outputs"][0]["data"]) == ("2", [2.0, 4.0])
        assert (await request(app, "GET", "/v2/models/lin")).json()["versions"] == ["2"]
        assert model.statistics().swaps == 1

        index = await request(app, "POST", "/v2/repository/index", b"", headers=AUTH)
        assert index.json() == [{"name": "lin", "version": "2", "state": "READY"}]
        unload = await request(app, "POST", "/v2/repository/models/lin/unload", {}, headers=AUTH)
        assert unload.status == 200
        assert (await request(app, "POST", "/v2/models/lin/infer", BODY)).status == 404
        assert (await request(app, "GET", "/v2/models/lin/ready")).status == 503
        assert (await request(app, "GET", "/v2/models/lin")).status == 404
        assert (await request(app, "GET", "/v2/models/lin/config")).status == 404
        index = await request(app, "POST", "/v2/repository/index", {}, headers=AUTH)
        assert index.json()[0]["state"] == "UNAVAILABLE"
        reload = await request(app, "POST", "/v2/repository/models/lin/load", {}, headers=AUTH)
        assert reload.status == 200
        assert (await request(app, "POST", "/v2/models/lin/infer", BODY)).status == 200


async def test_weight_paths_stay_inside_the_weights_directory(tmp_path: Path) -> None:
    app, model = linear_app(tmp_path, admin_token="s3cret")
    async with app.lifespan():
        for weights in ("../outside.pt", str(tmp_path / "outside.pt")):
            load = {"parameters": {"weights": weights, "version": "2"}}
            reply = await request(app, "POST", "/v2/repository/models/lin/load", load, headers=AUTH)
            assert reply.status == 403, reply.body
            assert "outside" in reply.error
        nul = {"parameters": {"weights": "v2.pt\u0000x", "version": "2"}}
        reply = await request(app, "POST", "/v2/repository/models/lin/load", nul, headers=AUTH)
        assert reply.status == 400, reply.body
        assert "NUL" in reply.error
        missing = {"parameters": {"weights": "nope.pt", "version": "2"}}
        reply = await request(app, "POST", "/v2/repository/models/lin/load", missing, headers=AUTH)
        assert reply.status == 400
        assert model.version == "1"  # the old model still serves


async def test_admin_needs_the_token(tmp_path: Path) -> None:
    app, _ = linear_app(tmp_path, admin_token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        reply = await request(app, "POST", "/v2/repository/index", b"", headers=headers)
        assert reply.status == 401
        assert reply.headers["www-authenticate"] == "Bearer"
    disabled, _ = linear_app(tmp_path / "other")
    reply = await request(disabled, "POST", "/v2/repository/index", b"", headers=AUTH)
    assert reply.status == 403
    assert json.loads(reply.body)["error"].startswith("the model repository API is disabled")


@pytest.mark.parametrize("version", ["²", "١٢", "9" * 5000])
async def test_a_loaded_version_int_cannot_read_keeps_the_model_serving(
    tmp_path: Path, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    # str.isdigit() accepts these, int() refuses them (or their length): metadata and infer
    # once answered 500 until the next load.
    app, model = linear_app(tmp_path, admin_token="s3cret")
    async with app.lifespan():
        load = {"parameters": {"weights": "v2.pt", "version": version}}
        reply = await request(app, "POST", "/v2/repository/models/lin/load", load, headers=AUTH)
        assert reply.status == 200, reply.body
        meta = await request(app, "GET", "/v2/models/lin")
        assert meta.status == 200, meta.body
        assert meta.json()["versions"] == [version]
        after = await request(app, "POST", "/v2/models/lin/infer", BODY)
        assert after.status == 200, after.body
        assert (after.json()["model_version"], after.json()["outputs"][0]["data"]) == (
            version,
            [2.0, 4.0],
        )
        assert (await request(app, "GET", "/v2/models/lin/config")).status == 200
        assert (await request(app, "GET", "/v2/models/lin/ready")).status == 200
    assert model.version == version
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_load_with_a_replace_that_is_not_a_string_is_a_400(tmp_path: Path) -> None:
    app, _ = linear_app(tmp_path, admin_token="s3cret")
    deep: Any = []
    for _ in range(900):
        deep = [deep]
    async with app.lifespan():
        for replace in (5, ["1"], deep):
            load = {"parameters": {"weights": "v2.pt", "version": "2", "replace": replace}}
            body = json.dumps(load).encode()
            reply = await request(app, "POST", "/v2/repository/models/lin/load", body, headers=AUTH)
            assert reply.status == 400, reply.body
            assert "'replace' must be a version string" in reply.error
