"""``batchkit profile`` (``batchkit/_cli/_profile.py``): arguments, outputs and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchkit.__main__ import main
from batchkit._cli._profile import _plain, parse_seconds
from batchkit.notebook import ProfileResult

MODULE = textwrap.dedent(
    """
    from batchkit import BatchedModel, batched

    def double_all(items):
        return [2 * i for i in items]

    @batched(max_batch_size=8)
    def model(items):
        return double_all(items)

    other = BatchedModel(double_all, name="other")
    both = [model, other]
    SAMPLES = list(range(10))

    def make_samples():
        return [1, 2, 3]

    def flaky_all(items):
        return [ValueError("odd") if i % 2 else 2 * i for i in items]

    flaky = BatchedModel(flaky_all, name="flaky")

    def noted_all(items):
        open("called", "w").close()
        return items

    noted = BatchedModel(noted_all, name="noted")
    """
)

FAST = ["--max-batch-size", "1,4", "--concurrency", "1,4", "--requests", "8", "--no-progress"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory holding ``cli_models.py``, as the current directory (importable)."""
    (tmp_path / "cli_models.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("cli_models", None)


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    assert main(["profile", *args, *FAST, "--json"]) == 0
    rows: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return rows


def test_profile_prints_every_point_as_json(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = run_json(["cli_models:model", "--inputs", "cli_models:SAMPLES"], capsys)
    assert [(r["max_batch_size"], r["concurrency"]) for r in rows] == [
        (1, 1),
        (1, 4),
        (4, 1),
        (4, 4),
    ]
    assert all(r["errors"] == 0 and r["requests"] == 8 for r in rows)


def test_profile_prints_a_table_with_the_recommendation(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "profile",
            "cli_models:model",
            "--inputs",
            "cli_models:SAMPLES",
            *FAST,
            "--latency-target",
            "10s",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "batchkit profile of 'model'" in out
    assert "best throughput with p99 \u2264 10,000 ms" in out


def test_profile_exits_1_when_no_point_meets_the_target(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "profile",
            "cli_models:model",
            "--inputs",
            "cli_models:SAMPLES",
            *FAST,
            "--latency-target",
            "1e-9s",
        ]
    )
    assert code == 1
    assert "no setting met p99" in capsys.readouterr().out


def test_profile_writes_csv_and_plot(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    args = ["profile", "cli_models:model", "--inputs", "cli_models:SAMPLES", *FAST]
    assert main([*args, "--csv", "out.csv", "--plot", "out.png"]) == 0
    lines = (project / "out.csv").read_text().splitlines()
    assert lines[0].startswith("max_batch_size,max_wait,max_concurrency,concurrency,")
    assert len(lines) == 5
    assert (project / "out.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        ("cli_models:double_all", []),  # a plain model function
        ("cli_models:both", ["--model", "other"]),  # a collection: pick one
    ],
)
def test_profile_accepts_functions_and_collections(
    project: Path, capsys: pytest.CaptureFixture[str], target: str, extra: list[str]
) -> None:
    rows = run_json([target, "--inputs", "cli_models:make_samples", *extra], capsys)
    assert len(rows) == 4


@pytest.mark.parametrize("content", ["[1, 2, 3]", "1\n2\n\n3\n"], ids=["json array", "json lines"])
def test_profile_reads_inputs_from_a_file(
    project: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    (project / "inputs.json").write_text(content)
    rows = run_json(["cli_models:model", "--inputs-file", "inputs.json"], capsys)
    assert len(rows) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cli_models:nope", "--inputs", "cli_models:SAMPLES"], "has no attribute 'nope'"),
        (["cli_models:model", "--inputs", "cli_models:model"], "must name a sequence of items"),
        (["cli_models:both", "--inputs", "cli_models:SAMPLES"], "pick one with --model"),
        (
            ["cli_models:both", "--inputs", "cli_models:SAMPLES", "--model", "x"],
            "no model named 'x'",
        ),
        (["cli_models:model", "--inputs-file", "missing.json"], "cannot read --inputs-file"),
        (
            ["cli_models:model", "--inputs", "cli_models:SAMPLES", "--requests", "0"],
            "requests must be an int >= 1, got 0",
        ),
    ],
)
def test_profile_errors_exit_2_with_the_reason(
    project: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["profile", *args, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_file_exits_2(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "bad.json").write_text("{not json")
    assert main(["profile", "cli_models:model", "--inputs-file", "bad.json"]) == 2
    assert "neither a JSON array nor JSON lines" in capsys.readouterr().err
    (project / "obj.json").write_text('{"a": 1}')
    assert main(["profile", "cli_models:model", "--inputs-file", "obj.json"]) == 2
    assert "must hold a JSON array of items, got dict" in capsys.readouterr().err


def test_argument_errors_are_usage_errors(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["profile", "cli_models:model", "--inputs", "x:y", "--max-wait", "2xs"])
    assert exc.value.code == 2
    assert "expected a duration such as 20ms or 0.02, got '2xs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "cli_models:model"])  # no inputs
    assert "one of the arguments --inputs --inputs-file is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0.02", 0.02), ("20ms", 0.02), ("500us", 0.0005), ("2s", 2.0), (" 1e-3 ", 0.001)],
)
def test_parse_seconds(text: str, seconds: float) -> None:
    assert parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ms", "-1", "1h", "1,5"])
