"""``paygate receipts``: the caller's signed receipts (``audit``: paygate.cli.receipts_audit)."""

from __future__ import annotations

from typing import Any

from paygate.cli.receipts_audit import add_audit


def register(sub: Any) -> None:
    receipts = sub.add_parser("receipts", help="signed receipts: prove them in the log")
    actions = receipts.add_subparsers(dest="receipts_command", required=True, metavar="ACTION")
    add_audit(actions)
