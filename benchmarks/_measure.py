"""Helpers shared by the benchmarks: interleaved rounds, summaries, and recording the figures.

Absolute times on a shared machine drift from one second to the next, so every benchmark
measures the things it compares in the same run, alternating between them round by round (the
order rotates each round, so neither side always runs first), and reports ratios of figures
taken side by side. The figures are recorded in ``benchmark.extra_info`` as a ``Findings``
document, which ``benchmarks/report.py`` turns into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = (
    "Findings",
    "batch_size_delta",
    "mean_batch_size",
    "median",
    "percentile",
    "rotated",
)

T = TypeVar("T")

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda value, threshold: value <= threshold,
    ">=": lambda value, threshold: value >= threshold,
}


def rotated(round_no: int, names: list[T]) -> list[T]:
    """Return ``names`` rotated by ``round_no``: the run order of one interleaved round."""
    k = round_no % len(names)
    return names[k:] + names[:k]


def median(values: list[float]) -> float:
    """Return the median of ``values``."""
    return float(statistics.median(values))


def percentile(values: list[float], q: float) -> float:
    """Return the nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def batch_size_delta(before: Mapping[int, int], after: Mapping[int, int]) -> dict[int, int]:
    """Return the batches of each size run between two ``statistics().batch_sizes`` snapshots."""
    delta = {size: after[size] - before.get(size, 0) for size in after}
    return {size: n for size, n in sorted(delta.items()) if n > 0}


def mean_batch_size(sizes: Mapping[int, int]) -> float:
    """Return the mean batch size of a size -> count distribution."""
    batches = sum(sizes.values())
    return sum(size * n for size, n in sizes.items()) / batches if batches else 0.0


class Findings:
    """What one benchmark measured: its setup, figures, targets and distributions.

    ``save`` stores it in ``benchmark.extra_info`` as plain JSON data; the report reads only
    that, so nothing in ``docs/benchmarks.md`` is typed by hand.
    """

    def __init__(self, scenario: str, title: str, *, order: int, number: str = "") -> None:
        """Start the findings; create them before measuring, as this records the load average."""
        self.doc: dict[str, Any] = {
            "scenario": scenario,
            "title": title,
            "order": order,
            "number": number,
            "setup": [],
            "figures": [],
            "targets": [],
            "distributions": [],
            "notes": [],
            "load_average": list(os.getloadavg()),
        }

    def setup(self, line: str) -> None:
        """Describe one aspect of how the benchmark ran (built from the parameters used)."""
        self.doc["setup"].append(line)

    def figure(self, key: str, label: str, value: float, unit: str) -> float:
        """Record one measured figure; ``unit`` tells the report how to print it."""
        self.doc["figures"].append({"key": key, "label": label, "value": value, "unit": unit})
        return value

    def value(self, key: str) -> float:
        """Return the figure recorded under ``key``."""
        for fig in self.doc["figures"]:
            if fig["key"] == key:
                return float(fig["value"])
        raise KeyError(key)

    def target(self, label: str, key: str, op: str, threshold: float) -> bool:
        """Judge the figure ``key`` against a target from the issue and record the verdict."""
        met = OPS[op](self.value(key), threshold)
        self.doc["targets"].append(
            {"label": label, "key": key, "op": op, "threshold": threshold, "met": met}
        )
        return met

    def distribution(self, label: str, sizes: Mapping[int, int]) -> None:
        """Record a batch-size distribution (size -> number of batches)."""
        self.doc["distributions"].append(
            {"label": label, "sizes": {str(k): v for k, v in sorted(sizes.items())}}
        )

    def note(self, line: str) -> None:
        """Record a remark the report prints under the figures."""
        self.doc["notes"].append(line)

    def save(self, benchmark: Any) -> None:
        """Store the findings in ``benchmark.extra_info`` (written to the JSON report)."""
        self.doc["load_average_after"] = list(os.getloadavg())
        benchmark.extra_info.update(self.doc)
