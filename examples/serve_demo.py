"""Serve the demo model over HTTP, drive it with 32 concurrent tritonclient requests, and
compare throughput with batching on and off. Ends by itself.

    python -m pip install -e ".[server,triton]" && python examples/serve_demo.py

The demo model costs 2 ms per batch plus a little per item (a stand-in for a small model on an
accelerator). The same server runs it twice: "demo" batches up to 64 requests together,
"demo_unbatched" (max_batch_size=1) runs each request alone.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import tritonclient.http.aio as aio

from batchkit.asgi import KServeApp, serving
from batchkit.asgi._demo import demo_models

CONCURRENCY = 32
REQUESTS = 400


async def drive(url: str, model: str) -> float:
    """Send REQUESTS requests, CONCURRENCY at a time; return requests per second."""
    client = aio.InferenceServerClient(url, conn_limit=CONCURRENCY)
    try:
        remaining = iter(range(REQUESTS))

        async def worker() -> None:
            for i in remaining:
                inp = aio.InferInput("INPUT0", [1, 16], "FP32")
                inp.set_data_from_numpy(np.full((1, 16), i, dtype=np.float32))
                result = await client.infer(model, [inp])
                assert result.as_numpy("OUTPUT0")[0, 0] == 2 * i + 1  # its own answer

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return REQUESTS / (time.perf_counter() - start)
    finally:
        await client.close()


def main() -> None:
    app = KServeApp(demo_models(unbatched=True))
    with serving(app) as address:  # "127.0.0.1:PORT", uvicorn in a background thread
        batched = asyncio.run(drive(address, "demo"))
        unbatched = asyncio.run(drive(address, "demo_unbatched"))
        stats = app.models[0].model.statistics()
    print(f"served on http://{address} (KServe v2), {CONCURRENCY} concurrent clients")
    print(f"batched (up to 64):  {batched:7.0f} req/s, mean batch {stats.mean_batch_size:.1f}")
    print(f"unbatched:           {unbatched:7.0f} req/s")
    print(f"batching speedup:    {batched / unbatched:7.1f}x")
    print("the same, step by step: python -m batchkit bench --compare")


if __name__ == "__main__":
    main()
