"""A server-wide byte budget for the work requests do before the model sees them.

Every infer request charges what reading, decompressing, parsing and decoding its body costs
(``cost_of_json``, ``cost_of_decode``) to one ``MemoryBudget`` shared by all requests before
doing it; once parsed it keeps charged what stays alive (``retained_bytes``: its body and its
arrays), and gives that back when it is answered. A charge the budget cannot take now is a 503
with Retry-After (the bytes are held by other requests: try again); a request whose own charges
exceed the whole budget is a 413 (it can never fit). Nothing here knows HTTP beyond the status
it answers with, so another transport can charge the same budget."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ._errors import HTTPError

__all__ = (
    "JSON_BYTE_COST",
    "JSON_CONTAINER_COST",
    "JSON_VALUE_COST",
    "Claim",
    "MemoryBudget",
    "cost_of_decode",
    "cost_of_json",
    "json_values",
    "retained_bytes",
)

# What parsing a JSON document and decoding its tensors hold at their peak: per byte of the
# document (json.loads decodes it to str, up to 4 bytes a character, and the strings it holds
# take as much again: 8, and 2 to spare), per value (a float or int object and its slot in a
# list or dict, 32 to 40 bytes, a key's string too; then the float64/int64 array numpy builds
# from data and the cast to the datatype, or for BYTES an object array, a list and a bytes object
# per element), and per list or dict on top of that (an empty list is 56 bytes, a dict of one
# member 184). Measured on CPython 3.11 with tracemalloc, with a margin; tests/asgi/test_memory.py
# checks them.
JSON_BYTE_COST = 10
JSON_VALUE_COST = 80
JSON_CONTAINER_COST = 64
# Decoding binary data: BYTES elements are an object array slot and a bytes object (33 bytes
# and the data) each; BF16 and BOOL are converted (up to 8 bytes an element); other datatypes
# are views of the body.
_BYTES_ELEMENT_COST = 48
_RETRY_AFTER = "1"


def cost_of_json(document: bytes | bytearray) -> int:
    """Return an upper bound of the bytes parsing ``document`` and decoding its JSON tensors hold
    at their peak: ``10 * bytes + 80 * values + 64 * containers`` (see ``json_values``)."""
    values, containers = json_values(document)
    return (
        JSON_BYTE_COST * len(document) + JSON_VALUE_COST * values + JSON_CONTAINER_COST * containers
    )


def json_values(document: bytes | bytearray) -> tuple[int, int]:
    """Return upper bounds of how many values, and how many lists and objects, ``document``
    holds: a cheap scan, at C speed, before any Python object is built.

    Every value but the first follows a comma (array elements, members), or a colon (member
    values; keys follow the commas), or opens its container. Commas, colons and brackets inside
    strings make it an over-estimate.
    """
    containers = document.count(b"[") + document.count(b"{")
    return 1 + document.count(b",") + document.count(b":") + containers, containers


def cost_of_decode(datatype: str, elements: int, data_bytes: int) -> int:
    """Return an upper bound of the bytes decoding one tensor's binary data allocates.

    ``data_bytes`` is the size of that data, which numeric datatypes are views of (BF16 and
    BOOL are converted: up to 8 bytes an element); BYTES become one Python object per element.
    JSON data is charged with its document (``cost_of_json``).
    """
    # The data bounds the elements (each takes 4 bytes or more: BYTES' length prefixes, BF16's
    # 2, BOOL's 1), so a shape that claims more than it sends costs nothing before its 400.
    if datatype == "BYTES":
        return _BYTES_ELEMENT_COST * min(elements, data_bytes // 4) + data_bytes
    if datatype == "BF16":
        return 8 * min(elements, data_bytes // 2)
    return 8 * min(elements, data_bytes) if datatype == "BOOL" else 0


def retained_bytes(body_bytes: int, arrays: Mapping[str, Any]) -> int:
    """Return an upper bound of what a parsed request holds until it is answered: its body and
    its decoded arrays (BYTES elements are a bytes object each, their data within the body's)."""
    total = body_bytes
    for array in arrays.values():
        total += array.nbytes
        if array.dtype.kind == "O":
            total += 33 * array.size + body_bytes
    return total


class MemoryBudget:
    """The bytes that requests in flight may hold at once, shared by every request.

    Thread-safe: work offloaded to worker threads charges it too. Raises ``ValueError`` for a
    limit below 1.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"a memory budget must be an int >= 1, got {limit!r}")
        self.limit = limit
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        """Return the bytes charged now."""
        return self._used

    @property
    def peak(self) -> int:
        """Return the most bytes ever charged at once."""
        return self._peak

    def claim(self) -> Claim:
        """Return a new, empty claim on the budget for one request (a context manager)."""
        return Claim(self)

    def _take(self, claim: Claim, size: int) -> None:
        with self._lock:
            if claim.size + size > self.limit:
                raise HTTPError(
                    f"this request needs about {claim.size + size} bytes of server memory to "
                    f"read and decode, more than the {self.limit} the server gives all requests "
                    "together (max_inflight_bytes); send tensors as binary data, or fewer at once",
                    status=413,
                )
            if self._used + size > self.limit:
                raise HTTPError(
                    f"the server is busy decoding other requests; retry after {_RETRY_AFTER} s",
                    status=503,
                    headers={"retry-after": _RETRY_AFTER},
                )
            self._used += size
            self._peak = max(self._peak, self._used)
            claim.size += size

    def _give_back(self, claim: Claim, size: int) -> None:
        with self._lock:
            size = min(size, claim.size)
            self._used -= size
            claim.size -= size


class Claim:
    """One request's charges on a ``MemoryBudget``, all given back by ``release()``."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.size = 0

    def take(self, size: int) -> None:
        """Charge ``size`` more bytes; raise ``HTTPError`` 503 (busy) or 413 (never fits)."""
        if size > 0:
            self._budget._take(self, size)

    def refund(self, size: int) -> None:
        """Give back ``size`` of the bytes charged (charged for more than was used)."""
        if size > 0:
            self._budget._give_back(self, size)

    def release(self) -> None:
        """Give back everything this claim charged."""
        self._budget._give_back(self, self.size)

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
