"""The MODULE:ATTR forms shared by the command-line adapters."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from batchkit import BatchedModel, ConfigurationError, batched
from batchkit._target import import_target, models_of


def double(items: list[int]) -> list[int]:
    return [2 * i for i in items]


@pytest.fixture
def module() -> Iterator[types.ModuleType]:
    mod = types.ModuleType("batchkit_target_sample")
    mod.one = BatchedModel(double, name="one")  # type: ignore[attr-defined]
    mod.ns = types.SimpleNamespace(inner=mod.one)  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def test_import_target_follows_dotted_attributes(module: types.ModuleType) -> None:
    assert import_target("batchkit_target_sample:ns.inner") is module.one


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected MODULE:ATTR"),
        (":attr", "expected MODULE:ATTR"),
        ("batchkit_target_sample:", "expected MODULE:ATTR"),
        ("batchkit_no_such_module:x", "no module named 'batchkit_no_such_module'"),
        ("batchkit_target_sample:missing", "has no attribute 'missing'"),
    ],
)
def test_import_target_errors_say_what_is_wrong(
    module: types.ModuleType, spec: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        import_target(spec)


def test_models_of_every_form() -> None:
    a = BatchedModel(double, name="a")
    b = batched(name="b")(double)
    assert models_of(a) == {"a": a}
    assert models_of({"x": a, "y": b}) == {"x": a, "y": b}
    assert models_of([a, b]) == {"a": a, "b": b}
    assert models_of(lambda: [a, b]) == {"a": a, "b": b}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (42, "expected a BatchedModel"),
        ([], "holds no models"),
        ({}, "holds no models"),
        ([double], "not a BatchedModel"),
        ({"x": 1}, "'x' is not a BatchedModel"),
        (lambda: lambda: 1, "expected a BatchedModel"),
    ],
)
def test_models_of_refuses_what_is_not_a_model(obj: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        models_of(obj)


def test_models_of_refuses_duplicate_names() -> None:
    with pytest.raises(ConfigurationError, match="two models are named 'a'"):
        models_of([BatchedModel(double, name="a"), BatchedModel(double, name="a")])
