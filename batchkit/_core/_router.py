"""``Deployment``: several versions of a model live at once (canary, A/B, shadow, promote).

A deployment routes each call to one of its versions, each a ``BatchedModel`` with its own
engine and settings, through their public entry points only. The routing lives in one
immutable ``Routing`` replaced whole under a lock, so a change (weights, shadow, promote,
rollback) is atomic: every call reads one routing, and a change never touches a version's
queue, so nothing queued is lost.

Shadow traffic runs beside the primary path, never on it: after a primary call succeeded, its
item and output go to a bounded queue (or are dropped and counted when it is full), and worker
threads of the deployment send them to the shadow version and compare the outputs.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import queue
import random
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar, cast

import anyio.to_thread

from ._errors import ClosedError, ConfigurationError
from ._model import BatchedModel
from ._slot import Versioned
from ._stats import DEFAULT_LATENCY_BOUNDS, LatencySummary, Statistics

__all__ = (
    "Deployment",
    "DeploymentStatistics",
    "Disagreement",
    "Routing",
    "ShadowStatistics",
    "default_compare",
)

T = TypeVar("T")
R = TypeVar("R")

Key = str | bytes | int
Compare = Callable[[Any, Any], Any]

# Sticky keys map to a point of [0, 1) through this many bits of their BLAKE2b digest.
_HASH_BITS = 53
# A shadow worker sends at most this many queued items as one call.
_SHADOW_BATCH = 64


@dataclass(frozen=True)
class Routing:
    """How a deployment routes calls, as one immutable value (``Deployment.routing``).

    ``weights`` holds every version's share (0 for a version that gets no routed calls); a
    call goes to a version with probability weight / sum of weights. ``shadow`` is the version
    mirrored calls also go to, for a ``shadow_fraction`` of the calls; ``compare`` tells
    whether a shadow output agrees with the primary one (None: ``default_compare``).
    """

    weights: Mapping[str, float]
    shadow: str | None = None
    shadow_fraction: float = 0.0
    compare: Compare | None = field(default=None, compare=False, repr=False)

    @property
    def primary(self) -> str:
        """Return the version with the highest weight (the first of equals)."""
        return max(self.weights, key=lambda v: self.weights[v])

    def shares(self) -> dict[str, float]:
        """Return each version's configured share of routed calls (weights over their sum)."""
        total = math.fsum(self.weights.values())
        return {v: w / total for v, w in self.weights.items()}

    def to_json(self) -> dict[str, Any]:
        """Return the routing as JSON-able data (without ``compare``)."""
        return {
            "weights": dict(self.weights),
            "primary": self.primary,
            "shadow": self.shadow,
            "shadow_fraction": self.shadow_fraction,
        }


@dataclass(frozen=True)
class Disagreement:
    """One mirrored call whose shadow output did not agree with the primary output."""

    item: Any
    primary: Any
    shadow: Any
    primary_version: str
    shadow_version: str


@dataclass(frozen=True)
class ShadowStatistics:
    """Counters of shadow traffic since the deployment was made.

    ``mirrored`` items were queued for the shadow; each then ends as ``agreed``, ``disagreed``
    or ``errors`` (the shadow version, or ``compare``, raised), or ``discarded`` (the
    deployment closed first). ``dropped`` items found the shadow queue full and were never
    queued. ``recent`` holds the last few disagreements, oldest first.
    """

    version: str | None
    fraction: float
    mirrored: int
    agreed: int
    disagreed: int
    errors: int
    dropped: int
    discarded: int
    pending: int
    recent: tuple[Disagreement, ...]

    @property
    def compared(self) -> int:
        """Return the shadow outputs compared so far."""
        return self.agreed + self.disagreed

    @property
    def disagreement_rate(self) -> float:
        """Return disagreed / compared (0.0 before the first comparison)."""
        return self.disagreed / self.compared if self.compared else 0.0


