"""Render models, statistics and tables as HTML (Jupyter) and as rich renderables (terminals).

Both renderers draw the same figures, taken once from a ``Statistics`` snapshot by the
``*_rows`` functions below. The HTML side uses only the standard library; rich is imported
inside the functions that build rich renderables, so importing this module stays light. The
core's ``_repr_html_`` and ``__rich__`` methods import this module when they are called, and
hand it plain data (a model's ``Settings``, a ``Statistics`` snapshot, a state word): nothing
here reaches back into the engine.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import DeploymentStatistics, LatencySummary, Settings, Statistics

__all__ = (
    "Table",
    "batch_size_rows",
    "fit_headers",
    "format_count",
    "format_ms",
    "format_rate",
    "in_kernel",
    "latency_rows",
    "split_table",
    "model_html",
    "model_rich",
    "model_tables",
    "notebook_output",
    "statistics_html",
    "statistics_rich",
    "statistics_tables",
    "tables_html",
    "tables_rich",
)

# Batch sizes are listed one by one up to this many distinct sizes, in power-of-two ranges above.
_MAX_SIZE_ROWS = 10
_BAR = "#4c78a8"
_HIGHLIGHT = "#e8f1e4"


@dataclass(frozen=True)
class Table:
    """A small table, drawn the same way in HTML and with rich.

    ``headers`` empty: a key/value table whose first cell in each row is its label. A row's
    last cell may be a bar: a fraction in [0, 1] given in ``bars`` by row index.
    """

    caption: str
    rows: Sequence[Sequence[str]]
    headers: Sequence[str] = ()
    bars: Mapping[int, float] = field(default_factory=dict)
    highlight: int | None = None
    note: str = ""


def in_kernel() -> bool:
    """Return whether this code runs in a Jupyter kernel (IPython with a kernel attached)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:  # never imported: not a kernel, and no reason to import it
        return False
    shell = ipython.get_ipython()
    return getattr(shell, "kernel", None) is not None


def notebook_output(html: str) -> Callable[[str], None]:
    """Show ``html`` in the running cell's output; return a function that replaces it in place.

    The function may be called from any thread (the kernel routes the update by display id).
    """
    ipd: Any = importlib.import_module("IPython.display")  # IPython's API is untyped
    handle = ipd.display(ipd.HTML(html), display_id=True)

    def update(new: str) -> None:
        if handle is not None:
            handle.update(ipd.HTML(new))

    return update


# -- figures ------------------------------------------------------------------------------------


