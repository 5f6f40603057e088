"""A request handler in the style of an async web server: priorities, timeouts, load shedding.

Interactive requests (priority 0) overtake queued bulk requests (priority 10). Every request has
a time budget (`timeout`). The queue is bounded and the handler uses `call_nowait`, so a burst
beyond the bound is refused at once (HTTP 503 with Retry-After) instead of queueing without end.

Run it:  python examples/async_server_style.py
"""

from __future__ import annotations

import asyncio
from collections import Counter

from batchkit import BatchedModel, DeadlineExceeded, ModelError, QueueFull


async def embed(texts: list[str]) -> list[int]:
    """The "model": an async function (a call to a remote GPU server, say), 20 ms a batch."""
    await asyncio.sleep(0.02)
    return [len(text) for text in texts]


model = BatchedModel(embed, max_batch_size=8, max_queue_size=24, timeout=1.0, name="embed")
served: list[str] = []  # request ids, in the order their answers came back


async def handle(
    request_id: str, text: str, *, interactive: bool, timeout: float | None = None
) -> tuple[int, str]:
    """Answer one request with an HTTP-like (status, body) pair."""
    try:
        length = await model.call_nowait(
            text,
            priority=0 if interactive else 10,  # lower number: served first
            timeout=timeout,  # None: the model's default, 1.0 s
        )
    except QueueFull as exc:
        return 503, f"busy, Retry-After: {exc.retry_after:g}"
    except DeadlineExceeded:  # also a TimeoutError
        return 504, "timed out"
    except ModelError as exc:
        return 500, f"model failed: {exc.__cause__!r}"
    served.append(request_id)
    return 200, str(length)


async def main() -> None:
    async with model:
        # A burst of 40 bulk requests and one interactive request arrive together. 24 fit in
        # the queue; the rest, the interactive one included (priority does not make room), are
        # refused at once with Retry-After 1 s (no batch has run yet to estimate from).
        bulk = [
            asyncio.create_task(handle(f"bulk-{i}", "x" * i, interactive=False)) for i in range(40)
        ]
        early = asyncio.create_task(handle("early-user", "hello", interactive=True))
        await asyncio.sleep(0.005)  # the first batch (8 bulk) runs; 16 bulk wait in the queue

        # Interactive requests now jump ahead of the 16 queued bulk requests.
        users = [
            asyncio.create_task(handle(f"user-{i}", "hi" * i, interactive=True, timeout=0.1))
            for i in range(4)
        ]
        # This one cannot be answered within 10 ms (the running batch needs ~15 ms more): it
        # expires in the queue and is never sent to the model.
        hurried = asyncio.create_task(handle("hurried", "now", interactive=True, timeout=0.01))

        bulk_outcomes = await asyncio.gather(*bulk)
        print(f"early interactive request: {await early}")
        print(f"hurried request: {await hurried}")
        print(f"user requests: {await asyncio.gather(*users)}")

    print(f"bulk status codes: {dict(Counter(status for status, _ in bulk_outcomes))}")
    positions = [served.index(f"user-{i}") for i in range(4)]
    print(f"user requests answered at positions {positions} of {len(served)}")
    stats = model.statistics()
    print(
        f"statistics: submitted={stats.submitted} completed={stats.completed} "
        f"rejected={stats.rejected} expired={stats.expired} batches={stats.batches} "
        f"mean batch size={stats.mean_batch_size:.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
