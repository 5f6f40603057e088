"""batchkit pipe: a batched model in a child process, called over JSON lines on stdin/stdout.

Run it:  python examples/pipe_client.py   (pure Python, no numpy or torch; about a second)

This one file plays both parts. Started with the argument ``serve`` it is the pipe server
(``batchkit.pipe.run``); otherwise it is the client, which starts the server as a child
process (``PipeClient``, ``SyncPipeClient``). Serving a model from a module of your own is the
same without the ``serve`` part: ``batchkit pipe mymodule:square``.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import anyio

from batchkit import DeadlineExceeded, batched
from batchkit.pipe import PipeClient, ResponseError, SyncPipeClient, run

SERVER = [sys.executable, __file__, "serve"]


@batched(max_batch_size=32)
def square(xs: list[int]) -> list[int | Exception]:
    """The "model": one call per batch; a negative item fails alone, as its own error."""
    time.sleep(0.005)  # a fixed cost per call, like a GPU kernel launch
    return [ValueError(f"negative input: {x}") if x < 0 else x * x for x in xs]


async def async_client() -> None:
    # Enter: start the child and wait for it to answer a ping. Leave: end its input, so it
    # answers what is in flight and exits.
    async with PipeClient(command=SERVER) as client:
        # 200 calls in flight at once over one pipe: the server batches them.
        results = await client.call_many(range(200))
        assert results == [i * i for i in range(200)]
        value, version = await client.call_versioned(12, priority=-1, timeout=5.0)
        print(f"async:   square(12) = {value} (model version {version})")
        try:
            await client.call(-3)
        except ResponseError as exc:  # an exception the model returned for this item
            print(f"async:   {exc.type}: {exc.message}")
        try:
            await client.call(4, timeout=0)
        except DeadlineExceeded:  # the same error type as in process
            print("async:   a call with timeout=0 expired")
        stats = await client.statistics()
        print(f"async:   {stats.completed} calls in {stats.batches} batches on the server")


def sync_client() -> None:
    # The same client for threads: calls from many threads share one child.
    with SyncPipeClient(command=SERVER) as client:
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(client.call, range(100)))
        assert results == [i * i for i in range(100)]
        stats = client.statistics()
        print(f"sync:    {stats.completed} calls, mean batch size {stats.mean_batch_size:.1f}")


def main() -> None:
    if sys.argv[1:] == ["serve"]:
        sys.exit(run(square))  # stdin/stdout carry the protocol; logs go to stderr
    start = time.perf_counter()
    anyio.run(async_client)
    sync_client()
    print(f"done in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
