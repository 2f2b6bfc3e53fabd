"""Markdown tables, as the commands print them."""

from __future__ import annotations


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns, so it also reads well in a terminal."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