def test_parse_seconds_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration"):
        parse_seconds(text)


def test_python_dash_m_batchkit_profile(project: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "batchkit",
            "profile",
            "cli_models:model",
            "--inputs",
            "cli_models:SAMPLES",
            *FAST,
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "batchkit profile of 'model'" in out.stdout


def test_plain_table_without_rich() -> None:
    from tests.notebook.test_profile import point

    result = ProfileResult("m", (point(8, 4, 500.0, 0.010), point(32, 16, 900.0, 0.030)))
    lines = _plain(result.table()).splitlines()
    assert lines[0].split() == [
        "max",
        "batch",
        "callers",
        "items/s",
        "mean",
        "batch",
        "p50",
        "ms",
        "p99",
        "ms",
    ]
    assert lines[1].split() == ["8", "4", "500", "8.0", "5.00", "10.0"]
    assert lines[2].startswith("*")  # the recommendation
    assert lines[2].split()[1:] == ["32", "16", "900", "32.0", "15.0", "30.0"]
    assert lines[3].startswith("best throughput: max_batch_size=32")


def run_cli(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "batchkit", "profile", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_the_table_shows_every_header_word_on_80_columns(project: Path) -> None:
    pytest.importorskip("rich")
    sweep = ["--max-wait", "0,1ms", "--max-concurrency", "1,2", "--concurrency", "4"]
    args = ["cli_models:flaky", "--inputs", "cli_models:SAMPLES", "--requests", "8", *sweep]
    path = os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")])
    out = run_cli(project, *args, "--no-progress", env={"COLUMNS": "80", "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 80 for line in out.stdout.splitlines()), out.stdout
    header = "max batch max wait ms max conc callers items/s mean batch p50 ms p99 ms errors"
    assert set(header.split()) <= set(out.stdout.split()), out.stdout
    assert "\u2026" not in out.stdout  # nothing cut short with an ellipsis


def test_plot_without_matplotlib_fails_before_measuring(project: Path) -> None:
    shim = project / "no_matplotlib"
    (shim / "matplotlib").mkdir(parents=True)
    (shim / "matplotlib" / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    path = os.pathsep.join([str(shim), str(project), os.environ.get("PYTHONPATH", "")])
    args = ["cli_models:noted", "--inputs", "cli_models:SAMPLES", *FAST, "--plot", "out.png"]
    out = run_cli(project, *args, env={"PYTHONPATH": path})
    assert out.returncode == 2
    assert "--plot needs matplotlib" in out.stderr
    assert not (project / "called").exists()  # the model never ran: nothing was measured
