"""Which fast lanes an engine runs: chosen once, when it is entered, from its settings and loop.

The general path (queue -> worker -> model -> settle) meets the whole contract on its own. Each
lane is a faster way to do part of it, taken only where it keeps the contract:

- ``plain``: ``call()`` with default arguments queues a request that is its own awaitable, with
  no checks (``Engine.submit_plain``; the general code is ``submit`` + ``outcome``). Taken on
  asyncio with no default timeout, no size_fn, no max_queue_size and greedy dispatch.
- ``staging``: while a sync model runs a batch in the engine's threads, the next batch is
  handed to that thread, and started before the finished batch's callers wake (the general
  code is the worker's wait -> take -> start). Taken on asyncio with no max_queue_size (a
  staged batch leaves the queue early, which would widen its bound).
- ``inline``: ``call_sync`` on an idle engine runs its item in the caller's thread, with no
  hand-over to the loop and back (the general code is a thread request through the queue).
  Taken on asyncio with no default timeout and greedy dispatch.
- ``side``: sync callers arriving while an inline batch runs wait beside it, and their threads
  run the next batches (priority, then arrival). Taken with ``inline``, no cost budget, no
  max_queue_size, no failure isolation and max_concurrency 1.

Without ``staging`` and ``inline`` only the loop's thread touches the batches, and the engine
takes no thread lock (always so on trio).

A private switch turns lanes off (never public API): the environment variable
``BATCHKIT_LANES_OFF`` (lane names, comma-separated, or ``all``), read once at import, and
``disabled`` here, which the tests and benchmarks set to run the same contract under every plan.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._config import Settings

__all__ = ("LANES", "Plan", "disabled", "lanes_off", "plan_for")

LANES = ("plain", "staging", "inline", "side")


def _read_switch(value: str) -> frozenset[str]:
    names = {name.strip() for name in value.split(",") if name.strip()}
    if "all" in names:
        return frozenset(LANES)
    return frozenset(names & set(LANES))


# The lanes turned off for engines entered from now on (tests and benchmarks replace it).
disabled: frozenset[str] = _read_switch(os.environ.get("BATCHKIT_LANES_OFF", ""))


@contextmanager
def lanes_off(*names: str) -> Iterator[None]:
    """Turn exactly ``names`` off for the engines entered inside the block (tests, benchmarks)."""
    global disabled
    saved = disabled
    disabled = frozenset(names)
    try:
        yield
    finally:
        disabled = saved


@dataclass(frozen=True)
class Plan:
    """The lanes an engine runs; every one False is the general path alone."""

    plain: bool = False
    staging: bool = False
    inline: bool = False
    side: bool = False

    @property
    def locks(self) -> bool:
        """Whether threads other than the loop's touch the engine's batches (and need a lock)."""
        return self.staging or self.inline


def plan_for(
    settings: Settings,
    loop: asyncio.AbstractEventLoop | None,
    off: frozenset[str] | None = None,
) -> Plan:
    """Return the lanes an engine with ``settings`` runs in ``loop`` (None: not asyncio),
    less those in ``off`` (default: the private switch ``disabled``)."""
    off = disabled if off is None else off
    asyncio_loop = loop is not None
    greedy = settings.max_wait <= 0
    no_timeout = settings.timeout is None
    plain = (
        asyncio_loop
        and no_timeout
        and greedy
        and settings.size_fn is None
        and settings.max_queue_size is None
    )
    inline = asyncio_loop and no_timeout and greedy and "inline" not in off
    side = (
        inline
        and settings.max_batch_cost is None
        and settings.max_queue_size is None
        and not settings.isolate_failures
        and settings.max_concurrency == 1
    )
    return Plan(
        plain=plain and "plain" not in off,
        staging=asyncio_loop and settings.max_queue_size is None and "staging" not in off,
        inline=inline,
        side=side and "side" not in off,
    )
