"""The engine: imports the standard library and anyio, nothing else.

This module is the core's API to the rest of batchkit: the integrations, adapters and CLI
import what they need from ``batchkit._core``, never from ``batchkit._core._x``. The seams the
core declares for outer modules (``WeightOps`` for weight operations) are listed here too.
"""

from __future__ import annotations

from ._config import BatchOptions as BatchOptions
from ._config import Settings as Settings
from ._context import BatchObserver as BatchObserver
from ._context import ContextFilter as ContextFilter
from ._context import FailureLog as FailureLog
from ._context import RequestContext as RequestContext
from ._context import current_context as current_context
from ._context import new_context as new_context
from ._context import observe_batches as observe_batches
from ._context import parse_traceparent as parse_traceparent
from ._context import request_context as request_context
from ._decorator import AsyncBatched as AsyncBatched
from ._decorator import SyncBatched as SyncBatched
from ._decorator import batched as batched
from ._errors import BatchkitError as BatchkitError
from ._errors import BatchSizeMismatch as BatchSizeMismatch
from ._errors import ClosedError as ClosedError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import ForbiddenPath as ForbiddenPath
from ._errors import IncompatibleWeights as IncompatibleWeights
from ._errors import ModelError as ModelError
from ._errors import QueueFull as QueueFull
from ._errors import RemoteError as RemoteError
from ._errors import RemoteInvalidInput as RemoteInvalidInput
from ._errors import RemoteRejected as RemoteRejected
from ._errors import RemoteUnavailable as RemoteUnavailable
from ._errors import SwapError as SwapError
from ._errors import ValidationFailed as ValidationFailed
from ._errors import WarmupFailed as WarmupFailed
from ._errors import WeightsNotFound as WeightsNotFound
from ._errors import WrongLoopError as WrongLoopError
from ._info import BatchInfo as BatchInfo
from ._info import SupportsBatchInfo as SupportsBatchInfo
from ._model import BatchedModel as BatchedModel
from ._router import Deployment as Deployment
from ._router import DeploymentStatistics as DeploymentStatistics
from ._router import Disagreement as Disagreement
from ._router import Routing as Routing
from ._router import ShadowStatistics as ShadowStatistics
from ._router import default_compare as default_compare
from ._slot import Versioned as Versioned
from ._stats import DEFAULT_LATENCY_BOUNDS as DEFAULT_LATENCY_BOUNDS
from ._stats import SAMPLE_WINDOW as SAMPLE_WINDOW
from ._stats import LatencyHistogram as LatencyHistogram
from ._stats import LatencySummary as LatencySummary
from ._stats import Statistics as Statistics
from ._swap import WeightOps as WeightOps

__all__ = (
    "DEFAULT_LATENCY_BOUNDS",
    "SAMPLE_WINDOW",
    "AsyncBatched",
    "BatchInfo",
    "BatchObserver",
    "BatchOptions",
    "BatchSizeMismatch",
    "BatchedModel",
    "BatchkitError",
    "ClosedError",
    "ConfigurationError",
    "ContextFilter",
    "DeadlineExceeded",
    "Deployment",
    "DeploymentStatistics",
    "Disagreement",
    "FailureLog",
    "ForbiddenPath",
    "IncompatibleWeights",
    "LatencyHistogram",
    "LatencySummary",
    "ModelError",
    "QueueFull",
    "RemoteError",
    "RemoteInvalidInput",
    "RemoteRejected",
    "RemoteUnavailable",
    "Routing",
    "RequestContext",
    "Settings",
    "ShadowStatistics",
    "Statistics",
    "SupportsBatchInfo",
    "SwapError",
    "SyncBatched",
    "ValidationFailed",
    "Versioned",
    "WarmupFailed",
    "WeightOps",
    "WeightsNotFound",
    "WrongLoopError",
    "batched",
    "default_compare",
    "current_context",
    "new_context",
    "observe_batches",
    "parse_traceparent",
    "request_context",
)
