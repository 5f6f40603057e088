"""A live view of a model's statistics, refreshed while load runs (Jupyter or terminal).

The view reads ``model.statistics()`` on its own thread every ``interval`` seconds and redraws
one display: in Jupyter an HTML output updated in place, in a terminal a ``rich.live.Live``.
It belongs to a ``with`` block or to ``start()``/``stop()``; nothing runs after ``stop()``.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

from .. import _render
from .._core import BatchedModel, ConfigurationError, Deployment, DeploymentStatistics, Statistics

__all__ = ("LiveView", "live")

Target = Literal["auto", "notebook", "terminal", "none"]

# Throughput is the completions over about this many seconds of recent frames.
_RATE_WINDOW = 3.0


class LiveView:
    """Show ``model``'s statistics, refreshed every ``interval`` seconds, until ``stop()``.

    Each frame shows the counts, queue depth and in-flight batches, throughput (answered items
    per second over the last few seconds), the batch-size histogram, latency percentiles, and
    the version serving, with each version change seen (swaps and rollbacks) and when.

    For a ``Deployment`` the figures add up its versions, the version shown is the primary one
    (promotions and rollbacks are listed as they happen), and a "split" table shows each
    version's configured and observed share, and the shadow's agreement.

    ``display``: "notebook" (an HTML output updated in place), "terminal" (rich), "none" (no
    output: read ``frame()``, ``_repr_html_()`` or ``__rich__()`` yourself), or "auto" (the
    notebook in a Jupyter kernel, else the terminal when rich is installed, else none).
    ``clock`` (seconds, monotonic) is for tests.
    """

    def __init__(
        self,
        model: BatchedModel[Any, Any] | Deployment[Any, Any],
        *,
        interval: float = 0.5,
        display: Target = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(model, (BatchedModel, Deployment)):
            raise ConfigurationError(
                f"live() needs a BatchedModel, got {model!r} (or a Deployment of them)"
            )
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not (interval > 0 and math.isfinite(interval))
        ):
            raise ConfigurationError(
                f"interval must be a positive number of seconds, got {interval!r}"
            )
        if display not in ("auto", "notebook", "terminal", "none"):
            raise ConfigurationError(
                f"display must be 'auto', 'notebook', 'terminal' or 'none', got {display!r}"
            )
        self.model = model
        self.interval = float(interval)
        self._target = display
        self._clock = clock
        self._start = clock()
        self._samples: deque[tuple[float, int]] = deque()
        self._versions: list[tuple[float, str]] = []
        self._stats: Statistics | None = None
        self._split: DeploymentStatistics | None = None
        self._rate = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink: _Sink | None = None
        self.update()

    def __repr__(self) -> str:
        state = "live" if self.running else "stopped"
        return f"<LiveView of {self.model.name!r} {state}, every {self.interval:g} s>"

    # -- figures -------------------------------------------------------------------------------

    def update(self) -> Statistics:
        """Take a new snapshot and return it (the refresh thread calls this every interval)."""
        snapshot = self.model.statistics()
        split = snapshot if isinstance(snapshot, DeploymentStatistics) else None
        stats = snapshot.total if isinstance(snapshot, DeploymentStatistics) else snapshot
        now = self._clock() - self._start
        with self._lock:
            self._stats, self._split = stats, split
            if not self._versions or self._versions[-1][1] != stats.model_version:
                self._versions.append((now, stats.model_version))
            self._samples.append((now, stats.completed))
            while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW:
                self._samples.popleft()
            (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
            self._rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return stats

    @property
    def throughput(self) -> float:
        """Return answered items per second over the last few seconds of snapshots."""
        with self._lock:
            return self._rate

    @property
    def versions(self) -> list[tuple[float, str]]:
        """Return each version seen, with the seconds since the view started when first seen."""
        with self._lock:
            return list(self._versions)

    def _extra(self) -> list[tuple[str, str]]:
        seen = self.versions
        shown = [f"{v} ({t:.1f} s)" if i else v for i, (t, v) in enumerate(seen)]
        if len(shown) > 6:  # the first, then the latest ones
            shown = [shown[0], "\u2026", *shown[-4:]]
        history = " \u2192 ".join(shown)
        return [
            ("throughput", f"{_render.format_rate(self.throughput)} items/s"),
            ("versions", history),
        ]

    def frame(self) -> list[_render.Table]:
        """Return the tables of the latest snapshot (a deployment's split first)."""
        with self._lock:
            stats, split = self._stats, self._split
        assert stats is not None
        tables = _render.statistics_tables(stats, extra=self._extra())
        return tables if split is None else [_render.split_table(split), *tables]

    def _title(self) -> str:
        with self._lock:
            stats = self._stats
        assert stats is not None
        state = "live" if self.running else "stopped"
        return f"{stats.name} \u00b7 version {stats.model_version} \u00b7 {state}"

    def _repr_html_(self) -> str:
        return _render.tables_html(self.frame(), title=self._title())

    def __rich__(self) -> Any:
        return _render.tables_rich(self.frame(), title=self._title())

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Return whether the refresh thread runs."""
        return self._thread is not None and not self._stop.is_set()

    def start(self) -> LiveView:
        """Show the view and start refreshing it; return the view."""
        if self._thread is not None:
            raise ConfigurationError("this live view was already started; make a new one")
        self._sink = _open_sink(self._target, self)
        self._thread = threading.Thread(
            target=self._run, name=f"batchkit-live-{self.model.name}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()
            if self._sink is not None:
                self._sink.refresh()

    def stop(self) -> None:
        """Stop refreshing, draw the last frame, and wait for the refresh thread to end."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.update()
        if self._sink is not None:
            self._sink.close()

    def __enter__(self) -> LiveView:
        # ``with live(model):`` gets a started view; ``with LiveView(model):`` starts it here.
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def live(
    model: BatchedModel[Any, Any] | Deployment[Any, Any],
    *,
    interval: float = 0.5,
    display: Target = "auto",
) -> LiveView:
    """Show ``model``'s statistics live, refreshed every ``interval`` seconds, and return the view.

    Use it as a context manager (``with live(model): ...``), or keep the view and call
    ``stop()`` when done. See ``LiveView`` for what it shows and where.
    """
    return LiveView(model, interval=interval, display=display).start()


class _Sink:
    def refresh(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.refresh()


def _open_sink(target: Target, view: LiveView) -> _Sink | None:
    if target == "auto":
        if _render.in_kernel():
            target = "notebook"
        else:
            try:
                import rich  # noqa: F401
            except ImportError:
                return None
            target = "terminal"
    if target == "notebook":
        return _NotebookSink(view)
    if target == "terminal":
        return _RichSink(view)
    return None


class _NotebookSink(_Sink):
    """An HTML output in the cell that started the view, updated in place by display id."""

    def __init__(self, view: LiveView) -> None:
        self._view = view
        self._update = _render.notebook_output(view._repr_html_())

    def refresh(self) -> None:
        self._update(self._view._repr_html_())


class _RichSink(_Sink):
    """A ``rich.live.Live`` on the terminal."""

    def __init__(self, view: LiveView) -> None:
        from rich.console import Console
        from rich.live import Live

        self._view = view
        self._live = Live(view, console=Console(file=sys.stderr), auto_refresh=False)
        self._live.start()

    def refresh(self) -> None:
        self._live.update(self._view, refresh=True)

    def close(self) -> None:
        self.refresh()
        self._live.stop()
