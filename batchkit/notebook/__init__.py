"""Notebook helpers: a live statistics view and the profiler.

Calling a model from a cell needs nothing from here: ``model.call_sync(item)`` and
``model.call_many_sync(items)`` block the cell, not the kernel's event loop (the engine runs on
its own background thread), and ``await model.call(item)`` works as a top-level ``await``.
Models and their statistics render as HTML tables by themselves.

- ``live(model)``: a view of queue depth, throughput, batch sizes, latency percentiles and the
  version, refreshed in place while load runs; stop it with ``stop()`` or a ``with`` block.
- ``profile(fn, inputs, ...)``: sweep ``max_batch_size``, ``max_wait``, ``max_concurrency``
  and the number of concurrent callers; the result renders as a table, plots with ``plot()``,
  recommends settings for a latency target, and exports with ``to_dicts()``/``to_csv()``.
- ``serve(app_or_models)``: run the KServe v2 HTTP server (uvicorn) on a background thread, so
  ``tritonclient`` can call it from the next cell; ``stop()`` ends it.

This module imports neither IPython, matplotlib, rich nor uvicorn until a function needs them.
"""

from __future__ import annotations

from ._live import LiveView as LiveView
from ._live import live as live
from ._result import ProfilePoint as ProfilePoint
from ._result import ProfileResult as ProfileResult
from ._server import BackgroundServer as BackgroundServer
from ._server import serve as serve
from ._sweep import aprofile as aprofile
from ._sweep import profile as profile

__all__ = (
    "BackgroundServer",
    "LiveView",
    "ProfilePoint",
    "ProfileResult",
    "aprofile",
    "live",
    "profile",
    "serve",
)
