"""``paygate receipts list|show|verify|audit``: signed receipts, for operators and callers.

``list`` and ``show`` read the receipts the ledger keeps (``--ledger-url``, else the settings),
read-only; ``show`` takes a payment's ledger id or its authorization nonce (the receipt's
payment id). ``verify`` checks a token — given, read from a file or ``-``, or fetched from an
appliance's ``GET /v1/receipts/{payment_id}`` — against a receipt key the caller trusts (the
one its attestation verified): the signature, the form, and what it says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from enclave import p256, receipts
from enclave.errors import InvalidPublicKey
from paygate.cli.ledger_reading import add_limit, add_where, ledger_at
from paygate.cli.options import add_action, add_json, command_actions
from paygate.cli.receipts_audit import add_audit
from paygate.cli.tables import print_table
from paygate.errors import PaygateError
from paygate.wire import RECEIPTS_PATH
from paygate.x402.ledger import StoredReceipt
from paygate.x402.ledger_store import LedgerLocation, open_ledger

FETCH_TIMEOUT = 15.0
MAX_FETCHED = 64 * 1024


class ReceiptCommandError(PaygateError):
    message = "the receipts command failed"
    code = "receipt_invalid"


def register(sub: Any) -> None:
    actions = command_actions(sub, "receipts", "list, show, verify or audit signed receipts")
    add_audit(actions)  # prove them included in the transparency log (paygate.cli.receipts_audit)

    listing = add_action(actions, "list", _list, "receipts kept in the ledger, newest first")
    add_limit(listing)

    show = add_action(actions, "show", _show, "a payment's receipts, decoded (unverified)")
    show.add_argument("payment", help="the ledger's payment id, or the authorization nonce")

    for parser in (listing, show):
        add_where(parser)

    text = "check a receipt against a trusted receipt key"
    verify = add_action(actions, "verify", _verify, text)
    verify.add_argument(
        "token", nargs="?", help="the receipt token, a file holding it, or - (stdin)"
    )
    verify.add_argument(
        "--receipt-key",
        required=True,
        help="the receipt key's point (130 hex digits), as the attestation verified it",
    )
    verify.add_argument("--url", help="fetch the settlement receipt from this appliance")
    verify.add_argument("--payment-id", help="with --url: the authorization nonce (0x + 64 hex)")
    add_json(verify)


def describe(kept: StoredReceipt) -> dict[str, Any]:
    """A kept receipt: its claims as signed (not verified here) and the token itself."""
    claims = receipts.unverified_claims(kept.token)
    return {
        "payment_id": kept.payment_id,
        "kind": kept.kind,
        "created_at": kept.created_at,
        "claims": claims,
        "token": kept.token,
    }


async def _read_list(where: LedgerLocation, limit: int) -> list[StoredReceipt]:
    ledger = await open_ledger(where, read_only=True, replica="paygate-receipts")
    try:
        return await ledger.list_receipts(limit=limit)
    finally:
        await ledger.close()


async def _read_show(where: LedgerLocation, payment: str) -> list[StoredReceipt]:
    ledger = await open_ledger(where, read_only=True, replica="paygate-receipts")
    try:
        ids = [payment]
        if payment.lower().startswith("0x"):
            ids = [record.id for record in await ledger.by_nonce(payment)]
        found: list[StoredReceipt] = []
        for payment_id in ids:
            found += await ledger.receipts(payment_id)
        return found
    finally:
        await ledger.close()


def _list(args: argparse.Namespace) -> int:
    kept = asyncio.run(_read_list(ledger_at(args), args.limit))
    described = [describe(k) for k in kept]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    rows: list[list[str]] = [["payment", "kind", "issued", "scheme", "charged", "transaction"]]
    for item in described:
        payment = item["claims"]["payment"] or {}
        rows.append(
            [
                item["payment_id"],
                item["kind"],
                _when(item["claims"]["issued_at"]),
                str(payment.get("scheme", "-")),
                str(payment.get("charged", "-")),
                str(payment.get("transaction", "-")),
            ]
        )
    print_table(rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    if not args.payment or len(args.payment) > 66:
        raise ReceiptCommandError("a payment id is 32 hex digits, or 0x and 64 hex digits")
    kept = asyncio.run(_read_show(ledger_at(args), args.payment))
    if not kept:
        print(f"no receipts for {args.payment}", file=sys.stderr)
        return 1
    described = [describe(k) for k in kept]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for item in described:
        print(f"{item['kind']} receipt of payment {item['payment_id']}")
        print(json.dumps(item["claims"], indent=2, sort_keys=True))
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        key = p256.parse_public_key_hex(args.receipt_key)
    except InvalidPublicKey:
        raise ReceiptCommandError("--receipt-key is not a P-256 point in hex") from None
    if args.url is not None:
        if args.token is not None or not args.payment_id:
            raise ReceiptCommandError("--url fetches by --payment-id; give no token with it")
        token = _fetch(args.url, args.payment_id)
    elif args.token is not None:
        token = _token(args.token)
    else:
        raise ReceiptCommandError("give a token (or a file, or -), or --url and --payment-id")
    try:
        claims = receipts.verify(token, key)
    except receipts.ReceiptTokenInvalid as exc:
        raise ReceiptCommandError(f"the receipt does not verify: {exc}") from None
    if args.json:
        print(json.dumps({"verified": True, "claims": claims}, indent=2))
    else:
        print(f"verified: a {claims['kind']} receipt signed by {claims['receipt_key']}")
        print(json.dumps(claims, indent=2, sort_keys=True))
    return 0


def _token(value: str) -> str:
    if value == "-":
        return sys.stdin.read(receipts.MAX_TOKEN + 1).strip()
    if "." not in value and Path(value).is_file():
        with Path(value).open() as file:
            return file.read(receipts.MAX_TOKEN + 1).strip()
    return value.strip()


def _fetch(url: str, payment_id: str) -> str:
    import httpx

    target = url.rstrip("/") + f"{RECEIPTS_PATH}/{payment_id}"
    try:
        with httpx.stream("GET", target, timeout=FETCH_TIMEOUT) as response:
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_FETCHED:
                    raise ReceiptCommandError("the appliance's answer is too large")
    except httpx.HTTPError as exc:
        raise ReceiptCommandError(f"cannot fetch the receipt: {type(exc).__name__}") from None
    if response.status_code != 200:
        code = response.headers.get("X-Paygate-Error", "error")
        raise ReceiptCommandError(f"the appliance answered HTTP {response.status_code} ({code})")
    try:
        token = json.loads(body)["receipt"]
    except (ValueError, KeyError, TypeError):
        raise ReceiptCommandError("the appliance's answer holds no receipt") from None
    if not isinstance(token, str):
        raise ReceiptCommandError("the appliance's answer holds no receipt")
    return token


def _when(seconds: object) -> str:
    if not isinstance(seconds, int):
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
