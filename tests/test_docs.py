"""The docs are true by construction: every Python block of README.md and docs/*.md runs.

Each page runs in its own process (``tests/support/docblocks.py``, whose docstring and
docs/contributing.md say how to mark a block): its ``python`` blocks in order, in one namespace,
the ones marked ``<!-- docs: server -->`` against a real ``batchkit serve``. New pages are picked
up by the glob. The README quickstart, the examples and the packaging facts are checked too.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import docblocks

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Info strings a page may use: `python` runs, the others are shown only. A Python alias such as
# `py` would look runnable and silently not run, so it is refused.
SHOWN = {"text", "console", "pycon", "bash", "sh", "json", "toml", "yaml", "ini", "protobuf"}


def run_python(code_or_path: str | Path, tmp_path: Path) -> str:
    args = [str(code_or_path)] if isinstance(code_or_path, Path) else ["-c", code_or_path]
    out = subprocess.run(
        [sys.executable, "-W", "error", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_readme_quickstart_shows_batching_and_both_callers(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = docblocks.blocks(ROOT / "README.md")[0].code
    assert len(quickstart.strip().splitlines()) <= 18, "a quickstart stays short"
    assert "async with embed:" in quickstart and "embed.call(" in quickstart
    lines = run_python(quickstart, tmp_path).splitlines()
    assert lines[:2] == ["[2, 5]", "5"], lines
    mean = float(lines[2].split()[0])
    assert mean > 1, f"the quickstart shows batching: {lines[2]}"
    assert "python -m pip install" in readme and "python -m nox -s tests" in readme


MAIN_COMMAND = "python -m batchkit bench --compare --concurrency 1,8,32 --duration 2"


def test_readme_main_command_is_the_serving_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f'python -m pip install -e ".[server,bench]" && {MAIN_COMMAND}' in readme


@pytest.mark.timeout(180)
def test_readme_main_command_runs(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("tritonclient.http")
    out = subprocess.run(
        [sys.executable, "-W", "error", *MAIN_COMMAND.split()[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "batching on (up to 64) vs off" in out.stdout
    assert "speedup" in out.stdout


def test_readme_names_the_ci_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m nox -s tests" in readme
    assert "nox -s tests" in ci


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    run_python(example, tmp_path)


@pytest.mark.timeout(120)
def test_ruff_is_clean() -> None:
    pytest.importorskip("ruff")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "batchkit",
            "tests",
            "benchmarks",
            "examples",
            "noxfile.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run ``batchkit serve`` (the demo model) on a free loopback port; yield ``host:port``."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("numpy")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchkit", "serve", "--port", str(port)],
        cwd=tmp_path_factory.mktemp("served"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # uvicorn logs this line once it listens
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail(f"batchkit serve exited: {proc.wait()}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def run_page(page: Path, tmp_path: Path, server: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``page``'s blocks in a fresh process in ``tmp_path``, warnings as errors."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if server is not None:
        env[docblocks.SERVER_ENV] = server
    return subprocess.run(
        [sys.executable, "-W", "error", docblocks.__file__, str(page)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
    )


RUNNABLE = [page for page in PAGES if docblocks.blocks(page)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda page: page.name)
def test_page_python_blocks_run(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    needs_server = any("server" in block.marks for block in docblocks.blocks(page))
    server = request.getfixturevalue("docs_server") if needs_server else None
    out = run_page(page, tmp_path, server)
    if out.returncode == docblocks.SKIPPED:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0, f"a block of {page.name} failed:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_fences_are_python_or_shown_only(page: Path) -> None:
    for fence in docblocks.fences(page.read_text(encoding="utf-8")):
        assert fence.info == "python" or fence.info in SHOWN, (
            f"{page.name}:{fence.line}: fence {fence.info!r}: use `python` for a block that "
            f"runs, or one of {sorted(SHOWN)} for one that does not"
        )


def test_docs_runner_runs_blocks_in_order_in_one_namespace(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs: setup\nhidden = 40\n-->\n\n```python\nimport asyncio\nx = hidden + 1\n```\n\n"
        "```text\nnot run: 1/0\n```\n\n```python\nawait asyncio.sleep(0)\nprint(x + 1)\n```\n"
        "````text\n<!-- docs: setup\n1 / 0\n-->\n```python\n1 / 0\n```\n````\n"
    )
    out = run_page(page, tmp_path, None)
    assert (out.returncode, out.stdout) == (0, "42\n"), out.stderr


def test_docs_runner_points_server_blocks_at_the_server(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nprint('localhost:8000')\n```\n\n<!-- docs: server -->\n"
        "```python\nprint('localhost:8000', '127.0.0.1:8000')\n```\n"
    )
    out = run_page(page, tmp_path, "127.0.0.1:5")
    assert out.stdout.splitlines() == ["localhost:8000", "127.0.0.1:5 127.0.0.1:5"], out.stderr


def test_docs_runner_fails_a_failing_block_and_names_its_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# a page\n\n```python\nok = 1\n```\n\n```python\n\n1 / 0\n```\n")
    out = run_page(page, tmp_path, None)
    assert out.returncode == 1
    assert f'File "{page}", line 9' in out.stderr and "ZeroDivisionError" in out.stderr


def test_packaging_metadata() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    # PEP 639: with a license expression, license classifiers are deprecated (some tools refuse).
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "batchkit developers" in (ROOT / "LICENSE").read_text()
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(project["urls"])
    # The classifiers list every minor version from requires-python's floor, and none below.
    floor = int(re.fullmatch(r">=3\.(\d+)", project["requires-python"]).group(1))  # type: ignore[union-attr]
    minors = sorted(
        int(c.rsplit(".", 1)[1])
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert minors == list(range(floor, minors[-1] + 1)), minors
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog") and "## [Unreleased]" in changelog
    extras = project["optional-dependencies"]
    # bench drives servers with tritonclient.http only: no gRPC; both CLI commands that plot
    # (bench --plot, profile --plot) get matplotlib from their extra.
    assert [d for d in extras["bench"] if "tritonclient" in d] == ["tritonclient[http]>=2.40"]
    assert "grpc" not in " ".join(extras["bench"])
    for extra in ("bench", "profile", "notebook"):
        assert any(d.startswith("matplotlib") for d in extras[extra]), extra
    assert "grpc" in extras["triton"][0]
    assert any(d.startswith("fastapi") for d in extras["dev"])


def test_bench_imports_no_grpc() -> None:
    """What the bench extra leaves out (gRPC), the bench command's load generator never imports."""
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("numpy")
    code = (
        "import sys; import batchkit._cli._bench, batchkit._cli._loadgen; "
        "print(sorted(m for m in sys.modules if 'grpc' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "[]\n"), out.stderr


def test_docs_runner_fails_a_page_that_leaves_files_unclosed(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nleft_open = open(__file__)\n```\n")
    out = run_page(page, tmp_path, None)
    assert out.returncode == 1 and "ResourceWarning" in out.stderr, out.stderr


def shell_blocks(page: str) -> list[str]:
    """Return the ``sh`` blocks of a page, with ``batchkit`` run by this interpreter."""
    text = (ROOT / "docs" / page).read_text()
    found = [fence.body for fence in docblocks.fences(text) if fence.info == "sh"]
    return [body.replace("batchkit pipe", f"{sys.executable} -m batchkit pipe") for body in found]


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_pipe_md_jq_pipeline_keeps_the_outputs_in_item_order(tmp_path: Path) -> None:
    """docs/pipe.md's jq example, run as written with the real jq, on a real pipe server."""
    if shutil.which("jq") is None:
        pytest.skip("needs jq")
    (command,) = [block for block in shell_blocks("pipe.md") if "jq " in block]
    (tmp_path / "mymodule.py").write_text(
        "from batchkit import batched\n\n"
        "@batched(max_batch_size=8)\n"
        "def embed(texts):\n"
        "    return [[len(t), t.upper()] if isinstance(t, str) else ValueError(t) for t in texts]\n"
    )
    items = ["a", "bb", {"not": "text"}, "dddd", *(f"x{i}" for i in range(40))]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    out = run_shell(command, tmp_path)
    assert out.returncode == 0, out.stderr
    expected = [None if isinstance(i, dict) else [len(i), i.upper()] for i in items]
    assert [json.loads(line) for line in out.stdout.splitlines()] == expected


def test_pipe_md_shell_session_prints_what_the_page_shows(tmp_path: Path) -> None:
    (session,) = [block for block in shell_blocks("pipe.md") if block.startswith("$ ")]
    command, *shown = session.replace("\\\n", "").splitlines()
    out = run_shell(command.removeprefix("$ "), ROOT)
    assert out.returncode == 0, out.stderr
    # Responses come in completion order: the immediate answers first, the model's after.
    assert out.stdout.splitlines()[:2] == shown[:2]
    assert sorted(out.stdout.splitlines()) == sorted(shown)


def documented_parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, object]:
    """Return a stub's parameters: name -> literal default (``...``: none, or not a literal)."""
    args = node.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    pairs = list(zip(positional, [*defaults, *args.defaults], strict=True))
    pairs += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    found: dict[str, object] = {}
    for arg, default in pairs:
        try:
            found[arg.arg] = ast.literal_eval(default) if default is not None else ...
        except ValueError:
            found[arg.arg] = ...
    for extra in (args.vararg, args.kwarg):
        if extra is not None:
            found[extra.arg] = ...
    return found


def real_parameters(fn: Any) -> dict[str, object]:
    """Return ``fn``'s parameters, a ``**settings: Unpack[TypedDict]`` expanded to its keys."""
    found: dict[str, object] = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is param.VAR_KEYWORD and "Unpack" in str(param.annotation):
            typed = re.search(r"Unpack\[(\w+)\]", str(param.annotation)).group(1)  # type: ignore[union-attr]
            found.update(dict.fromkeys(fn.__globals__[typed].__annotations__, ...))
        else:
            found[name] = ... if param.default is param.empty else param.default
    return found


def same_parameters(stub: ast.FunctionDef | ast.AsyncFunctionDef, fn: Any, where: str) -> None:
    documented, real = documented_parameters(stub), real_parameters(fn)
    documented.pop("cls", None)  # a classmethod, read through its class
    assert list(documented) == list(real) or set(documented) == set(real) > set(), (
        f"{where}: documented {list(documented)}, real {list(real)}"
    )
    for name, default in documented.items():
        if default is not ... and real[name] is not ...:
            assert real[name] == default, f"{where}: {name}={real[name]!r}, documented {default!r}"


def test_api_reference_signatures_match_the_code() -> None:
    """docs/api.md's reference stubs (``text`` blocks) name the real parameters and fields."""
    import batchkit

    checked = 0
    text = (ROOT / "docs" / "api.md").read_text()
    for fence in docblocks.fences(text):
        if fence.info != "text":
            continue
        try:
            tree = ast.parse(fence.body)
        except SyntaxError:  # a stub with `...same...` in it
            continue
        where = f"api.md:{fence.line}"
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.args.args[:1] and node.args.args[0].arg == "self":
                    same_parameters(node, getattr(batchkit.BatchedModel, node.name), where)
                    checked += 1
            elif isinstance(node, ast.ClassDef):
                cls = getattr(batchkit, node.name)
                if dataclasses.is_dataclass(cls):
                    fields = [n.target.id for n in node.body if isinstance(n, ast.AnnAssign)]  # type: ignore[union-attr]
                    assert fields == [f.name for f in dataclasses.fields(cls)], where
                    checked += 1
                for method in node.body:
                    if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
                        real = inspect.getattr_static(cls, method.name)
                        if not isinstance(real, property):
                            same_parameters(method, getattr(cls, method.name), where)
                            checked += 1
    assert checked >= 25, checked
