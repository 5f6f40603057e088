"""The model repository endpoints (admin): index, load a new version from weights, unload.

Over a ``ModelRepository`` (a folder of model files), load (re)reads the model from the
folder and unload stops serving it. They need the admin token (``Authorization: Bearer
<token>``), compared in constant time; weight paths stay inside the configured weights
directory.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from .._core import BatchedModel, ConfigurationError, ForbiddenPath, SwapError
from ._budget import Claim, MemoryBudget, cost_of_json
from ._errors import BadRequest, HTTPError
from ._http import (
    JSON,
    Receive,
    Response,
    Scope,
    allow,
    headers_of,
    json_object,
    json_response,
    read_body,
)
from ._model_repository import ModelRepository
from ._served import ServedModel
from ._tensors import describe

__all__ = ("Repository",)

logger = logging.getLogger("batchkit.asgi")


class Repository:
    """The repository endpoints over the app's served models, and which models are unloaded."""

    def __init__(
        self,
        served: Mapping[str, list[ServedModel]],
        find: Callable[[str, str | None], ServedModel],
        *,
        admin_token: str | None,
        weights_dir: str | os.PathLike[str] | None,
        max_body_size: int,
        model_repository: ModelRepository | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._served = served
        self._folder = model_repository
        self._find = find
        self.admin_token = admin_token
        self._weights_dir = None if weights_dir is None else os.path.realpath(weights_dir)
        self._max_body_size = max_body_size
        self._budget = budget
        self.unloaded: set[str] = set()

    async def route(self, scope: Scope, receive: Receive, parts: list[str]) -> Response:
        """Answer ``/v2/repository/<parts>``."""
        method = scope["method"]
        if parts == ["index"] or (
            len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload")
        ):
            allow(method, "POST")
        else:
            raise HTTPError(f"no route {scope['path']!r}", status=404)
        headers = headers_of(scope)
        self._authorize(headers)
        if self._budget is None:
            request = await self._request(receive, headers, None)
        else:
            with self._budget.claim() as claim:
                request = await self._request(receive, headers, claim)
        answer = await self.answer(parts, request)
        return Response(200, JSON, b"") if answer is None else json_response(200, answer)

    async def answer(self, parts: list[str], request: dict[str, Any]) -> list[Any] | None:
        """Answer an authorized repository request: ``["index"]`` (the index, a list) or
        ``["models", name, "load" | "unload"]`` (None); raise ``HTTPError`` for errors.

        Shared by HTTP and gRPC (whose request is turned into the same JSON object).
        """
        if self._folder is not None:
            return await self._folder_answer(self._folder, parts, request)
        if parts == ["index"]:
            return self._index(request)
        name = parts[1]
        if name not in self._served:
            raise HTTPError(f"unknown model {name!r}; serving {sorted(self._served)}", status=404)
        if parts[2] == "unload":
            self.unloaded.add(name)
            logger.info("batchkit: model %r unloaded", name)
            return None
        await self._load(name, request)
        return None

    async def _folder_answer(
        self, folder: ModelRepository, parts: list[str], request: dict[str, Any]
    ) -> list[Any] | None:
        if parts == ["index"]:
            return folder.index(ready=request.get("ready", False) is True)
        name, action = parts[1], parts[2]
        params = request.get("parameters", {})
        if not isinstance(params, dict) or params:
            raise BadRequest(
                "a model repository loads versions from its folder: add a version folder and "
                f"load again, without 'parameters' (got {describe(params)})"
            )
        try:
            if action == "unload":
                await folder.unload_model(name)
                logger.info("batchkit: model %r unloaded", name)
                return None
            await folder.load_model(name)
        except ConfigurationError as exc:
            raise HTTPError(str(exc), status=404) from None
        failed = [e for e in folder.index() if e["name"] == name and e["state"] != "READY"]
        if failed:
            reasons = "; ".join(e["reason"] for e in failed)
            raise HTTPError(f"loading model {name!r} failed: {reasons}", status=400)
        logger.info("batchkit: model %r loaded from the repository", name)
        return None

    async def _request(
        self, receive: Receive, headers: Mapping[str, str], claim: Claim | None
    ) -> dict[str, Any]:
        body = await read_body(receive, headers, self._max_body_size, claim)
        if claim is not None:
            claim.take(cost_of_json(body))
        return json_object(body)

    def _authorize(self, headers: Mapping[str, str]) -> None:
        token = self.admin_token
        if token is None:
            raise HTTPError(
                "the model repository API is disabled; configure an admin token to enable it",
                status=403,
            )
        given = headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            raise HTTPError(
                "the model repository API needs 'Authorization: Bearer <admin token>'",
                status=401,
                headers={"www-authenticate": "Bearer"},
            )

    def _index(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        ready_only = request.get("ready", False) is True
        index = []
        for served in (s for group in self._served.values() for s in group):
            unloaded = served.name in self.unloaded
            if ready_only and unloaded:
                continue
            entry = {
                "name": served.name,
                "version": served.version,
                "state": "UNAVAILABLE" if unloaded else "READY",
            }
            if unloaded:
                entry["reason"] = "unloaded"
            index.append(entry)
        return index

    async def _load(self, name: str, request: dict[str, Any]) -> None:
        params = request.get("parameters", {})
        if not isinstance(params, dict):
            raise BadRequest(f"'parameters' must be a JSON object, got {describe(params)}")
        weights, version = params.get("weights"), params.get("version")
        if weights is None:
            if version is not None:
                raise BadRequest("'version' needs 'weights' (the file to load it from)")
            self.unloaded.discard(name)  # load again what was unloaded
            logger.info("batchkit: model %r loaded", name)
            return
        if not isinstance(weights, str) or not isinstance(version, str) or not version:
            raise BadRequest(
                "'weights' (a path inside the weights directory) and 'version' (a non-empty "
                f"string) must be strings, got weights={describe(weights)}, "
                f"version={describe(version)}"
            )
        if "\x00" in weights or "\x00" in version or "/" in version:
            raise BadRequest(
                "'weights' may not hold a NUL byte, nor 'version' a NUL byte or '/', got "
                f"weights={describe(weights)}, version={describe(version)}"
            )
        replace = params.get("replace")
        if replace is not None and not isinstance(replace, str):
            raise BadRequest(f"'replace' must be a version string, got {describe(replace)}")
        served = self._find(name, replace)
        if not isinstance(served.model, BatchedModel):
            raise HTTPError(
                f"model {name!r} is a deployment of several versions; change its routing at "
                f"/v2/routing/models/{name}",
                status=409,
            )
        if any(s.version == version for s in self._served[name]):
            raise HTTPError(f"model {name!r} already serves version {version!r}", status=409)
        path = self._weights_path(weights)
        try:
            await served.model.swap(path, version=version)
        except ForbiddenPath as exc:
            raise HTTPError(str(exc), status=403) from None
        except SwapError as exc:
            raise HTTPError(
                f"loading version {version!r} of {name!r} failed: {exc}", status=400
            ) from None
        self.unloaded.discard(name)
        logger.info("batchkit: model %r now serves version %r", name, version)

    def _weights_path(self, weights: str) -> str:
        root = self._weights_dir
        if root is None:
            raise HTTPError(
                "loading weights needs a weights directory configured on the server", status=403
            )
        path = os.path.realpath(os.path.join(root, weights))
        if os.path.commonpath([root, path]) != root:
            raise HTTPError(
                f"the weights path {weights!r} is outside the weights directory", status=403
            )
        return path
