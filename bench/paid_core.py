"""Instructions per paid request of the payment core alone, in process (no HTTP): a paid exact
verify-only request's admission (decode, offer match, EIP-712 check with the signer's key
recovered, reservation, verification), its SERVED with the reply's receipt, and its exit, on a
real SQLite ledger; the facilitator is a settler in this process that finds every payment valid
(no network: what ``bench.instructions --paid`` adds on top is the HTTP of the request, the
facilitator's ``/verify`` round trip, the reply and its receipt's signature).

It runs under callgrind, switched on (``callgrind_control -i on``) only around the measured
requests, 4 at a time like ``bench.instructions``' connections; a figure the machine's load
does not move, in seconds rather than minutes. ``--stage`` stops each request early, to see
where the instructions go:

    .venv/bin/python -m bench.paid_core [--stage decode|match|check|admit|full]
        [--requests 500] [--tree DIR]

``decode``: the header read into its model; ``match``: + the offer matched; ``check``: + the
authorization checked (one secp256k1 recovery); ``admit``: the whole admission (reserved,
verified, a session); ``full``: + SERVED and the receipt kept (one transaction) and the exit.
Needs Debian ``valgrind``. docs/PERFORMANCE.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

STAGES = ("decode", "match", "check", "admit", "full")
WARM_UP = 50
PRICE = Decimal("0.001")
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, "source": "reported"}
RECEIPT = "r" * 700  # a reply receipt's size (a token of two base64url parts)


async def _run(stage: str, requests: int, grind: bool) -> None:
    from bench.presign import payment_headers
    from paygate.x402 import codec
    from paygate.x402.ledger_store import LedgerLocation, open_ledger
    from paygate.x402.models import AnyPaymentPayload, ResourceInfo, VerifyResponse
    from paygate.x402.networks import resolve_network
    from paygate.x402.offers import Acceptance, PaymentTerms, challenge
    from paygate.x402.processor import PaymentProcessor
    from paygate.x402.refusal import Refusal
    from paygate.x402.schemes.base import CheckTime
    from paygate.x402.settlement import VerifyOnly
    from paygate.x402.verify import match_offer

    class FindsAllValid:
        """The facilitator's answer without its round trip (its body made, as it would be)."""

        async def verify(
            self, payment: AnyPaymentPayload, requirements: dict[str, Any]
        ) -> VerifyResponse:
            payment.wire_json()
            return VerifyResponse(is_valid=True)

        async def close(self) -> None:
            return None

    network = resolve_network("base-sepolia")
    assert network.usdc is not None
    terms = PaymentTerms(
        pay_to="0x" + "5e11e7" * 6 + "5e11", accepted=(Acceptance(network, network.usdc),)
    )
    resource = ResourceInfo(
        url="http://127.0.0.1/v1/chat/completions", mime_type="application/json"
    )
    required = codec.encode(challenge(terms.offers(PRICE), resource, error="payment_required").v2)
    headers = payment_headers(required, WARM_UP + requests)
    with tempfile.TemporaryDirectory(prefix="paygate-paid-core-") as tmp:
        ledger = await open_ledger(LedgerLocation(kind="sqlite", path=Path(tmp) / "ledger.db"))
        processor = PaymentProcessor(
            terms=terms, ledger=ledger, settler=FindsAllValid(), settlement=VerifyOnly()
        )
        offers = processor.offers(PRICE, None)

        async def one(header: str) -> None:
            if stage in ("decode", "match", "check"):
                payment = codec.decode_payment(header, header="PAYMENT-SIGNATURE")
                if stage == "decode":
                    return
                offer = match_offer(payment, offers)
                if stage == "check":
                    when = CheckTime(int(time.time()), 5, 0.0)
                    processor.scheme(offer.scheme).check(payment, offer, when)
                return
            session = await processor.admit(
                {"PAYMENT-SIGNATURE": header}, price=PRICE, resource=resource, route="chat"
            )
            if isinstance(session, Refusal):
                raise SystemExit(f"refused: {session.code}")
            if stage == "admit":
                return
            async with session:
                session.status = 200
                await session.reply_ended(None, reply_bytes=100, receipt_follows=True)
                await session.keep_receipt(RECEIPT, USAGE)

        for header in headers[:WARM_UP]:
            await one(header)
        measured = iter(headers[WARM_UP:])

        async def connection() -> None:
            for header in measured:
                await one(header)

        control = ["callgrind_control", str(os.getpid())]
        if grind:
            subprocess.run([*control[:1], "-i", "on", control[1]], check=True, capture_output=True)
        await asyncio.gather(*(connection() for _ in range(4)))
        if grind:
            subprocess.run([*control[:1], "-i", "off", control[1]], check=True, capture_output=True)
            subprocess.run([*control[:1], "-d", control[1]], check=True, capture_output=True)
        await ledger.close()


def measure(stage: str, *, requests: int, tree: Path | None) -> float:
    """Thousands of instructions per request of the paid core up to ``stage``."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = f"{tree}:{tree / 'devtools'}"
    with tempfile.TemporaryDirectory(prefix="paygate-paid-core-grind-") as name:
        out = Path(name)
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.out.%p",
            sys.executable,
            __file__,  # by path: a --tree without this module still runs it
            "--stage",
            stage,
            "--requests",
            str(requests),
            "--inside",
        ]
        subprocess.run(argv, check=True, capture_output=True, env=env, timeout=1800)
        total = 0
        for dump in out.glob("callgrind.out*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
    return total / requests / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, default="full")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tree", type=Path, help="paygate from this source tree")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:  # under callgrind (measure's child), on the loop paygate serves on
        import uvloop

        uvloop.run(_run(args.stage, args.requests, grind=True))
        return 0
    k = measure(args.stage, requests=args.requests, tree=args.tree)
    print(f"paid core to {args.stage}: {k:,.1f} k instructions per request ({args.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
