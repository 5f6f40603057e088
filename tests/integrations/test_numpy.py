"""batchkit.numpy through its public API: stack, pad, split, grouped, and a real BatchedModel."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections import namedtuple
from typing import Any

import pytest

pytest.importorskip("numpy")

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import batchkit.numpy as bn
from batchkit import BatchedModel, BatchSizeMismatch, ConfigurationError

Pair = namedtuple("Pair", ["first", "second"])


# -- import ----------------------------------------------------------------------------------------


def test_import_batchkit_does_not_import_numpy() -> None:
    code = "import sys, batchkit; assert 'numpy' not in sys.modules, 'numpy was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- stack -----------------------------------------------------------------------------------------


def test_stack_adds_a_leading_axis_and_keeps_dtype() -> None:
    items = [np.arange(3, dtype=np.int16) + i for i in range(4)]
    batch = bn.stack(items)
    assert batch.shape == (4, 3)
    assert batch.dtype == np.int16
    np.testing.assert_array_equal(batch[2], items[2])


def test_stack_accepts_array_likes() -> None:
    np.testing.assert_array_equal(bn.stack([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))


def test_stack_rejects_mixed_shapes_naming_them() -> None:
    with pytest.raises(ConfigurationError, match=r"\(3,\), \(4,\)"):
        bn.stack([np.zeros(3), np.zeros(4), np.zeros(3)])


def test_stack_rejects_no_items() -> None:
    with pytest.raises(ConfigurationError, match="at least one item"):
        bn.stack([])


# -- pad -------------------------------------------------------------------------------------------


def test_pad_pads_to_the_longest_and_records_lengths() -> None:
    batch = bn.pad([np.array([1, 2]), np.array([3, 4, 5]), np.array([6])], value=-1)
    np.testing.assert_array_equal(batch.values, [[1, 2, -1], [3, 4, 5], [6, -1, -1]])
    np.testing.assert_array_equal(batch.lengths, [2, 3, 1])
    assert batch.lengths.dtype == np.int64
    assert batch.axis == 0


def test_pad_mask_is_true_where_data_is_real() -> None:
    batch = bn.pad([np.ones(2), np.ones(3)])
    np.testing.assert_array_equal(batch.mask, [[True, True, False], [True, True, True]])


def test_pad_along_a_negative_axis() -> None:
    batch = bn.pad([np.ones((2, 3)), np.ones((2, 5))], axis=-1)
    assert batch.values.shape == (2, 2, 5)
    assert batch.axis == 1
    np.testing.assert_array_equal(batch.lengths, [3, 5])
    np.testing.assert_array_equal(batch.values[0, :, 3:], 0)
    assert batch.mask.shape == (2, 5)


def test_pad_multiple_of_rounds_the_length_up() -> None:
    assert bn.pad([np.ones(5), np.ones(2)], multiple_of=4).values.shape == (2, 8)
    assert bn.pad([np.ones(8)], multiple_of=4).values.shape == (1, 8)


def test_pad_uses_the_common_dtype() -> None:
    batch = bn.pad([np.array([1], dtype=np.int32), np.array([0.5, 1.5], dtype=np.float32)])
    assert batch.values.dtype == np.float64
    np.testing.assert_array_equal(batch.values, [[1.0, 0.0], [0.5, 1.5]])


def test_pad_rejects_shapes_that_differ_off_the_axis() -> None:
    with pytest.raises(ConfigurationError, match=r"only along axis 0.*\(2, 3\), \(4, 5\)"):
        bn.pad([np.ones((2, 3)), np.ones((4, 5))])


def test_pad_rejects_items_of_different_ndim() -> None:
    with pytest.raises(ConfigurationError, match=r"\(2,\), \(2, 1\)"):
        bn.pad([np.ones(2), np.ones((2, 1))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis": 1}, "axis 1 is out of range"),
        ({"axis": "0"}, "axis must be an int, got '0'"),
        ({"multiple_of": 0}, "multiple_of must be an int >= 1 or None, got 0"),
        ({"multiple_of": True}, "got True"),
    ],
)
def test_pad_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bn.pad([np.ones(2)], **kwargs)


def test_pad_rejects_0d_items() -> None:
    with pytest.raises(ConfigurationError, match=r"shape \(\)"):
        bn.pad([np.float64(1.0)])


def test_padded_repr_is_short() -> None:
    batch = bn.pad([np.ones(2, dtype=np.float32), np.ones(3, dtype=np.float32)])
    assert repr(batch) == "Padded(values=float32[2x3], lengths=[2, 3], axis=0)"


# -- split -----------------------------------------------------------------------------------------


def test_split_gives_rows_that_are_views() -> None:
    output = np.arange(6).reshape(3, 2)
    rows = bn.split(output)
    assert len(rows) == 3
    np.testing.assert_array_equal(rows[1], [2, 3])
    assert all(np.shares_memory(row, output) for row in rows)


def test_split_a_tuple_gives_a_tuple_per_item() -> None:
    rows = bn.split((np.arange(2), np.array([[1, 1], [2, 2]])))
    assert type(rows[0]) is tuple
    assert rows[1][0] == 1
    np.testing.assert_array_equal(rows[1][1], [2, 2])


def test_split_a_named_tuple_keeps_its_type() -> None:
    rows = bn.split(Pair(np.arange(2), np.arange(2) * 10))
    assert rows == [Pair(0, 0), Pair(1, 10)]
    assert type(rows[0]) is Pair


def test_split_a_dict_gives_a_dict_per_item() -> None:
    rows = bn.split({"label": np.array([3, 4]), "scores": np.eye(2)})
    assert [row["label"] for row in rows] == [3, 4]
    np.testing.assert_array_equal(rows[1]["scores"], [0, 1])


def test_split_nested_structures() -> None:
    rows = bn.split({"pair": (np.arange(2), np.arange(2)), "x": np.arange(2)})
    assert rows[1] == {"pair": (1, 1), "x": 1}


def test_split_returns_a_list_as_is() -> None:
    error = ValueError("bad item")
    assert bn.split([1, error]) == [1, error]


def test_split_with_lengths_trims_each_row() -> None:
    rows = bn.split(np.arange(12).reshape(2, 2, 3), lengths=[1, 3], axis=-1)
    np.testing.assert_array_equal(rows[0], [[0], [3]])
    np.testing.assert_array_equal(rows[1], [[6, 7, 8], [9, 10, 11]])


def test_split_trims_a_padded_output_to_each_items_length() -> None:
    batch = bn.pad([np.ones(2), np.ones(4)])
    rows = bn.split(batch.with_values(batch.values * 2))
    assert [row.tolist() for row in rows] == [[2, 2], [2, 2, 2, 2]]


def test_split_trims_a_padded_output_along_its_own_axis() -> None:
    batch = bn.pad([np.ones(2), np.ones(3)])
    hidden = np.repeat(batch.values[:, None, :], 4, axis=1)  # (batch, 4, length)
    rows = bn.split((batch.with_values(hidden, axis=1), np.arange(2)))
    assert [row[0].shape for row in rows] == [(4, 2), (4, 3)]
    assert [row[1] for row in rows] == [0, 1]


def test_with_values_rejects_an_axis_out_of_range() -> None:
    batch = bn.pad([np.ones(2)])
    with pytest.raises(ConfigurationError, match="axis 1 is out of range"):
        batch.with_values(np.ones((1, 2)), axis=1)


def test_split_rejects_parts_of_different_batch_sizes() -> None:
    with pytest.raises(ConfigurationError, match="3 for 'a', 2 for 'b'"):
        bn.split({"a": np.zeros(3), "b": np.zeros(2)})


@pytest.mark.parametrize(
    ("output", "kwargs", "message"),
    [
        (np.float64(1.0), {}, "cannot split a float64"),
        (np.array(1.0), {}, "0-d array"),
        ((), {}, "empty tuple"),
        ("text", {}, "cannot split a str"),
        (np.zeros((2, 3)), {"lengths": [1]}, "1 lengths for 2 rows"),
        (np.zeros((2, 3)), {"lengths": [1, 4]}, "length 4 does not fit"),
        (np.zeros((2, 3)), {"lengths": [1.5, 2]}, "lengths must be a 1-d sequence of ints"),
        (np.zeros((2, 3)), {"lengths": [1, 2], "axis": 1}, "axis 1 is out of range"),
    ],
)
def test_split_rejects_what_it_cannot_split(
    output: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bn.split(output, **kwargs)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    width=st.integers(1, 3),
    axis=st.sampled_from([0, 1, -1]),
)
def test_pad_then_split_gives_back_the_items(lengths: list[int], width: int, axis: int) -> None:
    items = [np.arange(n * width).reshape((n, width) if axis == 0 else (width, n)) for n in lengths]
    batch = bn.pad(items, axis=axis, value=-1)
    for got, item in zip(bn.split(batch.with_values(batch.values)), items, strict=True):
        np.testing.assert_array_equal(got, item)


# -- grouped ---------------------------------------------------------------------------------------


class Recorder:
    """A batched model that doubles its input and records the shapes of its batches."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, batch: Any) -> Any:
        self.batches.append(batch.shape)
        return batch * 2