@dataclass(frozen=True)
class DeploymentStatistics:
    """An immutable snapshot of a deployment: its routing, the split, and each version's stats.

    ``routed`` counts the items each version got from the weights or a sticky key; ``pinned``
    those a caller sent to a version by name. ``versions`` holds each version's own
    ``Statistics``; ``total`` adds them up (counts summed, batch sizes merged; each latency's
    count, mean and max are exact over all versions, its percentiles the highest of the
    versions', an upper bound).
    """

    name: str
    routing: Routing
    routed: Mapping[str, int]
    pinned: Mapping[str, int]
    versions: Mapping[str, Statistics]
    shadow: ShadowStatistics
    total: Statistics

    @property
    def model_version(self) -> str:
        """Return the primary version (the highest weight)."""
        return self.routing.primary

    @property
    def completed(self) -> int:
        """Return the items completed by every version together."""
        return self.total.completed

    def summary(self) -> dict[str, Any]:
        """Return the routing, the observed split and the shadow counters as JSON-able data
        (what the HTTP routing endpoints and the pipe's ``stats`` answer)."""
        s = self.shadow
        return {
            "routing": self.routing.to_json(),
            "shares": self.routing.shares(),
            "routed": dict(self.routed),
            "pinned": dict(self.pinned),
            "observed_shares": self.observed_shares(),
            "completed": {v: st.completed for v, st in self.versions.items()},
            "shadow": {
                "version": s.version,
                "fraction": s.fraction,
                "mirrored": s.mirrored,
                "agreed": s.agreed,
                "disagreed": s.disagreed,
                "errors": s.errors,
                "dropped": s.dropped,
                "discarded": s.discarded,
                "pending": s.pending,
                "disagreement_rate": s.disagreement_rate,
            },
        }

    def observed_shares(self) -> dict[str, float]:
        """Return each version's observed share of the routed items (0.0 before any)."""
        total = sum(self.routed.values())
        return {v: (n / total if total else 0.0) for v, n in self.routed.items()}


