"""Prometheus metrics for batched models, read from ``statistics()`` when scraped.

``ModelCollector`` exports any models' snapshots to a ``prometheus_client`` registry;
``ServerMetrics`` adds what the ASGI server observes per HTTP request. Nothing is recorded on
the engine's hot path: the engine keeps its counters anyway, and a scrape reads a snapshot.

This module imports ``prometheus_client``; ``import batchkit`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchkit.metrics needs prometheus-client: pip install 'batchkit[metrics]'"
    ) from exc

from ._core import DEFAULT_LATENCY_BOUNDS, BatchedModel, Deployment, Statistics

__all__ = ("BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS", "ModelCollector", "ServerMetrics")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = DEFAULT_LATENCY_BOUNDS
_OUTCOMES = ("completed", "failed", "expired", "cancelled", "rejected")
_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))

_Model: TypeAlias = "BatchedModel[Any, Any] | Deployment[Any, Any]"
_Exported: TypeAlias = "_Model | tuple[str, _Model]"
"""A model (or deployment), exported under its own name, or a ``(name, model)`` pair."""


class ModelCollector(Collector):
    """Export the statistics of ``models`` (a callable returning them is read per scrape).

    Each entry is a ``BatchedModel`` (labelled with its ``name``) or a ``(name, model)`` pair
    (labelled ``name``: the name a server serves it under). Every series has the labels
    ``model`` and ``version`` (the version serving now, so several versions of one name stay
    apart; after a swap the model's counters go on under the new version).

    Per model: items by outcome, queue depth, items waiting for room,
    batches in flight, a batch-size histogram, queue-wait / compute / end-to-end latency
    histograms (every sample since collection began: the collector turns on
    ``record_histograms(LATENCY_BUCKETS)`` for each model) and the same latencies' recent
    quantiles, the version serving (``batchkit_model_version_info``) and swaps.

    A ``Deployment`` exports each of its versions as above (``version``: the version's name in
    the deployment), and its routing: ``batchkit_route_weight`` and ``batchkit_routed_items``
    (``how``: routed by weight or key, or pinned) per version, the shadow version's comparisons
    (``batchkit_shadow_items`` by outcome: agreed, disagreed, error, dropped, discarded),
    ``batchkit_shadow_pending`` and ``batchkit_shadow_disagreement_ratio``.
    """

    def __init__(self, models: Iterable[_Exported] | Callable[[], Iterable[_Exported]]) -> None:
        self._models = models if callable(models) else list(models)
        if not callable(models):
            self._current()  # histograms count from now on, not from the first scrape

    def _current(self) -> list[tuple[str, _Model]]:
        models = self._models
        current = [
            entry if isinstance(entry, tuple) else (entry.name, entry)
            for entry in (models() if callable(models) else models)
        ]
        for _, model in current:
            model.record_histograms(LATENCY_BUCKETS)
        return current

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families, from one snapshot per model."""
        snapshots: list[tuple[str, str, Statistics]] = []
        deployments = []
        for name, m in self._current():
            if isinstance(m, Deployment):
                stats = m.statistics()
                deployments.append((name, stats))
                snapshots.extend((name, v, s) for v, s in stats.versions.items())
            else:
                s = m.statistics()
                snapshots.append((name, s.model_version, s))
        yield from self._model_families(snapshots)
        yield from _routing_families(deployments)

    def _model_families(self, snapshots: list[tuple[str, str, Statistics]]) -> Iterator[Metric]:
        mv = ["model", "version"]
        items = CounterMetricFamily(
            "batchkit_items", "Items submitted to a model, by outcome.", labels=[*mv, "outcome"]
        )
        depth = GaugeMetricFamily("batchkit_queue_depth", "Items queued.", labels=mv)
        waiting = GaugeMetricFamily(
            "batchkit_waiting_for_room", "Submits waiting for room in a full queue.", labels=mv
        )
        in_flight = GaugeMetricFamily(
            "batchkit_in_flight_batches", "Batches running now.", labels=mv
        )
        sizes = HistogramMetricFamily("batchkit_batch_size", "Items per batch run.", labels=mv)
        version = GaugeMetricFamily(
            "batchkit_model_version_info", "The version serving now (value 1).",
            labels=["model", "version"],
        )  # fmt: skip
        swaps = CounterMetricFamily(
            "batchkit_swaps", "Model swaps and rollbacks, by result.", labels=[*mv, "result"]
        )
        latencies = {
            field: GaugeMetricFamily(
                f"batchkit_{field}_recent_seconds",
                f"{label} over the most recent items (a window of samples), by quantile.",
                labels=[*mv, "quantile"],
            )
            for field, label in (
                ("queue_wait", "Queue wait"),
                ("compute", "Batch compute time"),
                ("end_to_end", "Submit-to-outcome time"),
            )
        }
        histograms = {
            field: HistogramMetricFamily(
                f"batchkit_{field}_seconds", f"{label}, every sample.", labels=mv
            )
            for field, label in (
                ("queue_wait", "Queue wait per item"),
                ("compute", "Batch compute time"),
                ("end_to_end", "Submit-to-outcome time per item"),
            )
        }
        for name, label, s in snapshots:
            key = [name, label]
            for outcome in _OUTCOMES:
                items.add_metric([*key, outcome], getattr(s, outcome))
            depth.add_metric(key, s.queue_depth)
            waiting.add_metric(key, s.waiting_for_room)
            in_flight.add_metric(key, s.in_flight_batches)
            buckets, total = [], 0
            for bound in BATCH_SIZE_BUCKETS:
                total = sum(n for size, n in s.batch_sizes.items() if size <= bound)
                buckets.append((str(bound), total))
            buckets.append(("+Inf", s.batches))
            size_sum = sum(size * n for size, n in s.batch_sizes.items())
            sizes.add_metric(key, buckets, size_sum)
            version.add_metric(key, 1)
            swaps.add_metric([*key, "ok"], s.swaps)
            swaps.add_metric([*key, "failed"], s.failed_swaps)
            for field, family in latencies.items():
                summary = getattr(s, field)
                for quantile, attr in _QUANTILES:
                    family.add_metric([*key, quantile], getattr(summary, attr))
            for field, hfamily in histograms.items():
                hist = s.histograms.get(field)
                if hist is not None:
                    cumulative = [(_le(bound), n) for bound, n in hist.cumulative()]
                    hfamily.add_metric(key, cumulative, hist.sum)
        yield from (items, depth, waiting, in_flight, sizes, version, swaps)
        yield from latencies.values()
        yield from histograms.values()


def _routing_families(deployments: list[tuple[str, Any]]) -> Iterator[Metric]:
    mv = ["model", "version"]
    weight = GaugeMetricFamily(
        "batchkit_route_weight", "A version's share of the routed calls (configured).", labels=mv
    )
    routed = CounterMetricFamily(
        "batchkit_routed_items",
        "Items a deployment sent to a version: routed (by weight or key) or pinned.",
        labels=[*mv, "how"],
    )
    shadow = CounterMetricFamily(
        "batchkit_shadow_items",
        "Items mirrored to a deployment's shadow version, by outcome.",
        labels=["model", "outcome"],
    )
    pending = GaugeMetricFamily(
        "batchkit_shadow_pending", "Mirrored items not compared yet.", labels=["model"]
    )
    ratio = GaugeMetricFamily(
        "batchkit_shadow_disagreement_ratio",
        "Shadow outputs that disagreed with the primary, over those compared.",
        labels=["model"],
    )
    for name, stats in deployments:
        for version, share in stats.routing.shares().items():
            weight.add_metric([name, version], share)
            routed.add_metric([name, version, "routed"], stats.routed[version])
            routed.add_metric([name, version, "pinned"], stats.pinned[version])
        s = stats.shadow
        for outcome, n in (
            ("agreed", s.agreed),
            ("disagreed", s.disagreed),
            ("error", s.errors),
            ("dropped", s.dropped),
            ("discarded", s.discarded),
        ):
            shadow.add_metric([name, outcome], n)
        pending.add_metric([name], s.pending)
        ratio.add_metric([name], s.disagreement_rate)
    yield from (weight, routed, shadow, pending, ratio)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class ServerMetrics:
    """The metrics of one ASGI app: its models' statistics and its HTTP requests.

    Each app has its own registry, so several apps (or tests) in one process never clash. The
    request metrics carry the same ``model`` (the served name) and ``version`` labels as the
    model metrics.
    """

    def __init__(self, models: Iterable[_Exported] | Callable[[], Iterable[_Exported]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ModelCollector(models))
        self._requests = Counter(
            "batchkit_http_requests",
            "Inference requests answered, by model, version and HTTP status.",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "batchkit_http_request_duration_seconds",
            "Inference request time in the server, from routing to the response sent.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def add_gateway(self, counts: Callable[[], tuple[dict[tuple[str, str], int], int]]) -> None:
        """Export the gateway's counts, read per scrape from ``counts()``: requests by key name
        and outcome (allowed, limited, unauthorized, forbidden), and rate-limit store errors."""
        self.registry.register(_GatewayCollector(counts))

    def observe_request(self, model: str, version: str | None, status: int, seconds: float) -> None:
        """Count one inference request for ``model`` answered with ``status`` after ``seconds``."""
        version = "" if version is None else version
        self._requests.labels(model, version, str(status)).inc()
        self._duration.labels(model, version).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _GatewayCollector(Collector):
    def __init__(self, counts: Callable[[], tuple[dict[tuple[str, str], int], int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts, store_errors = self._counts()
        requests = CounterMetricFamily(
            "batchkit_gateway_requests",
            "Requests the gateway saw, by API key name and outcome.",
            labels=["key", "outcome"],
        )
        for (key, outcome), n in sorted(counts.items()):
            requests.add_metric([key, outcome], n)
        yield requests
        errors = CounterMetricFamily(
            "batchkit_gateway_store_errors",
            "Rate-limit store calls that failed or timed out.",
        )
        errors.add_metric([], store_errors)
        yield errors
