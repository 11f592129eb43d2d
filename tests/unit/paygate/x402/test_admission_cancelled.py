"""A paid admission cut short while the facilitator verifies (the caller gone: the gateway
cancels its handler) leaves no reservation held: the authorization is usable again at once,
and this process renews no lease for it (a hold kept would be renewed for ever, the payer's
retries refused as ``payment_in_progress`` until a restart)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from paygate import wire
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.processor import PaymentProcessor
from paygate.x402.session import PaymentSession
from paygate.x402.settlement import VerifyOnly
from tests.fixtures.x402_support import PAYER, RESOURCE, sdk_payment, terms

PRICE = Decimal("0.001")


class Facilitator:
    """A loopback facilitator whose first /verify is read and never answered (until the test
    ends); later ones find the payment valid."""

    def __init__(self) -> None:
        self.verifying = asyncio.Event()
        self.calls = 0
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.calls += 1
                if self.calls == 1:
                    self.verifying.set()
                    await self._stop.wait()
                    return
                body = json.dumps({"isValid": True, "payer": PAYER.address}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Facilitator:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._server is not None
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), timeout=5)


@pytest.fixture
async def facilitator() -> AsyncIterator[Facilitator]:
    async with Facilitator() as running:
        yield running


async def test_a_caller_gone_during_verification_leaves_no_reservation_held(
    tmp_path: Path, facilitator: Facilitator
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
