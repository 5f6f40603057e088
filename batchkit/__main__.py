"""The command line: ``batchkit COMMAND ...`` or ``python -m batchkit COMMAND ...``.

``main`` only dispatches: each subcommand adds its parser and does its work in its own module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .pipe import _cli as pipe_cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand ``argv`` names (default: the process's arguments); return its status."""
    parser = argparse.ArgumentParser(prog="batchkit", description="batchkit command line")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipe_cli.add_parser(subcommands)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
