"""``paygate request URL``: curl for the appliance — sealed, paid, opened.

The reply body goes to stdout as it arrives (streams included); what happened (status,
envelope, payment and receipt) goes to stderr. Exit status: 0 for HTTP < 400, 1 otherwise,
2 for a client error (``error [code]: message``, as every paygate command).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, BinaryIO, TextIO

import httpx

from paygate.client import ClientError, PaygateTransport, SentPayment, SpendPolicy
from paygate.client.payer import parse_assets
from paygate.client.wallet import load_wallet

MAX_DATA_BYTES = 32 * 1024 * 1024


class RequestFailed(ClientError):
    """The HTTP exchange itself failed (connection refused, timeout, broken stream)."""

    message = "the HTTP exchange failed (connection refused, timeout, broken stream)"

    code = "request_failed"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "request",
        help="send one sealed (and, if asked, paid) request, like curl",
        description="Send one request through the paygate client: the body sealed to the "
        "appliance's key, a 402 paid within --max-price, the reply opened.",
    )
    p.add_argument("url", help="full URL, e.g. http://127.0.0.1:8402/v1/chat/completions")
    p.add_argument("-d", "--data", help="JSON body; @FILE reads a file, @- stdin (implies POST)")
    p.add_argument("-X", "--method", help="HTTP method (default: POST with --data, else GET)")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value' (repeat)")
    p.add_argument("--stream", action="store_true", help='set "stream": true in the JSON body')
    envelope = p.add_mutually_exclusive_group()
    envelope.add_argument("--v1", action="store_true", help="Obol-compatible envelope v1")
    envelope.add_argument("--plain", action="store_true", help="no sealing (payment only)")
    p.add_argument("--pin", help="expected appliance key or its SHA-256 fingerprint")
    p.add_argument("--pay-with", metavar="KEYFILE", help="wallet key file (hex, mode 0600)")
    p.add_argument("--max-price", default="0.01", help="most to pay, in tokens (default 0.01)")
    p.add_argument("--network", action="append", help="allowed network (repeat; default any)")
    p.add_argument(
        "--asset", action="append", help="allowed token ADDRESS[:DECIMALS] (default: USDC)"
    )
    p.add_argument(
        "--pay-to", action="append", help="pay only this wallet (repeat; default: any payTo)"
    )
    p.add_argument("--x402-version", type=int, choices=[1, 2], help="pay only v1 or v2")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument("-s", "--silent", action="store_true", help="nothing on stderr but errors")
    p.set_defaults(run=run)


def _body(args: argparse.Namespace, stdin: BinaryIO) -> bytes | None:
    if args.data is None:
        return None
    if args.data == "@-":
        raw = stdin.read(MAX_DATA_BYTES + 1)
    elif args.data.startswith("@"):
        try:
            with open(args.data[1:], "rb") as handle:
                raw = handle.read(MAX_DATA_BYTES + 1)
        except OSError as exc:
            raise ClientError(f"cannot read {args.data[1:]}: {exc.strerror}") from None
    else:
        raw = args.data.encode()
    if len(raw) > MAX_DATA_BYTES:
        raise ClientError(f"--data is larger than {MAX_DATA_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ClientError("--data is not JSON") from None
    if args.stream:
        if not isinstance(document, dict):
            raise ClientError("--stream needs a JSON object body")
        document["stream"] = True
        raw = json.dumps(document).encode()
    return raw


def _headers(values: list[str], has_body: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/json"} if has_body else {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise ClientError(f"a header is 'Name: value', not {value[:40]!r}")
        headers[name.strip()] = text.strip()
    return headers


def _transport(args: argparse.Namespace) -> PaygateTransport:
    wallet = spend = None
    if args.pay_with:
        wallet = load_wallet(args.pay_with)
        try:
            spend = SpendPolicy(
                max_per_request=args.max_price,
                networks=args.network,
                assets=parse_assets(args.asset) if args.asset else None,
                pay_to=args.pay_to,
            )
        except ValueError as exc:
            raise ClientError(str(exc)) from None
    try:
        return PaygateTransport(
            envelope="v1" if args.v1 else "plain" if args.plain else "v2",
            pin=args.pin,
            wallet=wallet,
            spend=spend,
            x402_version=args.x402_version,
        )
    except ValueError as exc:
        raise ClientError(str(exc)) from None


def _describe_payment(record: SentPayment) -> str:
    text = f"paid {record.amount:f} on {record.network} to {record.pay_to}"
    if record.receipt is None:
        detail = f" ({record.receipt_error})" if record.receipt_error else ""
        return f"{text}; no receipt{detail}"
    if record.receipt.success:
        return text + f"; settled, transaction {record.receipt.transaction}"
    return text + f"; settlement failed: {record.receipt.error_reason or 'no reason'}"


def run(
    args: argparse.Namespace,
    *,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
    stdin: BinaryIO | None = None,
) -> int:
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr
    body = _body(args, stdin or sys.stdin.buffer)
    method = (args.method or ("POST" if body is not None else "GET")).upper()
    headers = _headers(args.header, body is not None)
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0))
    with httpx.Client(transport=_transport(args), timeout=timeout) as client:
        try:
            with client.stream(method, args.url, content=body, headers=headers) as reply:
                for chunk in reply.iter_bytes():
                    out.write(chunk)
                    out.flush()
                info = reply.extensions.get("paygate")
        except httpx.HTTPError as exc:
            raise RequestFailed(f"{type(exc).__name__}: {exc}") from None
    if not args.silent:
        envelope = info.envelope if info is not None else "plain"
        key = f", key {info.key_fingerprint[:16]}…" if info and info.key_fingerprint else ""
        print(f"paygate: HTTP {reply.status_code} ({envelope}{key})", file=err)
        if info is not None and info.payment is not None:
            print(f"paygate: {_describe_payment(info.payment)}", file=err)
    return 0 if reply.status_code < 400 else 1
