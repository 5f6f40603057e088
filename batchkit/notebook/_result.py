"""What a profile sweep measured: ``ProfilePoint`` (one setting) and ``ProfileResult``.

The result renders as a table (HTML in a notebook, rich in a terminal), recommends settings for
a latency target, exports rows (``to_dicts``, ``to_csv``), and plots (matplotlib, imported only
by ``plot``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .. import _render
from .._core import ConfigurationError, LatencySummary

__all__ = ("Percentile", "ProfilePoint", "ProfileResult", "check_percentile", "check_positive")

Percentile = Literal["p50", "p90", "p99"]


@dataclass(frozen=True)
class ProfilePoint:
    """The measurements at one point of a sweep: settings, load, throughput and latency.

    ``throughput`` is answered calls per second over the measured phase; ``latency`` is the
    callers' end-to-end latency, in seconds, over the calls answered. ``errors`` counts calls
    that raised, and ``error`` shows the first one (a point with errors is never recommended).
    """

    max_batch_size: int
    max_wait: float
    max_concurrency: int
    concurrency: int
    requests: int
    elapsed: float
    throughput: float
    latency: LatencySummary
    mean_batch_size: float
    batches: int
    errors: int = 0
    error: str | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """Return this point's settings as ``BatchedModel`` keyword arguments."""
        return {
            "max_batch_size": self.max_batch_size,
            "max_wait": self.max_wait,
            "max_concurrency": self.max_concurrency,
        }

    def as_dict(self) -> dict[str, Any]:
        """Return the point as a flat dict (times in seconds), one CSV row."""
        return {
            **self.settings,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "elapsed": self.elapsed,
            "throughput": self.throughput,
            "mean_batch_size": self.mean_batch_size,
            "batches": self.batches,
            "latency_mean": self.latency.mean,
            "latency_p50": self.latency.p50,
            "latency_p90": self.latency.p90,
            "latency_p99": self.latency.p99,
            "latency_max": self.latency.max,
            "error": self.error or "",
        }


