"""List tables and pull progress: rich on a terminal, the same plain lines when piped."""

from __future__ import annotations

import io
import os
import pty
import select

from paygate.cli.tables import plain_table, print_table
from paygate.cli.upstream import ProgressPrinter
from paygate.upstream.pull import Progress

ROWS = [
    ("NAME", "MODE", "URL"),
    ("alpha", "attach", "http://127.0.0.1:11434"),
    ("b", "container", "-"),
]


def test_piped_table_is_plain_aligned_columns() -> None:
    out = io.StringIO()
    print_table(ROWS, out)
    assert out.getvalue().splitlines() == [
        "NAME   MODE       URL",
        "alpha  attach     http://127.0.0.1:11434",
        "b      container  -",
    ]
    assert plain_table(ROWS) + "\n" == out.getvalue()


def _terminal() -> tuple[io.TextIOWrapper, int]:
    leader, follower = pty.openpty()
    return io.TextIOWrapper(os.fdopen(follower, "wb", buffering=0), write_through=True), leader


def _read(leader: int) -> str:
    """Everything written so far (until the terminal stays quiet for 0.2 s)."""
    chunks = []
    while select.select([leader], [], [], 0.2)[0]:
        chunks.append(os.read(leader, 65536).decode(errors="replace"))
    return "".join(chunks)


def test_terminal_table_is_rich() -> None:
    stream, leader = _terminal()
    try:
        print_table(ROWS, stream)
        text = _read(leader)
    finally:
        stream.close()
        os.close(leader)
    assert "\x1b[1m" in text  # rich's bold header: not the plain format
    assert "alpha" in text
    assert "http://127.0.0.1:11434" in text


def test_pull_progress_piped_and_on_a_terminal() -> None:
    piped = io.StringIO()
    printer = ProgressPrinter(piped)
    for step in (Progress("pulling manifest"), Progress("pulling abc", 50, 100),
                 Progress("pulling abc", 50, 100), Progress("success")):  # fmt: skip
        printer(step)
    printer.close()
    lines = piped.getvalue().splitlines()
    assert lines[0] == "pulling manifest"
    assert lines[1].endswith("50%")
    assert lines[2] == "success"  # an unchanged status is not repeated
    stream, leader = _terminal()
    try:
        bar = ProgressPrinter(stream)
        bar(Progress("pulling abc", 512, 1024))
        bar.close()
        text = _read(leader)
    finally:
        stream.close()
        os.close(leader)
    assert "pulling abc" in text
    assert "1.0 kB" in text  # rich's DownloadColumn: completed/total in bytes
