"""Torch weight swapping: load, check, build and copy weights for ``BatchedModel.swap()``.

``WEIGHT_OPS`` implements the core's ``WeightOps`` protocol with the functions below; the core
loads this module by name, only for models that are ``torch.nn.Module``s.

On CUDA, weights go from pinned host memory to the device with non-blocking copies on a side
stream, which is synchronized before the new model is published: inference on the default
stream is never queued behind the copies.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ._core import ForbiddenPath, IncompatibleWeights, SwapError, WeightOps, WeightsNotFound

__all__ = (
    "WEIGHT_OPS",
    "build",
    "check_fits",
    "copy_into",
    "device_of",
    "inference",
    "load_state",
    "place",
    "snapshot",
    "stage",
)

State = dict[str, torch.Tensor]

# Names listed in an IncompatibleWeights message, per kind of mismatch.
_SHOWN = 5


def device_of(module: torch.nn.Module) -> torch.device:
    """Return the device of the module's first parameter or buffer (CPU when it has none)."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def load_state(source: Any, weights_dir: str | os.PathLike[str] | None) -> State:
    """Return the state dict ``source`` gives: a mapping, a module, or a path to load.

    Paths are loaded on the CPU with ``weights_only=True``; relative ones are taken from
    ``weights_dir`` when it is set, and any path must then resolve inside it.
    """
    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        state = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        state = _load_file(Path(source), weights_dir)
    else:
        raise SwapError(
            "expected a model function, a torch.nn.Module, a state dict or a path to weights, "
            f"got {source!r}"
        )
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise IncompatibleWeights(f"not a state dict: {_names(bad)} are not tensors")
    return state


