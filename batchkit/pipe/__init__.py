"""Serve batched models over newline-delimited JSON on stdin/stdout, and call such a server.

``batchkit pipe MODULE:ATTR`` (or ``python -m batchkit pipe``) starts a server; ``serve()``
runs one in your own event loop, ``run()`` in your own script. ``PipeClient`` (async) and
``SyncPipeClient`` start one as a child process and call its models. The protocol is specified
in ``docs/pipe.md``.
"""

from __future__ import annotations

from ._client import PipeClient as PipeClient
from ._client import SyncPipeClient as SyncPipeClient
from ._errors import PipeProtocolError as PipeProtocolError
from ._errors import ResponseError as ResponseError
from ._errors import ServerExited as ServerExited
from ._protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._server import serve as serve
from ._stdio import claim_stdio as claim_stdio
from ._stdio import run as run

__all__ = (
    "PROTOCOL_VERSION",
    "PipeClient",
    "PipeProtocolError",
    "ResponseError",
    "ServerExited",
    "SyncPipeClient",
    "claim_stdio",
    "run",
    "serve",
)
