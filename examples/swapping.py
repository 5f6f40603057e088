"""Swap a model while callers keep calling: every answer says which version produced it.

Run it: `python examples/swapping.py` (pure Python, no torch needed).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from batchkit import BatchedModel, ValidationFailed


def model_v1(items: list[float]) -> list[float]:
    return [x * 2 for x in items]


def model_v2(items: list[float]) -> list[float]:
    return [x * 2 + 0.001 for x in items]  # "retrained": close to v1


def model_broken(items: list[float]) -> list[float]:
    return [-x for x in items]


Model = Callable[[list[float]], list[float]]


def close_to_old(new: Model, old: Model) -> bool:
    probe = [1.0, 2.0, 3.0]
    return all(abs(a - b) < 0.01 for a, b in zip(new(probe), old(probe), strict=True))


async def main() -> None:
    model = BatchedModel(model_v1, max_batch_size=16, version="1")
    versions: Counter[str] = Counter()
    done = asyncio.Event()

    async def caller(x: float) -> None:
        while not done.is_set():
            value, version = await model.call_versioned(x)
            assert value == (model_v1 if version in ("1", "3") else model_v2)([x])[0]
            versions[version] += 1

    async def operator() -> None:
        await model.call(0.0)
        await model.swap(model_v2, version="2", warmup=[1.0], validate=close_to_old)
        await model.call(0.0)
        try:
            await model.swap(model_broken, version="bad", validate=close_to_old)
        except ValidationFailed as exc:
            print("rejected:", exc)
        await model.call(0.0)
        print("rolled back to version", await model.rollback())
        await model.call(0.0)
        await model.swap(model_v1, version="3")
        await model.call(0.0)
        done.set()

    async with model:
        await asyncio.gather(operator(), *(caller(float(x)) for x in range(32)))
    stats = model.statistics()
    print("answers by version:", dict(sorted(versions.items())))
    print(f"swaps: {stats.swaps}, failed swaps: {stats.failed_swaps}, failed calls: {stats.failed}")


if __name__ == "__main__":
    asyncio.run(main())
