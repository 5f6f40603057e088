"""batchkit quickstart: one batched model, called from async tasks and from threads.

Run it:  python examples/quickstart.py   (pure Python, no numpy or torch; under 2 seconds)
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from batchkit import batched


@batched(max_batch_size=32)
def square(xs: list[int]) -> list[int]:
    """The "model": one call per batch, one output per item, in order."""
    time.sleep(0.01)  # a fixed cost per call, like a GPU kernel launch; it releases the GIL
    return [x * x for x in xs]


async def async_callers() -> list[int]:
    # `async with` runs the engine in this event loop: the fast path for async servers.
    async with square:
        # 200 concurrent callers, one item each; batches form while the model runs.
        return await asyncio.gather(*(square.call(i) for i in range(200)))
    # Leaving the block stops the engine; the model can be used again afterwards.


def thread_callers() -> list[int]:
    # A plain call from sync code starts the engine on a background thread on first use.
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(square, range(200)))


def main() -> None:
    start = time.perf_counter()

    # Async first: `async with` is refused while the background thread runs, and close() is final.
    results = asyncio.run(async_callers())
    assert results == [i * i for i in range(200)]
    stats = square.statistics()
    print(f"async:   {stats.completed} calls in {stats.batches} batches")

    results = thread_callers()
    assert results == [i * i for i in range(200)]
    square.close()  # stop the background thread; later calls raise ClosedError

    stats = square.statistics()  # the counters cover both sections
    print(f"total:   {stats.completed} calls in {stats.batches} batches")
    print(f"mean batch size: {stats.mean_batch_size:.1f}")
    print(f"batch sizes (size: count): {dict(sorted(stats.batch_sizes.items()))}")
    print(f"compute p50: {stats.compute.p50 * 1000:.1f} ms per batch")
    print(f"end to end p50: {stats.end_to_end.p50 * 1000:.1f} ms per call")
    print(f"done in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
