"""The model this suite guards: an embedding function with a fixed cost per call.

The sleep stands in for a real model, whose cost per call is mostly fixed (a kernel launch, a
forward pass over padding), so batching many callers' items into one call pays.
"""

from __future__ import annotations

import time

from batchkit import batched

TEXTS = [f"sentence number {i}" for i in range(100)]


@batched(max_batch_size=32)
def embed(texts: list[str]) -> list[list[float]]:
    time.sleep(0.002 + 0.00002 * len(texts))
    return [[float(len(text)), float(text.count(" "))] for text in texts]
