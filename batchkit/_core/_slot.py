"""The model slot: the model serving now, the one before it, and results tagged with versions.

The engine reads ``slot.current`` once when it starts a batch and runs the whole batch on that
installation, so publishing a new model is one reference assignment: batches already running
keep the installation they started with, and every later batch gets the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ._info import BatchInfo, info_method

__all__ = ("Installed", "ModelSlot", "Versioned")

R = TypeVar("R")


@dataclass(frozen=True)
class Versioned(Generic[R]):
    """An output together with the version of the model that produced it.

    Unpacks as a pair: ``value, version = await model.call_versioned(item)``.
    """

    value: R
    version: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.value, self.version))


@dataclass(frozen=True, eq=False)
class Installed:
    """One installed model: what the engine calls, and its version.

    ``weights`` is set only for an installation replaced in place (the same module object
    serves several versions): the weights to copy back in to make ``model`` this version again.
    ``with_info`` is the model's ``call_with_info`` when it opts in to receiving a ``BatchInfo``
    (looked up once, here, so ordinary models cost nothing per batch). ``inference`` is the
    context its batches run in, entered in the thread that calls it, for a model whose library
    has one (a ``torch.nn.Module``: ``torch.inference_mode``); None for any other model.
    """

    model: Callable[..., Any]
    is_async: bool
    version: str
    weights: Any = None
    with_info: Callable[[Any, BatchInfo], Any] | None = field(init=False, repr=False)
    inference: Callable[[], AbstractContextManager[Any]] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from ._swap import weight_ops_for  # _swap imports this module; never imports torch

        object.__setattr__(self, "with_info", info_method(self.model))
        ops = weight_ops_for(self.model)
        object.__setattr__(self, "inference", None if ops is None else ops.inference)


class ModelSlot:
    """Where the serving model lives; replaced whole, between batches."""

    __slots__ = ("current", "held", "previous")

    def __init__(self, installed: Installed) -> None:
        self.current = installed
        self.previous: Installed | None = None
        # While held (an in-place swap changes the model object itself), no batch starts.
        self.held = False

    def publish(self, installed: Installed, *, previous: Installed | None) -> None:
        """Make ``installed`` serve from the next batch on, remembering ``previous``."""
        self.previous = previous
        self.current = installed  # the one step every later batch sees
