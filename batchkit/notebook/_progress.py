"""Progress of a profile sweep: a bar in the running notebook cell, or one line on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import _render

if TYPE_CHECKING:
    from ._result import ProfileResult

__all__ = ("Progress", "TextProgress", "auto_progress")

Progress = Callable[[int, int], None]


def auto_progress() -> Progress | None:
    """Return the progress display for where this runs: a notebook cell, a terminal, or none."""
    if _render.in_kernel():
        return _NotebookProgress()
    if sys.stderr is not None and sys.stderr.isatty():
        return TextProgress()
    return None


class _NotebookProgress:
    """A progress bar in the output of the running cell, updated in place."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._update = _render.notebook_output(self._bar(0, 1))

    def _bar(self, done: int, total: int) -> str:
        secs = time.monotonic() - self._start
        return (
            f'<progress value="{done}" max="{total}" style="width:20em"></progress> '
            f"<span>{done}/{total} points, {secs:.1f} s</span>"
        )

    def __call__(self, done: int, total: int) -> None:
        self._update(self._bar(done, total))

    def finish(self, result: ProfileResult) -> None:
        secs = time.monotonic() - self._start
        self._update(f"<span>profiled {len(result.points)} points in {secs:.1f} s</span>")


class TextProgress:
    """A one-line progress bar on stderr."""

    def __call__(self, done: int, total: int) -> None:
        filled = round(30 * done / total)
        end = "\n" if done == total else ""
        print(
            f"\rprofiling [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}",
            end=end,
            file=sys.stderr,
            flush=True,
        )
