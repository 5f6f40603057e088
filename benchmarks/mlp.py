"""The torch model the throughput and latency benchmarks batch: a small MLP on one CPU thread.

``forward`` is the model function handed to batchkit and also the one the references call
directly, so both sides do the same stacking and unbinding work.

torch's thread count is per thread for OpenMP: ``torch.set_num_threads(1)`` in the main thread
does not hold in threads started later (``get_num_threads()`` says 1, yet an OpenMP helper thread
spins beside each one; pytorch/pytorch#37259). batchkit runs a sync model in a worker thread, and
the sync-caller references run it in their own threads, so ``forward`` sets the count once in
every thread it runs in; otherwise those threads would use more CPU than the main-thread
reference they are compared with.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

IN_FEATURES = 256
HIDDEN = 1024


class MLP:
    """Linear(256 -> 1024), ReLU, Linear(1024 -> 256) in eval mode, on one torch thread.

    Build it inside the benchmark (it imports torch); ``close`` restores torch's thread count.
    """

    def __init__(self, seed: int = 0) -> None:
        import torch

        self._torch = torch
        self._threads = torch.get_num_threads()
        self._local = threading.local()
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, IN_FEATURES),
        ).eval()

    def items(self, n: int) -> list[Any]:
        """Return ``n`` random input items (tensors of 256 floats)."""
        return list(self._torch.randn(n, IN_FEATURES).unbind(0))

    def forward(self, items: list[Any]) -> Sequence[Any]:
        """Run the MLP on a list of items: stack, forward, unbind (one output per item)."""
        if not getattr(self._local, "threads_set", False):
            self._torch.set_num_threads(1)
            self._local.threads_set = True
        # inference_mode is thread-local too: enter it here, in whichever thread runs the batch.
        with self._torch.inference_mode():
            return self.net(self._torch.stack(items)).unbind(0)

    def close(self) -> None:
        """Restore torch's intra-op thread count."""
        self._torch.set_num_threads(self._threads)
