"""batchkit.torch through its public API: stack, pad, split, grouped, and a real BatchedModel."""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any, NamedTuple

import pytest

pytest.importorskip("torch")

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchkit.torch as bt
from batchkit import BatchedModel, BatchSizeMismatch, ConfigurationError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Pair(NamedTuple):
    first: Any
    second: Any


# -- import ----------------------------------------------------------------------------------------


def test_import_batchkit_does_not_import_torch() -> None:
    code = (
        "import sys, batchkit, batchkit.numpy\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- stack -----------------------------------------------------------------------------------------


def test_stack_adds_a_leading_dim_and_keeps_dtype_and_device() -> None:
    items = [torch.arange(3, dtype=torch.int16) + i for i in range(4)]
    batch = bt.stack(items)
    assert batch.shape == (4, 3)
    assert batch.dtype == torch.int16
    assert batch.device == items[0].device
    assert torch.equal(batch[2], items[2])


def test_stack_rejects_mixed_shapes_naming_them() -> None:
    with pytest.raises(ConfigurationError, match=r"\(3,\), \(4,\)"):
        bt.stack([torch.zeros(3), torch.zeros(4)])


def test_stack_rejects_no_items() -> None:
    with pytest.raises(ConfigurationError, match="at least one item"):
        bt.stack([])


def test_stack_pin_memory_without_cuda_is_ignored() -> None:
    batch = bt.stack([torch.ones(2), torch.ones(2)], pin_memory=True)
    assert batch.is_pinned() == torch.cuda.is_available()
    assert torch.equal(batch, torch.ones(2, 2))


@pytest.mark.gpu
@needs_cuda
def test_stack_pin_memory_pins_a_cpu_batch() -> None:
    batch = bt.stack([torch.ones(2, dtype=torch.float16), torch.zeros(2)], pin_memory=True)
    assert batch.is_pinned()
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


@pytest.mark.gpu
@needs_cuda
def test_stack_and_pad_keep_a_cuda_device() -> None:
    items = [torch.ones(2, device="cuda"), torch.ones(3, device="cuda")]
    assert bt.stack(items[:1] * 2, pin_memory=True).device == items[0].device
    batch = bt.pad(items, pin_memory=True)
    assert batch.values.device == batch.lengths.device == batch.mask.device == items[0].device
    assert [row.device for row in bt.split(batch)] == [items[0].device] * 2


@pytest.mark.gpu
@needs_cuda
def test_pad_pin_memory_pins_values_and_lengths() -> None:
    batch = bt.pad([torch.ones(2), torch.ones(3)], pin_memory=True)
    assert batch.values.is_pinned()
    assert batch.lengths.is_pinned()
    moved = batch.to("cuda", non_blocking=True)
    assert moved.values.is_cuda
    assert moved.lengths.is_cuda


# -- pad -------------------------------------------------------------------------------------------


def test_pad_pads_to_the_longest_and_records_lengths() -> None:
    batch = bt.pad([torch.tensor([1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6])], value=-1)
    assert batch.values.tolist() == [[1, 2, -1], [3, 4, 5], [6, -1, -1]]
    assert batch.values.dtype == torch.int64
    assert batch.lengths.tolist() == [2, 3, 1]
    assert batch.lengths.dtype == torch.int64
    assert batch.axis == 0


def test_pad_mask_is_true_where_data_is_real() -> None:
    batch = bt.pad([torch.ones(2), torch.ones(3)])
    assert batch.mask.dtype == torch.bool
    assert batch.mask.tolist() == [[True, True, False], [True, True, True]]


def test_pad_along_a_negative_axis() -> None:
    batch = bt.pad([torch.ones(2, 3), torch.ones(2, 5)], axis=-1)
    assert batch.values.shape == (2, 2, 5)
    assert batch.axis == 1
    assert batch.lengths.tolist() == [3, 5]
    assert batch.values[0, :, 3:].eq(0).all()
    assert batch.mask.shape == (2, 5)


def test_pad_multiple_of_rounds_the_length_up() -> None:
    assert bt.pad([torch.ones(5), torch.ones(2)], multiple_of=4).values.shape == (2, 8)


def test_pad_uses_the_common_dtype() -> None:
    batch = bt.pad([torch.tensor([1], dtype=torch.int32), torch.tensor([0.5, 1.5])])
    assert batch.values.dtype == torch.float32
    assert batch.values.tolist() == [[1.0, 0.0], [0.5, 1.5]]


def test_pad_rejects_shapes_that_differ_off_the_axis() -> None:
    with pytest.raises(ConfigurationError, match=r"only along axis 0.*\(2, 3\), \(4, 5\)"):
        bt.pad([torch.ones(2, 3), torch.ones(4, 5)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axis": 1}, "axis 1 is out of range"),
        ({"axis": 0.0}, "axis must be an int, got 0.0"),
        ({"multiple_of": -2}, "multiple_of must be an int >= 1 or None, got -2"),
    ],
)
def test_pad_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bt.pad([torch.ones(2)], **kwargs)


def test_padded_to_moves_values_and_lengths() -> None:
    batch = bt.pad([torch.ones(2), torch.ones(3)]).to("cpu")
    assert batch.values.device.type == batch.lengths.device.type == "cpu"
    assert batch.mask.sum().item() == 5


def test_padded_repr_is_short() -> None:
    batch = bt.pad([torch.ones(2), torch.ones(3)])
    assert repr(batch) == "Padded(values=torch.float32[2x3] on cpu, lengths=[2, 3], axis=0)"


# -- split -----------------------------------------------------------------------------------------


def test_split_gives_rows_that_are_views() -> None:
    output = torch.arange(6).reshape(3, 2)
    rows = bt.split(output)
    assert [row.tolist() for row in rows] == [[0, 1], [2, 3], [4, 5]]
    output[1, 0] = 99
    assert rows[1][0].item() == 99


def test_split_a_tuple_gives_a_tuple_per_item() -> None:
    rows = bt.split((torch.arange(2), torch.tensor([[1, 1], [2, 2]])))
    assert type(rows[0]) is tuple
    assert rows[1][0].item() == 1
    assert rows[1][1].tolist() == [2, 2]


def test_split_a_named_tuple_keeps_its_type() -> None:
    rows = bt.split(Pair(torch.arange(2), torch.arange(2) * 10))
    assert type(rows[1]) is Pair
    assert (rows[1].first.item(), rows[1].second.item()) == (1, 10)


def test_split_a_dict_gives_a_dict_per_item() -> None:
    rows = bt.split({"label": torch.tensor([3, 4]), "scores": torch.eye(2)})
    assert [row["label"].item() for row in rows] == [3, 4]
    assert rows[1]["scores"].tolist() == [0.0, 1.0]


def test_split_returns_a_list_as_is() -> None:
    error = ValueError("bad item")
    assert bt.split([1, error]) == [1, error]


def test_split_with_tensor_lengths_narrows_each_row_to_a_view() -> None:
    output = torch.arange(12).reshape(2, 2, 3)
    rows = bt.split(output, lengths=torch.tensor([1, 3]), axis=-1)
    assert rows[0].tolist() == [[0], [3]]
    assert rows[1].tolist() == [[6, 7, 8], [9, 10, 11]]
    output[0, 1, 0] = -5
    assert rows[0][1, 0].item() == -5


def test_split_trims_a_padded_output_to_each_items_length() -> None:
    batch = bt.pad([torch.ones(2), torch.ones(4)])
    rows = bt.split(batch.with_values(batch.values * 2))
    assert [row.tolist() for row in rows] == [[2, 2], [2, 2, 2, 2]]


def test_split_rejects_parts_of_different_batch_sizes() -> None:
    with pytest.raises(ConfigurationError, match="3 for 0, 2 for 1"):
        bt.split((torch.zeros(3), torch.zeros(2)))


@pytest.mark.parametrize(
    ("output", "kwargs", "message"),
    [
        (torch.tensor(1.0), {}, "0-d tensor"),
        (3.0, {}, "cannot split a float"),
        ({}, {}, "empty dict"),
        (torch.zeros(2, 3), {"lengths": [1]}, "1 lengths for 2 rows"),
        (torch.zeros(2, 3), {"lengths": [1, 4]}, "length 4 does not fit"),
        (torch.zeros(2, 3), {"lengths": torch.tensor([1.0, 2.0])}, "1-d tensor of ints"),
        (torch.zeros(2, 3), {"lengths": ["1", 2]}, "sequence of ints"),
    ],
)
def test_split_rejects_what_it_cannot_split(
    output: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        bt.split(output, **kwargs)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    width=st.integers(1, 3),
    axis=st.sampled_from([0, 1, -1]),
)
def test_pad_then_split_gives_back_the_items(lengths: list[int], width: int, axis: int) -> None:
    items = [
        torch.arange(n * width).reshape((n, width) if axis == 0 else (width, n)) for n in lengths
    ]
    batch = bt.pad(items, axis=axis, value=-1)
    for got, item in zip(bt.split(batch.with_values(batch.values)), items, strict=True):
        assert torch.equal(got, item)


# -- grouped ---------------------------------------------------------------------------------------


def mixed_items() -> list[torch.Tensor]:
    return [torch.full((2,), 1.0), torch.full((3,), 2.0), torch.full((2,), 3.0), torch.ones(2, 2)]


def test_grouped_calls_the_model_once_per_shape_and_keeps_order() -> None:
    shapes: list[tuple[int, ...]] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape))
        return batch * 2

    items = mixed_items()
    outputs = bt.grouped(model)(items)
    assert shapes == [(2, 2), (1, 3), (1, 2, 2)]
    for out, item in zip(outputs, items, strict=True):
        assert torch.equal(out, item * 2)


