"""The ledger's work per paid exact (verify-only) request, apart from the rest of the path.

A paid exact request makes two ledger calls: ``reserve`` (the authorization's nonce claimed,
durable before the upstream is called) and, once the reply's signed receipt is made, one
``transition`` (RESERVED → VERIFIED → SERVED with the lease given up and the receipt kept, in one
transaction). This runs exactly those calls on a SQLite ledger in a temporary directory, with a
payload, requirements and receipt the size of the real ones, ``--inflight`` requests at a time
(so group commit forms groups as it does under load), and reports per request: the process's
CPU split into user and system time (``os.times``: the event loop and the commit thread), wall
time, COMMITs (fsyncs) and bytes written. Prints a table, writes bench/results/ledger_ops.json.

    .venv/bin/python -m bench.ledger_ops [--requests 3000] [--inflight 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from paygate import jsonsafe
from paygate.x402.ledger import PaymentState, ReceiptUsage
from paygate.x402.ledger_sqlite import SqliteLedger

RESULTS = Path(__file__).parent / "results" / "ledger_ops.json"
NETWORK = "eip155:84532"
ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"


def _requirements() -> dict[str, Any]:
    return {
        "scheme": "exact",
        "network": NETWORK,
        "amount": "1000",
        "asset": ASSET,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }


def _payment(nonce: str) -> dict[str, Any]:
    """An x402 v2 exact payment as the processor stores it (its wire form)."""
    now = int(time.time())
    return {
        "x402Version": 2,
        "resource": {
            "url": "http://127.0.0.1:8080/v1/chat/completions",
            "description": "chat completions",
            "mimeType": "application/json",
        },
        "accepted": _requirements(),
        "payload": {
            "signature": "0x" + secrets.token_hex(65),
            "authorization": {
                "from": PAYER,
                "to": PAY_TO,
                "value": "1000",
                "validAfter": str(now - 600),
                "validBefore": str(now + 3600),
                "nonce": nonce,
            },
        },
    }


def _receipt() -> str:
    """A reply receipt's size (a compact JWS over the receipt's claims)."""
    return secrets.token_urlsafe(520)


async def _request(ledger: SqliteLedger, requirements: str) -> None:
    nonce = "0x" + secrets.token_hex(32)
    record = await ledger.reserve(
        network=NETWORK,
        asset=ASSET,
        payer=PAYER,
        nonce=nonce,
        pay_to=PAY_TO,
        amount=1000,
        x402_version=2,
        route="/v1/chat/completions",
        payload=jsonsafe.dumps_compact(_payment(nonce)).decode(),
        requirements=requirements,
        idempotency_key=None,
    )
    await ledger.transition(
        record.id,
        PaymentState.SERVED,
        lease=record.lease,
        via=PaymentState.VERIFIED,
        let_go=True,
        reply_receipt=_receipt(),
        receipt_usage=ReceiptUsage(12, 34, "upstream"),
    )


def _io() -> dict[str, int]:
    """This process's I/O counters (Linux): bytes asked to write, bytes that reached storage."""
    counters: dict[str, int] = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            name, _, value = line.partition(":")
            counters[name.strip()] = int(value)
    except OSError:
        pass
    return counters


async def _round(path: Path, requests: int, inflight: int) -> dict[str, float]:
    ledger = await SqliteLedger.open(path)
    commits = 0

    def counted(_n: int) -> None:
        nonlocal commits
        commits += 1

    ledger.group_commit.after_commit = counted
    requirements = jsonsafe.dumps_compact(_requirements()).decode()
    try:
        for _ in range(min(200, requests)):  # warm: caches, the WAL's first pages
            await _request(ledger, requirements)
        commits = 0
        io0, cpu0, wall0 = _io(), os.times(), time.perf_counter()
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await _request(ledger, requirements)

        await asyncio.gather(*(worker() for _ in range(inflight)))
        wall, cpu, io = time.perf_counter() - wall0, os.times(), _io()
    finally:
        await ledger.close()
    per = 1e6 / requests
    return {
        "user_us": (cpu.user - cpu0.user) * per,
        "system_us": (cpu.system - cpu0.system) * per,
        "cpu_us": (cpu.user - cpu0.user + cpu.system - cpu0.system) * per,
        "wall_us": wall * per,
        "commits_per_request": commits / requests,
        "bytes_written_per_request": (io.get("wchar", 0) - io0.get("wchar", 0)) / requests,
        "file_bytes": path.stat().st_size,
    }


def run(requests: int, inflight: int, rounds: int) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="ledger-ops-") as tmp:
            results.append(asyncio.run(_round(Path(tmp) / "ledger.db", requests, inflight)))
    keys = results[0].keys()
    return {key: statistics.median(r[key] for r in results) for key in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = {str(n): run(args.requests, n, args.rounds) for n in args.inflight}
    print(f"ledger calls of one paid exact request (SQLite), median of {args.rounds} rounds")
    head = f"{'inflight':>8} {'cpu us':>8} {'user':>7} {'system':>7} {'wall us':>8}"
    print(head + f" {'commits':>8} {'written B':>10}")
    for n, row in rows.items():
        print(
            f"{n:>8} {row['cpu_us']:8.0f} {row['user_us']:7.0f} {row['system_us']:7.0f}"
            f" {row['wall_us']:8.0f} {row['commits_per_request']:8.2f}"
            f" {row['bytes_written_per_request']:10.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": platform.machine(),
                "python": platform.python_version(),
                "requests": args.requests,
                "rounds": args.rounds,
                "by_inflight": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
