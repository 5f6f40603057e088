"""Statistics: counters and latency samples kept by the engine, and the frozen snapshot."""

from __future__ import annotations

import itertools
import math
import threading
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._errors import ConfigurationError

__all__ = ("DEFAULT_LATENCY_BOUNDS", "LatencyHistogram", "LatencySummary", "Statistics")

# Upper bounds, in seconds, of the latency histogram buckets (as Prometheus' defaults, finer low).
DEFAULT_LATENCY_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

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
class LatencyHistogram:
    """Every latency sample since histograms were turned on, counted into buckets.

    ``counts[i]`` is the number of samples ``<= bounds[i]`` and above the bound before it; the
    last count is the samples above every bound. Unlike ``LatencySummary``, nothing is dropped.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """Return the number of samples."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """Return ``(bound, samples <= bound)`` per bucket, ending with ``(inf, count)``."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class _Histogram:
    """The mutable counts behind a ``LatencyHistogram``."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> LatencyHistogram:
        return LatencyHistogram(self.bounds, tuple(self.counts), self.sum)


def check_bounds(bounds: Sequence[float]) -> tuple[float, ...]:
    """Validate histogram bucket bounds: increasing positive numbers."""
    values = tuple(bounds)
    ok = bool(values) and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in values
    )
    if not ok or any(a >= b for a, b in itertools.pairwise(values)):
        raise ConfigurationError(f"histogram bounds must be increasing numbers > 0, got {bounds!r}")
    return tuple(float(b) for b in values)


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
    dispatch_held: bool = False
    histograms: Mapping[str, LatencyHistogram] = field(default_factory=lambda: MappingProxyType({}))

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
        from .._render import statistics_html  # the rendering layer, imported only when used

        return statistics_html(self)

    def __rich__(self) -> Any:
        """Return the snapshot as a rich renderable (needs rich)."""
        from .._render import statistics_rich

        return statistics_rich(self)


class Recorder:
    """Mutable counters owned by one engine; only the engine's loop thread writes them."""

    __slots__ = (
        "_lock",
        "batch_sizes",
        "batches",
        "cancelled",
        "completed",
        "compute",
        "expired",
        "failed",
        "failed_swaps",
        "histograms",
        "item_batches",
        "item_samples",
        "last_swap_pause_seconds",
        "last_swap_seconds",
        "queue",
        "rejected",
        "submitted",
        "swaps",
    )

    def __init__(self) -> None:
        # Items submitted outside a queue; those of the running engine's queue are its count.
        self.submitted = self.completed = self.failed = 0
        self.queue: Any = None  # the running engine's BatchQueue, while it runs
        # Makes folding the queue's count into `submitted` atomic for snapshots in other threads.
        self._lock = threading.Lock()
        self.expired = self.cancelled = self.rejected = self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.compute: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        # The per-item latencies, kept per batch: (start, end, each item's enqueue time), for
        # at least the last SAMPLE_WINDOW items; the samples are computed only by snapshots.
        self.item_batches: deque[tuple[float, float, list[float]]] = deque()
        self.item_samples = 0
        # Written by the swapping thread (one at a time), read by snapshots.
        self.swaps = self.failed_swaps = 0
        self.last_swap_seconds = self.last_swap_pause_seconds = 0.0
        # queue_wait, compute, end_to_end: counted only once turned on (a cost per item).
        self.histograms: dict[str, _Histogram] | None = None

    def count_queue(self, queue: Any) -> None:
        """Count the items submitted to ``queue`` (a running engine's) until ``retire_queue``."""
        with self._lock:
            self.queue = queue

    def retire_queue(self) -> None:
        """Fold the running queue's count into ``submitted``: its engine has stopped."""
        with self._lock:
            if self.queue is not None:
                self.submitted += self.queue.entered
                self.queue = None

    def submitted_now(self) -> int:
        """Return the items submitted so far (safe from any thread)."""
        with self._lock:
            queue = self.queue
            return self.submitted + (0 if queue is None else queue.entered)

    def record_histograms(self, bounds: tuple[float, ...]) -> None:
        """Start counting latencies into histograms with ``bounds`` (once; same bounds after)."""
        if self.histograms is None:
            self.histograms = {
                key: _Histogram(bounds) for key in ("queue_wait", "compute", "end_to_end")
            }
        elif self.histograms["compute"].bounds != bounds:
            raise ConfigurationError(
                "histograms are already recorded with bounds "
                f"{self.histograms['compute'].bounds!r}, got {bounds!r}"
            )

    def record_items(self, start: float, end: float, enqueued: list[float]) -> None:
        """Record the queue-wait and end-to-end latencies of one batch's items: the batch
        started at ``start`` and ended at ``end``; ``enqueued`` has each item's submit time."""
        batches = self.item_batches
        batches.append((start, end, enqueued))
        self.item_samples += len(enqueued)
        while self.item_samples - len(batches[0][2]) >= SAMPLE_WINDOW:
            self.item_samples -= len(batches.popleft()[2])
        if self.histograms is not None:
            waits, totals = self.histograms["queue_wait"], self.histograms["end_to_end"]
            for t in enqueued:
                waits.observe(start - t)
                totals.observe(end - t)

    def item_latencies(self) -> tuple[list[float], list[float]]:
        """Return the queue-wait and end-to-end samples of the last SAMPLE_WINDOW items."""
        waits: list[float] = []
        totals: list[float] = []
        for start, end, enqueued in list(self.item_batches):  # list(): atomic under the GIL
            waits.extend([start - t for t in enqueued])
            totals.extend([end - t for t in enqueued])
        return waits[-SAMPLE_WINDOW:], totals[-SAMPLE_WINDOW:]

    def snapshot(
        self,
        *,
        name: str,
        model_version: str,
        queue_depth: int,
        waiting_for_room: int,
        in_flight_batches: int,
        dispatch_held: bool = False,
    ) -> Statistics:
        """Return a frozen copy of the counters (safe from any thread under the GIL)."""
        waits, totals = self.item_latencies()
        # The loop's thread writes the counters while another thread may read them here: read
        # the outcomes before `submitted` (an item is submitted before it is settled, and each
        # counter only grows), so a snapshot never shows more settled than submitted.
        completed, failed, expired, cancelled = (
            self.completed,
            self.failed,
            self.expired,
            self.cancelled,
        )
        return Statistics(
            name=name,
            model_version=model_version,
            submitted=self.submitted_now(),
            completed=completed,
            failed=failed,
            expired=expired,
            cancelled=cancelled,
            rejected=self.rejected,
            queue_depth=queue_depth,
            waiting_for_room=waiting_for_room,
            in_flight_batches=in_flight_batches,
            batches=self.batches,
            batch_sizes=MappingProxyType(dict(self.batch_sizes)),
            queue_wait=LatencySummary.of(waits),
            compute=LatencySummary.of(list(self.compute)),
            end_to_end=LatencySummary.of(totals),
            swaps=self.swaps,
            failed_swaps=self.failed_swaps,
            last_swap_seconds=self.last_swap_seconds,
            last_swap_pause_seconds=self.last_swap_pause_seconds,
            dispatch_held=dispatch_held,
            histograms=MappingProxyType(
                {key: h.snapshot() for key, h in (self.histograms or {}).items()}
            ),
        )