def default_compare(primary: Any, shadow: Any) -> bool:
    """Return whether two outputs agree: ``allclose`` for numpy arrays and torch tensors (same
    shape, NaNs equal), element by element for lists, tuples and dicts, else ``==``.

    numpy and torch are never imported here: an output of theirs means they already are.
    """
    kind = type(primary).__module__.partition(".")[0]
    if kind == "numpy" and type(shadow).__module__.partition(".")[0] == "numpy":
        np = sys.modules["numpy"]
        a, b = np.asarray(primary), np.asarray(shadow)
        if a.shape != b.shape:
            return False
        if a.dtype.kind in "fc" or b.dtype.kind in "fc":
            return bool(np.allclose(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if kind == "torch" and type(shadow).__module__.partition(".")[0] == "torch":
        torch = sys.modules["torch"]
        if primary.shape != shadow.shape:
            return False
        shadow = shadow.to(device=primary.device, dtype=primary.dtype)
        if primary.is_floating_point() or primary.is_complex():
            return bool(torch.allclose(primary, shadow, equal_nan=True))
        return bool(torch.equal(primary, shadow))
    if isinstance(primary, (list, tuple)) and isinstance(shadow, (list, tuple)):
        return len(primary) == len(shadow) and all(
            default_compare(a, b) for a, b in zip(primary, shadow, strict=True)
        )
    if isinstance(primary, Mapping) and isinstance(shadow, Mapping):
        return primary.keys() == shadow.keys() and all(
            default_compare(primary[k], shadow[k]) for k in primary
        )
    return bool(primary == shadow)


@dataclass(frozen=True, eq=False)
class _Table:
    """A routing with what picking a version needs, precomputed."""

    routing: Routing
    versions: tuple[str, ...]
    bounds: tuple[float, ...]  # cumulative shares; the last is exactly 1.0

    @classmethod
    def of(cls, routing: Routing) -> _Table:
        versions = tuple(v for v, w in routing.weights.items() if w > 0)
        total = math.fsum(routing.weights[v] for v in versions)
        bounds, running = [], 0.0
        for v in versions:
            running += routing.weights[v]
            bounds.append(running / total)
        bounds[-1] = 1.0
        return cls(routing, versions, tuple(bounds))

    def pick(self, point: float) -> str:
        return self.versions[bisect.bisect_right(self.bounds, point)]


@dataclass(frozen=True, eq=False)
class _Mirror:
    """One primary outcome waiting to be replayed on the shadow version."""

    item: Any
    output: Any
    primary: str
    shadow: str
    compare: Compare


class Deployment(Generic[T, R]):
    """Serve several versions of one model at once, routing each call to one of them.

    ``versions`` maps each version's name to its ``BatchedModel`` (or is a sequence of models,
    each named by its ``version``). Every version keeps its own engine and batching settings.

    - ``weights``: each version's share of the calls (default: all to the first version).
    - ``shadow``, ``shadow_fraction``, ``compare``: mirror that fraction of the calls to the
      ``shadow`` version too and compare its output with ``compare(primary, shadow)``
      (default ``default_compare``); the shadow output is never returned.
    - ``shadow_queue_size``: mirrored items waiting for the shadow at most; more are dropped
      (and counted), so the shadow never slows a primary call. ``shadow_workers``: threads
      that send them (each sends what is queued as one ``call_many_sync``).
      ``shadow_timeout``: seconds a mirrored item may take.
    - ``keep_disagreements``: how many recent disagreements ``statistics()`` keeps.
    - ``seed``: seeds the random choices (weights and shadow fraction), for reproducible runs.
    - ``name``: shown in errors and statistics (default: the first version's model name).

    Calls take the model's entry points and two more keywords: ``key`` (sticky routing: calls
    with the same key go to the same version while the weights hold) and ``version`` (pin the
    call to that version; pinned calls are not mirrored). Routing changes (``set_weights``,
    ``set_shadow``, ``clear_shadow``, ``promote``, ``rollback``) are plain, non-blocking methods
    safe from any thread and from async code; each replaces the routing in one step.

    Run every version's engine in your event loop with ``async with deployment:``, or let the
    first calls start them on background threads that ``close()`` stops. Raises
    ``ConfigurationError`` for bad versions, weights or settings.
    """

    def __init__(
        self,
        versions: Mapping[str, BatchedModel[T, R]] | Sequence[BatchedModel[T, R]],
        *,
        weights: Mapping[str, float] | None = None,
        shadow: str | None = None,
        shadow_fraction: float = 1.0,
        compare: Compare | None = None,
        shadow_queue_size: int = 1024,
        shadow_workers: int = 2,
        shadow_timeout: float | None = 30.0,
        keep_disagreements: int = 10,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        self._models = _versions_of(versions)
        first = next(iter(self._models.values()))
        self.name = first.name if name is None else name
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"name must be a non-empty string, got {self.name!r}")
        _check_int("shadow_queue_size", shadow_queue_size, 1)
        _check_int("shadow_workers", shadow_workers, 1)
        _check_int("keep_disagreements", keep_disagreements, 0)
        if shadow_timeout is not None and not _positive(shadow_timeout):
            raise ConfigurationError(
                f"shadow_timeout must be a positive number of seconds or None, "
                f"got {shadow_timeout!r}"
            )
        if weights is None:
            weights = {next(iter(self._models)): 1.0}
        routing = self._checked(Routing(self._weights(weights)))
        if shadow is not None:
            routing = self._with_shadow(routing, shadow, shadow_fraction, compare)
        self._lock = threading.Lock()
        self._table = _Table.of(routing)
        self._previous: _Table | None = None
        self._random = random.Random(seed)
        self._routed = dict.fromkeys(self._models, 0)
        self._pinned = dict.fromkeys(self._models, 0)
        self._shadow = _ShadowRunner(
            self._models,
            f"batchkit-shadow-{self.name}",
            shadow_queue_size,
            shadow_workers,
            shadow_timeout,
            keep_disagreements,
        )
        self._closed = False
        self._stack: AsyncExitStack | None = None

    # -- what it holds -------------------------------------------------------------------------

    @property
    def versions(self) -> tuple[str, ...]:
        """Return the names of the versions, in the order given."""
        return tuple(self._models)

    @property
    def models(self) -> Mapping[str, BatchedModel[T, R]]:
        """Return each version's model, by version name."""
        return MappingProxyType(self._models)

    def __getitem__(self, version: str) -> BatchedModel[T, R]:
        return self._model(version)

    @property
    def routing(self) -> Routing:
        """Return the routing now in force."""
        return self._table.routing

    @property
    def version(self) -> str:
        """Return the primary version (the highest weight)."""
        return self._table.routing.primary

    @property
    def settings(self) -> Any:
        """Return the primary version's settings."""
        return self._models[self.version].settings

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.routing}>"

    # -- routing changes -----------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float]) -> Routing:
        """Route calls by ``weights`` (versions left out get 0) from now on; return the routing.

        Raises ``ConfigurationError`` for an unknown version, a weight that is negative or not
        finite, or weights that are all 0.
        """
        new = self._weights(weights)
        return self._change(lambda r: Routing(new, r.shadow, r.shadow_fraction, r.compare))

    def set_shadow(
        self, version: str, *, fraction: float = 1.0, compare: Compare | None = None
    ) -> Routing:
        """Mirror ``fraction`` of the routed calls to ``version`` too, compared by ``compare``."""
        return self._change(lambda r: self._with_shadow(r, version, fraction, compare))

    def clear_shadow(self) -> Routing:
        """Stop mirroring calls (mirrored items already queued are still compared)."""
        return self._change(lambda r: Routing(r.weights))

    def promote(self, version: str) -> Routing:
        """Make ``version`` the only primary: it gets every routed call (and stops being the
        shadow, if it was). ``rollback()`` restores the routing before."""
        self._model(version)

        def promoted(r: Routing) -> Routing:
            weights = dict.fromkeys(r.weights, 0.0)
            weights[version] = 1.0
            if r.shadow == version:
                return Routing(weights)
            return Routing(weights, r.shadow, r.shadow_fraction, r.compare)

        return self._change(promoted)

    def rollback(self) -> Routing:
        """Restore the routing before the last change and return it (a second rollback goes
        forward again). Raises ``ConfigurationError`` when the routing never changed."""
        with self._lock:
            previous = self._previous
            if previous is None:
                raise ConfigurationError(f"deployment {self.name!r} has no routing to roll back to")
            self._previous, self._table = self._table, previous
            return previous.routing

    def _change(self, change: Callable[[Routing], Routing]) -> Routing:
        with self._lock:
            routing = self._checked(change(self._table.routing))
            self._previous, self._table = self._table, _Table.of(routing)
            return routing

    def _weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        if not isinstance(weights, Mapping):
            raise ConfigurationError(
                f"weights must be a mapping of version to weight, got {weights!r}"
            )
        result = dict.fromkeys(self._models, 0.0)
        for version, weight in weights.items():
            self._model(version)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigurationError(
                    f"the weight of {version!r} must be a number, got {weight!r}"
                )
            if not (math.isfinite(weight) and weight >= 0):
                raise ConfigurationError(
                    f"the weight of {version!r} must be finite and >= 0, got {weight!r}"
                )
            result[version] = float(weight)
        return result

    def _checked(self, routing: Routing) -> Routing:
        if not any(w > 0 for w in routing.weights.values()):
            raise ConfigurationError(
                f"deployment {self.name!r} needs a version with a weight > 0, got "
                f"{dict(routing.weights)}"
            )
        return routing

    def _with_shadow(
        self, routing: Routing, version: str, fraction: float, compare: Compare | None
    ) -> Routing:
        self._model(version)
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 <= fraction <= 1
        ):
            raise ConfigurationError(f"shadow fraction must be in [0, 1], got {fraction!r}")
        if compare is not None and not callable(compare):
            raise ConfigurationError(f"compare must be callable, got {compare!r}")
        return Routing(routing.weights, version, float(fraction), compare)

    def _model(self, version: object) -> BatchedModel[T, R]:
        model = self._models.get(version) if isinstance(version, str) else None
        if model is None:
            raise ConfigurationError(
                f"deployment {self.name!r} has no version {version!r}; it has {list(self._models)}"
            )
        return model

    # -- routing one call ----------------------------------------------------------------------

    def _route(
        self, key: Key | None, version: str | None, n: int
    ) -> tuple[str, BatchedModel[T, R], list[_Target | None]]:
        """Return the version for a call of ``n`` items and, per item, where to mirror it."""
        if self._closed:
            raise ClosedError(f"deployment {self.name!r} is closed")
        if version is not None:
            model = self._model(version)
            with self._lock:
                self._pinned[version] += n
            return version, model, []
        point = None if key is None else _point(key)
        with self._lock:
            table = self._table
            if point is None:
                point = self._random.random()
            chosen = table.pick(point)
            self._routed[chosen] += n
            routing = table.routing
            mirrors: list[_Target | None] = []
            if routing.shadow is not None and routing.shadow != chosen and routing.shadow_fraction:
                target = _Target(routing.shadow, routing.compare or default_compare)
                draw = self._random.random
                mirrors = [target if draw() < routing.shadow_fraction else None for _ in range(n)]
        return chosen, self._models[chosen], mirrors

    def _mirror(
        self,
        version: str,
        mirrors: list[_Target | None],
        items: Sequence[Any],
        outputs: Sequence[Any],
    ) -> None:
        for target, item, output in zip(mirrors, items, outputs, strict=True):
            if target is not None and not isinstance(output, BaseException):
                self._shadow.offer(_Mirror(item, output, version, target.version, target.compare))

    # -- async entry points --------------------------------------------------------------------

    async def call(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        key: Key | None = None,
        version: str | None = None,
    ) -> R:
        """Route one item (by ``key``, or pinned to ``version``) and return its output.

        As ``BatchedModel.call()``; raises ``ConfigurationError`` for an unknown ``version``.
        """
        return (
            await self.call_versioned(
                item, priority=priority, timeout=timeout, deadline=deadline, key=key,
                version=version,
            )
        ).value  # fmt: skip

    async def call_nowait(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        key: Key | None = None,
        version: str | None = None,
    ) -> R:
        """Like ``call()``, but raise ``QueueFull`` at once when the version's queue is full."""
        chosen, model, mirrors = self._route(key, version, 1)
        value = await model.call_nowait(item, priority=priority, timeout=timeout, deadline=deadline)
        if mirrors:
            self._mirror(chosen, mirrors, [item], [value])
        return value

    async def call_versioned(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        key: Key | None = None,
        version: str | None = None,
    ) -> Versioned[R]:
        """Like ``call()``, and return the output with the name of the version that made it."""
        chosen, model, mirrors = self._route(key, version, 1)
        value = await model.call(item, priority=priority, timeout=timeout, deadline=deadline)
        if mirrors:
            self._mirror(chosen, mirrors, [item], [value])
        return Versioned(value, chosen)

    async def call_many(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
        key: Key | None = None,
        version: str | None = None,
    ) -> list[R]:
        """Route all ``items`` to one version and return their outputs in order.

        As ``BatchedModel.call_many()``; the whole call goes to one version.
        """
        results = await self._call_many(
            items, priority, timeout, deadline, return_exceptions, key, version, True
        )
        return [_value(r) for r in results]

    async def call_many_versioned(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
        key: Key | None = None,
        version: str | None = None,
    ) -> list[Versioned[R]]:
        """Like ``call_many()``, with each output paired with the version name."""
        return await self._call_many(
            items, priority, timeout, deadline, return_exceptions, key, version, True
        )

    async def call_many_nowait(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
        key: Key | None = None,
        version: str | None = None,
    ) -> list[R]:
        """Like ``call_many()``, but raise ``QueueFull`` at once when an item finds no room."""
        results = await self._call_many(
            items, priority, timeout, deadline, return_exceptions, key, version, False
        )
        return [_value(r) for r in results]

    async def call_many_nowait_versioned(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        deadline: float | None = None,
        return_exceptions: bool = False,
        key: Key | None = None,
        version: str | None = None,
    ) -> list[Versioned[R]]:
        """Like ``call_many_nowait()``, with each output paired with the version name."""
        return await self._call_many(
            items, priority, timeout, deadline, return_exceptions, key, version, False
        )

    async def _call_many(
        self,
        items: Iterable[T],
        priority: float,
        timeout: float | None,
        deadline: float | None,
        return_exceptions: bool,
        key: Key | None,
        version: str | None,
        wait: bool,
    ) -> list[Any]:
        items = list(items)
        chosen, model, mirrors = self._route(key, version, len(items))
        call = model.call_many_versioned if wait else model.call_many_nowait_versioned
        results: list[Any] = await call(
            items,
            priority=priority,
            timeout=timeout,
            deadline=deadline,
            return_exceptions=return_exceptions,
        )
        if mirrors:
            self._mirror(chosen, mirrors, items, [_value(r) for r in results])
        return [r if isinstance(r, BaseException) else Versioned(r.value, chosen) for r in results]

    # -- sync entry points ---------------------------------------------------------------------

    def call_sync(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        key: Key | None = None,
        version: str | None = None,
    ) -> R:
        """Route one item from sync code and return its output (as ``BatchedModel.call_sync``)."""
        return self.call_sync_versioned(
            item, priority=priority, timeout=timeout, key=key, version=version
        ).value

    def call_sync_versioned(
        self,
        item: T,
        *,
        priority: float = 0,
        timeout: float | None = None,
        key: Key | None = None,
        version: str | None = None,
    ) -> Versioned[R]:
        """Like ``call_sync()``, and return the output with the version name."""
        chosen, model, mirrors = self._route(key, version, 1)
        value = model.call_sync(item, priority=priority, timeout=timeout)
        if mirrors:
            self._mirror(chosen, mirrors, [item], [value])
        return Versioned(value, chosen)

    def call_many_sync(
        self,
        items: Iterable[T],
        *,
        priority: float = 0,
        timeout: float | None = None,
        return_exceptions: bool = False,
        key: Key | None = None,
        version: str | None = None,
    ) -> list[R]:
        """Route all ``items`` to one version from sync code and return their outputs."""
        items = list(items)
        chosen, model, mirrors = self._route(key, version, len(items))
        results = model.call_many_sync(
            items, priority=priority, timeout=timeout, return_exceptions=return_exceptions
        )
        if mirrors:
            self._mirror(chosen, mirrors, items, results)
        return results

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Deployment[T, R]:
        if self._closed:
            raise ClosedError(f"deployment {self.name!r} is closed")
        stack = AsyncExitStack()
        async with AsyncExitStack() as unwind:
            unwind.push_async_exit(stack)
            for model in self._distinct():
                await stack.enter_async_context(model)
            unwind.pop_all()
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        # The shadow workers stop first: a worker calling a version after its engine left
        # would start a background engine for it. A hung shadow holds this up to its timeout.
        self._shadow.stop_soon()
        try:
            await anyio.to_thread.run_sync(partial(self._shadow.join, final=False))
        finally:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)

    def __enter__(self) -> Deployment[T, R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, *, drain: bool = False) -> None:
        """Close every version and the shadow workers for good (see ``BatchedModel.close``).

        Mirrored items not yet sent to the shadow are discarded (and counted).
        """
        self._closed = True
        self._shadow.stop_soon()
        for model in self._distinct():
            model.close(drain=drain)
        self._shadow.join(final=True)

    async def aclose(self, *, drain: bool = False) -> None:
        """Close the deployment, like ``close()``, and wait until every version stopped."""
        self._closed = True
        self._shadow.stop_soon()
        for model in self._distinct():
            await model.aclose(drain=drain)
        await anyio.to_thread.run_sync(partial(self._shadow.join, final=True))

    def _distinct(self) -> list[BatchedModel[T, R]]:
        seen: dict[int, BatchedModel[T, R]] = {}
        for model in self._models.values():
            seen.setdefault(id(model), model)
        return list(seen.values())

    def wait_shadow_sync(self, timeout: float | None = None) -> bool:
        """Block until every mirrored item was compared (or failed); return False when
        ``timeout`` seconds passed first. For tests and load-test reports: calls never wait."""
        return self._shadow.wait_idle(timeout)

    async def wait_shadow(self, timeout: float | None = None) -> bool:
        """Like ``wait_shadow_sync()``, from async code (waits in a worker thread)."""
        return await anyio.to_thread.run_sync(self._shadow.wait_idle, timeout)

    # -- statistics ----------------------------------------------------------------------------

    def record_histograms(self, bounds: Sequence[float] = DEFAULT_LATENCY_BOUNDS) -> None:
        """Record latency histograms in every version (see ``BatchedModel.record_histograms``)."""
        for model in self._distinct():
            model.record_histograms(bounds)

    def statistics(self) -> DeploymentStatistics:
        """Return a snapshot of the routing, the observed split and every version's stats."""
        with self._lock:
            routing = self._table.routing
            routed, pinned = dict(self._routed), dict(self._pinned)
        versions = {v: m.statistics() for v, m in self._models.items()}
        return DeploymentStatistics(
            name=self.name,
            routing=routing,
            routed=MappingProxyType(routed),
            pinned=MappingProxyType(pinned),
            versions=MappingProxyType(versions),
            shadow=self._shadow.statistics(routing),
            total=_total(self.name, routing.primary, self._distinct_stats(versions)),
        )

    def _distinct_stats(self, versions: Mapping[str, Statistics]) -> list[Statistics]:
        seen: dict[int, Statistics] = {}
        for v, model in self._models.items():
            seen.setdefault(id(model), versions[v])
        return list(seen.values())


