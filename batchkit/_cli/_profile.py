"""``batchkit profile``: the notebook profiler from the command line, with a rich table."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import _render
from .._core import BatchedModel, ConfigurationError
from .._target import _takes_no_arguments, import_target, models_of
from ..notebook._progress import Progress, TextProgress
from ..notebook._result import ProfileResult
from ..notebook._sweep import profile

__all__ = ("add_parser", "parse_seconds", "run")

_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def add_parser(subparsers: Any) -> None:
    """Add the ``profile`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "profile",
        help="sweep batch size, wait and concurrency on a model; recommend settings",
        description="Sweep max_batch_size, max_wait, max_concurrency and the number of "
        "concurrent callers on a model, print throughput and latency for each point, and "
        "recommend the settings with the best throughput within a latency target. Durations "
        "are seconds, or take a unit: 20ms, 500us, 0.02s. Exits 1 when a latency target is "
        "given and no point meets it.",
    )
    parser.add_argument(
        "target",
        help="MODULE:ATTR naming a BatchedModel (or a factory or collection of them: pick one "
        "with --model), or a model function over a list of items",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--inputs", metavar="MODULE:ATTR", help="sample items: a sequence, or a factory of one"
    )
    source.add_argument(
        "--inputs-file", metavar="PATH", help="sample items: a JSON array, or JSON lines"
    )
    parser.add_argument("--model", help="the model's name, when TARGET holds several")
    parser.add_argument(
        "--max-batch-size",
        type=_ints,
        default=(1, 4, 16, 64),
        metavar="N,...",
        help="max_batch_size values (default: 1,4,16,64)",
    )
    parser.add_argument(
        "--max-wait",
        type=_durations,
        default=(0.0,),
        metavar="T,...",
        help="max_wait values (default: 0)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_ints,
        default=(1,),
        metavar="N,...",
        help="max_concurrency values (default: 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=_ints,
        default=(1, 8, 64),
        metavar="N,...",
        help="concurrent callers, the load (default: 1,8,64)",
    )
    parser.add_argument(
        "--requests", type=int, default=256, help="measured calls per point (default: 256)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="calls per point before measuring (default: one per caller)",
    )
    parser.add_argument(
        "--latency-target",
        type=parse_seconds,
        metavar="T",
        help="recommend the best throughput with this latency, e.g. 20ms",
    )
    parser.add_argument(
        "--percentile",
        choices=("p50", "p90", "p99"),
        default="p99",
        help="the latency the target bounds (default: p99)",
    )
    parser.add_argument("--csv", metavar="PATH", help="also write the points as CSV")
    parser.add_argument("--plot", metavar="PATH", help="also save the plots (needs matplotlib)")
    parser.add_argument(
        "--json", action="store_true", help="print the points as JSON instead of a table"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table (or JSON), write the exports; return the exit status."""
    if args.plot:  # checked before the sweep, not after it
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            need = "--plot needs matplotlib: pip install 'batchkit[notebook]'"
            print(f"batchkit profile: error: {need}", file=sys.stderr)
            return 2
    try:
        fn = _model_of(import_target(args.target), args.model)
        inputs = _inputs(args)
        progress = None if args.no_progress else _progress()
        result = profile(
            fn,
            inputs,
            max_batch_size=args.max_batch_size,
            max_wait=args.max_wait,
            max_concurrency=args.max_concurrency,
            concurrency=args.concurrency,
            requests=args.requests,
            warmup=args.warmup,
            latency_target=args.latency_target,
            percentile=args.percentile,
            progress=progress or False,
        )
        if progress is not None and hasattr(progress, "close"):
            progress.close()
    except ConfigurationError as exc:
        print(f"batchkit profile: error: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        result.to_csv(args.csv)
    if args.plot:
        result.plot().savefig(args.plot)
    if args.json:
        print(json.dumps(result.to_dicts(), indent=2))
    else:
        _print(result)
    met = args.latency_target is None or result.recommendation is not None
    return 0 if met else 1


def parse_seconds(text: str) -> float:
    """Parse a duration: seconds (``0.02``), or with a unit (``20ms``, ``500us``, ``1s``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration such as 20ms or 0.02, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def _durations(text: str) -> tuple[float, ...]:
    return tuple(parse_seconds(part) for part in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def _model_of(obj: Any, name: str | None) -> Callable[..., Any] | BatchedModel[Any, Any]:
    """Return the model to profile from what TARGET names."""
    if callable(obj) and not isinstance(obj, BatchedModel) and not _takes_no_arguments(obj):
        if name is not None:
            raise ConfigurationError(f"--model {name!r} needs a TARGET holding models, got {obj!r}")
        function: Callable[..., Any] = obj  # a model function over a list of items
        return function
    models = models_of(obj)
    if name is not None:
        if name not in models:
            raise ConfigurationError(f"no model named {name!r}; the target holds {sorted(models)}")
        return models[name]
    if len(models) > 1:
        raise ConfigurationError(
            f"the target holds several models, pick one with --model: {sorted(models)}"
        )
    return next(iter(models.values()))


def _inputs(args: argparse.Namespace) -> list[Any]:
    if args.inputs is not None:
        obj = import_target(args.inputs)
        if callable(obj) and _takes_no_arguments(obj):
            obj = obj()
        if isinstance(obj, (str, bytes, Mapping)) or not isinstance(obj, Iterable):
            raise ConfigurationError(f"--inputs must name a sequence of items, got {obj!r}")
        return list(obj)
    try:
        with open(args.inputs_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read --inputs-file {args.inputs_file!r}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"--inputs-file {args.inputs_file!r} is neither a JSON array nor JSON lines: {exc}"
            ) from None
    if not isinstance(data, list):
        raise ConfigurationError(
            f"--inputs-file {args.inputs_file!r} must hold a JSON array of items, "
            f"got {type(data).__name__}"
        )
    return data


def _progress() -> Progress | None:
    if not sys.stderr.isatty():
        return None
    try:
        return _RichProgress()
    except ImportError:
        return TextProgress()


class _RichProgress:
    """A rich progress bar on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress as Bar

        self._bar = Bar(console=Console(file=sys.stderr), transient=True)
        self._task = self._bar.add_task("profiling", total=None)
        self._bar.start()

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        self._bar.stop()


def _print(result: ProfileResult) -> None:
    try:
        from rich.console import Console
    except ImportError:
        print(_plain(result.table()))
        return
    console = Console()
    table = result.table()
    headers = _render.fit_headers(table.headers, table.rows, console.width)
    table = dataclasses.replace(table, headers=headers)  # whole words on a narrow terminal
    console.print(_render.tables_rich([table], title=f"batchkit profile of {result.name!r}"))


def _plain(table: _render.Table) -> str:
    """Return ``table`` as fixed-width text (without rich)."""
    rows = [list(table.headers), *[list(r) for r in table.rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        mark = "*" if table.highlight is not None and i - 1 == table.highlight else " "
        lines.append(mark + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join([*lines, table.note])
