"""Benchmark fixtures, and the machine facts the report prints (added to the JSON's machine_info).

Run with ``nox -s bench``, or by hand:
``pytest benchmarks -p no:cacheprovider --benchmark-json=.benchmarks/latest.json`` then
``python benchmarks/report.py .benchmarks/latest.json docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import pytest

import batchkit

# Shared with the test suite: fail a benchmark that leaves an engine thread running.
from tests.conftest import no_engine_threads_left as no_engine_threads_left

_LOAD_AT_START: list[float] = []


def pytest_configure(config: pytest.Config) -> None:
    _LOAD_AT_START[:] = os.getloadavg()


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    """Add what the report needs beyond pytest-benchmark's own machine facts."""
    try:
        import torch
    except ImportError:
        torch_version = None
    else:
        torch_version = torch.__version__
    machine_info["batchkit_version"] = batchkit.__version__
    machine_info["torch_version"] = torch_version
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["platform"] = platform.platform()
    machine_info["load_average_start"] = list(_LOAD_AT_START)
    machine_info["load_average_end"] = list(os.getloadavg())

# The real Triton of the Triton tests (skips without nvidia-pytriton).
from tests.conftest import triton_server as triton_server  # noqa: E402
