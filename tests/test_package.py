"""The package surface: layers, light import, explicit exports, old import paths, typing."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import fields
from pathlib import Path

import pytest

import batchkit

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "numpy",
    "rich",
    "prometheus_client",
    "tritonclient",
    "uvicorn",
    "IPython",
    "matplotlib",
    "grpc",
)

# -- layers (ARCHITECTURE.md, "Layers") ---------------------------------------------------------

CORE, INTEGRATIONS, ADAPTERS, CLI = 1, 2, 3, 4
# Private integration helpers that any integration may use (ARCHITECTURE.md's "L2 private").
# `_runtimes`: the model runtimes (ONNX Runtime, TorchScript, Python files) and the model
# configuration reader of the model repository, each importing its library lazily.
L2_PRIVATE = ("_collate", "_render", "_runtimes", "_target", "_torch_weights")
L2_PUBLIC = ("numpy", "torch", "metrics", "triton")
L3 = ("asgi", "pipe", "notebook")
# The only imports that do not go down, each with its reason.
EXCEPTIONS = {
    # The core's renderers: `_repr_html_`/`__rich__` import them lazily and hand them plain data.
    ("batchkit._core._model", "batchkit._render"),
    ("batchkit._core._stats", "batchkit._render"),
    # The `WeightOps` seam: loaded by name for torch modules only, as anyio loads its backends.
    ("batchkit._core._swap", "batchkit._torch_weights"),
    # The documented L3 -> L3 edge: the notebook's server runs the KServe app.
    ("batchkit.notebook._server", "batchkit.asgi"),
}
# Third-party names the core may import (besides the standard library and itself).
CORE_MAY_IMPORT = {"anyio"}
CORE_TYPE_CHECKING_ONLY = {"typing_extensions"}


def module_name(package_root: Path, path: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> tuple[int, str]:
    """Return the layer of module ``name`` (from its path) and its unit (package or module)."""
    parts = name.split(".")[1:]
    if not parts or parts[0] in ("_version", "__init__"):
        return 0, "batchkit"  # the package facade and its version: importable by every layer
    head = parts[0]
    if head == "_core":
        return CORE, head
    if head in L2_PRIVATE or head in L2_PUBLIC:
        return INTEGRATIONS, head
    if head in L3:
        return ADAPTERS, head
    if head in ("_cli", "__main__"):
        return CLI, "_cli"
    if head in ("pytest_plugin", "_pytest_plugin"):
        # A front end like the command: it drives models through the adapters (the pipe
        # client) and the notebook profiler's sweep, so it sits beside the CLI, not below it.
        return CLI, "pytest_plugin"
    raise AssertionError(f"{name}: no layer for this path; add it to tests/test_package.py")


def _is_module(package_root: Path, name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    base = package_root / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(package_root: Path, path: Path) -> list[tuple[str, bool]]:
    """Return (module imported, under TYPE_CHECKING) for every import in ``path``: top level,
    lazy (inside functions) and by name (``importlib.import_module`` of a constant)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(package_root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checking.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        typing_only = id(node) in checking
        if isinstance(node, ast.Import):
            found += [(alias.name, typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                is_sub = sub.startswith("batchkit") and _is_module(package_root, sub)
                found.append((sub if is_sub else source, typing_only))
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("import_module")
            and node.args
        ):
            arg = node.args[0]
            value = arg.value if isinstance(arg, ast.Constant) else None
            if isinstance(arg, ast.Name):
                value = constants.get(arg.id)
            if isinstance(value, str):
                found.append((value, typing_only))
    return found


def layer_violations(package_root: Path) -> list[str]:
    """Return every import of the package at ``package_root`` that breaks the layer rules."""
    problems = []
    for path in sorted(package_root.rglob("*.py")):
        here = module_name(package_root, path)
        layer, unit = layer_of(here)
        for target, typing_only in imports_of(package_root, path):
            top = target.split(".")[0]
            if top != "batchkit":
                if layer == CORE and top not in sys.stdlib_module_names:
                    allowed = CORE_MAY_IMPORT | (CORE_TYPE_CHECKING_ONLY if typing_only else set())
                    if top not in allowed:
                        problems.append(f"{here} imports {target}: the core imports stdlib/anyio")
                continue
            if (here, target) in EXCEPTIONS:
                continue
            if not _is_module(package_root, target):
                problems.append(f"{here} imports {target}, which does not exist")
                continue
            their_layer, their_unit = layer_of(target)
            if layer != CORE and target.startswith("batchkit._core."):
                problems.append(f"{here} imports {target}: import batchkit._core instead")
            elif their_layer > layer and layer != 0:
                problems.append(f"{here} (L{layer}) imports {target} (L{their_layer}): upward")
            elif their_layer == layer and their_unit != unit and layer != CORE:
                if not (layer == INTEGRATIONS and their_unit in L2_PRIVATE):
                    problems.append(f"{here} imports {target}: sideways across L{layer}")
            elif layer == 0 and their_layer > CORE:
                problems.append(f"{here} (the package facade) imports {target}: keep it light")
    return problems


def test_imports_only_go_down_the_layers() -> None:
    assert layer_violations(ROOT / "batchkit") == []


def test_every_named_exception_is_still_needed() -> None:
    edges = {
        (module_name(ROOT / "batchkit", path), target)
        for path in (ROOT / "batchkit").rglob("*.py")
        for target, _ in imports_of(ROOT / "batchkit", path)
    }
    assert sorted(EXCEPTIONS - edges) == []


@pytest.mark.parametrize(
    ("module", "line", "problem"),
    [
        ("_core/_engine.py", "from ..asgi import KServeApp", "(L1) imports batchkit.asgi (L3)"),
        ("_core/_engine.py", "import numpy", "the core imports stdlib/anyio"),
        ("_core/_engine.py", "import importlib\nimportlib.import_module('batchkit.pipe')", "L3"),
        ("numpy.py", "from .pipe import run", "(L2) imports batchkit.pipe (L3): upward"),
        ("pipe/_x.py", "from .._core._errors import E", "import batchkit._core instead"),
        ("pipe/_x.py", "from ..asgi import KServeApp", "sideways across L3"),
        ("asgi/_x.py", "from .._cli import main", "(L3) imports batchkit._cli (L4): upward"),
        ("asgi/_x.py", "def f():\n    from ..notebook import live", "sideways across L3"),
        ("asgi/_x.py", "from .._gone import x", "batchkit._gone, which does not exist"),
    ],
)
def test_the_layer_check_fails_on_a_new_bad_import(
    tmp_path: Path, module: str, line: str, problem: str
) -> None:
    package = tmp_path / "batchkit"
    for rel in ("_core/_errors.py", "_core/_engine.py", "numpy.py", "_cli/__init__.py"):
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text("")
    for sub in ("", "_core", "asgi", "pipe", "notebook"):
        (package / sub).mkdir(exist_ok=True)
        (package / sub / "__init__.py").write_text("")
    assert layer_violations(package) == []
    (package / module).write_text(line + "\n")
    problems = layer_violations(package)
    assert len(problems) == 1, problems
    assert problem in problems[0]


def test_the_core_lists_what_outer_layers_may_use() -> None:
    import batchkit._core as core

    assert isinstance(core.__all__, tuple)
    for name in core.__all__:
        assert hasattr(core, name), name
    # Every public name of batchkit comes from the core's list.
    assert set(batchkit.__all__) - {"__version__"} <= set(core.__all__)


def test_at_most_five_private_modules_sit_flat_in_the_package() -> None:
    flat = sorted(
        p.stem for p in (ROOT / "batchkit").glob("_*.py") if p.stem not in ("__init__", "__main__")
    )
    assert len(flat) <= 5, flat


# -- import paths and weight -----------------------------------------------------------------

# Every public name of every public module, as the first layout exported them: none may go.
PUBLIC = {
    "batchkit": (
        "AsyncBatched", "BatchInfo", "BatchSizeMismatch", "BatchedModel", "BatchkitError",
        "ClosedError", "ConfigurationError", "DeadlineExceeded", "ForbiddenPath",
        "IncompatibleWeights", "LatencyHistogram", "LatencySummary", "ModelError", "QueueFull",
        "RemoteError", "RemoteInvalidInput", "RemoteRejected", "RemoteUnavailable", "Settings",
        "Statistics", "SupportsBatchInfo", "SwapError", "SyncBatched", "ValidationFailed",
        "Versioned", "WarmupFailed", "WeightsNotFound", "WrongLoopError", "__version__",
        "batched",
    ),
    "batchkit.asgi": (
        "ASGIApp", "DATATYPES", "KServeApp", "Receive", "Scope", "Send", "ServedModel",
        "Tensor", "serving",
    ),
    "batchkit.notebook": (
        "BackgroundServer", "LiveView", "ProfilePoint", "ProfileResult", "aprofile", "live",
        "profile", "serve",
    ),
    "batchkit.triton": ("TensorSpec", "TritonModel"),
    "batchkit.pipe": (
        "PROTOCOL_VERSION", "PipeClient", "PipeProtocolError", "ResponseError", "ServerExited",
        "SyncPipeClient", "claim_stdio", "run", "serve",
    ),
    "batchkit.numpy": ("Padded", "grouped", "pad", "shape_of", "split", "stack"),
    "batchkit.torch": ("Padded", "grouped", "pad", "shape_of", "split", "stack"),
    "batchkit.metrics": (
        "BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS", "ModelCollector", "ServerMetrics",
    ),
    "batchkit.pytest_plugin": (
        "ERROR_KINDS", "BatchBenchmark", "FigureClock", "Figures", "GrpcTarget", "HttpTarget",
        "PipeTarget", "Round", "SweepPoint", "batchkit_benchmark", "sweep",
    ),
}  # fmt: skip
NEEDS = {
    "batchkit.asgi": "numpy",
    "batchkit.triton": "tritonclient",
    "batchkit.numpy": "numpy",
    "batchkit.torch": "torch",
    "batchkit.metrics": "prometheus_client",
}


@pytest.mark.parametrize("path", sorted(PUBLIC))
def test_every_public_name_imports_from_its_old_path(path: str) -> None:
    if path in NEEDS:
        pytest.importorskip(NEEDS[path])
    module = importlib.import_module(path)
    missing = [name for name in PUBLIC[path] if not hasattr(module, name)]
    assert missing == []
    assert set(PUBLIC[path]) <= set(module.__all__)
    for name in PUBLIC[path]:
        exec(f"from {path} import {name}", {})


def test_the_commands_keep_their_entry_points() -> None:
    from batchkit.__main__ import main

    assert callable(main)
    out = subprocess.run(
        [sys.executable, "-m", "batchkit", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for command in ("serve", "bench", "profile", "pipe"):
        assert command in out.stdout
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'batchkit = "batchkit.__main__:main"' in scripts


def test_every_module_named_in_a_string_exists() -> None:
    pattern = re.compile(r"batchkit(\.[A-Za-z_]\w*)+")
    for path in (ROOT / "batchkit").rglob("*.py"):
        named = [
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
        for name in filter(pattern.fullmatch, named):
            assert _is_module(ROOT / "batchkit", name), (path, name)


@pytest.mark.parametrize(
    "module", ["batchkit", "batchkit.notebook", "batchkit.pipe", "batchkit.pytest_plugin"]
)
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


# -- settings: one source -----------------------------------------------------------------------


def test_the_settings_are_listed_once() -> None:
    from batchkit._core import BatchOptions, Settings

    typed_elsewhere = {"size_fn", "collate", "split"}  # their types depend on T and R
    options = set(BatchOptions.__annotations__)
    assert options | typed_elsewhere == {f.name for f in fields(Settings)} | {"version"}


def test_a_misspelt_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batchsize'"):
        batchkit.BatchedModel(lambda xs: xs, max_batchsize=4)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batchsize'"):
        batchkit.batched(max_batchsize=4)(lambda xs: xs)  # type: ignore[call-overload]


def _mypy(tmp_path: Path, source: str) -> list[str]:
    """Return mypy --strict's errors on ``source``; check the one line marked ``# E:`` has one."""
    source = textwrap.dedent(source)
    marked = [n for n, line in enumerate(source.splitlines(), 1) if "# E:" in line]
    sample = tmp_path / "sample.py"
    sample.write_text(source)
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
    assert [e.split(":")[1] for e in errors] == [str(n) for n in marked], out.stdout
    return errors


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
def test_every_setting_type_checks_through_batched(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    errors = _mypy(
        tmp_path,
        """
        from typing import assert_type
        from batchkit import AsyncBatched, BatchedModel, SyncBatched, batched

        @batched(
            max_batch_size=8, max_wait=0.01, adaptive_wait=True, max_queue_size=100,
            max_concurrency=2, timeout=1.0, size_fn=len, max_batch_cost=64.0,
            isolate_failures=True, name="m", version="2", weights_dir="/weights",
            keep_previous=False,
        )
        def every(texts: list[str]) -> list[int]:
            return [len(t) for t in texts]

        @batched(keep_previous=False)
        async def scores(xs: list[float]) -> list[str]:
            return [str(x) for x in xs]

        def plain(texts: list[str]) -> list[int]:
            return [len(t) for t in texts]

        model = BatchedModel(
            plain, max_batch_size=8, max_wait=0.01, adaptive_wait=True,
            max_queue_size=100, max_concurrency=2, timeout=1.0, max_batch_cost=64.0,
            isolate_failures=True, name="m", version="2", weights_dir="/weights",
            keep_previous=False,
        )
        assert_type(every, SyncBatched[str, int])
        assert_type(scores, AsyncBatched[float, str])
        assert_type(model, BatchedModel[str, int])

        batched(keep_previous="no")  # E: wrong type
        """,
    )
    # Exactly one error: the deliberately wrong type on the last line.
    assert len(errors) == 1, errors
    assert '"str"' in errors[0]


@pytest.mark.timeout(300)
def test_batched_maps_list_types_to_item_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    errors = _mypy(
        tmp_path,
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
        assert_type(Model.predict, SyncBatched[int, float])
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
        """,
    )
    # Exactly one error: the deliberately wrong item type on the last line.
    assert len(errors) == 1, errors
    assert 'incompatible type "int"; expected "str"' in errors[0]
