"""``batchkit pipe MODULE:ATTR``: the command-line entry of the pipe server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

from .._core import ConfigurationError
from ..pipe._server import DEFAULT_GRACE, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_LINE_BYTES
from ..pipe._stdio import run
from ._logging import FORMATS
from ._logging import configure as configure_logging

__all__ = ("add_parser", "main")

DESCRIPTION = """\
Serve batched models over newline-delimited JSON: one request per line on stdin, one response
per line on stdout as soon as each item completes (out of order: match them by id). Logs go to
stderr. End of input (or SIGTERM/SIGINT, within --grace seconds) answers everything in flight
and exits. The protocol is specified in docs/pipe.md.
"""


def add_parser(subparsers: Any) -> None:
    """Add the ``pipe`` subcommand to ``subparsers`` (from ``add_subparsers()``)."""
    parser = subparsers.add_parser(
        "pipe", help="serve models over JSON lines on stdin/stdout", description=DESCRIPTION
    )
    parser.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="a BatchedModel, a mapping or collection of them, or a factory returning one",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        metavar="N",
        help="requests read and not yet answered before reading pauses (default %(default)s)",
    )
    parser.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        metavar="N",
        help="longest request line accepted (default %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="after SIGTERM/SIGINT, time to finish the requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what is logged to stderr (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="text lines, or one JSON object per line (default %(default)s)",
    )
    parser.add_argument(
        "--backend", default="asyncio", choices=["asyncio", "trio"], help=argparse.SUPPRESS
    )
    parser.set_defaults(command=main)


def main(args: argparse.Namespace) -> int:
    """Run the pipe server as ``args`` say; return the exit status."""
    configure_logging(args.log_level, args.log_format)  # each line with its request's id
    try:
        status = run(
            args.target,
            max_in_flight=args.max_in_flight,
            max_line_bytes=args.max_line_bytes,
            grace=args.grace,
            backend=args.backend,
        )
    except ConfigurationError as exc:
        print(f"batchkit pipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        # A sync model still running a batch nobody waits for cannot be interrupted, and its
        # thread would hold the interpreter open. Every response is written: leave now.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    return status
