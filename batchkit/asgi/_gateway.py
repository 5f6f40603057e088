"""The gateway in front of inference: API keys and rate limits, for every transport.

A ``Gateway`` answers two questions for a request: who is calling (``authenticate``: a key
from the keys file, compared in constant time by its SHA-256 digest), and may they run this
much now (``admit``: a rate limit per key, counted in requests or in rows, kept in a
``MemoryStore`` for one process or a ``RedisStore`` shared by every replica). Both raise
``GatewayError`` with the status, message and headers to answer with; the HTTP app and the
gRPC servicer translate it for their wire. Nothing here knows about HTTP or gRPC.

The limit is GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp per
key): a key with rate ``N/period`` and burst ``B`` may spend ``B`` at once, then one unit every
``period / N``. In Redis it is one Lua script on the server's own clock, so replicas agree.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio

from .._core import ConfigurationError
from ._errors import HTTPError

__all__ = (
    "ApiKey",
    "Decision",
    "Gateway",
    "GatewayError",
    "KeyRing",
    "MemoryStore",
    "Rate",
    "RedisStore",
    "parse_rate",
)

logger = logging.getLogger("batchkit.asgi")

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")
# The longest credential looked at: longer ones are refused before hashing.
MAX_KEY_LENGTH = 512


@dataclass(frozen=True)
class Rate:
    """``count`` units per ``period`` seconds, with up to ``burst`` units at once."""

    count: float
    period: float
    burst: float

    @property
    def interval(self) -> float:
        """Seconds per unit once the burst is spent."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count:g}/{self.period:g}s (burst {self.burst:g})"


def parse_rate(text: str, burst: float | None = None) -> Rate:
    """Parse ``"100/s"``, ``"6000/min"``, ``"10/5s"`` (and ``second``, ``minute``, ``hour``,
    ``day``); ``burst`` defaults to the count. Raises ``ConfigurationError`` naming the text."""
    match = _RATE.match(text.lower()) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise ConfigurationError(
            f"rate limit {text!r} is not COUNT/UNIT (units: s, min, h, day; e.g. '100/s')"
        )
    count = float(match.group(1))
    period = float(match.group(2) or 1) * unit
    if count <= 0 or period <= 0:
        raise ConfigurationError(f"rate limit {text!r} must be positive")
    if burst is None:
        burst = max(1.0, count)
    if isinstance(burst, bool) or not isinstance(burst, (int, float)) or not burst >= 1:
        raise ConfigurationError(f"burst must be a number >= 1, got {burst!r}")
    return Rate(count, period, float(burst))


@dataclass(frozen=True)
class ApiKey:
    """One key of the keys file: its name (logged, labelled), digest, limit and state."""

    name: str
    digest: bytes
    rate: Rate | None = None
    revoked: bool = False


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The API keys of a keys file (JSON), reloadable in place.

    Each entry has a ``name`` and either ``key`` (the secret) or ``sha256`` (its hex digest),
    and optionally ``rate_limit`` (``"100/s"``), ``burst`` and ``revoked``. A reload that fails
    keeps the keys already loaded and raises ``ConfigurationError``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._keys: tuple[ApiKey, ...] = ()
        self._lock = threading.Lock()
        self.reload()

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return self._keys

    def reload(self) -> int:
        """Read the file again; return how many keys it has."""
        keys = _read_keys(self.path)
        with self._lock:
            self._keys = keys
        logger.info("batchkit: loaded %d API keys from %s", len(keys), self.path)
        return len(keys)

    def find(self, secret: str) -> ApiKey | None:
        """Return the key whose secret is ``secret``, or None; every key is compared, each in
        constant time, so the time taken says nothing about which one nearly matched."""
        presented = digest_of(secret)
        found = None
        for key in self._keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found


