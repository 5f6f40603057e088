"""The error for a request with more rows than a model accepts names the setting, max_rows."""

from __future__ import annotations

import pytest

from batchkit.asgi import KServeApp, ServedModel

from ..support.asgi import identity_model, request
from .test_app import json_input

pytestmark = pytest.mark.anyio


async def test_too_many_rows_names_max_rows_and_its_value() -> None:
    served = identity_model("FP32", (-1,), name="small", max_batch_size=8)
    small = ServedModel(served.model, inputs=served.inputs, outputs=served.outputs, max_rows=2)
    app = KServeApp([small], metrics=False)
    body = {"inputs": [json_input("X", "FP32", [1, 2, 3], [3, 1])]}
    async with app.lifespan():
        reply = await request(app, "POST", "/v2/models/small/infer", body)
    assert reply.status == 400
    assert "3 rows" in reply.error
    assert "max_rows=2" in reply.error
    assert "ServedModel" in reply.error
