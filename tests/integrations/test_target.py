"""The MODULE:ATTR forms shared by the command-line adapters, and the declared tensors."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from batchkit import BatchedModel, ConfigurationError, batched
from batchkit._target import (
    DATATYPE_DTYPES,
    Tensor,
    import_target,
    item_problem,
    models_of,
    routed_models_of,
)


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


# -- declared tensors, shared by the HTTP and pipe servers --------------------------------------


def test_each_datatype_names_the_dtype_and_configuration_the_http_server_uses() -> None:
    pytest.importorskip("numpy")
    from batchkit.asgi._tensors import DATATYPES

    assert list(DATATYPE_DTYPES) == list(DATATYPES)
    for name, spec in DATATYPES.items():
        tensor = Tensor("t", name, [2])
        assert tensor.dtype == spec.dtype.name
        assert tensor.config()["data_type"] == spec.config


@pytest.mark.parametrize(
    ("dtype", "shape", "problem"),
    [
        ("float32", (5, 3), None),
        ("float32", (1, 3), None),
        ("float64", (5, 3), "input 'x' is FP32 (numpy float32), got float64"),
        ("float32", (5, 4), "input 'x' has shape [5, 4], expected [-1, 3] (-1 is any size)"),
        ("float32", (3,), "has shape [3], expected [-1, 3]"),
        ("float32", (5, 3, 1), "has shape [5, 3, 1]"),
    ],
)
def test_an_item_is_checked_by_its_dtype_and_shape(
    dtype: str, shape: tuple[int, ...], problem: str | None
) -> None:
    got = item_problem(Tensor("x", "FP32", [-1, 3]), dtype, shape)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_bf16_items_are_float32_and_bytes_items_are_objects() -> None:
    assert item_problem(Tensor("b", "BF16", []), "float32", ()) is None
    assert item_problem(Tensor("s", "BYTES", [1]), "object", (1,)) is None
    assert item_problem(Tensor("s", "BYTES", [1]), "uint8", (1,)) is not None


def test_routed_models_of_unwraps_a_declared_model_only_when_asked_for_its_inputs() -> None:
    pytest.importorskip("numpy")
    from batchkit.asgi import ServedModel

    tensor = Tensor("x", "INT8", [2])
    served = ServedModel(BatchedModel(double, name="d"), inputs=[tensor], name="served")
    inputs: dict[str, tuple[Tensor, ...]] = {}
    assert routed_models_of([served], inputs=inputs) == {"served": served.model}
    assert inputs == {"served": (tensor,)}
    assert routed_models_of({"k": served}, inputs=inputs) == {"k": served.model}
    assert inputs["k"] == (tensor,)
    with pytest.raises(ConfigurationError, match="expected a BatchedModel"):
        routed_models_of(served)  # without `inputs`: a caller that would drop it
