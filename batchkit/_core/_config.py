"""Settings of a batched model, validated once when the model is built.

The one source of the settings: ``BatchOptions`` types the keyword arguments that
``BatchedModel``, ``@batched`` and their overloads take (every one but the three whose types
depend on the item and output types: ``size_fn``, ``collate``, ``split``), and ``Settings``
holds their defaults and validates them. A test checks that the two list the same names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from ._errors import ConfigurationError

__all__ = ("BatchOptions", "Settings", "check_timeout")


class BatchOptions(TypedDict, total=False):
    """The keyword settings of ``BatchedModel`` and ``@batched`` whose types do not depend on the
    item and output types (see ``BatchedModel`` for each one's meaning, ``Settings`` for the
    defaults). ``name`` None means the function's name; ``version`` names the first version."""

    max_batch_size: int
    max_wait: float
    adaptive_wait: bool
    max_queue_size: int | None
    max_concurrency: int
    timeout: float | None
    max_batch_cost: float | None
    isolate_failures: bool
    name: str | None
    version: str
    weights_dir: str | os.PathLike[str] | None
    keep_previous: bool


@dataclass(frozen=True)
class Settings:
    """The batching settings of one model (see ``BatchedModel`` for each field's meaning)."""

    name: str
    max_batch_size: int = 32
    max_wait: float = 0.0
    adaptive_wait: bool = False
    max_queue_size: int | None = None
    max_concurrency: int = 1
    timeout: float | None = None
    size_fn: Callable[[Any], float] | None = None
    max_batch_cost: float | None = None
    collate: Callable[[list[Any]], Any] | None = None
    split: Callable[[Any], Sequence[Any]] | None = None
    isolate_failures: bool = False
    weights_dir: str | os.PathLike[str] | None = None
    keep_previous: bool = True

    def __post_init__(self) -> None:
        _check_int("max_batch_size", self.max_batch_size, minimum=1)
        _check_int("max_concurrency", self.max_concurrency, minimum=1)
        if self.max_queue_size is not None:
            _check_int("max_queue_size", self.max_queue_size, minimum=1)
        _check_number("max_wait", self.max_wait, allow_zero=True)
        if self.timeout is not None:
            _check_number("timeout", self.timeout, allow_zero=False)
        if self.max_batch_cost is not None:
            _check_number("max_batch_cost", self.max_batch_cost, allow_zero=False)
        if self.adaptive_wait and self.max_wait == 0:
            raise ConfigurationError("adaptive_wait needs a max_wait > 0 to adapt, got max_wait=0")
        if (self.size_fn is None) != (self.max_batch_cost is None):
            raise ConfigurationError(
                "size_fn and max_batch_cost go together: give both or neither, got "
                f"size_fn={self.size_fn!r}, max_batch_cost={self.max_batch_cost!r}"
            )
        for field in ("size_fn", "collate", "split"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise ConfigurationError(f"{field} must be callable, got {value!r}")
        if self.weights_dir is not None and not isinstance(self.weights_dir, (str, os.PathLike)):
            raise ConfigurationError(f"weights_dir must be a path, got {self.weights_dir!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"name must be a non-empty string, got {self.name!r}")


def _check_int(field: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{field} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{field} must be >= {minimum}, got {value!r}")


def _check_number(field: str, value: object, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{field} must be a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{field} must be {bound}, got {value!r}")


def check_timeout(timeout: float | None, deadline: float | None) -> None:
    """Validate a call's ``timeout`` and ``deadline`` arguments."""
    if timeout is not None and deadline is not None:
        raise ConfigurationError(
            f"give timeout or deadline, not both (got timeout={timeout!r}, deadline={deadline!r})"
        )
    if timeout is not None:
        _check_number("timeout", timeout, allow_zero=True)
    if deadline is not None and (not isinstance(deadline, (int, float)) or math.isnan(deadline)):
        raise ConfigurationError(f"deadline must be a number, got {deadline!r}")
