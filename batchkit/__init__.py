"""batchkit: embedded dynamic batching for Python ML inference.

Many callers each hold one item; the model is fastest on batches. batchkit gathers the items into
batches, runs the model once per batch, and gives every caller its own answer.
"""

from __future__ import annotations

from ._core._config import Settings as Settings
from ._core._decorator import AsyncBatched as AsyncBatched
from ._core._decorator import SyncBatched as SyncBatched
from ._core._decorator import batched as batched
from ._core._errors import BatchkitError as BatchkitError
from ._core._errors import BatchSizeMismatch as BatchSizeMismatch
from ._core._errors import ClosedError as ClosedError
from ._core._errors import ConfigurationError as ConfigurationError
from ._core._errors import DeadlineExceeded as DeadlineExceeded
from ._core._errors import ForbiddenPath as ForbiddenPath
from ._core._errors import IncompatibleWeights as IncompatibleWeights
from ._core._errors import ModelError as ModelError
from ._core._errors import QueueFull as QueueFull
from ._core._errors import RemoteError as RemoteError
from ._core._errors import RemoteInvalidInput as RemoteInvalidInput
from ._core._errors import RemoteRejected as RemoteRejected
from ._core._errors import RemoteUnavailable as RemoteUnavailable
from ._core._errors import SwapError as SwapError
from ._core._errors import ValidationFailed as ValidationFailed
from ._core._errors import WarmupFailed as WarmupFailed
from ._core._errors import WeightsNotFound as WeightsNotFound
from ._core._errors import WrongLoopError as WrongLoopError
from ._core._info import BatchInfo as BatchInfo
from ._core._info import SupportsBatchInfo as SupportsBatchInfo
from ._core._model import BatchedModel as BatchedModel
from ._core._slot import Versioned as Versioned
from ._core._stats import LatencyHistogram as LatencyHistogram
from ._core._stats import LatencySummary as LatencySummary
from ._core._stats import Statistics as Statistics
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
    "Settings",
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
)

import logging as _logging

_logging.getLogger("batchkit").addHandler(_logging.NullHandler())