@dataclass(frozen=True, repr=False)
class ProfileResult:
    """The points of a sweep, with the latency target it was run for (if any).

    Renders as a table in Jupyter (``_repr_html_``) and with rich (``__rich__``); ``plot()``
    draws throughput and latency against batch size and concurrency; ``to_dicts()`` and
    ``to_csv()`` export the points.
    """

    name: str
    points: tuple[ProfilePoint, ...]
    latency_target: float | None = None
    percentile: Percentile = "p99"

    @property
    def recommendation(self) -> ProfilePoint | None:
        """Return ``recommend()`` for the target the sweep was run with."""
        return self.recommend(self.latency_target, percentile=self.percentile)

    def recommend(
        self,
        latency_target: float | None = None,
        *,
        percentile: Percentile = "p99",
        concurrency: int | None = None,
    ) -> ProfilePoint | None:
        """Return the point with the best throughput whose latency meets the target.

        ``latency_target`` is in seconds, for the latency ``percentile`` ("p50", "p90" or
        "p99"); None keeps every point. ``concurrency`` keeps only the points measured at that
        load (the number of callers you expect). Points with errors are never chosen. Ties in
        throughput (equal to 4 significant digits) go to the lower latency, then to the
        smaller settings. Returns None when no point qualifies. Apply the settings with
        ``BatchedModel(fn, **point.settings)``.
        """
        check_percentile(percentile)
        if latency_target is not None:
            check_positive("latency_target", latency_target)
        fit = [
            p
            for p in self.points
            if not p.errors
            and p.requests
            and (concurrency is None or p.concurrency == concurrency)
            and (latency_target is None or getattr(p.latency, percentile) <= latency_target)
        ]
        if not fit:
            return None
        return min(
            fit,
            key=lambda p: (
                -_significant(p.throughput),
                _significant(getattr(p.latency, percentile)),
                p.max_batch_size,
                p.max_wait,
                p.max_concurrency,
                p.concurrency,
            ),
        )

    def to_dicts(self) -> list[dict[str, Any]]:
        """Return one flat dict per point (times in seconds), in sweep order."""
        return [p.as_dict() for p in self.points]

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the points as CSV text (a header row, then one row per point).

        With ``path``, also write the text to that file.
        """
        out = io.StringIO()
        rows = self.to_dicts()
        fields = list(rows[0]) if rows else list(_empty_point().as_dict())
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def summary(self) -> str:
        """Return one line that states the recommendation (or that none met the target)."""
        return _summary(self)

    def __repr__(self) -> str:
        return f"<ProfileResult {self.name!r}, {len(self.points)} points: {self.summary()}>"

    def table(self) -> _render.Table:
        """Return the points as a display table, the recommended one highlighted.

        A setting that the sweep held constant is stated in the caption instead of a column,
        and the errors column shows only when some point had errors.
        """
        best = self.recommendation
        columns: list[tuple[str, Callable[[ProfilePoint], str]]] = [
            ("max batch", lambda p: str(p.max_batch_size)),
        ]
        fixed = []
        if len({p.max_wait for p in self.points}) > 1:
            columns.append(("max wait ms", lambda p: _render.format_ms(p.max_wait)))
        elif self.points:
            fixed.append(f"max_wait={self.points[0].max_wait:g}")
        if len({p.max_concurrency for p in self.points}) > 1:
            columns.append(("max conc", lambda p: str(p.max_concurrency)))
        elif self.points:
            fixed.append(f"max_concurrency={self.points[0].max_concurrency}")
        columns += [
            ("callers", lambda p: str(p.concurrency)),
            ("items/s", lambda p: _render.format_rate(p.throughput)),
            ("mean batch", lambda p: f"{p.mean_batch_size:.1f}"),
            ("p50 ms", lambda p: _render.format_ms(p.latency.p50)),
            ("p99 ms", lambda p: _render.format_ms(p.latency.p99)),
        ]
        if any(p.errors for p in self.points):
            columns.append(("errors", lambda p: str(p.errors)))
        caption = "profile" + (f" ({', '.join(fixed)})" if fixed else "")
        return _render.Table(
            caption,
            [[cell(p) for _, cell in columns] for p in self.points],
            headers=[header for header, _ in columns],
            highlight=None if best is None else self.points.index(best),
            note=self.summary(),
        )

    def _repr_html_(self) -> str:
        return _render.tables_html([self.table()], title=f"batchkit profile of {self.name!r}")

    def __rich__(self) -> Any:
        return _render.tables_rich([self.table()], title=f"batchkit profile of {self.name!r}")

    def plot(self, *, max_wait: float | None = None, max_concurrency: int | None = None) -> Any:
        """Draw throughput and p50/p99 latency against batch size and concurrency.

        Returns a ``matplotlib.figure.Figure`` (it shows itself in Jupyter; ``savefig`` writes
        it to a file). When the sweep covered several ``max_wait`` or ``max_concurrency``
        values, the plot shows one of them: the one given, else the recommendation's, else the
        first. Needs matplotlib (``pip install batchkit[notebook]``).
        """
        from ._plot import plot_profile

        if not self.points:
            raise ConfigurationError("this profile has no points to plot")
        best = self.recommendation
        if max_wait is None:
            max_wait = best.max_wait if best else self.points[0].max_wait
        if max_concurrency is None:
            max_concurrency = best.max_concurrency if best else self.points[0].max_concurrency
        return plot_profile(self, max_wait, max_concurrency)


def _significant(x: float) -> float:
    """Return ``x`` to 4 significant digits, so that clock rounding noise does not pick."""
    return float(f"{x:.4g}")


def _summary(result: ProfileResult) -> str:
    target, pct = result.latency_target, result.percentile
    best = result.recommendation
    bound = "" if target is None else f" with {pct} \u2264 {_render.format_ms(target)} ms"
    if best is None:
        ok = [p for p in result.points if not p.errors and p.requests]
        if not ok:
            return "no point of the sweep answered without errors"
        low = min(ok, key=lambda p: getattr(p.latency, pct))
        return (
            f"no setting met {pct} \u2264 {_render.format_ms(target or 0.0)} ms; the lowest "
            f"{pct} was {_render.format_ms(getattr(low.latency, pct))} ms "
            f"({_settings_text(low)}, {low.concurrency} callers)"
        )
    return (
        f"best throughput{bound}: {_settings_text(best)} "
        f"({_render.format_rate(best.throughput)} items/s with {best.concurrency} callers, "
        f"{pct} {_render.format_ms(getattr(best.latency, pct))} ms)"
    )


def _settings_text(p: ProfilePoint) -> str:
    return (
        f"max_batch_size={p.max_batch_size}, max_wait={p.max_wait:g}, "
        f"max_concurrency={p.max_concurrency}"
    )


def _empty_point() -> ProfilePoint:
    return ProfilePoint(1, 0.0, 1, 1, 0, 0.0, 0.0, LatencySummary.of([]), 0.0, 0)


def check_positive(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{field} must be a positive number of seconds, got {value!r}")


def check_percentile(percentile: object) -> None:
    if percentile not in ("p50", "p90", "p99"):
        raise ConfigurationError(f"percentile must be 'p50', 'p90' or 'p99', got {percentile!r}")
