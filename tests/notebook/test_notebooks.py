"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel, and are stored clean.

Each notebook is executed by nbclient in an ipykernel running this interpreter (a kernelspec
made for the test, so an unrelated "python3" kernel installed on the machine is never used),
in a temporary directory. A cell error, or anything a cell writes to stderr (a warning, a
traceback printed by a thread), fails the test.

The notebooks are stored with their outputs cleared: no stale errors, no machine-specific
figures in the repository. Clear them before committing (Jupyter: "Clear All Outputs").
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "batchkit-tests"

# What each notebook needs beyond the notebook extra, skipped when missing.
NEEDS = {
    "quickstart.ipynb": ["torch"],
    "profiling.ipynb": ["torch", "matplotlib"],
    "swapping.ipynb": ["torch"],
    "serving.ipynb": ["uvicorn", "tritonclient.http", "numpy"],
}


def test_every_notebook_is_listed() -> None:
    assert {p.name for p in NOTEBOOKS} == set(NEEDS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    book = json.loads(path.read_text())
    assert book["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(book["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has stored outputs"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has a count"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec that runs ipykernel on this interpreter, found first on JUPYTER_PATH."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    data = tmp_path_factory.mktemp("jupyter")
    spec = data / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(data))
        mp.setenv("JUPYTER_PLATFORM_DIRS", "1")
        mp.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # no debugger notice on stderr
        mp.setenv("MPLBACKEND", "agg")
        yield KERNEL


def problems(book: Any) -> list[str]:
    """Return every error and stderr output of the executed ``book``."""
    found = []
    for i, cell in enumerate(book.cells):
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                found.append(f"cell {i}: {out['ename']}: {out['evalue']}")
            elif out["output_type"] == "stream" and out["name"] == "stderr":
                found.append(f"cell {i} stderr: {out['text']}")
    return found


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path: Path, kernel: str, tmp_path: Path) -> None:
    for module in NEEDS[path.name]:
        pytest.importorskip(module)
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    client = NotebookClient(
        book,
        kernel_name=kernel,
        timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    assert not problems(book), "\n".join(problems(book))
    assert elapsed < 120, f"{path.name} took {elapsed:.0f} s"
