"""The gateway: API keys and rate limits in front of inference (docs/security.md).

In-process through the ASGI app for the rules, and through a real uvicorn server with the stock
tritonclient for the wire. Redis-backed limits shared by replicas: tests/cli/test_gateway_redis.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from batchkit import BatchedModel, ConfigurationError
from batchkit.asgi import KServeApp, ServedModel, Tensor
from batchkit.asgi._gateway import MemoryStore, parse_rate

from ..support.asgi import Reply, request, running_server

pytestmark = pytest.mark.anyio

ROW = [1.0, 2.0, 3.0]


def keys_file(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


KEYS = [
    {"name": "alice", "key": "alice-secret"},
    {"name": "bob", "sha256": hashlib.sha256(b"bob-secret").hexdigest(), "rate_limit": "2/min"},
    {"name": "mallory", "key": "mallory-secret", "revoked": True},
]


def make_app(tmp_path: Path, **options: Any) -> KServeApp:
    model = BatchedModel(lambda items: items, name="m")
    served = ServedModel(
        model, inputs=[Tensor("X", "FP32", [3])], outputs=[Tensor("Y", "FP32", [3])]
    )
    if "api_keys" not in options:
        options["api_keys"] = keys_file(tmp_path, KEYS)
    return KServeApp(served, metrics=True, admin_token="admin", **options)


def body(rows: int = 1) -> dict[str, Any]:
    return {"inputs": [{"name": "X", "datatype": "FP32", "shape": [rows, 3], "data": ROW * rows}]}


async def infer(app: KServeApp, headers: dict[str, str] | None = None, rows: int = 1) -> Reply:
    return await request(app, "POST", "/v2/models/m/infer", body(rows), headers=headers)


# -- rates and the limit's arithmetic -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [("100/s", 100, 1), ("6000/min", 6000, 60), ("10/5s", 10, 5), ("2/hour", 2, 3600)],
)
def test_rates_parse(text: str, count: float, period: float) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.period, rate.burst) == (count, period, count)


@pytest.mark.parametrize("text", ["", "100", "100/", "x/s", "100/fortnight", "0/s", "-1/s", "1/0s"])
def test_bad_rates_say_what_a_rate_is(text: str) -> None:
    with pytest.raises(ConfigurationError, match="rate limit"):
        parse_rate(text)


async def test_the_limit_allows_the_burst_then_one_unit_per_interval() -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    rate = parse_rate("2/s", burst=4)  # 4 at once, then one every 0.5 s
    allowed = [(await store.admit("k", rate, 1)).allowed for _ in range(5)]
    assert allowed == [True, True, True, True, False]
    refused = await store.admit("k", rate, 1)
    assert refused.retry_after == pytest.approx(0.5) and refused.remaining == 0
    now[0] += 0.5
    assert (await store.admit("k", rate, 1)).allowed
    assert not (await store.admit("k", rate, 1)).allowed
    now[0] += 10
    full = await store.admit("k", rate, 3)  # rows: three units at once
    assert full.allowed and full.remaining == 1 and full.limit == 4
    assert not (await store.admit("k", rate, 2)).allowed  # two more than are left
    assert (await store.admit("other", rate, 4)).allowed  # buckets are per key


# -- keys -----------------------------------------------------------------------------------------


async def test_a_missing_key_is_401_with_a_json_error(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.lifespan():
        reply = await infer(app)
    assert reply.status == 401
    assert "API key is required" in reply.error
    assert reply.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer alice-secret"},
        {"authorization": "bearer   alice-secret  "},
        {"x-api-key": "alice-secret"},
        {"authorization": f"Bearer {'bob-secret'}"},  # stored as its SHA-256 only
    ],
)
async def test_a_valid_key_passes_as_bearer_or_x_api_key(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    app = make_app(tmp_path)
    async with app.lifespan():
        reply = await infer(app, headers)
    assert reply.status == 200, reply.body
    assert reply.json()["outputs"][0]["data"] == ROW


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer nope"},
        {"authorization": "Bearer "},
        {"authorization": "Bearer"},
        {"authorization": ""},
        {"authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"authorization": "Bearer " + "x" * 100_000},
        {"x-api-key": "ключ-😀"},
        {"x-api-key": "alice-secret\x00"},
        {"x-api-key": ""},
    ],
)
async def test_bad_keys_are_clean_401s(tmp_path: Path, headers: dict[str, str]) -> None:
    app = make_app(tmp_path)
    async with app.lifespan():
        reply = await infer(app, headers)
        assert reply.status == 401, reply.body
        assert reply.error
        assert (await infer(app, {"x-api-key": "alice-secret"})).status == 200  # still serving


async def test_a_revoked_key_is_403_and_named(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.lifespan():
        reply = await infer(app, {"x-api-key": "mallory-secret"})
    assert reply.status == 403
    assert "mallory" in reply.error and "mallory-secret" not in reply.error


async def test_health_stays_open_and_metadata_is_open_unless_protected(tmp_path: Path) -> None:
    for protect in (False, True):
        app = make_app(tmp_path, protect_metadata=protect)
        async with app.lifespan():
            for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/m/ready"):
                assert (await request(app, "GET", path)).status == 200
            for path in ("/v2", "/v2/models/m", "/v2/models/m/config", "/metrics"):
                reply = await request(app, "GET", path)
                assert reply.status == (401 if protect else 200), (path, reply.body)
                keyed = await request(app, "GET", path, headers={"x-api-key": "alice-secret"})
                assert keyed.status == 200


async def test_reload_by_the_admin_endpoint_revokes_and_adds_keys(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    path = tmp_path / "keys.json"
    admin = {"authorization": "Bearer admin"}
    async with app.lifespan():
        assert (await infer(app, {"x-api-key": "alice-secret"})).status == 200
        path.write_text(
            json.dumps({"keys": [{"name": "alice", "key": "alice-secret", "revoked": True},
                                 {"name": "carol", "key": "carol-secret"}]})
        )  # fmt: skip
        assert (await request(app, "POST", "/v2/gateway/reload")).status == 401
        reply = await request(app, "POST", "/v2/gateway/reload", headers=admin)
        assert (reply.status, reply.json()) == (200, {"keys": 2})
        assert (await infer(app, {"x-api-key": "alice-secret"})).status == 403
        assert (await infer(app, {"x-api-key": "carol-secret"})).status == 200
        path.write_text("{not json")
        reply = await request(app, "POST", "/v2/gateway/reload", headers=admin)
        assert reply.status == 400 and "not valid" in reply.error
        assert (await infer(app, {"x-api-key": "carol-secret"})).status == 200  # kept


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([{"key": "k"}], "'name'"),
        ([{"name": "a"}], "exactly one of 'key' and 'sha256'"),
        ([{"name": "a", "sha256": "zz"}], "64 hex digits"),
        ([{"name": "a", "key": "k", "rate_limit": "fast"}], "COUNT/UNIT"),
        ([{"name": "a", "key": "k"}, {"name": "a", "key": "j"}], "used twice"),
        ([{"name": "a", "key": "k", "colour": 1}], "unknown fields"),
    ],
)
def test_a_bad_keys_file_names_the_problem(
    tmp_path: Path, entries: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make_app(tmp_path, api_keys=keys_file(tmp_path, entries))


# -- limits ---------------------------------------------------------------------------------------


async def test_over_the_limit_is_429_with_retry_after_and_ratelimit_headers(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    bob = {"x-api-key": "bob-secret"}  # 2/min, burst 2
    async with app.lifespan():
        first = await infer(app, bob)
        assert first.status == 200
        assert first.headers["ratelimit-limit"] == "2"
        assert first.headers["ratelimit-remaining"] == "1"
        assert (await infer(app, bob)).status == 200
        limited = await infer(app, bob)
        assert limited.status == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 30
        assert limited.headers["ratelimit-remaining"] == "0"
        assert "bob" in limited.error
        assert (await infer(app, {"x-api-key": "alice-secret"})).status == 200  # no limit
        metrics = (await request(app, "GET", "/metrics")).body.decode()
    assert 'batchkit_gateway_requests_total{key="bob",outcome="allowed"} 2.0' in metrics
    assert 'batchkit_gateway_requests_total{key="bob",outcome="limited"} 1.0' in metrics
    assert "bob-secret" not in metrics


async def test_a_default_limit_applies_per_key(tmp_path: Path) -> None:
    app = make_app(tmp_path, rate_limit="1/min")
    async with app.lifespan():
        assert (await infer(app, {"x-api-key": "alice-secret"})).status == 200
        assert (await infer(app, {"x-api-key": "alice-secret"})).status == 429
        assert (await infer(app, {"x-api-key": "bob-secret"})).status == 200  # its own


async def test_rows_can_be_what_is_counted(tmp_path: Path) -> None:
    app = make_app(tmp_path, rate_limit="5/min", rate_limit_rows=True)
    alice = {"x-api-key": "alice-secret"}
    async with app.lifespan():
        assert (await infer(app, alice, rows=3)).status == 200
        reply = await infer(app, alice, rows=3)  # 6 rows > 5
        assert reply.status == 429
        assert (await infer(app, alice, rows=2)).status == 200
        too_big = await infer(app, {"x-api-key": "bob-secret"}, rows=3)  # bob's burst is 2
        assert too_big.status == 429 and "allows 2 at once" in too_big.error
        stats = app.models[0].model.statistics()
    assert stats.completed == 5  # refused rows never reached the model


async def test_limits_without_keys_apply_to_everyone_as_one(tmp_path: Path) -> None:
    app = make_app(tmp_path, api_keys=None, rate_limit="2/min")
    async with app.lifespan():
        statuses = [(await infer(app)).status for _ in range(3)]
    assert statuses == [200, 200, 429]


# -- on the wire, with the stock tritonclient ----------------------------------------------------


def test_tritonclient_sends_its_key_and_reads_401_and_429(tmp_path: Path) -> None:
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    app = make_app(tmp_path)
    with running_server(app) as url:
        client = httpclient.InferenceServerClient(url)
        try:
            assert client.is_server_ready()  # health needs no key
            inp = httpclient.InferInput("X", [1, 3], "FP32")
            inp.set_data_from_numpy(np.array([ROW], np.float32))
            with pytest.raises(InferenceServerException, match="API key is required"):
                client.infer("m", [inp])
            out = client.infer("m", [inp], headers={"Authorization": "Bearer alice-secret"})
            assert out.as_numpy("Y").tolist() == [ROW]
            bob = {"X-API-Key": "bob-secret"}
            client.infer("m", [inp], headers=bob)
            client.infer("m", [inp], headers=bob)
            with pytest.raises(InferenceServerException, match="rate limit") as info:
                client.infer("m", [inp], headers=bob)
            assert info.value.status() == "429"
        finally:
            client.close()


def test_the_server_keeps_serving_through_malformed_headers(tmp_path: Path) -> None:
    """Raw requests with bytes no client library would send: 401, never 500, still serving."""
    import socket

    app = make_app(tmp_path)
    payload = json.dumps(body()).encode()
    with running_server(app) as url:
        host, port = url.split(":")
        for header in (
            b"Authorization: Bearer \xff\xfe\r\n",
            b"X-API-Key: \xc3\x28\r\n",
            b"Authorization: \r\n",
            b"X-API-Key: " + b"k" * 20_000 + b"\r\n",
        ):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n" + header
                    + b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload
                )  # fmt: skip
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            status = reply.split(b" ", 2)[1]
            assert status in (b"401", b"400", b"431"), reply[:200]
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


async def test_keys_never_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(tmp_path)
    with caplog.at_level("DEBUG"):
        async with app.lifespan():
            await infer(app, {"x-api-key": "bob-secret"})
            await infer(app, {"x-api-key": "wrong-secret"})
            await anyio.lowlevel.checkpoint()
    assert "bob-secret" not in caplog.text and "wrong-secret" not in caplog.text


# -- gRPC: the same keys and limits, from call metadata ------------------------------------------


def test_grpc_calls_carry_their_key_in_metadata(tmp_path: Path) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from batchkit.asgi import serving

    app = make_app(tmp_path, protect_metadata=True)
    with serving(app, grpc_port=0) as address:
        client = grpcclient.InferenceServerClient(address.grpc)
        try:
            assert client.is_server_live() and client.is_server_ready()  # health: no key
            assert client.is_model_ready("m")
            inp = grpcclient.InferInput("X", [1, 3], "FP32")
            inp.set_data_from_numpy(np.array([ROW], np.float32))

            def status_of(**kwargs: Any) -> str:
                with pytest.raises(InferenceServerException) as info:
                    client.infer("m", [inp], **kwargs)
                return str(info.value.status())

            assert status_of() == "StatusCode.UNAUTHENTICATED"
            assert status_of(headers={"authorization": "Bearer nope"}) == (
                "StatusCode.UNAUTHENTICATED"
            )
            assert status_of(headers={"x-api-key": "mallory-secret"}) == (
                "StatusCode.PERMISSION_DENIED"
            )
            alice = {"authorization": "Bearer alice-secret"}
            assert client.infer("m", [inp], headers=alice).as_numpy("Y").tolist() == [ROW]
            with pytest.raises(InferenceServerException, match="API key"):
                client.get_model_metadata("m")  # protected by the option
            assert client.get_model_metadata("m", headers=alice).name == "m"
            bob = {"x-api-key": "bob-secret"}  # 2/min
            client.infer("m", [inp], headers=bob)
            client.infer("m", [inp], headers=bob)
            assert status_of(headers=bob) == "StatusCode.RESOURCE_EXHAUSTED"
        finally:
            client.close()
    counts = app.gateway.counts if app.gateway is not None else {}
    assert counts[("bob", "limited")] == 1 and counts[("bob", "allowed")] == 2
    assert counts[("mallory", "forbidden")] == 1