def _read_keys(path: Path) -> tuple[ApiKey, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the keys file {str(path)!r}: {exc}") from None
    try:
        data: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigurationError(f"keys file {str(path)!r} is not valid: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigurationError(f"keys file {str(path)!r}: expected a list of keys under 'keys'")
    keys: list[ApiKey] = []
    names: set[str] = set()
    for n, entry in enumerate(entries):
        where = f"keys file {str(path)!r}, key {n}"
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where}: expected an object")
        unknown = set(entry) - {"name", "key", "sha256", "rate_limit", "burst", "revoked"}
        if unknown:
            raise ConfigurationError(f"{where}: unknown fields {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigurationError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise ConfigurationError(f"{where}: the name {name!r} is used twice")
        names.add(name)
        secret, hexdigest = entry.get("key"), entry.get("sha256")
        if (secret is None) == (hexdigest is None):
            raise ConfigurationError(f"{where} ({name}): give exactly one of 'key' and 'sha256'")
        if secret is not None:
            if not isinstance(secret, str) or not secret or len(secret) > MAX_KEY_LENGTH:
                raise ConfigurationError(
                    f"{where} ({name}): 'key' must be a string of 1 to {MAX_KEY_LENGTH} characters"
                )
            digest = digest_of(secret)
        else:
            try:
                digest = bytes.fromhex(hexdigest) if isinstance(hexdigest, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigurationError(f"{where} ({name}): 'sha256' must be 64 hex digits")
        rate = None
        if entry.get("rate_limit") is not None:
            rate = parse_rate(entry["rate_limit"], entry.get("burst"))
        elif entry.get("burst") is not None:
            raise ConfigurationError(f"{where} ({name}): 'burst' needs a 'rate_limit'")
        revoked = entry.get("revoked", False)
        if not isinstance(revoked, bool):
            raise ConfigurationError(f"{where} ({name}): 'revoked' must be true or false")
        keys.append(ApiKey(name, digest, rate, revoked))
    return tuple(keys)


@dataclass(slots=True)
class Decision:
    """A rate-limit answer: allowed or not, and what the ``RateLimit-*`` headers say."""

    allowed: bool
    limit: float  # the burst: units that may be spent at once
    remaining: float  # units left now
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until this cost would be allowed (0 when allowed)


class Store(Protocol):
    async def admit(self, bucket: str, rate: Rate, cost: float) -> Decision: ...

    async def aclose(self) -> None: ...


def _decide(rate: Rate, used: float, over: float, allowed: bool) -> Decision:
    """``used``: seconds of the bucket in use after this request (before it, when refused);
    ``over``: seconds past the burst it would have gone (refused only)."""
    interval = rate.interval
    capacity = rate.burst * interval
    return Decision(
        allowed,
        rate.burst,
        max(0.0, math.floor((capacity - used) / interval + 1e-9)),
        max(0.0, used),
        max(0.0, over),
    )


class MemoryStore:
    """Rate-limit state in this process (one timestamp per bucket, on the monotonic clock)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}

    async def admit(self, bucket: str, rate: Rate, cost: float) -> Decision:
        now = self._clock()
        tat = max(self._tat.get(bucket, now), now)
        new_tat = tat + cost * rate.interval
        over = new_tat - now - rate.burst * rate.interval
        if over > 1e-9:
            return _decide(rate, tat - now, over, False)
        self._tat[bucket] = new_tat
        if len(self._tat) > 100_000:  # forget buckets that are full again
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return _decide(rate, new_tat - now, 0.0, True)

    async def aclose(self) -> None:
        return None


# GCRA on the Redis server's clock, in microseconds. KEYS[1]: the bucket; ARGV: the interval
# per unit, the burst's span and the cost (all microseconds but the cost). Returns
# {allowed, used_us, over_us} as strings (Lua numbers would be truncated to integers).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local over = new_tat - now - span
if over > 0 then
  return {0, tostring(tat - now), tostring(over)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, tostring(new_tat - now), '0'}
"""


class RedisStore:
    """Rate-limit state in Redis, shared by every replica using the same ``url`` and
    ``prefix``; one atomic script per request, each call bounded by ``timeout`` seconds.
    Needs the ``redis`` package (``batchkit[gateway]``) and an asyncio event loop."""

    def __init__(self, url: str, *, prefix: str = "batchkit:rl:", timeout: float = 0.25) -> None:
        try:
            import redis.asyncio
        except ImportError:
            raise ConfigurationError(
                "a Redis rate-limit store needs redis: pip install 'batchkit[gateway]'"
            ) from None
        if not timeout > 0:
            raise ConfigurationError(f"the Redis timeout must be > 0, got {timeout!r}")
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        try:
            self._client = redis.asyncio.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry_on_timeout=False,
            )
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from None
        self._script = self._client.register_script(_GCRA)

    async def admit(self, bucket: str, rate: Rate, cost: float) -> Decision:
        interval_us = rate.interval * 1e6
        with anyio.fail_after(self.timeout * 2):  # connect, then the script
            allowed, used, over = await self._script(
                keys=[self.prefix + bucket],
                args=[repr(interval_us), repr(rate.burst * interval_us), repr(cost)],
            )
        return _decide(rate, float(used) / 1e6, float(over) / 1e6, bool(int(allowed)))

    async def aclose(self) -> None:
        await self._client.aclose()


class GatewayError(HTTPError):
    """A request the gateway refuses: ``kind`` is ``unauthorized`` (401), ``forbidden`` (403),
    ``limited`` (429) or ``unavailable`` (503: the limit's store failed, closed policy)."""

    def __init__(
        self, kind: str, message: str, status: int, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, status=status, headers=headers)
        self.kind = kind


@dataclass(frozen=True)
class Admitted:
    """A request the gateway let through: who, and the ``RateLimit-*`` headers to send."""

    key: ApiKey | None
    headers: dict[str, str]


_ANONYMOUS = "-"  # the key name of requests when no keys file is used
# Per rate: its RateLimit-Limit and RateLimit-Policy values.
_FIXED_HEADERS: dict[Rate, tuple[str, str]] = {}
OnStoreError = Literal["open", "closed"]


class Gateway:
    """API keys and rate limits for one server (see the module docstring).

    ``keys``: a ``KeyRing`` (None: no keys needed; limits then apply to all callers as one).
    ``rate``: the default limit per key (keys may override it; None: no default).
    ``store``: where limits are counted (default ``MemoryStore()``). ``rows``: count rows, not
    requests. ``protect_metadata``: metadata, config and ``/metrics`` need a key too (health
    never does). ``on_store_error``: ``"open"`` lets requests through when the store fails,
    ``"closed"`` refuses them (503); either way a log line (at most one per 10 s) and a metric.
    """

    def __init__(
        self,
        *,
        keys: KeyRing | None = None,
        rate: Rate | None = None,
        store: Store | None = None,
        rows: bool = False,
        protect_metadata: bool = False,
        on_store_error: OnStoreError = "open",
    ) -> None:
        if on_store_error not in ("open", "closed"):
            raise ConfigurationError(
                f"on_store_error must be 'open' or 'closed', got {on_store_error!r}"
            )
        self.keys = keys
        self.rate = rate
        self.store: Store = store if store is not None else MemoryStore()
        self.rows = rows
        self.protect_metadata = protect_metadata
        self.on_store_error = on_store_error
        # (key name, outcome) -> count; outcome: allowed, limited, unauthorized, forbidden.
        self.counts: Counter[tuple[str, str]] = Counter()
        self.store_errors = 0
        self._last_error_log = -math.inf

    # -- who ------------------------------------------------------------------------------------

    def authenticate(self, credential: str | None) -> ApiKey | None:
        """Return the caller's key (None when no keys are configured); raise ``GatewayError``
        401 for a missing or unknown key, 403 for a revoked one."""
        if self.keys is None:
            return None
        if credential is None or not credential.strip():
            self.counts[("<none>", "unauthorized")] += 1
            raise GatewayError(
                "unauthorized",
                "an API key is required (Authorization: Bearer <key> or X-API-Key)",
                401,
                {"www-authenticate": 'Bearer realm="batchkit"'},
            )
        key = None if len(credential) > MAX_KEY_LENGTH else self.keys.find(credential.strip())
        if key is None:
            self.counts[("<unknown>", "unauthorized")] += 1
            raise GatewayError(
                "unauthorized",
                "the API key is not valid",
                401,
                {"www-authenticate": 'Bearer realm="batchkit", error="invalid_token"'},
            )
        if key.revoked:
            self.counts[(key.name, "forbidden")] += 1
            raise GatewayError("forbidden", f"the API key {key.name!r} is revoked", 403)
        return key

    # -- how much -------------------------------------------------------------------------------

    def rate_of(self, key: ApiKey | None) -> Rate | None:
        if key is not None and key.rate is not None:
            return key.rate
        return self.rate

    async def admit(self, key: ApiKey | None, cost: float = 1.0) -> Admitted:
        """Spend ``cost`` of ``key``'s limit; raise ``GatewayError`` 429 (or 503) when over."""
        name = _ANONYMOUS if key is None else key.name
        rate = self.rate_of(key)
        if rate is None:
            self.counts[(name, "allowed")] += 1
            return Admitted(key, {})
        if cost > rate.burst:  # could never pass: say so rather than ask to retry forever
            self.counts[(name, "limited")] += 1
            raise GatewayError(
                "limited",
                f"this request costs {cost:g} rows; the limit of key {name!r} allows "
                f"{rate.burst:g} at once",
                429,
            )
        try:
            decision = await self.store.admit(name, rate, cost)
        except Exception as exc:  # the store failed or timed out: the chosen policy
            return self._store_failed(key, name, exc)
        fixed = _FIXED_HEADERS.get(rate)
        if fixed is None:  # what never changes for a rate, formatted once
            fixed = _FIXED_HEADERS[rate] = (
                f"{rate.burst:g}",
                f"{rate.burst:g};w={rate.period * rate.burst / rate.count:g}",
            )
        headers = {
            "ratelimit-limit": fixed[0],
            "ratelimit-remaining": str(int(decision.remaining)),
            "ratelimit-reset": str(math.ceil(decision.reset)),
            "ratelimit-policy": fixed[1],
        }
        if not decision.allowed:
            self.counts[(name, "limited")] += 1
            retry = str(max(1, math.ceil(decision.retry_after)))
            raise GatewayError(
                "limited",
                f"rate limit of key {name!r} exceeded ({rate}); retry after {retry} s",
                429,
                {**headers, "retry-after": retry},
            )
        self.counts[(name, "allowed")] += 1
        return Admitted(key, headers)

    def _store_failed(self, key: ApiKey | None, name: str, exc: BaseException) -> Admitted:
        self.store_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:
            self._last_error_log = now
            logger.error(
                "batchkit: the rate-limit store failed (%s: %s); failing %s",
                type(exc).__name__,
                exc,
                self.on_store_error,
            )
        if self.on_store_error == "open":
            self.counts[(name, "allowed")] += 1
            return Admitted(key, {})
        raise GatewayError(
            "unavailable",
            "the rate limiter is unavailable; retry later",
            503,
            {"retry-after": "1"},
        )

    async def aclose(self) -> None:
        await self.store.aclose()


def credential_of(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
        return ""  # another scheme: present, not a key
    return api_key


def build_gateway(
    *,
    api_keys: str | Any | None,
    rate_limit: str | None,
    burst: float | None = None,
    rows: bool = False,
    store: str = "memory",
    on_store_error: OnStoreError = "open",
    protect_metadata: bool = False,
) -> Gateway:
    """Build a ``Gateway`` from the server's options (``KServeApp`` and ``batchkit serve``)."""
    keys = None if api_keys is None else KeyRing(api_keys)
    rate = None if rate_limit is None else parse_rate(rate_limit, burst)
    if burst is not None and rate_limit is None:
        raise ConfigurationError("a rate-limit burst needs a rate limit")
    chosen: Store
    if store == "memory":
        chosen = MemoryStore()
    elif isinstance(store, str) and store.startswith(("redis://", "rediss://", "unix://")):
        chosen = RedisStore(store)
    else:
        raise ConfigurationError(
            f"rate-limit store must be 'memory' or a redis:// URL, got {store!r}"
        )
    return Gateway(
        keys=keys,
        rate=rate,
        store=chosen,
        rows=rows,
        protect_metadata=protect_metadata,
        on_store_error=on_store_error,
    )