@pytest.mark.anyio
async def test_grouped_wraps_an_async_model_in_an_async_function() -> None:
    async def model(batch: torch.Tensor) -> torch.Tensor:
        return batch + 1

    wrapped = bt.grouped(model)
    assert inspect.iscoroutinefunction(wrapped)
    outputs = await wrapped(mixed_items())
    assert torch.equal(outputs[3], torch.full((2, 2), 2.0))


def test_grouped_raises_batch_size_mismatch_for_a_short_group() -> None:
    with pytest.raises(BatchSizeMismatch, match="returned 1 outputs for a batch of 2"):
        bt.grouped(lambda batch: batch[:1])(mixed_items())


# -- a real BatchedModel ---------------------------------------------------------------------------


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # Not torch.testing.assert_close: its first call spends a second on lazy imports.
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"{got} != {want}"


def seeded(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter)
    return module.eval()


LINEAR = seeded(torch.nn.Linear(3, 4))
GRU = seeded(torch.nn.GRU(3, 5, batch_first=True))


@torch.inference_mode()
def linear(batch: torch.Tensor) -> torch.Tensor:
    return LINEAR(batch)  # type: ignore[no-any-return]


def sequences() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(n, 3) for n in (4, 1, 6, 2, 4)]


def test_batched_model_with_stack_and_split() -> None:
    torch.manual_seed(2)
    items = [torch.randn(3) for _ in range(8)]
    with BatchedModel(linear, collate=bt.stack, split=bt.split, max_batch_size=16) as model:
        outputs = model.call_many_sync(items)
        assert model.statistics().batches < len(items)
    for out, item in zip(outputs, items, strict=True):
        assert_close(out, linear(item))


