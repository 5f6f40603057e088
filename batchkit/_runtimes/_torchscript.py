"""Run a TorchScript (``torch.jit.load``) or ``torch.export`` (``model.pt2``) program.

torch is imported here only, when such a model is loaded. The program runs under
``torch.inference_mode()`` with the inputs as positional tensors in the configuration's order;
it returns a tensor (one output), a tuple or list (in the configuration's output order), or a
mapping by output name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._core import ConfigurationError
from ._config import ModelSpec, TensorSpec

__all__ = ("TorchRuntime",)


class TorchRuntime:
    """A loaded TorchScript or exported program. Raises ``ConfigurationError``."""

    def __init__(self, path: str | os.PathLike[str], spec: ModelSpec) -> None:
        try:
            import torch
        except ImportError:
            raise ConfigurationError(
                "serving TorchScript models needs torch: pip install 'batchkit[torch]'"
            ) from None
        if not spec.inputs or not spec.outputs:
            raise ConfigurationError(
                f"{spec.source}: input/output: a TorchScript model's configuration must "
                "declare its inputs and outputs"
            )
        self._torch = torch
        self.inputs: tuple[TensorSpec, ...] = spec.inputs
        self.outputs: tuple[TensorSpec, ...] = spec.outputs
        try:
            if Path(path).suffix == ".pt2":
                program: Any = torch.export.load(os.fspath(path))
                self.module: Any = program.module()
            else:
                # torch 2.10+ deprecates TorchScript, and still loads it: the model's
                # author chose it, so the warning tells the server's operator nothing.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
                    self.module = torch.jit.load(  # type: ignore[no-untyped-call]
                        os.fspath(path), map_location="cpu"
                    )
                self.module.eval()
        except Exception as exc:
            raise ConfigurationError(f"{path}: torch cannot load it: {exc}") from None

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one batch: arrays by input name in, arrays by output name out."""
        torch = self._torch
        args = [torch.from_numpy(inputs[t.name]) for t in self.inputs]
        with torch.inference_mode():
            result = self.module(*args)
        names = [t.name for t in self.outputs]
        if isinstance(result, Mapping):
            values = [result[name] for name in names]
        elif isinstance(result, Sequence) and not isinstance(result, torch.Tensor):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(names):
            raise TypeError(f"the model returned {len(values)} outputs, declared {names}")
        pairs = zip(names, values, strict=True)
        return {name: value.detach().cpu().numpy() for name, value in pairs}

    def close(self) -> None:
        """Release the module."""
        self.module = None
