"""The package surface: light import, explicit exports, typing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import batchkit

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "torch",
    "numpy",
    "rich",
    "prometheus_client",
    "tritonclient",
    "uvicorn",
    "IPython",
    "matplotlib",
)


@pytest.mark.parametrize("module", ["batchkit", "batchkit.notebook"])
def test_import_is_light(module: str) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import {module}
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        print(",".join(heavy))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_import_configures_no_logging_handlers_beyond_a_null_handler() -> None:
    import logging

    handlers = logging.getLogger("batchkit").handlers
    assert all(isinstance(h, logging.NullHandler) for h in handlers)
    assert not logging.getLogger().handlers or "batchkit" not in repr(logging.getLogger().handlers)


def test_all_lists_exactly_the_public_names() -> None:
    # Optional submodules (batchkit.numpy, batchkit.torch) appear once imported; not re-exported.
    public = {
        name
        for name, value in vars(batchkit).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert isinstance(batchkit.__all__, tuple)
    assert set(batchkit.__all__) - {"__version__"} == public
    for name in batchkit.__all__:
        assert hasattr(batchkit, name)


def test_errors_inherit_the_closest_builtin() -> None:
    assert issubclass(batchkit.DeadlineExceeded, TimeoutError)
    assert issubclass(batchkit.ConfigurationError, ValueError)
    assert issubclass(batchkit.ClosedError, RuntimeError)
    for name in batchkit.__all__:
        obj = getattr(batchkit, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, batchkit.BatchkitError)


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "batchkit" / "py.typed").exists()


@pytest.mark.timeout(300)
def test_mypy_strict_passes_on_the_package() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "batchkit"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(300)
def test_batched_maps_list_types_to_item_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    sample = tmp_path / "sample.py"
    sample.write_text(
        textwrap.dedent(
            """
            from typing import assert_type
            from batchkit import AsyncBatched, BatchedModel, SyncBatched, batched

            @batched
            def lengths(texts: list[str]) -> list[int]:
                return [len(t) for t in texts]

            @batched(max_batch_size=8)
            async def scores(xs: list[float]) -> list[str]:
                return [str(x) for x in xs]

            class Model:
                @batched
                def predict(self, xs: list[int]) -> list[float]:
                    return [x / 2 for x in xs]

            assert_type(lengths, SyncBatched[str, int])
            assert_type(lengths("abc"), int)
            assert_type(scores, AsyncBatched[float, str])
            assert_type(Model().predict(3), float)
            def over_tuples(batch: tuple[int, ...]) -> dict[str, list[str]]:
                return {"out": [str(x) for x in batch]}

            def pick(out: dict[str, list[str]]) -> list[str]:
                return out["out"]

            def to_tuple(items: list[int]) -> tuple[int, ...]:
                return tuple(items)

            collated = BatchedModel(over_tuples, collate=to_tuple, split=pick, max_batch_size=8)
            assert_type(collated, BatchedModel[int, str])

            async def use() -> None:
                assert_type(await scores(1.0), str)
                assert_type(await lengths.call("x"), int)
                assert_type(lengths.call_many_sync(["a"]), list[int])

            lengths(3)  # E: wrong item type
            """
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-version",
            "3.11",
            str(sample),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    # Exactly one error: the deliberately wrong item type on the last line.
    assert len(errors) == 1, out.stdout
    assert 'incompatible type "int"; expected "str"' in errors[0]
