"""Benchmark batched models in a pytest-benchmark suite: the ``batchkit_benchmark`` fixture.

Enable it in a suite (it is off by default, so it changes nothing elsewhere) with one of::

    batchkit_benchmark = true                # the ini file (the pytest11 entry point reads it)
    pytest -p batchkit.pytest_plugin         # the command line
    pytest_plugins = ["batchkit.pytest_plugin"]   # the root conftest.py

Then a test calls the fixture once with a target and a load; it runs the load in rounds inside
pytest-benchmark's timing and records items/s, p50/p90/p99, the mean batch size and its
histogram, errors by kind, and (when asked) a baseline measured in the same run with the ratio,
in ``benchmark.extra_info``. Each round's recorded time is the figure a regression makes worse
(1 / ratio with a baseline, seconds per item without), so ``--benchmark-compare-fail=mean:5%``
fails CI on the ratio. ``sweep()`` parametrizes a test over the profiler's grid. See
docs/pytest-benchmark.md.
"""

from __future__ import annotations

from ._pytest_plugin._fixture import BatchBenchmark as BatchBenchmark
from ._pytest_plugin._fixture import FigureClock as FigureClock
from ._pytest_plugin._fixture import batchkit_benchmark as batchkit_benchmark
from ._pytest_plugin._load import ERROR_KINDS as ERROR_KINDS
from ._pytest_plugin._load import Figures as Figures
from ._pytest_plugin._load import GrpcTarget as GrpcTarget
from ._pytest_plugin._load import HttpTarget as HttpTarget
from ._pytest_plugin._load import PipeTarget as PipeTarget
from ._pytest_plugin._load import Round as Round
from ._pytest_plugin._load import SweepPoint as SweepPoint
from ._pytest_plugin._load import sweep as sweep

__all__ = (
    "ERROR_KINDS",
    "BatchBenchmark",
    "FigureClock",
    "Figures",
    "GrpcTarget",
    "HttpTarget",
    "PipeTarget",
    "Round",
    "SweepPoint",
    "batchkit_benchmark",
    "sweep",
)