def format_ms(seconds: float) -> str:
    """Format ``seconds`` as milliseconds with about three significant digits."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def format_count(n: int) -> str:
    """Format a count with thousands separators."""
    return f"{n:,}"


def format_rate(per_second: float) -> str:
    """Format a rate in items per second."""
    return f"{per_second:,.1f}" if per_second < 100 else f"{per_second:,.0f}"


def latency_rows(stats: Statistics) -> list[tuple[str, LatencySummary]]:
    """Return the latency summaries of ``stats`` with their labels."""
    return [
        ("queue wait", stats.queue_wait),
        ("compute (batch)", stats.compute),
        ("end to end", stats.end_to_end),
    ]


def batch_size_rows(batch_sizes: Mapping[int, int]) -> list[tuple[str, int]]:
    """Return (label, batches) for a histogram of batch sizes, in ranges when there are many."""
    sizes = sorted(batch_sizes)
    if len(sizes) <= _MAX_SIZE_ROWS:
        return [(str(size), batch_sizes[size]) for size in sizes]
    buckets: dict[int, int] = {}
    for size in sizes:
        top = 1 << max(0, size - 1).bit_length()  # the power of two at or above size
        buckets[top] = buckets.get(top, 0) + batch_sizes[size]
    rows = []
    for top, count in sorted(buckets.items()):
        low = top // 2 + 1
        rows.append((str(top) if low >= top else f"{low}\u2013{top}", count))
    return rows


def statistics_tables(stats: Statistics, *, extra: Sequence[tuple[str, str]] = ()) -> list[Table]:
    """Return the tables that show ``stats``; ``extra`` rows go at the end of the first one."""
    items = [
        ("submitted", format_count(stats.submitted)),
        ("completed", format_count(stats.completed)),
        ("failed", format_count(stats.failed)),
        ("expired", format_count(stats.expired)),
        ("cancelled", format_count(stats.cancelled)),
        ("rejected", format_count(stats.rejected)),
        ("queue depth", format_count(stats.queue_depth)),
        ("waiting for room", format_count(stats.waiting_for_room)),
        ("in-flight batches", format_count(stats.in_flight_batches)),
        *([("dispatch", "held (in-place swap)")] if stats.dispatch_held else []),
        *extra,
    ]
    latency = Table(
        "latency (ms)",
        [
            [label, format_ms(s.p50), format_ms(s.p90), format_ms(s.p99), format_ms(s.max)]
            for label, s in latency_rows(stats)
        ],
        headers=("", "p50", "p90", "p99", "max"),
        note=f"over the last {stats.end_to_end.count:,} items",
    )
    sizes = batch_size_rows(stats.batch_sizes)
    most = max((count for _, count in sizes), default=0)
    histogram = Table(
        "batch sizes",
        [[label, format_count(count)] for label, count in sizes],
        headers=("size", "batches"),
        bars={i: count / most for i, (_, count) in enumerate(sizes)} if most else {},
        note=f"{stats.batches:,} batches, mean size {stats.mean_batch_size:.1f}",
    )
    return [Table("items", items), latency, histogram]


def split_table(stats: DeploymentStatistics) -> Table:
    """Return the table of a deployment's split: per version its configured and observed share
    of the routed items (the bar), pinned items and completions, and the shadow's agreement."""
    shares = stats.routing.shares()
    observed = stats.observed_shares()
    rows, bars = [], {}
    for i, (version, st) in enumerate(stats.versions.items()):
        role = [
            *(["primary"] if version == stats.routing.primary else []),
            *(["shadow"] if version == stats.routing.shadow else []),
        ]
        rows.append(
            [
                version + (f" ({', '.join(role)})" if role else ""),
                f"{shares[version]:.1%}",
                format_count(stats.routed[version]),
                format_count(stats.pinned[version]),
                format_count(st.completed),
                f"{observed[version]:.1%}",
            ]
        )
        bars[i] = observed[version]
    s = stats.shadow
    note = ""
    if s.version is not None or s.mirrored or s.dropped:
        note = (
            f"shadow {s.version or '(off)'} at {s.fraction:.0%}: {s.disagreement_rate:.1%} "
            f"disagree ({s.disagreed:,} of {s.compared:,} compared), {s.errors:,} errors, "
            f"{s.dropped:,} dropped, {s.pending:,} pending"
        )
    return Table(
        "split",
        rows,
        headers=("version", "weight", "routed", "pinned", "completed", "observed"),
        bars=bars,
        note=note,
    )


def model_tables(s: Settings, stats: Statistics, state: str) -> list[Table]:
    """Return the tables that show a model: its settings ``s``, its ``stats`` and ``state``."""
    rows = [
        ("state", state),
        ("version", stats.model_version),
        ("max_batch_size", str(s.max_batch_size)),
        ("max_wait", _wait_text(s.max_wait, s.adaptive_wait)),
        ("max_concurrency", str(s.max_concurrency)),
        ("max_queue_size", "unbounded" if s.max_queue_size is None else str(s.max_queue_size)),
        ("timeout", "none" if s.timeout is None else f"{s.timeout:g} s"),
    ]
    if s.max_batch_cost is not None:
        rows.append(("max_batch_cost", f"{s.max_batch_cost:g}"))
    if s.isolate_failures:
        rows.append(("isolate_failures", "yes"))
    if stats.swaps or stats.failed_swaps:
        rows.append(("swaps", f"{stats.swaps} ({stats.failed_swaps} failed)"))
    return [Table("model", rows), *statistics_tables(stats)]


def _wait_text(max_wait: float, adaptive: bool) -> str:
    if max_wait == 0:
        return "0 (greedy)"
    return f"{format_ms(max_wait)} ms" + (" (adaptive)" if adaptive else "")


# -- HTML ---------------------------------------------------------------------------------------

_CELL = "padding:1px 6px;text-align:right"
_LABEL = "padding:1px 6px;text-align:left;font-weight:normal"


