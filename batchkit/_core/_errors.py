"""Every exception batchkit raises.

The hierarchy::

    BatchkitError
    ├── ConfigurationError (also ValueError)  a setting or call argument is invalid: your fault
    ├── ClosedError (also RuntimeError)       the model was closed, or closes while you wait
    ├── QueueFull                             the bounded queue had no room
    ├── DeadlineExceeded (also TimeoutError)  the call's deadline passed before its outcome
    ├── WrongLoopError (also RuntimeError)    the engine runs in another loop than this call needs
    └── ModelError                            the model function failed for a whole batch
        └── BatchSizeMismatch                 the model returned the wrong number of outputs

A model that returns an exception instance in one item's slot fails only that caller, with that
exception as it is (not wrapped).
"""

from __future__ import annotations

__all__ = (
    "BatchSizeMismatch",
    "BatchkitError",
    "ClosedError",
    "ConfigurationError",
    "DeadlineExceeded",
    "ModelError",
    "QueueFull",
    "WrongLoopError",
)


class BatchkitError(Exception):
    """Base class of every error batchkit raises."""


class ConfigurationError(BatchkitError, ValueError):
    """Raised by ``BatchedModel()``, ``@batched`` and the call methods for an invalid setting.

    The message names the setting and shows the bad value.
    """


class ClosedError(BatchkitError, RuntimeError):
    """Raised by the call methods when the model is closed.

    Also raised to callers still queued when the model closes without draining.
    """


class QueueFull(BatchkitError):
    """Raised by ``call_nowait()`` when the queue holds ``max_queue_size`` items.

    ``retry_after`` estimates, in seconds, when room is likely (from the recent batch compute
    time and the batches queued ahead); adapters send it as ``Retry-After``.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(BatchkitError, TimeoutError):
    """Raised by the call methods when the call's timeout or deadline passes first.

    An item whose deadline passes while it is queued is never sent to the model.
    """


class WrongLoopError(BatchkitError, RuntimeError):
    """Raised when a call would need the engine in another event loop than it runs in.

    The sync entry points raise it on the thread running the engine's loop (blocking it would
    deadlock: use the async entry points there); ``async with model`` raises it when the model
    already runs elsewhere (on its background thread, or under another ``async with``).
    """


class ModelError(BatchkitError):
    """Raised to every caller of a batch when the model function raised.

    The original exception is chained as ``__cause__``; ``batch_size`` is the size of the batch
    that failed.
    """

    def __init__(self, message: str, *, batch_size: int) -> None:
        super().__init__(message)
        self.batch_size = batch_size


class BatchSizeMismatch(ModelError):
    """Raised to every caller of a batch when the model returned the wrong number of outputs."""

    def __init__(self, *, expected: int, got: int) -> None:
        super().__init__(
            f"the model returned {got} outputs for a batch of {expected} items", batch_size=expected
        )
        self.expected = expected
        self.got = got
