"""Serving a ``Deployment``: requests that name or key a version, and the routing admin API.

- ``/v2/models/<name>/versions/<v>/infer`` pins the request to version ``v`` of a deployment;
  the ``batchkit-routing-key`` header routes it sticky by that key.
- ``GET /v2/routing`` lists every served deployment's routing and split;
  ``GET /v2/routing/models/<name>`` shows one; ``POST`` there changes it, with a JSON object
  holding one of ``weights``, ``shadow`` (an object, or null to clear), ``promote``,
  ``rollback``. Every routing endpoint needs the admin token, as the repository endpoints do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .._core import ConfigurationError, Deployment
from ._budget import MemoryBudget, cost_of_json
from ._errors import BadRequest, HTTPError
from ._http import (
    Receive,
    Response,
    Scope,
    allow,
    headers_of,
    json_object,
    json_response,
    read_body,
)
from ._served import ServedModel
from ._tensors import describe

__all__ = (
    "ROUTING_KEY_HEADER",
    "RoutingAdmin",
    "pinned",
    "routed_by_key",
    "routed_versions",
    "with_key",
)

logger = logging.getLogger("batchkit.asgi")

ROUTING_KEY_HEADER = "batchkit-routing-key"
# Routing keys longer than this are refused (400): they name a user or a session, not data.
_MAX_KEY = 256
_CHANGES = ("weights", "shadow", "promote", "rollback")


def pinned(group: list[ServedModel], version: str) -> ServedModel | None:
    """Return the deployment in ``group`` that has ``version``, pinned to it (else None)."""
    for served in group:
        model = served.model
        if isinstance(model, Deployment) and version in model.versions:
            return served.routed(version=version)
    return None


def routed_versions(group: list[ServedModel]) -> list[str]:
    """Return the versions the deployments in ``group`` route to."""
    return [v for s in group if isinstance(s.model, Deployment) for v in s.model.versions]


def with_key(served: ServedModel, scope: Scope) -> ServedModel:
    """Return ``served`` routed by the request's routing key, when it is a deployment."""
    if not isinstance(served.model, Deployment):
        return served
    return routed_by_key(served, headers_of(scope).get(ROUTING_KEY_HEADER))


def routed_by_key(served: ServedModel, key: str | None) -> ServedModel:
    """Return ``served`` routed by the routing ``key`` (a header over HTTP, call metadata over
    gRPC; None: no key), when it is a deployment."""
    if key is None or not isinstance(served.model, Deployment):
        return served
    if not key or len(key) > _MAX_KEY:
        raise BadRequest(
            f"the {ROUTING_KEY_HEADER} header must hold 1 to {_MAX_KEY} characters, got {len(key)}"
        )
    return served.routed(version=served.route.get("version"), key=key)


class RoutingAdmin:
    """The ``/v2/routing`` endpoints over the app's served deployments."""

    def __init__(
        self,
        served: Mapping[str, list[ServedModel]],
        authorize: Callable[[Mapping[str, str]], None],
        max_body_size: int,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._served = served
        self._authorize = authorize
        self._max_body_size = max_body_size
        self._budget = budget if budget is not None else MemoryBudget(2**62)

    async def route(self, scope: Scope, receive: Receive, parts: list[str]) -> Response:
        """Answer ``/v2/routing/<parts>``."""
        method = scope["method"]
        if parts in ([], [""]):
            allow(method, "GET")
            self._authorize(headers_of(scope))
            return json_response(200, {"models": [self._state(n, d) for n, d in self._all()]})
        if len(parts) != 2 or parts[0] != "models":
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        if method != "GET":
            allow(method, "POST")
        headers = headers_of(scope)
        self._authorize(headers)
        name = parts[1]
        deployment = self._deployment(name)
        if method == "POST":
            with self._budget.claim() as claim:
                body = await read_body(receive, headers, self._max_body_size, claim)
                claim.take(cost_of_json(body))
                request = json_object(body)
            self._change(name, deployment, request)
        return json_response(200, self._state(name, deployment))

    def _all(self) -> list[tuple[str, Deployment[Any, Any]]]:
        return [
            (name, s.model)
            for name, group in self._served.items()
            for s in group
            if isinstance(s.model, Deployment)
        ]

    def _deployment(self, name: str) -> Deployment[Any, Any]:
        for served in self._served.get(name, []):
            if isinstance(served.model, Deployment):
                return served.model
        if name in self._served:
            raise HTTPError(f"model {name!r} is not a deployment of several versions", status=404)
        raise HTTPError(f"unknown model {name!r}; serving {sorted(self._served)}", status=404)

    def _change(self, name: str, deployment: Deployment[Any, Any], request: dict[str, Any]) -> None:
        given = [k for k in _CHANGES if k in request]
        unknown = sorted(set(request) - set(_CHANGES))
        if unknown or len(given) != 1:
            raise BadRequest(
                f"a routing change is a JSON object with exactly one of {list(_CHANGES)}, "
                f"got {describe(sorted(request))}"
            )
        (what,) = given
        value = request[what]
        try:
            if what == "weights":
                if not isinstance(value, dict):
                    raise BadRequest(
                        f"'weights' must be an object of version: weight, got {describe(value)}"
                    )
                for version, weight in value.items():
                    if not _is_number(weight):
                        raise BadRequest(
                            f"the weight of version {describe(version)} must be a number, got "
                            f"{describe(weight)}"
                        )
                deployment.set_weights(value)
            elif what == "shadow":
                self._shadow(deployment, value)
            elif what == "promote":
                if not isinstance(value, str):
                    raise BadRequest(f"'promote' must be a version name, got {describe(value)}")
                deployment.promote(value)
            else:
                if value is not True:
                    raise BadRequest(f"'rollback' must be true, got {describe(value)}")
                deployment.rollback()
        except ConfigurationError as exc:  # its message may quote a client's value: clip it
            message = str(exc)
            raise BadRequest(message if len(message) <= 500 else message[:497] + "...") from None
        logger.info("batchkit: routing of %r is now %s", name, deployment.routing.to_json())

    def _shadow(self, deployment: Deployment[Any, Any], value: Any) -> None:
        if value is None:
            deployment.clear_shadow()
            return
        if not isinstance(value, dict) or not isinstance(value.get("version"), str):
            raise BadRequest(
                "'shadow' must be null or an object with 'version' (and 'fraction'), got "
                f"{describe(value)}"
            )
        if "fraction" in value and not _is_number(value["fraction"]):
            raise BadRequest(
                f"the shadow's 'fraction' must be a number, got {describe(value['fraction'])}"
            )
        unknown = sorted(set(value) - {"version", "fraction"})
        if unknown:
            raise BadRequest(f"'shadow' has unknown field(s) {describe(unknown)}")
        deployment.set_shadow(value["version"], fraction=value.get("fraction", 1.0))

    def _state(self, name: str, deployment: Deployment[Any, Any]) -> dict[str, Any]:
        return {"name": name, **deployment.statistics().summary()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