def mixed_items() -> list[Any]:
    return [np.full(2, 1.0), np.full(3, 2.0), np.full(2, 3.0), np.full((2, 2), 4.0)]


def test_grouped_calls_the_model_once_per_shape_and_keeps_order() -> None:
    model = Recorder()
    items = mixed_items()
    outputs = bn.grouped(model)(items)
    assert model.batches == [(2, 2), (1, 3), (1, 2, 2)]
    for out, item in zip(outputs, items, strict=True):
        np.testing.assert_array_equal(out, item * 2)


def test_grouped_with_a_key_and_pad_batches_by_length_bucket() -> None:
    def model(batch: bn.Padded) -> Any:
        return batch.with_values(batch.values + batch.lengths[:, None])

    wrapped = bn.grouped(model, key=lambda item: len(item) > 2, collate=bn.pad)
    outputs = wrapped([np.zeros(1), np.zeros(5), np.zeros(2), np.zeros(4)])
    assert [out.tolist() for out in outputs] == [[1], [5] * 5, [2, 2], [4] * 4]


@pytest.mark.anyio
async def test_grouped_wraps_an_async_model_in_an_async_function() -> None:
    calls: list[int] = []

    async def model(batch: Any) -> Any:
        calls.append(len(batch))
        return batch + 1

    wrapped = bn.grouped(model)
    assert inspect.iscoroutinefunction(wrapped)
    outputs = await wrapped(mixed_items())
    assert calls == [2, 1, 1]
    np.testing.assert_array_equal(outputs[3], np.full((2, 2), 5.0))


