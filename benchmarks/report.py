"""Write docs/benchmarks.md from a pytest-benchmark JSON file.

Usage: ``python benchmarks/report.py .benchmarks/latest.json [MORE.json ...] docs/benchmarks.md``

Several JSON files merge into one report: the first gives the machine section, and a scenario
from a later file (the Triton benchmark of ``nox -s triton``, say) says which run it came from.

Every figure, target and verdict comes from the JSON: the benchmarks record what they measured in
``extra_info`` (see ``benchmarks/_measure.py``), and the machine and commit come from the JSON's
``machine_info`` and ``commit_info``. Nothing here is typed by hand but the words around them.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

MICRO = "\u00b5"
OPS = {"<=": "\u2264", ">=": "\u2265"}

REPRODUCE = (
    "nox -s bench",
    "# or, in a virtualenv with the dev, numpy, torch, server, metrics and bench extras:",
    "pytest benchmarks -p no:cacheprovider --benchmark-json=.benchmarks/latest.json",
    "python benchmarks/report.py .benchmarks/latest.json docs/benchmarks.md",
    "# scenarios 9 and 12b (Triton) run in `nox -s triton`, which writes .benchmarks/triton.json;",
    "# `nox -s bench` merges that file into this page when it exists",
)


def fmt(value: float, unit: str) -> str:
    """Format a figure for the table by its unit."""
    if unit == "us":
        return f"{value:,.2f} {MICRO}s"
    if unit == "ms":
        return f"{value:,.3f} ms"
    if unit == "items/s":
        return f"{value:,.0f} items/s"
    if unit == "x":
        return f"{value:,.2f}x"
    if unit == "%":
        return f"{value:,.1f} %"
    if unit == "items":
        return f"{value:,.1f}"
    return f"{value:,.4g} {unit}".rstrip()


def machine_section(data: dict[str, Any], source: str) -> list[str]:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    cpu = machine.get("cpu", {}) or {}
    when = data.get("datetime")
    date = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC") if when else "unknown"
    commit_id = str(commit.get("id") or "unknown")[:10]
    if commit.get("dirty"):
        commit_id += " plus uncommitted changes"
    load_start = machine.get("load_average_start")
    load_end = machine.get("load_average_end")
    rows = [
        ("date", date),
        ("commit", f"{commit_id} ({commit.get('branch', '?')})"),
        ("batchkit", str(machine.get("batchkit_version", "unknown"))),
        (
            "Python",
            f"{machine.get('python_version', '?')} ({machine.get('python_implementation', '?')})",
        ),
        ("torch", str(machine.get("torch_version") or "not installed")),
        ("platform", str(machine.get("platform") or machine.get("system", "?"))),
        (
            "CPU",
            f"{cpu.get('brand_raw') or machine.get('processor') or '?'}, "
            f"{machine.get('cpu_count', cpu.get('count', '?'))} logical CPUs",
        ),
    ]
    for label, load in (("start", load_start), ("end", load_end)):
        if load:
            figures = ", ".join(f"{x:.2f}" for x in load)
            rows.append((f"load average at the run's {label} (1, 5, 15 min)", figures))
    lines = [
        "## Machine and run",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        f"Source: `{source}`, written by pytest-benchmark {data.get('version', '?')}.",
        "",
    ]
    return lines


# The ratios that matter, by scenario: (figure key, what it says). The values come from the run.
HEADLINES = {
    "dispatch": [
        ("batchkit_us_wall", "engine overhead per item (identity model, 1,000 callers)"),
        ("vs_baseline", "batchkit items/s vs a hand-written asyncio queue batcher"),
    ],
    "mlp_throughput": [("of_ceiling", "batchkit items/s vs the raw model on full batches")],
    "latency_async": [("added_p50", "low load: latency added to one async call, p50")],
    "latency_sync": [("added_p50", "low load: latency added to one `call_sync`, p50")],
    "sync_callers": [("vs_unbatched", "16 threads: batched vs each thread calling the model")],
    "swap_latency": [("swap_ratio", "p99 with a swap every 200 ms vs steady p99 (54 MB MLP)")],
    "serving": [
        ("trivial_rps", "HTTP server, trivial model, 32 in flight: requests/s"),
        ("trivial_p99", "HTTP server, trivial model, 32 in flight: p99"),
        ("mlp_speedup", "HTTP server, MLP: batched vs unbatched requests/s"),
    ],
    "triton": [("vs_direct", "64 callers to Triton: through batchkit vs one request per row")],
    "grpc": [
        ("grpc_rps", "gRPC server, trivial model, 32 in flight: requests/s"),
        ("grpc_vs_http", "gRPC vs HTTP requests/s, same server, same run"),
    ],
    "grpc_triton": [
        ("grpc_vs_triton", "batchkit gRPC vs Triton's gRPC requests/s, same run"),
        ("p99_vs_triton", "batchkit gRPC p99 vs Triton's gRPC p99"),
    ],
    "bench_compare": [
        ("speedup_32", "`batchkit bench --compare`, 32 in flight: batched vs unbatched"),
        ("batched_p99_32", "`batchkit bench --compare`, 32 in flight: batched p99"),
    ],
}


def headline_section(benches: list[dict[str, Any]]) -> list[str]:
    lines = ["## Headline figures", "", "| scenario | figure | value |", "| --- | --- | --- |"]
    for info in benches:
        figures = {f["key"]: f for f in info["figures"]}
        for key, label in HEADLINES.get(info["scenario"], []):
            if key in figures:
                fig = figures[key]
                lines.append(
                    f"| {info.get('number', '')} | {label} | {fmt(fig['value'], fig['unit'])} |"
                )
    lines.append("")
    return lines


def verdict(target: dict[str, Any]) -> str:
    return "met" if target["met"] else "**not met**"


def summary_section(benches: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "| scenario | target | measured | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for info in benches:
        figures = {f["key"]: f for f in info["figures"]}
        for target in info["targets"]:
            fig = figures[target["key"]]
            lines.append(
                f"| {heading(info)} | {target['label']} {OPS[target['op']]} "
                f"{fmt(target['threshold'], fig['unit'])} | {fmt(fig['value'], fig['unit'])} "
                f"| {verdict(target)} |"
            )
    lines.append("")
    return lines


def heading(info: dict[str, Any]) -> str:
    return f"{info['number']}. {info['title']}" if info.get("number") else info["title"]


def scenario_section(info: dict[str, Any]) -> list[str]:
    lines = [f"## {heading(info)}", ""]
    lines += [f"- {line}" for line in info["setup"]]
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {f['label']} | {fmt(f['value'], f['unit'])} |" for f in info["figures"]]
    lines.append("")
    for dist in info["distributions"]:
        sizes = ", ".join(f"{size}: {n}" for size, n in dist["sizes"].items())
        lines.append(f"{dist['label']} (size: batches): {sizes or 'none'}")
        lines.append("")
    figures = {f["key"]: f for f in info["figures"]}
    for target in info["targets"]:
        fig = figures[target["key"]]
        lines.append(
            f"Target: {target['label']} {OPS[target['op']]} "
            f"{fmt(target['threshold'], fig['unit'])}: {fmt(fig['value'], fig['unit'])}, "
            f"{verdict(target)}."
        )
        lines.append("")
    for note in info["notes"]:
        lines += [note, ""]
    load = info.get("load_average")
    if load:
        after = info.get("load_average_after") or [float("nan")]
        lines += [
            f"Load average (1 min) when this benchmark started and ended: {load[0]:.2f}, "
            f"{after[0]:.2f}.",
            "",
        ]
    return lines


def scenarios(data: dict[str, Any], source: str | None) -> list[dict[str, Any]]:
    """Return the scenarios of one JSON file; ``source`` names the run of a merged file."""
    found = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "scenario" not in info:
            continue
        if source is not None:
            commit = data.get("commit_info", {})
            when = data.get("datetime")
            date = datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC") if when else "?"
            info = dict(info, notes=[
                *info.get("notes", []),
                f"Measured in a separate run: `{source}`, {date}, commit "
                f"{str(commit.get('id') or 'unknown')[:10]}.",
            ])  # fmt: skip
        found.append(info)
    return found


def render(
    data: dict[str, Any], source: str, more: list[tuple[dict[str, Any], str]] | None = None
) -> str:
    benches = scenarios(data, None)
    for other, other_source in more or []:
        benches += scenarios(other, other_source)
    benches.sort(key=lambda info: info["order"])
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/report.py from pytest-benchmark's JSON; do not edit. -->",
        "",
        "Each benchmark measures what it compares in the same run, alternating between them, and "
        "reports ratios: absolute times drift on shared machines, ratios taken side by side much "
        "less. Reproduce with:",
        "",
        "```sh",
        *REPRODUCE,
        "```",
        "",
    ]
    lines += machine_section(data, source)
    if not benches:
        lines += ["No benchmark results in this run.", ""]
    else:
        lines += headline_section(benches)
        lines += summary_section(benches)
        for info in benches:
            lines += scenario_section(info)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(f"usage: {argv[0]} BENCHMARK_JSON [MORE_JSON ...] OUTPUT_MD", file=sys.stderr)
        return 2
    sources, output = [Path(a) for a in argv[1:-1]], Path(argv[-1])
    loaded = [(json.loads(p.read_text(encoding="utf-8")), p.as_posix()) for p in sources]
    (data, source), more = loaded[0], loaded[1:]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(data, source, more), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