def _table_html(table: Table) -> str:
    parts = ['<table style="border-collapse:collapse;margin:0">']
    parts.append(
        f'<caption style="text-align:left;font-weight:bold">{escape(table.caption)}</caption>'
    )
    if table.headers:
        heads = "".join(f'<th style="{_CELL}">{escape(h)}</th>' for h in table.headers)
        parts.append(f"<thead><tr>{heads}</tr></thead>")
    parts.append("<tbody>")
    for i, row in enumerate(table.rows):
        style = f' style="background:{_HIGHLIGHT};font-weight:bold"' if i == table.highlight else ""
        cls = ' class="recommended"' if i == table.highlight else ""
        cells = [f'<th scope="row" style="{_LABEL}">{escape(row[0])}</th>']
        cells += [f'<td style="{_CELL}">{escape(cell)}</td>' for cell in row[1:]]
        if i in table.bars:
            width = round(100 * table.bars[i])
            cells.append(
                '<td style="padding:1px 6px;width:8em">'
                f'<div style="background:{_BAR};height:0.8em;width:{width}%"></div></td>'
            )
        parts.append(f"<tr{cls}{style}>{''.join(cells)}</tr>")
    parts.append("</tbody></table>")
    if table.note:
        parts.append(f'<div style="font-size:0.85em;opacity:0.7">{escape(table.note)}</div>')
    return f"<div>{''.join(parts)}</div>"


def tables_html(tables: Sequence[Table], *, title: str = "") -> str:
    """Return ``tables`` side by side as one compact HTML fragment, under ``title``."""
    head = f'<div style="font-weight:bold;margin-bottom:4px">{escape(title)}</div>' if title else ""
    body = "".join(_table_html(t) for t in tables)
    return (
        f'<div class="batchkit" style="font-size:0.9em">{head}'
        '<div style="display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start">'
        f"{body}</div></div>"
    )


def statistics_html(stats: Statistics, *, extra: Sequence[tuple[str, str]] = ()) -> str:
    """Return ``stats`` as HTML (``Statistics._repr_html_``)."""
    title = f"{stats.name} \u00b7 version {stats.model_version}"
    return tables_html(statistics_tables(stats, extra=extra), title=title)


def model_html(settings: Settings, stats: Statistics, state: str) -> str:
    """Return a model as HTML (``BatchedModel._repr_html_``)."""
    title = f"BatchedModel {settings.name!r}"
    return tables_html(model_tables(settings, stats, state), title=title)


# -- rich ---------------------------------------------------------------------------------------


def _table_rich(table: Table) -> Any:
    from rich.table import Table as RichTable

    out = RichTable(
        title=table.caption,
        title_justify="left",
        caption=table.note or None,
        caption_justify="left",
        show_header=bool(table.headers),
        box=None,
        pad_edge=False,
    )
    headers = list(table.headers) or ["", ""]
    for i, header in enumerate(headers):
        out.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    if table.bars:
        out.add_column("", no_wrap=True)
    for i, row in enumerate(table.rows):
        cells = list(row)
        if table.bars:
            cells.append("\u2588" * max(1, round(12 * table.bars[i])) if i in table.bars else "")
        out.add_row(*cells, style="bold green" if i == table.highlight else None)
    return out


def fit_headers(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[str]:
    """Return ``headers``, one word per line if the table is wider than ``width`` in one line.

    For tables drawn without borders, two spaces between columns (the CLI's): on an 80-column
    terminal every header then shows whole, over two lines, where rich would cut it short.
    """

    def table_width(names: Sequence[str]) -> int:
        widths = [
            max(len(line) for text in [name, *(r[i] for r in rows)] for line in text.split("\n"))
            for i, name in enumerate(names)
        ]
        return sum(widths) + 2 * (len(widths) - 1)

    if table_width(headers) <= width:
        return list(headers)
    return ["\n".join(name.split()) for name in headers]


def tables_rich(tables: Sequence[Table], *, title: str = "") -> Any:
    """Return ``tables`` as one rich renderable, side by side where the terminal allows."""
    from rich.columns import Columns
    from rich.console import Group
    from rich.text import Text

    columns = Columns([_table_rich(t) for t in tables], padding=(0, 3))
    return Group(Text(title, style="bold"), columns) if title else columns


def statistics_rich(stats: Statistics, *, extra: Sequence[tuple[str, str]] = ()) -> Any:
    """Return ``stats`` as a rich renderable (``Statistics.__rich__``)."""
    title = f"{stats.name} \u00b7 version {stats.model_version}"
    return tables_rich(statistics_tables(stats, extra=extra), title=title)


def model_rich(settings: Settings, stats: Statistics, state: str) -> Any:
    """Return a model as a rich renderable (``BatchedModel.__rich__``)."""
    title = f"BatchedModel {settings.name!r}"
    return tables_rich(model_tables(settings, stats, state), title=title)
