"""``paygate ledger migrate|copy``: the ledger's schema, and moving it to another store.

``migrate`` brings the configured ledger (or ``--ledger-url``) to this paygate's schema; the
gateway does the same at start, this lets an operator do it first. ``copy`` copies every
table of the ledger (payments and their history, receipts, idempotency keys, the free quota and
the sign-in key, the economics and console tables, the transparency log, batch-settlement
channels) from one store to another, row for row (:mod:`paygate.x402.ledger_copy`): stop the
gateways first, and migrate both stores to this paygate's schema. Rows already in the
destination are left as they are; a different row under the same key refuses the whole copy.

URLs are secrets: nothing here prints them. A PostgreSQL URL without a password takes it from
``PAYGATE_LEDGER_PASSWORD_FILE`` or the systemd credential ``ledger_password``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from paygate.cli.options import add_action, command_actions
from paygate.config import load_settings
from paygate.x402.ledger import LedgerConflict
from paygate.x402.ledger_copy import Counts, Store, copy_tables
from paygate.x402.ledger_migrations import SCHEMA_VERSION  # both stores' (one set of steps)
from paygate.x402.ledger_store import LedgerLocation, open_ledger


def register(sub: Any) -> None:
    actions = command_actions(
        sub, "ledger", "migrate the payment ledger, or copy it to another store"
    )

    migrate = add_action(actions, "migrate", _migrate, "bring the ledger's schema up to date")
    migrate.add_argument(
        "--ledger-url", help="postgresql://… or sqlite:////abs/path (default: settings)"
    )

    copy = add_action(actions, "copy", _copy, "copy every table of the ledger to another store")
    copy.add_argument("--from", dest="source", help="source ledger URL (default: settings)")
    copy.add_argument("--to", dest="target", required=True, help="destination ledger URL")


def location(args: argparse.Namespace, url: str | None) -> LedgerLocation:
    return load_settings(args.config).ledger_location(url)


async def _run_migrate(where: LedgerLocation) -> tuple[int, int]:
    ledger = await open_ledger(where, replica="paygate-ledger-migrate")
    try:
        return ledger.found_version, SCHEMA_VERSION  # type: ignore[attr-defined]
    finally:
        await ledger.close()


def _migrate(args: argparse.Namespace) -> int:
    where = location(args, args.ledger_url)
    found, now = asyncio.run(_run_migrate(where))
    if found == now:
        print(f"ledger {where.describe()}: schema v{now}, up to date")
    else:
        print(f"ledger {where.describe()}: schema v{found} -> v{now}")
    return 0


async def _run_copy(source: LedgerLocation, target: LedgerLocation) -> list[tuple[str, Counts]]:
    # Neither store is migrated here: both must be at this paygate's schema already.
    reader = await open_ledger(source, replica="paygate-ledger-copy", migrate=False)
    try:
        writer = await open_ledger(target, replica="paygate-ledger-copy", migrate=False)
        try:
            return await copy_tables(Store(reader, source.kind), Store(writer, target.kind))
        finally:
            await writer.close()
    finally:
        await reader.close()


def _copy(args: argparse.Namespace) -> int:
    source = location(args, args.source)
    target = location(args, args.target)
    if source == target:
        raise LedgerConflict("--from and --to are the same ledger")
    tables = asyncio.run(_run_copy(source, target))
    print(f"ledger copy from {source.describe()} to {target.describe()}:")
    for name, counts in tables:
        print(f"  {name}: {counts.copied} copied, {counts.present} already there")
    copied = sum(counts.copied for _, counts in tables)
    present = sum(counts.present for _, counts in tables)
    print(f"copied {copied} rows ({present} already there)")
    return 0
