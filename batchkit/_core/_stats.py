"""Statistics: counters and latency samples kept by the engine, and the frozen snapshot."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ("LatencySummary", "Statistics")

# How many recent latency samples the percentiles are computed over.
SAMPLE_WINDOW = 4096


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles, in seconds, over the most recent samples (``count`` of them)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: list[float]) -> LatencySummary:
        """Summarize ``samples``; all figures are 0.0 when there are none."""
        if not samples:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        samples = sorted(samples)
        n = len(samples)

        def rank(q: float) -> float:
            return samples[min(n - 1, max(0, math.ceil(q * n) - 1))]

        return cls(n, math.fsum(samples) / n, rank(0.50), rank(0.90), rank(0.99), samples[-1])


@dataclass(frozen=True)
class Statistics:
    """An immutable snapshot of a model's counters and recent latencies.

    Every item submitted ends as exactly one of completed, failed, expired or cancelled; until
    then it is queued, waiting for room, or in a running batch. ``rejected`` counts submits
    refused by a full queue (they were never submitted).
    """

    name: str
    model_version: str
    submitted: int
    completed: int
    failed: int
    expired: int
    cancelled: int
    rejected: int
    queue_depth: int
    waiting_for_room: int
    in_flight_batches: int
    batches: int
    batch_sizes: Mapping[int, int]
    queue_wait: LatencySummary
    compute: LatencySummary
    end_to_end: LatencySummary
    swaps: int = 0
    failed_swaps: int = 0
    last_swap_seconds: float = 0.0
    last_swap_pause_seconds: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        """Return the mean size of the batches run so far (0.0 before the first)."""
        if not self.batches:
            return 0.0
        return sum(size * n for size, n in self.batch_sizes.items()) / self.batches

    @property
    def pending(self) -> int:
        """Return the items submitted that have no outcome yet."""
        done = self.completed + self.failed + self.expired + self.cancelled
        return self.submitted - done

    def _repr_html_(self) -> str:
        """Return the snapshot as a compact HTML table (Jupyter's rich display)."""
        from .._display import statistics_html  # the display layer, imported only when used

        return statistics_html(self)

    def __rich__(self) -> Any:
        """Return the snapshot as a rich renderable (needs rich)."""
        from .._display import statistics_rich

        return statistics_rich(self)


class Recorder:
    """Mutable counters owned by one engine; only the engine's loop thread writes them."""

    __slots__ = (
        "batch_sizes",
        "batches",
        "cancelled",
        "completed",
        "compute",
        "end_to_end",
        "expired",
        "failed",
        "failed_swaps",
        "last_swap_pause_seconds",
        "last_swap_seconds",
        "queue_wait",
        "rejected",
        "submitted",
        "swaps",
    )

    def __init__(self) -> None:
        self.submitted = self.completed = self.failed = 0
        self.expired = self.cancelled = self.rejected = self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.queue_wait: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.compute: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.end_to_end: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        # Written by the swapping thread (one at a time), read by snapshots.
        self.swaps = self.failed_swaps = 0
        self.last_swap_seconds = self.last_swap_pause_seconds = 0.0

    def snapshot(
        self,
        *,
        name: str,
        model_version: str,
        queue_depth: int,
        waiting_for_room: int,
        in_flight_batches: int,
    ) -> Statistics:
        """Return a frozen copy of the counters (safe from any thread under the GIL)."""
        return Statistics(
            name=name,
            model_version=model_version,
            submitted=self.submitted,
            completed=self.completed,
            failed=self.failed,
            expired=self.expired,
            cancelled=self.cancelled,
            rejected=self.rejected,
            queue_depth=queue_depth,
            waiting_for_room=waiting_for_room,
            in_flight_batches=in_flight_batches,
            batches=self.batches,
            batch_sizes=MappingProxyType(dict(self.batch_sizes)),
            queue_wait=LatencySummary.of(list(self.queue_wait)),
            compute=LatencySummary.of(list(self.compute)),
            end_to_end=LatencySummary.of(list(self.end_to_end)),
            swaps=self.swaps,
            failed_swaps=self.failed_swaps,
            last_swap_seconds=self.last_swap_seconds,
            last_swap_pause_seconds=self.last_swap_pause_seconds,
        )
