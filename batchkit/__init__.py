"""batchkit: embedded dynamic batching for Python ML inference.

Many callers each hold one item; the model is fastest on batches. batchkit gathers the items into
batches, runs the model once per batch, and gives every caller its own answer.
"""

from __future__ import annotations

from ._core import AsyncBatched as AsyncBatched
from ._core import BatchedModel as BatchedModel
from ._core import BatchInfo as BatchInfo
from ._core import BatchkitError as BatchkitError
from ._core import BatchSizeMismatch as BatchSizeMismatch
from ._core import ClosedError as ClosedError
from ._core import ConfigurationError as ConfigurationError
from ._core import DeadlineExceeded as DeadlineExceeded
from ._core import Deployment as Deployment
from ._core import DeploymentStatistics as DeploymentStatistics
from ._core import Disagreement as Disagreement
from ._core import ForbiddenPath as ForbiddenPath
from ._core import IncompatibleWeights as IncompatibleWeights
from ._core import LatencyHistogram as LatencyHistogram
from ._core import LatencySummary as LatencySummary
from ._core import ModelError as ModelError
from ._core import QueueFull as QueueFull
from ._core import RemoteError as RemoteError
from ._core import RemoteInvalidInput as RemoteInvalidInput
from ._core import RemoteRejected as RemoteRejected
from ._core import RemoteUnavailable as RemoteUnavailable
from ._core import Routing as Routing
from ._core import Settings as Settings
from ._core import ShadowStatistics as ShadowStatistics
from ._core import Statistics as Statistics
from ._core import SupportsBatchInfo as SupportsBatchInfo
from ._core import SwapError as SwapError
from ._core import SyncBatched as SyncBatched
from ._core import ValidationFailed as ValidationFailed
from ._core import Versioned as Versioned
from ._core import WarmupFailed as WarmupFailed
from ._core import WeightsNotFound as WeightsNotFound
from ._core import WrongLoopError as WrongLoopError
from ._core import batched as batched
from ._core import default_compare as default_compare
from ._version import __version__ as __version__

__all__ = (
    "AsyncBatched",
    "BatchInfo",
    "BatchSizeMismatch",
    "BatchedModel",
    "BatchkitError",
    "ClosedError",
    "ConfigurationError",
    "DeadlineExceeded",
    "Deployment",
    "DeploymentStatistics",
    "Disagreement",
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
    "Settings",
    "ShadowStatistics",
    "Statistics",
    "SupportsBatchInfo",
    "SwapError",
    "SyncBatched",
    "ValidationFailed",
    "Versioned",
    "WarmupFailed",
    "WeightsNotFound",
    "WrongLoopError",
    "__version__",
    "batched",
    "default_compare",
)

import logging as _logging

_logging.getLogger("batchkit").addHandler(_logging.NullHandler())
