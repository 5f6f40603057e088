"""Guard the batching of ``embed`` in CI: throughput relative to calling it unbatched.

Save a baseline run on main, then compare each change against it; the comparison fails when
the batched/unbatched ratio gets more than 10% worse (see docs/pytest-benchmark.md)::

    pytest examples/pytest_benchmark --benchmark-autosave
    pytest examples/pytest_benchmark --benchmark-compare --benchmark-compare-fail=mean:10%
"""

from __future__ import annotations

import pytest
from models import TEXTS, embed

from batchkit.pytest_plugin import BatchBenchmark, SweepPoint, sweep


def test_embed_under_concurrent_callers(batchkit_benchmark: BatchBenchmark) -> None:
    figures = batchkit_benchmark(
        embed, TEXTS, concurrency=16, requests=256, baseline="unbatched", rounds=3
    )
    assert figures.failed == 0  # errors are recorded, not raised: fail on them here


@pytest.mark.parametrize("point", sweep(max_batch_size=(4, 32), concurrency=(16,)))
def test_embed_settings(batchkit_benchmark: BatchBenchmark, point: SweepPoint) -> None:
    batchkit_benchmark(embed, TEXTS, point=point, requests=128, baseline="unbatched", rounds=2)
