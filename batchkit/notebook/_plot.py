"""Plots of a profile: throughput and latency against batch size and concurrency (matplotlib).

Imported only by ``ProfileResult.plot()``. Figures are built without pyplot, so nothing is
registered globally and nothing is shown twice in a notebook; the figure class renders itself
as PNG in Jupyter whatever the matplotlib backend.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._core import ConfigurationError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._result import ProfilePoint, ProfileResult

__all__ = ("plot_profile",)


@functools.cache
def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "ProfileResult.plot() needs matplotlib: pip install 'batchkit[notebook]'"
        ) from exc

    class ProfileFigure(Figure):
        """A matplotlib figure that Jupyter shows as a PNG image."""

        def _repr_png_(self) -> bytes:
            out = io.BytesIO()
            self.savefig(out, format="png", dpi=90)
            return out.getvalue()

    return ProfileFigure


def plot_profile(result: ProfileResult, max_wait: float, max_concurrency: int) -> Figure:
    """Return a 2x2 figure of ``result`` for the points at ``max_wait`` and ``max_concurrency``."""
    points = [
        p
        for p in result.points
        if p.max_wait == max_wait
        and p.max_concurrency == max_concurrency
        and p.requests
        and not p.errors
    ]
    if not points:
        raise ConfigurationError(
            f"no point without errors at max_wait={max_wait!r}, "
            f"max_concurrency={max_concurrency!r} to plot"
        )
    fig = _figure_class()(figsize=(10, 6.5), layout="constrained")
    (thr_b, lat_b), (thr_c, lat_c) = fig.subplots(2, 2)
    best = result.recommendation
    by_size = _series(points, lambda p: p.concurrency, lambda p: p.max_batch_size)
    by_load = _series(points, lambda p: p.max_batch_size, lambda p: p.concurrency)
    _draw(thr_b, lat_b, by_size, "max_batch_size", "callers", result, best)
    _draw(thr_c, lat_c, by_load, "concurrency (callers)", "max batch", result, best)
    fig.suptitle(
        f"{result.name}: max_wait={max_wait:g} s, max_concurrency={max_concurrency}",
        fontsize="medium",
    )
    return fig


def _series(
    points: list[ProfilePoint],
    line: Callable[[ProfilePoint], int],
    x: Callable[[ProfilePoint], int],
) -> dict[int, list[ProfilePoint]]:
    out: dict[int, list[ProfilePoint]] = {}
    for p in points:
        out.setdefault(line(p), []).append(p)
    return {k: sorted(v, key=x) for k, v in sorted(out.items())}


def _draw(
    thr: Axes,
    lat: Axes,
    series: dict[int, list[ProfilePoint]],
    xlabel: str,
    legend: str,
    result: ProfileResult,
    best: ProfilePoint | None,
) -> None:
    on_size = xlabel == "max_batch_size"
    for key, pts in series.items():
        xs = [p.max_batch_size if on_size else p.concurrency for p in pts]
        (line,) = thr.plot(xs, [p.throughput for p in pts], marker="o", label=f"{legend} {key}")
        color = line.get_color()
        lat.plot(
            xs,
            [p.latency.p99 * 1e3 for p in pts],
            marker="o",
            color=color,
            label=f"{legend} {key}",
        )
        lat.plot(
            xs,
            [p.latency.p50 * 1e3 for p in pts],
            marker=".",
            linestyle="--",
            color=color,
        )
    if best is not None and any(best in pts for pts in series.values()):
        x = best.max_batch_size if on_size else best.concurrency
        thr.plot(
            [x],
            [best.throughput],
            marker="*",
            markersize=16,
            color="gold",
            markeredgecolor="black",
            linestyle="none",
            label="recommended",
        )
        lat.plot(
            [x],
            [getattr(best.latency, result.percentile) * 1e3],
            marker="*",
            markersize=16,
            color="gold",
            markeredgecolor="black",
            linestyle="none",
        )
    if result.latency_target is not None:
        lat.axhline(
            result.latency_target * 1e3,
            color="red",
            linestyle=":",
            label=f"{result.percentile} target",
        )
    for ax in (thr, lat):
        xs = sorted(
            {p.max_batch_size if on_size else p.concurrency for pts in series.values() for p in pts}
        )
        if len(xs) > 2 and xs[0] >= 1:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    thr.set_ylabel("throughput (items/s)")
    lat.set_ylabel("latency (ms): p99 solid, p50 dashed")
    thr.legend(fontsize="small")
    lat.legend(fontsize="small")
