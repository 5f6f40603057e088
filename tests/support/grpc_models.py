"""The models of the gRPC tests (tests/asgi/test_grpc.py), served in-process or by a
``batchkit serve tests.support.grpc_models:make_app`` subprocess.

The gated model holds its batch until the test opens its gate: a pair of thread events
in-process, files in ``$BATCHKIT_TEST_GATE_DIR`` across processes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from batchkit import BatchedModel
from batchkit.asgi import KServeApp, ServedModel, Tensor

from .asgi import DATATYPES, identity_model

TOKEN = "s3cret-token"
MAX_MESSAGE_SIZE = 64 * 1024


def _first(item: Any) -> float:
    return float(np.asarray(item).reshape(-1)[0])


class Gate:
    """A sync model that records its items and holds its batch until the test opens the gate."""

    def __init__(self) -> None:
        self._entered = threading.Event()
        self._release = threading.Event()
        self._seen: list[float] = []

    def __call__(self, items: list[Any]) -> list[Any]:
        self._seen.extend(_first(x) for x in items)
        self._entered.set()
        assert self._release.wait(30), "the test never opened the gate"
        return items

    def wait_entered(self, timeout: float) -> bool:
        return self._entered.wait(timeout)

    def open(self) -> None:
        self._release.set()

    def seen(self) -> list[float]:
        return list(self._seen)

    def reset(self) -> None:
        self._release.clear()
        self._entered.clear()
        self._seen.clear()


class FileGate:
    """The ``Gate`` across processes: files ``seen``, ``entered`` and ``release`` in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, items: list[Any]) -> list[Any]:
        with open(self.folder / "seen", "a") as f:
            f.writelines(f"{_first(x)}\n" for x in items)
        (self.folder / "entered").touch()
        if not self._wait_for("release", 30):
            raise TimeoutError("the test never opened the gate")
        return items

    def _wait_for(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not (self.folder / name).exists():  # another process: no event to wait on
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_entered(self, timeout: float) -> bool:
        return self._wait_for("entered", timeout)

    def open(self) -> None:
        (self.folder / "release").touch()

    def seen(self) -> list[float]:
        path = self.folder / "seen"
        return [float(v) for v in path.read_text().split()] if path.exists() else []

    def reset(self) -> None:
        for name in ("release", "entered", "seen"):
            (self.folder / name).unlink(missing_ok=True)


def broken(items: list[Any]) -> list[Any]:
    raise RuntimeError("the secret stack")


def grow(items: list[Any]) -> list[Any]:
    return [np.zeros(4000, np.float32) for _ in items]


def models(gate: Any) -> list[ServedModel]:
    served = [identity_model(dt, max_batch_size=64) for dt in DATATYPES]
    served.append(identity_model("FP32", name="tiny_queue", max_queue_size=1))
    served.append(identity_model("FP32", name="spare"))
    served.append(identity_model("FP32", name="pair", max_batch_size=2, max_wait=30.0))
    served.append(ServedModel(BatchedModel(broken, name="broken")))
    served.append(ServedModel(BatchedModel(gate, name="gated", max_batch_size=1)))
    served.append(
        ServedModel(
            BatchedModel(grow, name="grow"),
            inputs=[Tensor("X", "FP32", [1])],
            outputs=[Tensor("Y", "FP32", [4000])],
        )
    )
    return served


def make_app() -> KServeApp:
    """The app of the ``batchkit serve`` subprocess (its token: ``$BATCHKIT_ADMIN_TOKEN``)."""
    gate = FileGate(Path(os.environ["BATCHKIT_TEST_GATE_DIR"]))
    return KServeApp(models(gate), admin_token=os.environ["BATCHKIT_ADMIN_TOKEN"])
