"""Every exception batchkit raises.

The hierarchy::

    BatchkitError
    ├── ConfigurationError (also ValueError)  a setting or call argument is invalid: your fault
    ├── ClosedError (also RuntimeError)       the model was closed, or closes while you wait
    ├── QueueFull                             the bounded queue had no room
    ├── DeadlineExceeded (also TimeoutError)  the call's deadline passed before its outcome
    ├── WrongLoopError (also RuntimeError)    the engine runs in another loop than this call needs
    ├── ModelError                            the model function failed for a whole batch
    │   ├── BatchSizeMismatch                 the model returned the wrong number of outputs
    │   └── RemoteError                       a remote inference server failed the request
    │       ├── RemoteUnavailable (also ConnectionError)  unreachable, not ready, or went away
    │       ├── RemoteRejected                it refused the request: overloaded, queue full
    │       └── RemoteInvalidInput (also ValueError)      it rejected the inputs as invalid
    └── SwapError                             swap() or rollback() failed; the old model serves
        ├── WeightsNotFound (also FileNotFoundError)  no weights file at the path given
        ├── ForbiddenPath (also PermissionError)      the path is outside ``weights_dir``
        ├── IncompatibleWeights (also ValueError)     the weights do not fit the architecture
        ├── WarmupFailed                              the new model failed its warm-up batch
        └── ValidationFailed                          the validation callback rejected it

A model that returns an exception instance in one item's slot fails only that caller, with that
exception as it is (not wrapped). A remote model (``batchkit.triton.TritonModel``) does that for
each request it sends: a failed request fails only its own items, with a ``RemoteError`` (or a
``DeadlineExceeded`` when the server's timeout for it expired), the server's error chained.
"""

from __future__ import annotations

__all__ = (
    "BatchSizeMismatch",
    "BatchkitError",
    "ClosedError",
    "ConfigurationError",
    "DeadlineExceeded",
    "ForbiddenPath",
    "IncompatibleWeights",
    "ModelError",
    "QueueFull",
    "RemoteError",
    "RemoteInvalidInput",
    "RemoteRejected",
    "RemoteUnavailable",
    "SwapError",
    "ValidationFailed",
    "WarmupFailed",
    "WeightsNotFound",
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
    that failed and ``version`` the model version that ran it (None if it never ran).
    """

    def __init__(self, message: str, *, batch_size: int, version: str | None = None) -> None:
        super().__init__(message)
        self.batch_size = batch_size
        self.version = version


class BatchSizeMismatch(ModelError):
    """Raised to every caller of a batch when the model returned the wrong number of outputs."""

    def __init__(self, *, expected: int, got: int) -> None:
        super().__init__(
            f"the model returned {got} outputs for a batch of {expected} items", batch_size=expected
        )
        self.expected = expected
        self.got = got


class RemoteError(ModelError):
    """Raised to the callers of the items a remote inference server failed (``TritonModel``).

    Only the items of the failed request get it; ``batch_size`` is that request's size. The
    client library's exception is chained as ``__cause__``; the message names the server and
    the model, and quotes the server's reason.
    """


class RemoteUnavailable(RemoteError, ConnectionError):
    """Raised when the server cannot be reached (after the retries), or is not ready.

    Also raised by ``TritonModel`` when it connects, and when the server goes away while a
    request is in flight. Worth retrying later: the same model works again once the server is
    back.
    """


class RemoteRejected(RemoteError):
    """Raised when the server refused the request without running it: its queue was full, or
    it is over capacity. Worth retrying after ``retry_after`` seconds (a guess: 1.0)."""

    def __init__(
        self, message: str, *, batch_size: int, version: str | None = None, retry_after: float = 1.0
    ) -> None:
        super().__init__(message, batch_size=batch_size, version=version)
        self.retry_after = retry_after


class RemoteInvalidInput(RemoteError, ValueError):
    """Raised when the server rejected the request's inputs: a wrong shape, datatype or name.

    The caller's fault, not the server's: the same items fail again.
    """


class SwapError(BatchkitError):
    """Raised by ``swap()`` and ``rollback()`` when the new model cannot be published.

    Nothing changed: the model that served before still serves, and the next swap may be tried.
    A failure inside the preparation (loading, moving, building) is chained as ``__cause__``.
    """


class WeightsNotFound(SwapError, FileNotFoundError):
    """Raised by ``swap()`` when a weights path names no file."""


class ForbiddenPath(SwapError, PermissionError):
    """Raised by ``swap()`` when a weights path lies outside the model's ``weights_dir``."""


class IncompatibleWeights(SwapError, ValueError):
    """Raised by ``swap()`` when weights cannot be loaded into the model's architecture.

    The message lists the missing and unexpected names and the mismatched shapes.
    """


class WarmupFailed(SwapError):
    """Raised by ``swap()`` when the new model raised (or answered wrongly) on the warm-up."""


class ValidationFailed(SwapError):
    """Raised by ``swap()`` when the validation callback returned False or raised."""
