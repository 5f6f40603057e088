"""Running a pipe server as a process: stdin and stdout reserved for the protocol."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import anyio

from .._target import import_target
from ._server import DEFAULT_GRACE, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_LINE_BYTES, serve

__all__ = ("claim_stdio", "run")


def claim_stdio() -> tuple[int, int]:
    """Reserve stdin and stdout for the protocol; return private duplicates of fds 0 and 1.

    Afterwards fd 1 and ``sys.stdout`` write to stderr, so a model that prints (from Python or
    from C) cannot corrupt the protocol, and fd 0 reads ``/dev/null``, so a model that reads
    stdin cannot steal request lines. Call it once, early, before importing model code.
    """
    if sys.stdout is not None:
        sys.stdout.flush()
    protocol_in, protocol_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
    finally:
        os.close(null)
    sys.stdout = sys.stderr
    return protocol_in, protocol_out


def run(
    models: Any,
    *,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    grace: float = DEFAULT_GRACE,
    backend: str = "asyncio",
) -> int:
    """Serve ``models`` on this process's stdin and stdout until the end; return the status.

    ``models`` is what ``serve()`` takes, or a ``MODULE:ATTR`` string, imported after stdout
    is claimed (so output printed while importing goes to stderr). SIGTERM and SIGINT stop it
    gracefully (see ``serve``). Call it from the main thread, outside any event loop::

        if __name__ == "__main__":
            sys.exit(batchkit.pipe.run(model))

    Raises ``ConfigurationError`` for a bad setting or target.
    """
    input_fd, output_fd = claim_stdio()
    if isinstance(models, str):
        models = import_target(models)
    main = functools.partial(
        serve,
        models,
        input_fd=input_fd,
        output_fd=output_fd,
        max_in_flight=max_in_flight,
        max_line_bytes=max_line_bytes,
        grace=grace,
        handle_signals=True,
    )
    status: int = anyio.run(main, backend=backend)
    return status
