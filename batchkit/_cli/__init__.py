"""The ``batchkit`` command: ``serve``, ``bench``, ``profile``, ``pipe``.

``main`` only dispatches: each subcommand adds its parser and does its work in its own module
(``_serve``, ``_bench``, ``_profile``, ``_pipe``); the load generator ``bench`` drives is
``batchkit.triton._loadgen`` (``_loadgen`` here keeps its old import path). This is the top layer:
it may import everything below it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .._version import __version__

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), run the subcommand, return its status."""
    parser = argparse.ArgumentParser(prog="batchkit", description="Dynamic batching for ML.")
    parser.add_argument("--version", action="version", version=f"batchkit {__version__}")
    subparsers = parser.add_subparsers(title="commands", required=True)
    from . import _bench, _pipe, _profile, _serve

    _serve.add_parser(subparsers)
    _bench.add_parser(subparsers)
    _profile.add_parser(subparsers)
    _pipe.add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.command(args))
