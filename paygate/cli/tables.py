"""List commands' tables: ``rich`` on a terminal, plain aligned columns when piped.

Piped or redirected (scripts, logs, tests), the same rows come as plain columns, so what
scripts parse does not change; ``--json`` stays the format meant for programs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.table import Table

Row = Sequence[str]


def plain_table(rows: Sequence[Row]) -> str:
    """Aligned columns, header first; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def print_table(rows: Sequence[Row], stream: TextIO | None = None) -> None:
    """``rows[0]`` is the header. A rich table on a terminal, plain columns otherwise."""
    stream = stream or sys.stdout
    if not stream.isatty():
        print(plain_table(rows), file=stream)
        return
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in rows[0]:
        table.add_column(name, overflow="fold")
    for row in rows[1:]:
        table.add_row(*row)
    Console(file=stream, highlight=False).print(table)
