"""``python -m batchkit`` and the ``batchkit`` script: the command lives in ``batchkit._cli``."""

from __future__ import annotations

import sys

from ._cli import main as main

__all__ = ("main",)

if __name__ == "__main__":
    sys.exit(main())