@dataclass(frozen=True, eq=False)
class _Target:
    version: str
    compare: Compare


class _ShadowRunner:
    """A bounded queue of mirrored items and the threads that replay them on the shadow.

    ``offer`` never blocks: a full queue drops the item and counts it. Worker threads start
    with the first offer; ``stop_soon`` makes them discard what is still queued, ``join``
    waits for them.
    """

    def __init__(
        self,
        models: Mapping[str, BatchedModel[Any, Any]],
        thread_name: str,
        capacity: int,
        workers: int,
        timeout: float | None,
        keep: int,
    ) -> None:
        self._models = models
        self._thread_name = thread_name
        self._queue: queue.Queue[_Mirror | None] = queue.Queue(capacity)
        self._workers = workers
        self._timeout = timeout
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._recent: deque[Disagreement] = deque(maxlen=keep)
        self.mirrored = self.agreed = self.disagreed = self.errors = 0
        self.dropped = self.discarded = 0
        self.pending = 0  # offered and not yet settled (queued or being replayed)

    def offer(self, mirror: _Mirror) -> None:
        if not self._threads:
            self._start()
        with self._lock:
            if self._stopping:
                self.dropped += 1
                return
            self.pending += 1
        try:
            self._queue.put_nowait(mirror)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self._settled(1)
            return
        with self._lock:
            self.mirrored += 1

    def _settled(self, n: int) -> None:
        """Count ``n`` mirrored items as settled (holding the lock)."""
        self.pending -= n
        if not self.pending:
            self._idle.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: not self.pending, timeout)

    def _start(self) -> None:
        with self._lock:
            if self._threads or self._stopping:
                return
            for i in range(self._workers):
                thread = threading.Thread(
                    target=self._work, name=f"{self._thread_name}-{i}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        last = False
        while not last:
            batch: list[_Mirror] = []
            first = self._queue.get()
            if first is None:
                return  # this worker's stop sentinel
            batch.append(first)
            while len(batch) < _SHADOW_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True  # this worker's stop sentinel: end after this batch
                    break
                batch.append(more)
            if self._stopping:
                with self._lock:
                    self.discarded += len(batch)
                    self._settled(len(batch))
                continue
            self._replay(batch)

    def _replay(self, batch: list[_Mirror]) -> None:
        by_version: dict[str, list[_Mirror]] = {}
        for mirror in batch:
            by_version.setdefault(mirror.shadow, []).append(mirror)
        for version, mirrors in by_version.items():
            model = self._models[version]
            try:
                outputs: list[Any] = model.call_many_sync(
                    [m.item for m in mirrors], timeout=self._timeout, return_exceptions=True
                )
            except Exception as exc:  # closed, or the call itself refused
                outputs = [exc] * len(mirrors)
            for mirror, output in zip(mirrors, outputs, strict=True):
                self._judge(mirror, output)

    def _judge(self, mirror: _Mirror, output: Any) -> None:
        agreed: bool | None = None
        closing = isinstance(output, ClosedError) and self._stopping
        if not closing and not isinstance(output, BaseException):
            try:
                agreed = bool(mirror.compare(mirror.output, output))
            except Exception:
                agreed = None
        with self._lock:
            if closing:
                self.discarded += 1  # the deployment closed before the shadow answered
            elif agreed is None:
                self.errors += 1
            elif agreed:
                self.agreed += 1
            else:
                self.disagreed += 1
                self._recent.append(
                    Disagreement(mirror.item, mirror.output, output, mirror.primary, mirror.shadow)
                )
            self._settled(1)

    def stop_soon(self) -> None:
        with self._lock:
            self._stopping = True

    def join(self, *, final: bool) -> None:
        """Stop the workers and wait for them; ``final``: for good (the deployment closed),
        else a later offer starts them again (the deployment may be entered again)."""
        with self._lock:
            self._stopping = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)  # one per worker; workers that stop discard, so room comes
        for thread in threads:
            thread.join()
        while True:  # offers that raced with the stop
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                with self._lock:
                    self.discarded += 1
                    self._settled(1)
        if not final:
            with self._lock:
                self._stopping = False

    def statistics(self, routing: Routing) -> ShadowStatistics:
        with self._lock:
            return ShadowStatistics(
                version=routing.shadow,
                fraction=routing.shadow_fraction if routing.shadow is not None else 0.0,
                mirrored=self.mirrored,
                agreed=self.agreed,
                disagreed=self.disagreed,
                errors=self.errors,
                dropped=self.dropped,
                discarded=self.discarded,
                pending=self.pending,
                recent=tuple(self._recent),
            )


