"""``paygate receipts audit``: prove that signed receipts are in the appliance's log.

For each receipt token (arguments, or one per line in ``--file``): its leaf hash (RFC 6962,
over the exact signed bytes), the gateway's ``/v1/log/receipt-proof`` (which receipts entry and
the path within that period's tree), the receipts entry itself from its entry bundle (whose
root the path must reach, with the entry's count), and the entry's inclusion in the checkpoint
signed by ``--log-key``. A receipt no entry covers yet, or whose entry is past every checkpoint
the log has signed (the checkpoint is read again once for it: the log may have grown meanwhile),
is reported as pending, not as proven.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import httpx

from enclave import receipts
from enclave.receipts import ReceiptTokenInvalid
from enclave.tlog import entries, merkle
from paygate.errors import PaygateError

MAX_TOKENS = 100_000


def add_audit(actions: Any) -> None:
    """Register ``audit`` under the ``receipts`` command group."""
    audit = actions.add_parser("audit", help="prove your receipts are in the appliance's log")
    audit.add_argument("url", help="the gateway's base URL")
    audit.add_argument("tokens", nargs="*", help="receipt tokens")
    audit.add_argument("--file", type=Path, help="a file of receipt tokens, one per line")
    audit.add_argument("--log-key", required=True, help="the log's vkey (attested)")
    audit.add_argument("--timeout", type=float, default=10.0)
    audit.set_defaults(run=_audit)


def leaf_of(token: str) -> bytes:
    try:
        return merkle.leaf_hash(receipts.signed_bytes(token.strip()))
    except ReceiptTokenInvalid:
        raise PaygateError("a receipt token is not base64url") from None


def _audit(args: argparse.Namespace) -> int:
    from paygate.cli.log import LogCheckFailed, _checkpoint, _get, drive
    from paygate.client.errors import LogInconsistent
    from paygate.client.tlog import Seen, consistent, prove_inclusion, read_entries

    tokens = list(args.tokens)
    if args.file is not None:
        tokens += [line for line in args.file.read_text().splitlines() if line.strip()]
    if not tokens or len(tokens) > MAX_TOKENS:
        raise PaygateError(f"give 1 to {MAX_TOKENS} receipt tokens")
    proven = pending = 0
    reread = False
    with httpx.Client(timeout=args.timeout, trust_env=False) as client:
        base, checkpoint, signed = _checkpoint(args, client)
        for token in tokens:
            leaf = leaf_of(token)
            status, body = _get(client, f"{base}receipt-proof?leaf={leaf.hex()}")
            if status == 404:
                print(f"pending  {leaf.hex()}: no receipts entry covers it yet")
                pending += 1
                continue
            if status != 200:
                raise LogCheckFailed(f"receipt-proof answered HTTP {status}")
            answer = json.loads(body)
            index = int(answer["entry"])
            if index >= checkpoint.size and not reread:
                # The log grew between the checkpoint's read and this proof's (another
                # replica cut a period): read the checkpoint again, once per audit, and hold
                # it to the first (append-only: proofs against both are of one log).
                first = Seen(checkpoint.size, checkpoint.root, signed)
                base, checkpoint, signed = _checkpoint(args, client)
                try:
                    drive(consistent(base, first, checkpoint), client)
                except LogInconsistent as exc:
                    raise LogCheckFailed(str(exc)) from None
                reread = True
            if index >= checkpoint.size:
                # Not provable against any checkpoint the log has signed yet: pending, as
                # a receipt no entry covers, never proven.
                print(f"pending  {leaf.hex()}: its receipts entry is past the signed checkpoint")
                pending += 1
                continue
            if index < 0:
                raise LogCheckFailed("the receipts entry index is negative")
            data = drive(read_entries(base, checkpoint.size, index, index + 1), client)[0][1]
            entry = entries.parse(data)
            if entry["type"] != "receipts" or entry["count"] != answer["count"]:
                raise LogCheckFailed(f"entry {index} is not the receipts entry of this receipt")
            proof = [base64.b64decode(h) for h in answer["proof"]]
            try:
                merkle.verify_inclusion(
                    leaf, int(answer["position"]), entry["count"], proof,
                    bytes.fromhex(entry["root"]),
                )  # fmt: skip
            except merkle.ProofError as exc:
                raise LogCheckFailed(f"receipt {leaf.hex()}: {exc}") from None
            drive(prove_inclusion(base, index, data, checkpoint), client)
            print(f"included {leaf.hex()}: receipts entry {index}, position {answer['position']}")
            proven += 1
    print(f"{proven} receipts proven in {checkpoint.origin} size {checkpoint.size}, "
          f"{pending} pending")  # fmt: skip
    return 0
