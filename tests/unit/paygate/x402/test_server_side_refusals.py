"""Refusals of a payment that are this server's failure, not the caller's doing, are marked
``server_side`` (on a body-priced route they doubt nobody's payment claims:
paygate.server.claims): a facilitator's own failure to verify, and a hold on what the payment
needs (a busy channel) that no live request keeps. A refusal of the payment itself, and a hold
a live request keeps, are not."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from paygate import wire
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.models import AnyPaymentPayload
from paygate.x402.processor import PaymentProcessor
from paygate.x402.refusal import Refusal
from paygate.x402.schemes import Scheme
from paygate.x402.settlement import VerifyOnly
from tests.fixtures.ledger_support import Clock, request
from tests.fixtures.loopback_verifier import LoopbackVerifier
from tests.fixtures.x402_support import RESOURCE, sdk_payment, terms

PRICE = Decimal("0.001")


class RefusingVerifier(LoopbackVerifier):
    """A loopback facilitator whose /verify finds every payment invalid for ``reason``."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""

    async def answer(self) -> dict[str, Any] | None:
        return {"isValid": False, "invalidReason": self.reason}


@pytest.fixture
async def facilitator() -> AsyncIterator[RefusingVerifier]:
    async with RefusingVerifier() as running:
        yield running


@pytest.mark.parametrize(
    ("reason", "server_side"),
    [("unexpected_verify_error", True), ("insufficient_funds", False)],
)
async def test_a_facilitators_own_failure_to_verify_is_server_side(
    tmp_path: Path, facilitator: RefusingVerifier, reason: str, server_side: bool
) -> None:
    facilitator.reason = reason
    ledger = await open_ledger(LedgerLocation(kind="sqlite", path=tmp_path / "payments.db"))
    async with aiohttp.ClientSession() as http:
        settler = FacilitatorSettler(http, facilitator.url, timeout=10, settle_timeout=10)
        processor = PaymentProcessor(
            terms=terms(), ledger=ledger, settler=settler, settlement=VerifyOnly()
        )
        payment = sdk_payment(2)
        headers = {wire.PAYMENT_SIGNATURE: base64.b64encode(payment.wire_json()).decode()}
        try:
            refused = await asyncio.wait_for(
                processor.admit(headers, price=PRICE, resource=RESOURCE, route="chat"),
                timeout=10,
            )
        finally:
            await settler.close()
            await ledger.close()
    assert isinstance(refused, Refusal), refused
    assert (refused.status, refused.code, refused.server_side) == (402, reason, server_side)


class Held:
    """A scheme whose busy refusal names the payment (by nonce) whose request holds it."""

    def __init__(self, nonce: str | None) -> None:
        self.nonce = nonce

    async def holder(self, reason: str, payment: AnyPaymentPayload) -> str | None:
        return self.nonce if reason == "busy" else None


async def test_a_hold_left_by_a_request_that_died_is_server_side(
    tmp_path: Path,
) -> None:
    """Held by a live request (reserved, its owner's lease running): the caller's doing (its
    own concurrent request; or a caller holding its channel with a slow call to have refusals
    that doubt nobody). Held by one whose lease ran out (its replica gone): this server's
    failure. Held under the nonce of a payment that ended: a live hold under the same key (a
    payment gives its hold back as it ends; a refund's voucher has the last paid one's key),
    the caller's doing. A holder that is no payment, or none, or another reason: not known to
    be the server's."""
    clock = Clock()
    ledger = await open_ledger(
        LedgerLocation(kind="sqlite", path=tmp_path / "payments.db"),
        replica="a",
        lease_seconds=10.0,
        clock=clock,
    )
    processor = PaymentProcessor(
        terms=terms(),
        ledger=ledger,
        settler=cast(Any, None),
        settlement=VerifyOnly(),
        clock=clock,
    )
    payment = cast(AnyPaymentPayload, None)

    async def left_by_failure(nonce: str | None, reason: str = "busy") -> bool:
        return await processor._left_by_failure(cast(Scheme, Held(nonce)), reason, payment)

    try:
        live = await ledger.reserve(**request(1))
        assert not await left_by_failure(live.nonce)
        assert not await left_by_failure(live.nonce, "invalid_payload")
        verified = await ledger.transition(live.id, PaymentState.VERIFIED, lease=live.lease)
        assert not await left_by_failure(verified.nonce)
        clock.now += 10.0  # its owner's lease ran out: the replica is presumed dead
        assert await left_by_failure(verified.nonce)
        ended = await ledger.reserve(**request(2))
        await ledger.transition(ended.id, PaymentState.RELEASED, lease=ended.lease)
        assert not await left_by_failure(ended.nonce)
        assert not await left_by_failure("0x" + "ab" * 32)  # no payment's
        assert not await left_by_failure("another request")
        assert not await left_by_failure(None)
    finally:
        await ledger.close()


@pytest.mark.parametrize(("identified", "progress"), [(False, False), (True, False), (False, True)])
async def test_a_retry_of_a_payment_whose_replica_died_is_server_side(
    tmp_path: Path, identified: bool, progress: bool
) -> None:
    """A payment reserved by a replica that died mid-request (its lease ran out, the
    reconciler not round yet): the payer's retry is refused 409 `payment_in_progress` — this
    server's failure. While its owner's lease runs (a request in progress: a replay of it, or
    the payer's own second try), the caller's doing. By its authorization (a replay) and by
    its payment-identifier alike; and with ``progress``, a stream that recorded what it had
    delivered (SERVED, under its lease) before its replica stalled and died: cut, its caller
    sent the authorization again (by its payment-identifier, a SERVED payment's outcome is
    told instead: ``payment_already_served``)."""
    clock = Clock()
    location = LedgerLocation(kind="sqlite", path=tmp_path / "payments.db")
    dead = await open_ledger(location, replica="dead", lease_seconds=10.0, clock=clock)
    live = await open_ledger(location, replica="live", lease_seconds=10.0, clock=clock)
    payment = sdk_payment(2)
    wired = payment.wire()
    key = "pay_" + "5" * 32 if identified else None
    if key is not None:
        wired["extensions"]["payment-identifier"]["info"]["id"] = key
    authorization = wired["payload"]["authorization"]
    clock.now = int(authorization["validBefore"]) - 600.0  # while the payment is valid
    processor = PaymentProcessor(
        terms=terms(),
        ledger=live,
        settler=cast(Any, None),
        settlement=VerifyOnly(),
        clock=clock,
    )
    headers = {wire.PAYMENT_SIGNATURE: base64.b64encode(json.dumps(wired).encode()).decode()}
    try:
        await dead.reserve(
            **request(
                network=wired["accepted"]["network"],
                asset=wired["accepted"]["asset"],
                payer=authorization["from"],
                nonce=authorization["nonce"],
                pay_to=wired["accepted"]["payTo"],
                payload=json.dumps(wired),
                idempotency_key=key,
                route="chat",
                amount=int(authorization["value"]),
            )
        )
        if progress:  # as paygate.x402.settlements.Settlements.stream_progress records it
            reserved = (await dead.by_nonce(authorization["nonce"]))[0]
            await dead.transition(
                reserved.id, PaymentState.SERVED, via=PaymentState.VERIFIED, lease=reserved.lease
            )
        for server_side in (False, True):
            refused = await processor.admit(headers, price=PRICE, resource=RESOURCE, route="chat")
            assert isinstance(refused, Refusal), refused
            assert (refused.status, refused.code, refused.server_side) == (
                409,
                "payment_in_progress",
                server_side,
            )
            clock.now += 10.0  # the dead replica's lease runs out
    finally:
        await dead.close()
        await live.close()
