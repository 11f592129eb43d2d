"""Idempotent retries: x402's ``payment-identifier`` extension, so that a caller who retries
(a dropped connection, a timeout) is charged once.

A payment's identifier (``extensions["payment-identifier"].info.id``, 16-128 characters) is
kept on its ledger record. A request that names an identifier already on a record is
answered from that record, before any reservation, verification or upstream call:

====================================  =====  ============================  =================
the identifier's record               status code                          charged again?
====================================  =====  ============================  =================
another fingerprint (below)           409    ``idempotency_key_reused``    no
reserved, being verified, or a       409    ``payment_in_progress``       no (Retry-After)
stream going out (SERVED, lease live)
served (settled, settling, or         409    ``payment_already_served``    no (its receipt)
verify-only)
settlement refused for good           402    ``settlement_failed``         no (its receipt)
released (nothing was charged)        —      the identifier is free again: the request is
                                             paid and served as a new one
older than the TTL, ended             —      forgotten: as above
====================================  =====  ============================  =================

The **fingerprint** is what the payment buys and who buys it: the route, the payer, the
network, the asset, the payee, the authorized amount and the scheme. A retry signs a new
authorization (new nonce) or re-sends the same header: either way, the same fingerprint.
The request body is not part of it: the payment is decided on the headers, before a byte of
the body is read (docs/PAYMENTS.md, admission), and a body is never written to the ledger.

**What is stored: the outcome, not the reply.** Re-sending the stored reply would mean keeping
every paid reply (the plaintext, or a key that opens it) outside the sealed path for the TTL,
and the case that matters most — a stream cut mid-way — has no complete reply to keep: the
caller's disconnect ends the upstream's generation. So the retry gets a stable outcome with
the original receipt, never a second charge, and the appliance keeps no reply at all. The
record is the ledger's own payment row (an identifier of at most 128 characters): nothing new
grows; the TTL (``payment_identifier_ttl_seconds``) bounds how long an ended payment's
identifier is honoured, after which it may name a new purchase. A payment whose outcome is
still open (settling, under review) is never forgotten: forgetting it could charge twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from paygate.x402.ledger import PaymentRecord, PaymentState
from paygate.x402.ledger_base import Ledger
from paygate.x402.models import SETTLE_FAILED
from paygate.x402.refusal import Refusal
from paygate.x402.results import Receipt

log = logging.getLogger("paygate.x402")

DEFAULT_TTL_SECONDS = 86_400.0
_SERVED = (PaymentState.SERVED, PaymentState.SETTLING, PaymentState.SETTLED)
_STARTED = (PaymentState.RESERVED, PaymentState.VERIFIED)


def fingerprint(
    *,
    route: str,
    payer: str,
    network: str,
    asset: str,
    pay_to: str,
    amount: int,
    scheme: str,
) -> str:
    """What a payment buys and who buys it, as one digest (see the module docstring)."""
    parts = (route, payer.lower(), network, asset.lower(), pay_to.lower(), str(amount), scheme)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def record_fingerprint(record: PaymentRecord) -> str:
    return fingerprint(
        route=record.route,
        payer=record.payer,
        network=record.network,
        asset=record.asset,
        pay_to=record.pay_to,
        amount=record.amount,
        scheme=record.scheme,
    )


class PaymentIdentifiers:
    """Answers a request whose payment identifier is known, from the ledger (sans-HTTP)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        receipt: Callable[[PaymentRecord], Receipt],
        settles: bool,
        ttl: float = DEFAULT_TTL_SECONDS,
        retry_after: str = "1",
        clock: Callable[[], float],
    ) -> None:
        if not ttl > 0:
            raise ValueError("the payment identifier TTL must be > 0 seconds")
        self._ledger = ledger
        self._receipt = receipt
        self._ttl = ttl
        self._retry_after = retry_after
        self._clock = clock
        # States in which a payment is over for good: a verify-only payment ends SERVED.
        self._ended = (PaymentState.SETTLED, PaymentState.FAILED) + (
            () if settles else (PaymentState.SERVED,)
        )

    def _streaming(self, record: PaymentRecord) -> bool:
        """SERVED, settled after its reply, and its lease live: a stream still going out (its
        progress is recorded SERVED after its first chunk) or its charge about to be made — in
        progress, its outcome to come; not a payment served and over (let go, or its replica
        presumed dead: owed, answered as served)."""
        return (
            record.state is PaymentState.SERVED
            and PaymentState.SERVED not in self._ended
            and record.owner is not None
            and record.lease_until is not None
            and record.lease_until > self._clock()
        )

    async def outcome(self, key: str, wanted: str) -> Refusal | None:
        """The answer for identifier ``key`` on a request of fingerprint ``wanted``, or None:
        the identifier is unknown or free, and the request goes on (paid once, with it)."""
        record = await self._ledger.by_idempotency_key(key)
        if record is None:
            return None
        ended_before = self._clock() - self._ttl
        if record.state is PaymentState.RELEASED or (
            record.state in self._ended and record.updated_at < ended_before
        ):
            # Nothing was charged, or long over: the identifier may name a new purchase.
            await self._ledger.forget_idempotency_key(
                key, payment_id=record.id, ended=self._ended, before=ended_before
            )
            return None
        if record_fingerprint(record) != wanted:
            return Refusal(
                409,
                "idempotency_key_reused",
                "this payment-identifier belongs to another payment",
            )
        if record.state in _STARTED or self._streaming(record):
            return Refusal(
                409,
                "payment_in_progress",
                "this payment is already being used by another request",
                headers={"Retry-After": self._retry_after},
                # Its replica died mid-request: the payer's retry waits for the reconciler.
                server_side=await self._ledger.abandoned(record),
            )
        receipt = self._receipt(record)
        headers = {receipt.header: receipt.encoded()} if record.transaction else {}
        if record.state is PaymentState.FAILED:
            reason = record.error or SETTLE_FAILED
            log.info("payment %s: a retry of a refused settlement", record.id)
            return Refusal(
                402,
                "settlement_failed",
                f"the payment could not be settled: {reason}",
                headers={receipt.header: receipt.encoded()},
            )
        assert record.state in _SERVED
        log.info("payment %s: a retry of a served payment; not charged again", record.id)
        return Refusal(
            409,
            "payment_already_served",
            "this payment-identifier was served and paid for already; "
            "send a new identifier for a new request",
            headers=headers,
        )
