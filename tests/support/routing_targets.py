"""Deployments the routing tests serve in a child process (``batchkit pipe``)."""

from __future__ import annotations

from typing import Any

from batchkit import BatchedModel, Deployment


def _tagged(tag: str) -> Any:
    def model(items: list[Any]) -> list[Any]:
        return [f"{tag}:{item}" for item in items]

    return model


def _make() -> Deployment[Any, Any]:
    return Deployment(
        {v: BatchedModel(_tagged(v), name="clf", version=v) for v in ("1", "2")},
        weights={"1": 0.5, "2": 0.5},
        seed=0,
    )


deployment = _make()
# A deployment and a plain model served side by side, by name.
both = {"clf": _make(), "plain": BatchedModel(_tagged("p"), name="plain", version="7")}
