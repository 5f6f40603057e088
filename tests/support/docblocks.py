"""Find the Python code blocks of a Markdown page and run them, in order, as the page shows them.

``tests/test_docs.py`` runs every page this way, each in its own process
(``python tests/support/docblocks.py PAGE``); docs/contributing.md says how to write blocks:

- A fence whose info string is exactly ``python`` is run. Every other fence (``text``,
  ``console``, ``pycon``, ``bash``, ``json``...) is shown only; a Python fragment that cannot run
  on its own belongs in one of those.
- The blocks of one page share one namespace and run in page order, so a block may use what an
  earlier one defined. They run like notebook cells: top-level ``await`` works, on one asyncio
  event loop kept for the whole page.
- ``<!-- docs: server -->`` on the line before a block: the block needs a KServe v2 server.
  The test starts a real ``batchkit serve`` (the demo model ``demo``, FP32[16] in and out) and
  every ``localhost:8000`` and ``127.0.0.1:8000`` in the block is pointed at it.
- ``<!-- docs: setup`` on a line of its own, then code, then ``-->``: code the reader does not
  see (a stand-in for their model or data), run where it stands. ``<!-- docs: check`` is the
  same, for asserts after a block that prove what its comments say (``# 9``).

A failing block exits the process with status 1 and a traceback that names the page and the
line; a block that imports a missing optional library (numpy, torch...) exits with status 77,
which the test reports as a skip.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import os
import re
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

SERVER_ENV = "BATCHKIT_DOCS_SERVER"
SKIPPED = 77
# Libraries a page may need that a lighter install lacks: a block importing one of these skips.
OPTIONAL = frozenset(
    {
        "fastapi",
        "IPython",
        "matplotlib",
        "numpy",
        "prometheus_client",
        "rich",
        "starlette",
        "torch",
        "trio",
        "tritonclient",
        "uvicorn",
    }
)
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
MARK = re.compile(r"^<!--\s*docs:\s*([a-z][a-z ]*?)\s*-->\s*$")
SETUP = re.compile(r"^<!--\s*docs:\s*(setup|check)\s*$")
PLACEHOLDERS = ("localhost:8000", "127.0.0.1:8000")


@dataclass(frozen=True)
class Block:
    """One block to run: where it starts (1-based line of its first code line) and its code."""

    page: Path
    line: int
    code: str
    marks: frozenset[str]
    hidden: bool = False


@dataclass(frozen=True)
class Fence:
    """A fenced block of any language: its opening line, info string and body."""

    line: int
    info: str
    body: str
    marks: frozenset[str]
    end: int  # the line of the closing fence


def fences(text: str) -> list[Fence]:
    """Return every fenced block of ``text``, with the marks on the line before it."""
    lines = text.splitlines()
    found: list[Fence] = []
    marks: frozenset[str] = frozenset()
    index = 0
    while index < len(lines):
        line = lines[index]
        fence, mark = FENCE.match(line), MARK.match(line)
        if mark:
            marks = frozenset(mark.group(1).split())
        elif fence:
            indent, closing, info = fence.groups()
            end = index + 1
            while end < len(lines) and not lines[end].strip().startswith(closing):
                end += 1
            body = "".join(text[len(indent) :] + "\n" for text in lines[index + 1 : end])
            found.append(Fence(index + 1, info, body, marks, end + 1))
            index = end
        if not mark and line.strip():
            marks = frozenset()
        index += 1
    return found


def blocks(page: Path) -> list[Block]:
    """Return the blocks of ``page`` to run, in order (see the module docstring)."""
    text = page.read_text(encoding="utf-8")
    found = [
        Block(page, fence.line + 1, fence.body, fence.marks)
        for fence in fences(text)
        if fence.info == "python"
    ]
    lines = text.splitlines()
    inside = {n for fence in fences(text) for n in range(fence.line, fence.end + 1)}
    for index, line in enumerate(lines):
        if SETUP.match(line) and index + 1 not in inside:
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "-->")
            code = "".join(text + "\n" for text in lines[index + 1 : end])
            found.append(Block(page, index + 2, code, frozenset(), hidden=True))
    return sorted(found, key=lambda block: block.line)


def prepare(block: Block, server: str | None) -> str:
    """Return the code to run for ``block``: the server's address put in where it needs one."""
    code = block.code
    if "server" in block.marks:
        if server is None:
            raise RuntimeError(f"{block.page}:{block.line} needs a server ({SERVER_ENV} unset)")
        for placeholder in PLACEHOLDERS:
            code = code.replace(placeholder, server)
    return code


def run(page: Path, server: str | None = None) -> None:
    """Run the blocks of ``page`` in one namespace, on one event loop; raise what a block raises.

    Each block is compiled under the page's file name with its lines where the page has them,
    so a traceback points at the page.
    """
    unraisable: list[str] = []
    sys.unraisablehook = lambda hook: unraisable.append(
        f"{hook.exc_type.__name__}: {hook.exc_value}"
    )
    module = types.ModuleType("__docs__")
    module.__file__ = str(page)
    sys.modules["__docs__"] = module
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        for block in blocks(page):
            source = "\n" * (block.line - 1) + prepare(block, server)
            code = compile(source, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if code.co_flags & inspect.CO_COROUTINE:
                loop.run_until_complete(eval(code, module.__dict__))
            else:
                exec(code, module.__dict__)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    sys.modules.pop("__docs__", None)
    module.__dict__.clear()
    gc.collect()
    if unraisable:  # what a page leaves to the garbage collector, unclosed files included
        raise RuntimeError(f"{page.name}: exceptions ignored in __del__: {unraisable}")


def main(argv: list[str]) -> int:
    """Run one page (``argv[0]``); the server's address comes from ``$BATCHKIT_DOCS_SERVER``."""
    page = Path(argv[0]).resolve()
    try:
        run(page, os.environ.get(SERVER_ENV))
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in OPTIONAL:
            print(f"{page.name} needs {exc.name}", file=sys.stderr)
            return SKIPPED
        traceback.print_exc()
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
