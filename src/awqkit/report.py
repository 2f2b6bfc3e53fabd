"""Plain-text output shared by the commands."""

from __future__ import annotations

from pathlib import Path


def check_output_file(path: str | Path) -> None:
    """Refuse a report destination that cannot be written, before the work whose result it holds."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"output is a folder, not a file: {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no folder to write {path} into: {path.parent}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns, so it also reads well in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