@torch.inference_mode()
def gru_last_state(batch: bt.Padded) -> torch.Tensor:
    """The GRU's state after each item's last real step: padding must not reach it."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        batch.values, batch.lengths.cpu(), batch_first=True, enforce_sorted=False
    )
    _, state = GRU(packed)
    return state[-1]  # type: ignore[no-any-return]


def test_batched_model_with_pad_feeds_lengths_to_the_model() -> None:
    items = sequences()
    with BatchedModel(gru_last_state, collate=bt.pad, split=bt.split) as model:
        outputs = model.call_many_sync(items)
    with torch.inference_mode():
        expected = [GRU(item[None])[1][-1, 0] for item in items]
    for out, want in zip(outputs, expected, strict=True):
        assert_close(out, want)


@torch.inference_mode()
def gru_steps(batch: bt.Padded) -> bt.Padded:
    """Every step's GRU output, padded; split trims each item's back to its length."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        batch.values, batch.lengths.cpu(), batch_first=True, enforce_sorted=False
    )
    size = batch.values.shape[1]
    steps, _ = torch.nn.utils.rnn.pad_packed_sequence(
        GRU(packed)[0], batch_first=True, total_length=size
    )
    return batch.with_values(steps)


def test_batched_model_with_pad_trims_outputs_to_each_length() -> None:
    items = sequences()
    with BatchedModel(gru_steps, collate=bt.pad, split=bt.split) as model:
        outputs = model.call_many_sync(items)
    with torch.inference_mode():
        expected = [GRU(item[None])[0][0] for item in items]
    for out, want in zip(outputs, expected, strict=True):
        assert_close(out, want)