def _load_file(path: Path, weights_dir: str | os.PathLike[str] | None) -> State:
    if weights_dir is not None:
        root = Path(weights_dir).resolve()
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root):
            raise ForbiddenPath(f"weights path {str(path)!r} is outside weights_dir {str(root)!r}")
    else:
        resolved = path.resolve()
    if not resolved.is_file():
        raise WeightsNotFound(f"no weights file at {str(path)!r}")
    try:
        loaded = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IncompatibleWeights(
            f"cannot load weights from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(loaded, Mapping):
        raise IncompatibleWeights(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a state dict"
        )
    return dict(loaded)


def check_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``IncompatibleWeights`` unless ``state`` has exactly the module's names and shapes."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key} {tuple(state[key].shape)} != {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes {_names(shapes)}")
    if problems:
        raise IncompatibleWeights(
            f"the weights do not fit {type(module).__name__}: " + "; ".join(problems)
        )


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = len(items) - _SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def stage(state: State, device: torch.device) -> State:
    """Return ``state`` ready to copy to ``device``: in pinned host memory for CUDA."""
    if device.type != "cuda":
        return state
    return {key: t if t.is_cuda or t.is_pinned() else t.pin_memory() for key, t in state.items()}


def build(
    template: torch.nn.Module, state: State, device: torch.device | str | None
) -> torch.nn.Module:
    """Return a new module shaped like ``template`` holding ``state``, on ``device``, in eval.

    The template's parameters are not copied: the new module's tensors are allocated empty on
    the device and filled from ``state`` (non-persistent buffers are cloned from the template).
    """
    check_fits(template, state)
    target = _normalized(device if device is not None else device_of(template))
    if target.type == "meta":
        raise SwapError(
            f"{type(template).__name__} is on the meta device: give swap() a device to build on"
        )
    persistent = set(template.state_dict())
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for tensor in template.parameters():
            if id(tensor) not in memo:
                empty = torch.empty_like(tensor, device=target)
                memo[id(tensor)] = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
        for name, buffer in template.named_buffers(remove_duplicate=False):
            if id(buffer) not in memo:
                memo[id(buffer)] = (
                    torch.empty_like(buffer, device=target)
                    if name in persistent
                    else buffer.to(target, copy=True)
                )
        try:
            module = copy.deepcopy(template, memo)
        except Exception as exc:
            raise SwapError(
                f"cannot copy the architecture of {type(template).__name__} to load new weights "
                f"into ({type(exc).__name__}: {exc}); swap in a new module, or swap in place"
            ) from exc
    copy_into(module, stage(state, target))
    return module.eval()


def place(module: torch.nn.Module, device: torch.device | str | None) -> torch.nn.Module:
    """Return ``module`` on ``device`` in eval mode: itself, or a copy built on the device."""
    if device is None or _normalized(device_of(module)) == _normalized(device):
        return module.eval()
    return build(module, dict(module.state_dict()), device)


def snapshot(module: torch.nn.Module) -> State:
    """Return a host copy of the module's weights (to copy back in later).

    CUDA tensors are copied into pinned memory on a side stream: the batches running meanwhile
    are not queued behind the copies.
    """
    tensors = module.state_dict()
    streams = _side_streams(tensors.values())
    out: State = {}
    with torch.no_grad():
        for key, tensor in tensors.items():
            if tensor.is_cuda:
                host = torch.empty_like(tensor, device="cpu", pin_memory=True)
                with torch.cuda.stream(streams[tensor.device]):
                    host.copy_(tensor, non_blocking=True)
                out[key] = host
            else:
                out[key] = tensor.detach().clone()
    for side in streams.values():
        side.synchronize()
    return out


def copy_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the module's own tensors and wait until the copies are done.

    A module whose state dict is not its registered parameters and buffers (quantized or packed
    layers that build their state dict) loads it itself, with ``load_state_dict``.
    """
    targets = module.state_dict(keep_vars=True)
    registered = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    if any(id(t) not in registered for t in targets.values()):
        module.load_state_dict(state, strict=True)
        return
    streams = _side_streams(targets.values())
    # A tensor the module created while serving (a lazy parameter, a cache) is an inference
    # tensor, which only inference mode may update in place; no_grad suffices for the others.
    inplace = torch.inference_mode() if _any_inference(targets.values()) else torch.no_grad()
    with inplace:
        for key, tensor in targets.items():
            if tensor.is_cuda:
                with torch.cuda.stream(streams[tensor.device]):
                    tensor.copy_(state[key], non_blocking=True)
            else:
                tensor.copy_(state[key])
    for side in streams.values():
        side.synchronize()


def inference() -> Any:
    """Return the context a torch module's batches run in: ``torch.inference_mode()``.

    Outputs then carry no autograd graph (no ``grad_fn``), so they convert to numpy, and no
    memory is kept for a backward pass that never comes. Entered in the thread that calls the
    model: autograd's mode is per thread.
    """
    return torch.inference_mode()


def _side_streams(tensors: Iterable[torch.Tensor]) -> dict[torch.device, torch.cuda.Stream]:
    """Return a side stream per CUDA device among ``tensors``.

    Each waits for the work already queued on its device's current stream (a freshly
    allocated block may still be read there), never the other way around.
    """
    streams: dict[torch.device, torch.cuda.Stream] = {}
    for tensor in tensors:
        if tensor.is_cuda and tensor.device not in streams:
            side = torch.cuda.Stream(tensor.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(tensor.device))
            streams[tensor.device] = side
    return streams


def _any_inference(tensors: Iterable[torch.Tensor]) -> bool:
    return any(t.is_inference() for t in tensors)


def _normalized(device: torch.device | str) -> torch.device:
    """Return ``device`` with its index: "cuda" means the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _TorchWeightOps:
    """The core's ``WeightOps`` for ``torch.nn.Module`` models: the functions of this module."""

    device_of = staticmethod(device_of)
    load_state = staticmethod(load_state)
    check_fits = staticmethod(check_fits)
    stage = staticmethod(stage)
    build = staticmethod(build)
    place = staticmethod(place)
    snapshot = staticmethod(snapshot)
    copy_into = staticmethod(copy_into)
    inference = staticmethod(inference)


WEIGHT_OPS: WeightOps = _TorchWeightOps()