def test_grouped_keeps_exception_instances_in_their_slots() -> None:
    error = ValueError("no good")

    def model(batch: Any) -> list[Any]:
        return [error if row.flat[0] == 3.0 else row.sum() for row in batch]

    outputs = bn.grouped(model)(mixed_items())
    assert outputs[:3] == [2.0, 6.0, error]


def test_grouped_raises_batch_size_mismatch_for_a_short_group() -> None:
    with pytest.raises(BatchSizeMismatch, match="returned 1 outputs for a batch of 2"):
        bn.grouped(lambda batch: batch[:1])(mixed_items())


def test_grouped_takes_the_models_name() -> None:
    def encoder(batch: Any) -> Any:
        return batch

    assert bn.grouped(encoder).__name__ == "encoder"


def test_grouped_rejects_a_model_that_is_not_callable() -> None:
    with pytest.raises(ConfigurationError, match="got 42"):
        bn.grouped(42)  # type: ignore[call-overload]


def test_grouped_rejects_an_unhashable_key() -> None:
    with pytest.raises(ConfigurationError, match=r"hashable value, got \[2\]"):
        bn.grouped(Recorder(), key=lambda item: list(item.shape))(mixed_items())


# -- a real BatchedModel ---------------------------------------------------------------------------

WEIGHTS = np.arange(12, dtype=np.float64).reshape(3, 4) / 10


def linear(batch: Any) -> Any:
    return batch @ WEIGHTS


def test_batched_model_with_stack_and_split() -> None:
    items = [np.full(3, float(i)) for i in range(8)]
    with BatchedModel(linear, collate=bn.stack, split=bn.split, max_batch_size=16) as model:
        outputs = model.call_many_sync(items)
        assert model.statistics().batches < len(items)
    for out, item in zip(outputs, items, strict=True):
        np.testing.assert_allclose(out, linear(item))


def masked_mean(batch: bn.Padded) -> Any:
    """Mean over each item's real positions: padding must not count."""
    total = np.where(batch.mask, batch.values, 0.0).sum(axis=1)
    return total / batch.lengths


def test_batched_model_with_pad_gives_the_model_lengths() -> None:
    items = [np.arange(1.0, n + 1) for n in (3, 1, 5, 2)]
    with BatchedModel(masked_mean, collate=bn.pad, split=bn.split) as model:
        outputs = model.call_many_sync(items)
    assert outputs == [pytest.approx(item.mean()) for item in items]


def test_batched_model_with_pad_trims_outputs_to_each_length() -> None:
    def running_sum(batch: bn.Padded) -> bn.Padded:
        return batch.with_values(np.cumsum(batch.values, axis=1))

    items = [np.arange(float(n)) for n in (4, 1, 3)]
    with BatchedModel(running_sum, collate=bn.pad, split=bn.split) as model:
        outputs = model.call_many_sync(items)
    for out, item in zip(outputs, items, strict=True):
        np.testing.assert_array_equal(out, np.cumsum(item))


def test_batched_model_with_grouped_mixed_shapes() -> None:
    items = [np.full((n, 3), float(n)) for n in (2, 3, 2, 1, 3)]
    with BatchedModel(bn.grouped(linear)) as model:
        outputs = model.call_many_sync(items)
    for out, item in zip(outputs, items, strict=True):
        np.testing.assert_allclose(out, linear(item))


def test_batched_model_with_async_grouped() -> None:
    async def model_fn(batch: Any) -> Any:
        return linear(batch)

    items = [np.ones(3), np.ones((2, 3)), np.zeros(3)]
    with BatchedModel(bn.grouped(model_fn)) as model:
        outputs = model.call_many_sync(items)
    for out, item in zip(outputs, items, strict=True):
        np.testing.assert_allclose(out, linear(item))


def test_batched_model_with_grouped_fails_only_the_item_the_model_failed() -> None:
    def model_fn(batch: Any) -> list[Any]:
        return [ValueError("negative") if row.min() < 0 else row.sum() for row in batch]

    with BatchedModel(bn.grouped(model_fn)) as model:
        outputs = model.call_many_sync(
            [np.ones(2), -np.ones(2), np.ones(3)], return_exceptions=True
        )
    assert outputs[0] == 2.0
    assert isinstance(outputs[1], ValueError)
    assert outputs[2] == 3.0
