"""Developer tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s bench`,
`nox -s triton`.

Every session installs through constraints.txt, which pins torch to the CPU build these machines
carry (any other torch pulls several GB of CUDA packages). torch is installed first, on its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox
import nox.command

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")
# The lanes to turn off for each extra run of tests/core: none left, then plain, staging and
# inline (with the sync callers beside it) each alone.
LANE_PLANS = ("all", "staging,inline,side", "plain,inline,side", "plain,staging")


def install(session: nox.Session, *extras: str, torch: bool = False) -> None:
    """Install the project with ``extras`` (torch first, when asked) under the constraints."""
    if torch:
        session.install(*CONSTRAINTS, "torch")
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install(*CONSTRAINTS, "-e", spec)


def ensure_redis(session: nox.Session) -> None:
    """Install redis-server from Debian's packages when missing (the gateway's Redis tests
    skip, saying so, where that is not possible)."""
    if shutil.which("redis-server") is not None or shutil.which("apt-get") is None:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        session.warn("redis-server is missing and apt-get needs root: the Redis tests skip")
        return
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        session.run(*sudo, "apt-get", "update", "-qq", external=True, env=env)
        session.run(
            *sudo, "apt-get", "install", "-y", "-qq", "redis-server", external=True, env=env
        )
    except nox.command.CommandFailed:
        session.warn("could not install redis-server: the Redis tests skip")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the whole test suite (typecheck included, as a test)."""
    install(
        session,
        *("dev", "numpy", "torch", "server", "metrics", "bench", "notebook", "onnx", "gateway"),
        torch=True,
    )
    ensure_redis(session)
    session.run("pytest", *session.posargs)
    if session.posargs:
        return
    # The engine's contract again under the other plans of its fast lanes: every lane off, and
    # each lane alone (the private switch of batchkit/_core/_plan.py; the run above had all on).
    for off in LANE_PLANS:
        session.run("pytest", "tests/core", "-q", env={"BATCHKIT_LANES_OFF": off})


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Run ruff over the project."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "batchkit", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """Run mypy --strict on batchkit/."""
    install(session, "dev", "rich", "notebook")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmarks and rewrite docs/benchmarks.md from the figures measured."""
    install(
        session,
        *("dev", "numpy", "torch", "server", "metrics", "bench", "onnx", "gateway"),
        torch=True,
    )
    session.run(
        "pytest",
        "benchmarks",
        "-p",
        "no:cacheprovider",
        "--benchmark-json=.benchmarks/latest.json",
        *session.posargs,
    )
    # The Triton scenario comes from `nox -s triton`, when it has run.
    triton = [".benchmarks/triton.json"] if Path(".benchmarks/triton.json").exists() else []
    session.run(
        "python", "benchmarks/report.py", ".benchmarks/latest.json", *triton, "docs/benchmarks.md"
    )


@nox.session(python="3.11")
def triton(session: nox.Session) -> None:
    """Run the Triton tests and benchmark against a real tritonserver, from nvidia-pytriton.

    pytriton bundles a CPU-capable tritonserver and pins numpy<2, hence its own virtualenv.
    The tests start the server on 127.0.0.1 and stop it by its PID.
    """
    install(session, "dev", "numpy", "server", "metrics", "triton")
    session.install(*CONSTRAINTS, "nvidia-pytriton")
    session.run(
        "pytest",
        "-m",
        "triton",
        "-p",
        "no:cacheprovider",
        "tests",
        "benchmarks/test_triton_throughput.py",
        "benchmarks/test_grpc_serving.py",
        "--benchmark-json=.benchmarks/triton.json",
        *session.posargs,
    )
    session.run(
        "python", "benchmarks/report.py", ".benchmarks/triton.json", ".benchmarks/triton.md"
    )