def _versions_of(
    versions: Mapping[str, BatchedModel[Any, Any]] | Sequence[BatchedModel[Any, Any]],
) -> dict[str, BatchedModel[Any, Any]]:
    if isinstance(versions, Mapping):
        pairs = list(versions.items())
    elif isinstance(versions, Sequence) and not isinstance(versions, (str, bytes)):
        pairs = [(cast("str", getattr(m, "version", None)), m) for m in versions]
    else:
        raise ConfigurationError(
            f"versions must be a mapping of version name to BatchedModel or a sequence of "
            f"BatchedModel, got {versions!r}"
        )
    result: dict[str, BatchedModel[Any, Any]] = {}
    for version, model in pairs:
        if not isinstance(model, BatchedModel):
            raise ConfigurationError(f"version {version!r} is not a BatchedModel: {model!r}")
        if not isinstance(version, str) or not version or "/" in version:
            raise ConfigurationError(
                f"a version name must be a non-empty string without '/', got {version!r}"
            )
        if version in result:
            raise ConfigurationError(f"version {version!r} is given twice")
        result[version] = model
    if not result:
        raise ConfigurationError("a deployment needs at least one version")
    return result


def _point(key: Key) -> float:
    """Map a sticky key to [0, 1), the same in every process (unlike ``hash()``)."""
    if isinstance(key, bool) or not isinstance(key, (str, bytes, int)):
        raise ConfigurationError(f"a routing key must be a str, bytes or int, got {key!r}")
    data = key if isinstance(key, bytes) else str(key).encode()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> (64 - _HASH_BITS)) / (1 << _HASH_BITS)


