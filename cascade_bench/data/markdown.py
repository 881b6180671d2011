"""Markdown tables: the one formatter every table of the package goes through (run reports, bench
tables, cost summaries), so they all share one layout: ``| a | b |``, a rule line, one line per row."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence


def markdown_table(
    header: Sequence[object], rows: Iterable[Sequence[object]], right: Optional[Sequence[bool]] = None
) -> str:
    """The table as Markdown lines: ``header``, its rule (``---``, or ``---:`` for a column ``right``
    aligns), then each row; cells are written as ``str`` (format numbers before)."""
    header = [str(cell) for cell in header]
    right = list(right) if right is not None else [False] * len(header)
    if len(right) != len(header):
        raise ValueError(f"{len(right)} alignments for {len(header)} columns")
    lines = [_line(header), _line("---:" if flag else "---" for flag in right)]
    for row in rows:
        cells = [str(cell) for cell in row]
        if len(cells) != len(header):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(header)} columns: {cells}")
        lines.append(_line(cells))
    return "\n".join(lines)


def _line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"
