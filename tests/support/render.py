"""Read rendered output in tests: HTML tables as data, rich renderables as plain text."""

from __future__ import annotations

import io
from html.parser import HTMLParser

__all__ = ("Tables", "render")


class Tables(HTMLParser):
    """Collect each HTML table as {caption: [row cells]}, with the bar widths seen."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.titles: list[str] = []
        self.bars: list[str] = []
        self._caption: str | None = None
        self._rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._in_caption = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "caption":
            self._in_caption, self._caption = True, ""
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div":
            style = dict(attrs).get("style") or ""
            if "width:" in style and "height" in style:
                self.bars.append(style.split("width:")[1].rstrip("%"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._in_caption = False
        elif tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            assert self._caption is not None
            self.tables[self._caption] = [r for r in self._rows if r]
            self._rows, self._caption = [], None

    def handle_data(self, data: str) -> None:
        if self._in_caption:
            self._caption = (self._caption or "") + data
        elif self._cell is not None:
            self._cell.append(data)

    def row(self, caption: str, label: str) -> list[str]:
        for row in self.tables[caption]:
            if row[0] == label:
                return row[1:]
        raise KeyError(f"no row {label!r} in {caption!r}: {self.tables[caption]}")


def render(obj: object) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(obj)
    return out.getvalue()