def _value(result: Any) -> Any:
    return result if isinstance(result, BaseException) else result.value


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"{name} must be an int >= {least}, got {value!r}")


def _positive(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and value > 0
        and math.isfinite(value)
    )


def _total(name: str, version: str, stats: list[Statistics]) -> Statistics:
    """Add up the versions' statistics (percentiles: the highest, an upper bound)."""
    sizes: dict[int, int] = {}
    for s in stats:
        for size, n in s.batch_sizes.items():
            sizes[size] = sizes.get(size, 0) + n

    def latency(field_name: str) -> LatencySummary:
        parts: list[LatencySummary] = [getattr(s, field_name) for s in stats]
        count = sum(p.count for p in parts)
        if not count:
            return LatencySummary.of([])
        return LatencySummary(
            count=count,
            mean=sum(p.mean * p.count for p in parts) / count,
            p50=max(p.p50 for p in parts),
            p90=max(p.p90 for p in parts),
            p99=max(p.p99 for p in parts),
            max=max(p.max for p in parts),
        )

    def added(field_name: str) -> int:
        return sum(getattr(s, field_name) for s in stats)

    return Statistics(
        name=name,
        model_version=version,
        submitted=added("submitted"),
        completed=added("completed"),
        failed=added("failed"),
        expired=added("expired"),
        cancelled=added("cancelled"),
        rejected=added("rejected"),
        queue_depth=added("queue_depth"),
        waiting_for_room=added("waiting_for_room"),
        in_flight_batches=added("in_flight_batches"),
        batches=added("batches"),
        batch_sizes=MappingProxyType(sizes),
        queue_wait=latency("queue_wait"),
        compute=latency("compute"),
        end_to_end=latency("end_to_end"),
        swaps=added("swaps"),
        failed_swaps=added("failed_swaps"),
    )
