"""Load-test a canary and a shadow over HTTP, and watch a server shed overload.

A ``Deployment`` serves model ``clf`` in three versions: ``v1`` (the primary), ``v2`` (a canary
at 10% of the traffic) and ``v3`` (a shadow that sees every call, never answers one, and
disagrees with ``v1`` on about 3% of the inputs). The script sends requests with the stock
``tritonclient`` asyncio client from many tasks at once, then reports the canary's configured
and observed share, the shadow's disagreement rate, and what a second, deliberately small
deployment does with a burst it cannot hold (503 with Retry-After).

Run it: ``python examples/canary_loadtest.py [--requests 800] [--concurrency 16] [--json F]``
(needs ``batchkit[server,bench]``: uvicorn, numpy, tritonclient).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tritonclient.http.aio as aio

from batchkit import BatchedModel, Deployment
from batchkit.asgi import KServeApp, ServedModel, Tensor, serving

TOKEN = "load-test-token"
SIGNATURE = {"inputs": [Tensor("X", "FP32", (4,))], "outputs": [Tensor("Y", "FP32", (4,))]}


def doubled(items: list[np.ndarray]) -> list[np.ndarray]:
    return [x * 2 for x in items]


def doubled_mostly(items: list[np.ndarray]) -> list[np.ndarray]:
    """The shadow: like v1, except on inputs whose first value is 0, 1 or 2 modulo 100."""
    return [x * 2 + (1 if int(x[0]) % 100 < 3 else 0) for x in items]


def slow(items: list[np.ndarray]) -> list[np.ndarray]:
    time.sleep(0.05)  # a model that cannot keep up with a burst
    return items


def canary_deployment(canary: float, shadow_fraction: float, seed: int) -> Deployment[Any, Any]:
    versions = {v: BatchedModel(doubled, name="clf", version=v) for v in ("v1", "v2")}
    versions["v3"] = BatchedModel(doubled_mostly, name="clf", version="v3")
    return Deployment(
        versions,
        weights={"v1": 1 - canary, "v2": canary},
        shadow="v3",
        shadow_fraction=shadow_fraction,
        seed=seed,
    )


def small_deployment() -> Deployment[Any, Any]:
    model = BatchedModel(slow, name="small", version="1", max_batch_size=2, max_queue_size=2)
    return Deployment({"1": model})


async def canary_load(url: str, requests: int, concurrency: int) -> Counter[str]:
    """Send ``requests`` inferences from ``concurrency`` tasks; count the versions answering."""
    seen: Counter[str] = Counter()
    pending = iter(range(requests))
    client = aio.InferenceServerClient(url)

    async def worker() -> None:
        for i in pending:
            data = np.full((1, 4), i, np.float32)
            inp = aio.InferInput("X", [1, 4], "FP32")
            inp.set_data_from_numpy(data)
            result = await client.infer("clf", [inp])
            np.testing.assert_array_equal(result.as_numpy("Y"), data * 2)  # never the shadow's
            seen[result.get_response()["model_version"]] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return seen


def burst(url: str, requests: int) -> list[tuple[int, str | None]]:
    """Send ``requests`` JSON inferences to ``small`` at once; return (status, Retry-After)."""
    host, port = url.rsplit(":", 1)
    body = json.dumps(
        {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    )

    def one(_: int) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v2/models/small/infer", body)
            reply = conn.getresponse()
            reply.read()
            return reply.status, reply.getheader("retry-after")
        finally:
            conn.close()

    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(one, range(requests)))


def routing_state(url: str, name: str) -> dict[str, Any]:
    host, port = url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(
            "GET", f"/v2/routing/models/{name}", headers={"authorization": f"Bearer {TOKEN}"}
        )
        reply = conn.getresponse()
        return dict(json.loads(reply.read()))
    finally:
        conn.close()


def binomial_interval(n: int, p: float, z: float = 3.2905) -> tuple[float, float]:
    """Return the 99.9% normal interval of a binomial share around ``p`` over ``n`` trials."""
    half = z * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--canary", type=float, default=0.1)
    parser.add_argument("--shadow-fraction", type=float, default=1.0)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    deployment = canary_deployment(args.canary, args.shadow_fraction, args.seed)
    served = [
        ServedModel(deployment, **SIGNATURE),
        ServedModel(small_deployment(), **SIGNATURE),
    ]
    app = KServeApp(served, admin_token=TOKEN)
    with serving(app) as url:
        seen = asyncio.run(canary_load(url, args.requests, args.concurrency))
        deployment.wait_shadow_sync(60)
        state = routing_state(url, "clf")
        statuses = burst(url, args.burst)

    low, high = binomial_interval(args.requests, args.canary)
    observed = seen["v2"] / args.requests
    shadow = state["shadow"]
    shed = [retry for status, retry in statuses if status == 503]
    report = {
        "requests": args.requests,
        "versions": dict(seen),
        "canary": {"configured": args.canary, "observed": observed, "interval": [low, high]},
        "routed": state["routed"],
        "shadow": shadow,
        "overload": {
            "burst": args.burst,
            "served": sum(status == 200 for status, _ in statuses),
            "shed": len(shed),
            "retry_after": sorted(set(r for r in shed if r is not None)),
            "other": sorted(status for status, _ in statuses if status not in (200, 503)),
        },
    }
    print(
        f"canary v2: configured {args.canary:.1%}, observed {observed:.1%} of "
        f"{args.requests} requests (99.9% interval {low:.1%} to {high:.1%})"
    )
    print(
        f"shadow v3: {shadow['disagreement_rate']:.1%} disagreement "
        f"({shadow['disagreed']} of {shadow['agreed'] + shadow['disagreed']} compared), "
        f"{shadow['errors']} errors, {shadow['dropped']} dropped"
    )
    overload = report["overload"]
    print(
        f"overload: {args.burst} requests at once on a queue of 2: {overload['shed']} shed with "
        f"503 + Retry-After {', '.join(overload['retry_after']) or '-'} s, "
        f"{overload['served']} served"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
