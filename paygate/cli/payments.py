"""``paygate payments list|show|summary``: what the payment ledger holds, for operators.

The ledger (``--ledger-url``, else the settings: ``ledger_url`` or ``ledger_path``) is opened
read-only: nothing is created (a missing file is ``ledger_not_found``), nothing migrated. The
signed payload is never printed, only whether one is stored; nor is the ledger URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from paygate.cli.ledger_reading import add_limit, add_where, ledger_at
from paygate.cli.options import add_action, command_actions
from paygate.cli.tables import print_table
from paygate.x402.ledger import (
    MAX_LIST_LIMIT,
    SUMMARY_KEYS,
    Earnings,
    PaymentEvent,
    PaymentNotFound,
    PaymentRecord,
    PaymentState,
)
from paygate.x402.ledger_store import LedgerLocation, open_ledger

USDC_DECIMALS = 6


def register(sub: Any) -> None:
    actions = command_actions(sub, "payments", "list or show payments in the ledger")

    listing = add_action(actions, "list", _list, "recent payments, newest first")
    listing.add_argument("--state", choices=[state.value for state in PaymentState])
    listing.add_argument(
        "--review",
        action="store_true",
        help="only payments flagged for review: owed, outcome unknown, unprovable here",
    )
    add_limit(listing)

    show = add_action(actions, "show", _show, "one payment in full (never its signed payload)")
    show.add_argument("id", help="the payment id (32 hex digits)")

    summary = add_action(actions, "summary", _summary, "earnings: settled payments, grouped")
    summary.add_argument(
        "--since",
        type=_since,
        default=0.0,
        help="only payments created since: a duration back (30m, 24h, 7d) or a UTC date "
        "(2026-12-01); default: all",
    )
    summary.add_argument("--by", choices=SUMMARY_KEYS, default="model")

    for parser in (listing, show, summary):
        add_where(parser)


_UNITS = {"m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> float:
    """A start time (unix seconds) from "30m"/"24h"/"7d" back from now, or a UTC date."""
    if len(text) > 1 and text[:-1].isdigit() and text[-1] in _UNITS:
        return time.time() - int(text[:-1]) * _UNITS[text[-1]]
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError("use 30m, 24h, 7d or a date like 2026-12-01") from None


def describe(record: PaymentRecord, now: float) -> dict[str, Any]:
    """Everything about a payment that is safe to show: all but the signed payload."""
    return {
        "id": record.id,
        "state": record.state.value,
        "served": record.served,
        "network": record.network,
        "asset": record.asset,
        "payer": record.payer,
        "pay_to": record.pay_to,
        "nonce": record.nonce,
        "scheme": record.scheme,
        "amount": str(record.amount),  # exact: the price; upto: the authorized maximum
        "amount_usdc": usdc(record.amount),
        "model": record.model,
        "tokens_in": record.tokens_in,
        "tokens_out": record.tokens_out,
        "usage_source": record.usage_source,
        "charged": None if record.settle_amount is None else str(record.settle_amount),
        "settled": None if record.settled_amount is None else str(record.settled_amount),
        "settled_usdc": None if record.settled_amount is None else usdc(record.settled_amount),
        "x402_version": record.x402_version,
        "route": record.route,
        "idempotency_key": record.idempotency_key,
        "transaction": record.transaction,
        "error": record.error,
        "needs_review": record.needs_review,
        "attempts": record.attempts,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "owner": record.owner,
        "lease": record.lease,
        "lease_until": record.lease_until,
        "age_seconds": round(max(0.0, now - record.created_at), 3),
        "payload_stored": bool(record.payload),
    }


def usdc(amount: int) -> str:
    """Atomic units as a 6-decimal USDC amount: 1000 → "0.001000"."""
    return f"{Decimal(amount).scaleb(-USDC_DECIMALS):.{USDC_DECIMALS}f}"


def _short(value: str | None, head: int = 6, tail: int = 4) -> str:
    if not value:
        return "-"
    return value if len(value) <= head + tail + 1 else f"{value[:head]}…{value[-tail:]}"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def event_facts(event: PaymentEvent) -> dict[str, Any]:
    return {
        "at": event.at,
        "replica": event.replica,
        "action": event.action.value,
        "state": event.state.value,
        "lease": event.lease,
        "transaction": event.transaction,
        "error": event.error,
        "detail": event.detail,
    }


async def _read_list(
    where: LedgerLocation, state: PaymentState | None, limit: int, *, review: bool = False
) -> list[PaymentRecord]:
    ledger = await open_ledger(where, read_only=True, replica="paygate-payments")
    try:
        if not review:
            return await ledger.list(state=state, limit=limit)
        # Flagged records are SETTLING ones; the flag lives in their error (REVIEW_PREFIX).
        owed = await ledger.list(state=PaymentState.SETTLING, limit=MAX_LIST_LIMIT)
        return [record for record in owed if record.needs_review][:limit]
    finally:
        await ledger.close()


async def _read_one(
    where: LedgerLocation, payment_id: str
) -> tuple[PaymentRecord | None, list[PaymentEvent]]:
    ledger = await open_ledger(where, read_only=True, replica="paygate-payments")
    try:
        record = await ledger.get(payment_id)
        return record, (await ledger.history(payment_id) if record else [])
    finally:
        await ledger.close()


def _list(args: argparse.Namespace) -> int:
    state = PaymentState(args.state) if args.state else None
    records = asyncio.run(_read_list(ledger_at(args), state, args.limit, review=args.review))
    now = time.time()
    if args.json:
        print(json.dumps([describe(record, now) for record in records], indent=2))
        return 0
    if not records:
        print("no payments")
        return 0
    header = "ID STATE SCHEME SERVED NETWORK PAYER USDC TOKENS SETTLED TX AGE ERROR"
    rows: list[tuple[str, ...]] = [tuple(header.split())]
    rows += [
        (
            r.id,
            r.state.value + (" (review)" if r.needs_review else ""),
            r.scheme,
            "yes" if r.served else "no",
            r.network,
            _short(r.payer),
            usdc(r.amount),
            "-" if r.tokens_in is None else f"{r.tokens_in}/{r.tokens_out}",
            "-" if r.settled_amount is None else usdc(r.settled_amount),
            _short(r.transaction, 8, 6),
            _age(now - r.created_at),
            r.error or "-",
        )
        for r in records
    ]
    print_table(rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    record, history = asyncio.run(_read_one(ledger_at(args), args.id))
    if record is None:
        raise PaymentNotFound(f"no payment {args.id[:64]!r} in the ledger")
    facts = describe(record, time.time())
    facts["history"] = [event_facts(event) for event in history]
    try:
        facts["requirements"] = json.loads(record.requirements)
    except ValueError:
        facts["requirements"] = None  # stored as given; not JSON is not worth failing on
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    for name in (
        "id",
        "state",
        "served",
        "network",
        "asset",
        "payer",
        "pay_to",
        "nonce",
        "scheme",
        "amount",
        "amount_usdc",
        "model",
        "tokens_in",
        "tokens_out",
        "usage_source",
        "charged",
        "settled",
        "settled_usdc",
        "x402_version",
        "route",
        "idempotency_key",
        "transaction",
        "error",
        "attempts",
        "owner",
        "lease",
    ):
        value = facts[name]
        print(f"{name:16} {'-' if value is None else value}")
    print(f"{'created':16} {_when(record.created_at)} ({_age(facts['age_seconds'])} ago)")
    print(f"{'updated':16} {_when(record.updated_at)}")
    print(f"{'payload':16} {'stored (signed; not shown)' if record.payload else 'none'}")
    print(f"{'requirements':16} {json.dumps(facts['requirements'], sort_keys=True)}")
    for event in history:
        extra = " ".join(
            f"{k}={v}"
            for k, v in (("tx", event.transaction), ("error", event.error), ("from", event.detail))
            if v
        )
        print(
            f"{'history':16} {_when(event.at)} {event.replica} {event.action.value}"
            f" -> {event.state.value} (lease {event.lease}) {extra}".rstrip()
        )
    return 0


async def _read_earnings(where: LedgerLocation, since: float, by: str) -> list[Earnings]:
    ledger = await open_ledger(where, read_only=True, replica="paygate-payments")
    try:
        return await ledger.earnings(since=since, by=by)
    finally:
        await ledger.close()


def _summary(args: argparse.Namespace) -> int:
    groups = asyncio.run(_read_earnings(ledger_at(args), args.since, args.by))
    total = sum(g.settled for g in groups)
    if args.json:
        document = {
            "by": args.by,
            "since": args.since,
            "groups": [
                {
                    "key": g.key,
                    "payments": g.payments,
                    "tokens_in": g.tokens_in,
                    "tokens_out": g.tokens_out,
                    "settled": str(g.settled),
                    "settled_usdc": usdc(g.settled),
                }
                for g in groups
            ],
            "total": str(total),
            "total_usdc": usdc(total),
        }
        print(json.dumps(document, indent=2))
        return 0
    rows = [(args.by.upper(), "PAYMENTS", "TOKENS IN", "TOKENS OUT", "USDC")]
    rows += [
        (g.key, str(g.payments), str(g.tokens_in), str(g.tokens_out), usdc(g.settled))
        for g in groups
    ]
    rows.append(("total", str(sum(g.payments for g in groups)), "", "", usdc(total)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
