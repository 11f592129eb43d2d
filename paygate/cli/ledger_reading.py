"""What the commands that read the ledger (``payments``, ``receipts``) ask alike: where the
ledger is (``--ledger-path``/``--ledger-url``, else the configuration's), ``--json``, and a
bounded ``--limit``."""

from __future__ import annotations

import argparse
from pathlib import Path

from paygate.config import load_settings
from paygate.x402.ledger import MAX_LIST_LIMIT
from paygate.x402.ledger_store import LedgerLocation


def add_where(parser: argparse.ArgumentParser) -> None:
    """``--ledger-path``/``--ledger-url`` (one or the other) and ``--json``."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ledger-path", type=Path, help="SQLite ledger file")
    where.add_argument("--ledger-url", help="postgresql://… or sqlite:////abs/path")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=_limit, default=50, help=f"at most N rows (1-{MAX_LIST_LIMIT}, default 50)"
    )


def ledger_at(args: argparse.Namespace) -> LedgerLocation:
    """The ledger the arguments name, else the configuration's."""
    if args.ledger_path is not None:
        return LedgerLocation(kind="sqlite", path=Path(args.ledger_path))
    return load_settings(args.config).ledger_location(args.ledger_url)


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_LIST_LIMIT}")
    return int(text)
