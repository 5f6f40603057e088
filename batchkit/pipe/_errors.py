"""The errors the pipe client raises, beyond the core's own.

The hierarchy (``BatchkitError`` is the core's base)::

    BatchkitError
    ├── ServerExited (also RuntimeError)  the server process ended before answering
    ├── ResponseError                     the server answered with an error of another type
    └── PipeProtocolError                 the server's output broke the protocol

Error responses whose type the core has (``DeadlineExceeded``, ``ModelError``, ``ClosedError``,
``QueueFull``) are raised as those, so code written against a ``BatchedModel`` in the same
process handles a model in a pipe server the same way.

They live in the adapter, not in ``batchkit/_core/_errors.py``: the core knows nothing of pipes.
(``batchkit.RemoteError`` is another thing: a remote inference server such as Triton failed a
batch.)
"""

from __future__ import annotations

__all__ = ("PipeProtocolError", "ResponseError", "ServerExited")

from .._core import BatchkitError


class ServerExited(BatchkitError, RuntimeError):
    """Raised by the client's calls when the server process exited, or was killed, first.

    Also raised when entering the client if the server does not start (a bad ``MODULE:ATTR``
    exits with status 2; its stderr says why). ``returncode`` is the exit status (negative: the
    signal that ended it), None if unknown.
    """

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class ResponseError(BatchkitError):
    """Raised by the client's calls for an error response with no batchkit equivalent.

    ``type`` is the error type on the wire (``InvalidRequest``, ``UnknownModel``, or the class
    name of an exception the model returned for this item, such as ``ValueError``);
    ``message`` its message; ``version`` the model version, when the server sent one.
    """

    def __init__(self, type: str, message: str, *, version: str | None = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.version = version


class PipeProtocolError(BatchkitError):
    """Raised when the server's output is not protocol version 1 (a line that is not JSON, a
    response without an id, an unsupported protocol version at the handshake)."""
