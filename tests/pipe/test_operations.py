"""The pipe's logs: the CLI configures them (text or JSON), model failures are logged once per
failed batch with the id of the line (docs/operations.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_pipe(*args: str, lines: list[dict[str, object]]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-W", "error", "-m", "batchkit", "pipe", *args]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    return subprocess.run(command, input=text, capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.timeout(60)
def test_a_model_failure_is_logged_as_json_with_the_line_id() -> None:
    lines: list[dict[str, object]] = [
        {"id": "ok", "input": 1},
        {"id": "boom-1", "input": "boom"},
        {"id": "neg", "input": -1},
    ]
    out = run_pipe("tests.support.pipe_targets:faulty", "--log-format", "json", lines=lines)
    assert out.returncode == 0, out.stderr
    answered = {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert answered["boom-1"]["error"]["type"] == "ModelError"
    records = [json.loads(line) for line in out.stderr.splitlines()]  # one object per line
    failures = {r["request_id"]: r for r in records if "exception" in r}
    assert set(failures) == {"boom-1", "neg"}  # the failed batch and the failed row
    boom = failures["boom-1"]
    assert boom["level"] == "ERROR" and boom["logger"] == "batchkit.pipe"
    assert (boom["model"], boom["version"]) == ("faulty", "7")
    assert "RuntimeError: boom in the batch" in boom["exception"]
    assert "ValueError: negative: -1" in failures["neg"]["exception"]
    assert any(r["message"].startswith("batchkit ") for r in records)  # the startup line


@pytest.mark.timeout(60)
def test_text_logs_carry_the_line_id() -> None:
    out = run_pipe("tests.support.pipe_targets:faulty", lines=[{"id": 42, "input": "boom"}])
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert "[42]" in line and "model 'faulty' version 7 failed" in line
    assert out.stderr.count("Traceback (most recent call last)") == 1
