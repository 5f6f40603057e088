"""Triton's statistics extension: ``GET /v2/models[/{name}[/versions/{v}]]/stats``.

The figures come from each model's ``statistics()`` snapshot; the cumulative durations from
its latency histograms, which the app turns on when it starts serving (every sample since).
"""

from __future__ import annotations

from typing import Any

from .._core import DEFAULT_LATENCY_BOUNDS, ConfigurationError, Statistics
from ._served import ServedModel

__all__ = ("model_stats", "record_histograms", "snapshot")


def record_histograms(served: ServedModel) -> None:
    """Make sure ``served``'s model counts every latency sample (keeps bounds already set)."""
    if not snapshot(served).histograms:
        try:
            served.model.record_histograms(DEFAULT_LATENCY_BOUNDS)
        except ConfigurationError:  # a version records them already, with other bounds
            pass


def snapshot(served: ServedModel) -> Statistics:
    """Return the statistics of ``served``'s model (a ``Deployment``: the version serving
    under this name, else its versions added up)."""
    stats: Any = served.model.statistics()
    if isinstance(stats, Statistics):
        return stats
    return stats.versions.get(served.version, stats.total)  # type: ignore[no-any-return]


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def model_stats(served: ServedModel, last_inference_ms: int) -> dict[str, Any]:
    """Return one ``model_stats`` entry of Triton's statistics response for ``served``.

    ``success`` counts completed items and their end-to-end time; ``fail`` counts failed and
    expired items; ``queue`` and ``compute_infer`` count every item that reached a batch, with
    its time queued and the time its batch ran. ``compute_input`` and ``compute_output`` are
    part of ``compute_infer`` (collation runs inside the batch) and read 0 ns. ``batch_stats``
    counts the batches of each size; batchkit does not time batches by size (0 ns).
    """
    s = snapshot(served)
    hist = s.histograms
    waits, totals = hist.get("queue_wait"), hist.get("end_to_end")
    ran = totals.count if totals is not None else 0
    queue_s = waits.sum if waits is not None else 0.0
    total_s = totals.sum if totals is not None else 0.0
    success_s = total_s * s.completed / ran if ran else 0.0
    return {
        "name": served.name,
        "version": served.version,
        "last_inference": last_inference_ms,
        "inference_count": s.completed,
        "execution_count": s.batches,
        "inference_stats": {
            "success": _duration(s.completed, success_s),
            "fail": _duration(s.failed + s.expired, 0.0),
            "queue": _duration(ran, queue_s),
            "compute_input": _duration(ran, 0.0),
            "compute_infer": _duration(ran, max(0.0, total_s - queue_s)),
            "compute_output": _duration(ran, 0.0),
            "cache_hit": _duration(0, 0.0),
            "cache_miss": _duration(0, 0.0),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(n, 0.0),
                "compute_infer": _duration(n, 0.0),
                "compute_output": _duration(n, 0.0),
            }
            for size, n in sorted(s.batch_sizes.items())
        ],
        "memory_usage": [],
    }
