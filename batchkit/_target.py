"""Find what a ``MODULE:ATTR`` command-line argument names: a model, several, or an app.

Shared by the command-line adapters (``batchkit serve``, ``batchkit pipe``), so every command
accepts the same forms:

- a ``BatchedModel`` (``@batched`` functions are ``BatchedModel`` too), or, for the servers
  (``routed_models_of``), a ``Deployment`` of several versions;
- a mapping of names to models, or any other collection of models (each served under its name);
- a callable taking no arguments that returns one of the above (a factory);
- for the ASGI server only, an ASGI application (anything else callable with three arguments).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from ._core import BatchedModel, ConfigurationError, Deployment

__all__ = ("import_target", "models_of", "routed_models_of")


def import_target(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and return the object it names.

    The current directory is importable, as with ``python -m``. Raises ``ConfigurationError``
    with what is wrong (malformed spec, missing module, missing attribute).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"expected MODULE:ATTR, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigurationError(f"no module named {module_name!r} (from {spec!r})") from exc
        raise  # the module exists but an import inside it failed: show the real error
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def models_of(obj: Any, *, call_factory: bool = True) -> dict[str, BatchedModel[Any, Any]]:
    """Return the models ``obj`` holds, by name.

    Raises ``ConfigurationError`` when ``obj`` holds no model, something that is not a model,
    or two models with the same name.
    """
    return _models_of(obj, (BatchedModel,), call_factory)


def routed_models_of(
    obj: Any, *, call_factory: bool = True
) -> dict[str, BatchedModel[Any, Any] | Deployment[Any, Any]]:
    """Like ``models_of``, where a model may also be a ``Deployment`` of several versions."""
    return _models_of(obj, (BatchedModel, Deployment), call_factory)


def _models_of(obj: Any, kinds: tuple[type[Any], ...], call_factory: bool) -> dict[str, Any]:
    what = " or ".join(k.__name__ for k in kinds)
    if isinstance(obj, kinds):
        return {obj.name: obj}
    if isinstance(obj, Mapping):
        models: dict[str, Any] = {}
        for key, model in obj.items():
            if not isinstance(model, kinds):
                raise ConfigurationError(f"{key!r} is not a {what}: {model!r}")
            models[str(key)] = model
        if not models:
            raise ConfigurationError("the mapping holds no models")
        return models
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        models = {}
        for model in obj:
            if not isinstance(model, kinds):
                raise ConfigurationError(f"not a {what}: {model!r}")
            if model.name in models:
                raise ConfigurationError(f"two models are named {model.name!r}")
            models[model.name] = model
        if not models:
            raise ConfigurationError("the collection holds no models")
        return models
    if call_factory and callable(obj) and _takes_no_arguments(obj):
        return _models_of(obj(), kinds, False)
    raise ConfigurationError(f"expected a {what}, a collection of them or a factory, got {obj!r}")


def _takes_no_arguments(fn: Any) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )
