"""A paid admission cut short while the facilitator verifies (the caller gone: the gateway
cancels its handler) leaves no reservation held: the authorization is usable again at once,
and this process renews no lease for it (a hold kept would be renewed for ever, the payer's
retries refused as ``payment_in_progress`` until a restart)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from paygate import wire
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.processor import PaymentProcessor
from paygate.x402.session import PaymentSession
from paygate.x402.settlement import VerifyOnly
from tests.fixtures.loopback_verifier import LoopbackVerifier
from tests.fixtures.x402_support import PAYER, RESOURCE, sdk_payment, terms

PRICE = Decimal("0.001")


class StallingVerifier(LoopbackVerifier):
    """A loopback facilitator whose first /verify is read and never answered (until the test
    ends); later ones find the payment valid."""

    def __init__(self) -> None:
        super().__init__()
        self.verifying = asyncio.Event()

    async def answer(self) -> dict[str, Any] | None:
        if self.calls == 1:
            self.verifying.set()
            return None
        return {"isValid": True, "payer": PAYER.address}


@pytest.fixture
async def facilitator() -> AsyncIterator[StallingVerifier]:
    async with StallingVerifier() as running:
        yield running


async def test_a_caller_gone_during_verification_leaves_no_reservation_held(
    tmp_path: Path, facilitator: StallingVerifier
) -> None:
    ledger = await open_ledger(LedgerLocation(kind="sqlite", path=tmp_path / "payments.db"))
    async with aiohttp.ClientSession() as http:
        settler = FacilitatorSettler(http, facilitator.url, timeout=10, settle_timeout=10)
        processor = PaymentProcessor(
            terms=terms(), ledger=ledger, settler=settler, settlement=VerifyOnly()
        )
        payment = sdk_payment(2)
        headers = {wire.PAYMENT_SIGNATURE: base64.b64encode(payment.wire_json()).decode()}
        try:
            admitting = asyncio.get_running_loop().create_task(
                processor.admit(headers, price=PRICE, resource=RESOURCE, route="chat")
            )
            await asyncio.wait_for(facilitator.verifying.wait(), timeout=10)
            admitting.cancel()  # the caller went away while /verify was out
            await asyncio.gather(admitting, return_exceptions=True)
            assert admitting.cancelled()

            # Nothing held any more: no lease this process renews for it.
            assert await processor.recovery.renew_leases() == 0
            (record,) = await ledger.by_nonce(payment.wire()["payload"]["authorization"]["nonce"])
            assert record.state is PaymentState.RELEASED

            # The payer's retry with the same authorization is admitted, not refused as in
            # progress.
            again = await asyncio.wait_for(
                processor.admit(headers, price=PRICE, resource=RESOURCE, route="chat"),
                timeout=10,
            )
            assert isinstance(again, PaymentSession), again
            async with again:
                again.status = 200
        finally:
            await settler.close()
            await ledger.close()