def test_batched_model_with_grouped_mixed_shapes() -> None:
    torch.manual_seed(3)
    items = [torch.randn(n, 3) for n in (2, 3, 2, 1, 3)]
    with BatchedModel(bt.grouped(linear)) as model:
        outputs = model.call_many_sync(items)
    for out, item in zip(outputs, items, strict=True):
        assert_close(out, linear(item))


def test_batched_model_with_async_grouped_and_length_buckets() -> None:
    async def model_fn(batch: bt.Padded) -> torch.Tensor:
        return gru_last_state(batch)

    items = sequences()
    wrapped = bt.grouped(model_fn, key=lambda item: len(item) > 3, collate=bt.pad)
    with BatchedModel(wrapped) as model:
        outputs = model.call_many_sync(items)
    with torch.inference_mode():
        expected = [GRU(item[None])[1][-1, 0] for item in items]
    for out, want in zip(outputs, expected, strict=True):
        assert_close(out, want)


# -- a torch.nn.Module as the model: no autograd -------------------------------------------------


class _Recorder(torch.nn.Module):
    """A linear layer that records whether autograd was off in the thread that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        out: torch.Tensor = self.linear(batch)
        return out


def _module_model(**kwargs: Any) -> tuple[BatchedModel[Any, Any], _Recorder]:
    module = _Recorder()
    return BatchedModel(module, collate=bt.stack, split=bt.split, **kwargs), module


def _check_outputs(outputs: list[Any], module: _Recorder) -> None:
    for out in outputs:
        assert out.grad_fn is None and not out.requires_grad
        assert out.numpy().shape == (2,)  # what an adapter does with it: numpy
    assert module.modes and all(mode == (True, False) for mode in module.modes), module.modes


@pytest.mark.anyio
async def test_a_module_runs_in_inference_mode_for_async_callers() -> None:
    model, module = _module_model(max_batch_size=4)
    async with model:
        outputs = [await model.call(torch.ones(3)) for _ in range(3)]
    _check_outputs(outputs, module)


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_a_module_runs_in_inference_mode_for_sync_callers_in_their_threads(
    max_concurrency: int,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model, module = _module_model(max_batch_size=4, max_concurrency=max_concurrency)
    try:
        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(lambda _: model.call_sync(torch.ones(3)), range(16)))
    finally:
        model.close()
    _check_outputs(outputs, module)


def test_a_module_s_warmup_runs_in_inference_mode() -> None:
    model, _ = _module_model()
    try:
        model.call_sync(torch.ones(3))
        replacement = _Recorder()
        model.swap_sync(replacement, version="2", warmup=[torch.zeros(3)])
        assert replacement.modes == [(True, False)]
        assert model.call_sync(torch.ones(3)).grad_fn is None
    finally:
        model.close()


def test_split_detaches_rows_from_autograd() -> None:
    weight = torch.ones(3, requires_grad=True)
    batch = torch.stack([weight * 2, weight * 3])
    assert batch.grad_fn is not None
    rows = bt.split(batch)
    assert all(row.grad_fn is None and not row.requires_grad for row in rows)
    pair = bt.split(Pair(batch, batch + 1))
    assert all(not part.requires_grad for item in pair for part in item)


def test_a_lazy_module_swapped_in_place_after_serving() -> None:
    # Its parameters are created by the first batch, in inference mode: inference tensors,
    # which only inference mode may update in place.
    module = torch.nn.LazyLinear(2)
    model = BatchedModel(module, collate=bt.stack, split=bt.split)
    try:
        model.call_sync(torch.ones(3))
        state = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
        model.swap_sync(state, version="2", in_place=True)
        assert model.call_sync(torch.ones(3)).tolist() == [3.0, 3.0]
        model.rollback_sync()
        assert model.version == "1"
    finally:
        model.close()
