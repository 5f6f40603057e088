"""A ``Deployment`` served over HTTP: a real uvicorn server, the stock tritonclient.http client.

One name routes to its versions (by weight, by the routing-key header, or pinned by the URL's
version); the admin endpoints read and change the routing; /metrics shows each version and the
shadow's agreement.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from batchkit import BatchedModel, Deployment
from batchkit.asgi import KServeApp, ServedModel, Tensor

from ..support.asgi import running_server

tritonclient_http = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def plus(offset: float) -> Any:
    def model(items: list[Any]) -> list[Any]:
        return [np.asarray(x, np.float32) + offset for x in items]

    return model


def flaky_copy(items: list[Any]) -> list[Any]:
    """The shadow: agrees with version 1 except where the first value is negative."""
    return [np.asarray(x, np.float32) + (5 if x[0] < 0 else 0) for x in items]


def make_deployment(**options: Any) -> Deployment[Any, Any]:
    versions = {
        "1": BatchedModel(plus(0), name="clf", version="1"),
        "2": BatchedModel(plus(100), name="clf", version="2", max_batch_size=8),
        "s": BatchedModel(flaky_copy, name="clf", version="s"),
    }
    return Deployment(versions, **options)


def served(deployment: Deployment[Any, Any]) -> ServedModel:
    return ServedModel(
        deployment,
        inputs=[Tensor("X", "FP32", (3,))],
        outputs=[Tensor("Y", "FP32", (3,))],
    )


@pytest.fixture
def server() -> Iterator[tuple[str, Deployment[Any, Any]]]:
    deployment = make_deployment(weights={"1": 0.9, "2": 0.1}, seed=5)
    app = KServeApp([served(deployment)], admin_token=TOKEN, metrics=True)
    with running_server(app) as url:
        yield url, deployment


def infer(
    client: Any, x: list[float], *, version: str = "", headers: dict[str, str] | None = None
) -> tuple[str, np.ndarray[Any, Any]]:
    data = np.asarray([x], np.float32)
    inp = tritonclient_http.InferInput("X", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    result = client.infer("clf", [inp], model_version=version, headers=headers)
    return result.get_response()["model_version"], result.as_numpy("Y")[0]


def call(url: str, method: str, path: str, body: Any = None, headers: Any = None) -> Any:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, payload, {**(headers or {})})
        reply = conn.getresponse()
        text = reply.read()
        return reply.status, dict(reply.getheaders()), text
    finally:
        conn.close()


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    status, _, text = call(url, method, path, body, AUTH)
    assert status == 200, text
    return json.loads(text)


def test_one_name_routes_by_weight_and_reports_the_version(server: Any) -> None:
    url, _ = server
    client = tritonclient_http.InferenceServerClient(url)
    seen: Counter[str] = Counter()
    n = 800
    for i in range(n):
        version, y = infer(client, [i, 1, 2])
        offset = 100 if version == "2" else 0
        np.testing.assert_array_equal(y, np.asarray([i, 1, 2], np.float32) + offset)
        seen[version] += 1
    assert set(seen) == {"1", "2"}
    bound = 3.2905 * math.sqrt(n * 0.1 * 0.9) + 1
    assert abs(seen["2"] - n * 0.1) <= bound, seen
    state = admin(url, "GET", "/v2/routing/models/clf")
    assert state["routed"] == {"1": seen["1"], "2": seen["2"], "s": 0}
    assert state["routing"]["weights"] == {"1": 0.9, "2": 0.1, "s": 0.0}


def test_a_request_naming_a_version_is_pinned_to_it(server: Any) -> None:
    url, deployment = server
    client = tritonclient_http.InferenceServerClient(url)
    for _ in range(20):
        version, y = infer(client, [1, 2, 3], version="s")  # weight 0: only pinned calls
        assert version == "s"
        np.testing.assert_array_equal(y, [1, 2, 3])
    assert infer(client, [1, 2, 3], version="2")[0] == "2"
    deployment.set_weights({"1": 1, "2": 1})  # "1" is the primary (first of equals)
    assert deployment.version == "1"
    assert {infer(client, [1, 2, 3], version="1")[0] for _ in range(10)} == {"1"}
    deployment.rollback()
    with pytest.raises(InferenceServerException, match=r"has no version '7'"):
        infer(client, [1, 2, 3], version="7")
    assert deployment.statistics().pinned == {"1": 10, "2": 1, "s": 20}
    metadata = client.get_model_metadata("clf")
    assert sorted(metadata["versions"]) == ["1", "2", "s"]
    assert client.is_model_ready("clf", "s")
    config = client.get_model_config("clf", "2")
    assert config["max_batch_size"] == 8  # the pinned version's own settings
    assert config["version_policy"] == {"specific": {"versions": ["2"]}}
    assert client.get_model_config("clf")["max_batch_size"] == 32  # the primary's


def test_a_routing_key_sticks_to_one_version(server: Any) -> None:
    url, _ = server
    client = tritonclient_http.InferenceServerClient(url)
    first = {}
    for user in range(40):
        headers = {"batchkit-routing-key": f"user-{user}"}
        first[user] = {infer(client, [user, 0, 0], headers=headers)[0] for _ in range(5)}
    assert all(len(versions) == 1 for versions in first.values())
    with pytest.raises(InferenceServerException, match="batchkit-routing-key"):
        infer(client, [0, 0, 0], headers={"batchkit-routing-key": "k" * 300})


def test_admin_endpoints_change_the_routing_at_once(server: Any) -> None:
    url, _ = server
    client = tritonclient_http.InferenceServerClient(url)
    state = admin(url, "POST", "/v2/routing/models/clf", {"promote": "2"})
    assert state["routing"]["primary"] == "2"
    assert {infer(client, [0, 0, 0])[0] for _ in range(20)} == {"2"}
    state = admin(url, "POST", "/v2/routing/models/clf", {"rollback": True})
    assert state["routing"]["weights"] == {"1": 0.9, "2": 0.1, "s": 0.0}
    admin(url, "POST", "/v2/routing/models/clf", {"weights": {"1": 1}})
    admin(url, "POST", "/v2/routing/models/clf", {"shadow": {"version": "s", "fraction": 1}})
    rows = [[-1, 0, 0] if i % 4 == 0 else [1, 0, 0] for i in range(40)]
    for row in rows:
        assert infer(client, row) == ("1", pytest.approx(np.asarray(row, np.float32)))
    listing = admin(url, "GET", "/v2/routing")
    assert [m["name"] for m in listing["models"]] == ["clf"]
    state = admin(url, "POST", "/v2/routing/models/clf", {"shadow": None})
    assert state["routing"]["shadow"] is None
    shadow = state["shadow"]
    assert shadow["mirrored"] == 40
    assert shadow["agreed"] + shadow["disagreed"] + shadow["pending"] == 40


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"weights": {"9": 1}}, 400, "no version '9'"),
        ({"weights": {"1": 0}}, 400, "a weight > 0"),
        ({"weights": [1]}, 400, "must be an object"),
        ({"promote": 2}, 400, "must be a version name"),
        ({"shadow": {"version": "s", "fraction": 2}}, 400, "fraction"),
        ({"shadow": {"fraction": 1}}, 400, "'version'"),
        ({"shadow": {"version": "s", "extra": 1}}, 400, "unknown field"),
        ({"rollback": 1}, 400, "must be true"),
        ({"promote": "2", "rollback": True}, 400, "exactly one of"),
        ({}, 400, "exactly one of"),
        ({"swap": 1}, 400, "exactly one of"),
    ],
)
def test_a_bad_change_is_a_clear_400_and_changes_nothing(
    server: Any, body: Any, status: int, message: str
) -> None:
    url, deployment = server
    before = deployment.routing
    got, _, text = call(url, "POST", "/v2/routing/models/clf", body, AUTH)
    assert got == status, text
    assert message in json.loads(text)["error"]
    assert deployment.routing == before


def test_the_routing_endpoints_need_the_admin_token(server: Any) -> None:
    url, deployment = server
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("GET", "/v2/routing"), ("POST", "/v2/routing/models/clf")):
            status, reply_headers, _ = call(url, method, path, {"promote": "2"}, headers)
            assert status == 401
            assert reply_headers["www-authenticate"] == "Bearer"
    assert deployment.version == "1"
    assert call(url, "GET", "/v2/routing/models/nope", None, AUTH)[0] == 404
    assert call(url, "DELETE", "/v2/routing/models/clf", None, AUTH)[0] == 405
    assert call(url, "GET", "/v2/routing/other/clf", None, AUTH)[0] == 404


def test_without_an_admin_token_routing_is_read_only_by_requests() -> None:
    deployment = make_deployment()
    plain = ServedModel(BatchedModel(plus(0), name="plain"))
    app = KServeApp([served(deployment), plain], metrics=False)
    with running_server(app) as url:
        assert call(url, "GET", "/v2/routing", None, AUTH)[0] == 403
        client = tritonclient_http.InferenceServerClient(url)
        assert infer(client, [1, 2, 3])[0] == "1"
    app = KServeApp([served(make_deployment()), plain], admin_token=TOKEN, metrics=False)
    with running_server(app) as url:
        status, _, text = call(url, "GET", "/v2/routing/models/plain", None, AUTH)
        assert status == 404 and b"not a deployment" in text
        status, _, text = call(
            url,
            "POST",
            "/v2/repository/models/clf/load",
            {"parameters": {"weights": "w.pt", "version": "9"}},
            AUTH,
        )
        assert status == 409 and b"/v2/routing/models/clf" in text


def test_metrics_per_version_and_for_shadow_agreement() -> None:
    deployment = make_deployment(weights={"1": 1, "2": 1}, shadow="s", seed=1)
    app = KServeApp([served(deployment)], admin_token=TOKEN, metrics=True)
    with running_server(app) as url:
        client = tritonclient_http.InferenceServerClient(url)
        versions = Counter(infer(client, [-1 if i % 2 else 1, 0, 0])[0] for i in range(60))
        assert deployment.wait_shadow_sync(30)
        stats = deployment.statistics()
        _, _, text = call(url, "GET", "/metrics")
    metrics = text.decode()

    def value(name: str, **labels: str) -> float:
        for line in metrics.splitlines():
            match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
            if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
                return float(match.group(2))
        raise AssertionError(f"{name} {labels} not in the metrics")

    for version in ("1", "2"):
        assert (
            value("batchkit_routed_items_total", model="clf", version=version, how="routed")
            == (versions[version])
        )
        assert value("batchkit_route_weight", model="clf", version=version) == 0.5
        completed = value("batchkit_items_total", model="clf", version=version, outcome="completed")
        assert completed == versions[version]
        assert (
            value("batchkit_http_requests_total", model="clf", version=version, status="200")
            == versions[version]
        )
    s = stats.shadow
    assert s.mirrored == versions["1"] + versions["2"] and s.disagreed > 0
    assert value("batchkit_shadow_items_total", model="clf", outcome="agreed") == s.agreed
    assert value("batchkit_shadow_items_total", model="clf", outcome="disagreed") == s.disagreed
    assert value("batchkit_shadow_disagreement_ratio", model="clf") == pytest.approx(
        s.disagreement_rate
    )
    shadow_completed = value("batchkit_items_total", model="clf", version="s", outcome="completed")
    assert shadow_completed == s.mirrored


def test_promote_and_rollback_over_http_under_load_lose_nothing(server: Any) -> None:
    url, deployment = server
    results: list[tuple[int, str, Any]] = []
    errors: list[BaseException] = []

    def caller(base: int) -> None:
        client = tritonclient_http.InferenceServerClient(url)
        try:
            for i in range(base, base + 60):
                version, y = infer(client, [i, 0, 0])
                results.append((i, version, y))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    changes = 0
    try:
        while any(t.is_alive() for t in threads):
            body = {"promote": "2"} if changes % 2 == 0 else {"rollback": True}
            admin(url, "POST", "/v2/routing/models/clf", body)
            changes += 1
    finally:
        for t in threads:
            t.join()
    assert not errors and changes > 1
    assert len(results) == 240
    for i, version, y in results:  # every answer from the version it reports
        offset = 100 if version == "2" else 0
        np.testing.assert_array_equal(y, np.asarray([i, 0, 0], np.float32) + offset)
    stats = deployment.statistics()
    assert sum(stats.routed.values()) == 240
    assert stats.total.failed == stats.total.cancelled == 0
