"""The ``batchkit`` command: ``serve``, ``bench``, ``profile`` and the other subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process arguments), run the subcommand, return its status."""
    parser = argparse.ArgumentParser(prog="batchkit", description="Dynamic batching for ML.")
    subparsers = parser.add_subparsers(title="commands", required=True)
    from . import _bench_cli, _profile_cli, _serve

    _serve.add_parser(subparsers)
    _bench_cli.add_parser(subparsers)
    _profile_cli.add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.command(args))


if __name__ == "__main__":
    sys.exit(main())
