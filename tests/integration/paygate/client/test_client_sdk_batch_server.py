"""paygate's own client pays `batch-settlement` to a server built on the official x402 SDK: the
SDK's FastAPI payment middleware with its batch-settlement server scheme, the SDK facilitator
(devtools' dev facilitator registers BatchSettlementEvmFacilitator) on anvil. Nothing of paygate
runs on the server side; the chain is the proof."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.batch_settlement.server import BatchSettlementEvmScheme

from paygate.client import PaygateTransport, SpendPolicy
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.uvicorn_thread import UvicornThread

PRICE_ATOMIC = 1000  # "$0.001"
DEPOSIT_ATOMIC = 20_000
SPEND = SpendPolicy(
    max_per_request="0.01", max_total="0.05", networks=["base-sepolia"], channel_deposit="0.02"
)


class SdkBatchServer:
    """The SDK-protected FastAPI app (batch-settlement only) under uvicorn, in a thread."""

    def __init__(self, facilitator_url: str, pay_to: str) -> None:
        app = FastAPI()
        server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url)))
        server.register("eip155:84532", BatchSettlementEvmScheme(pay_to))
        routes = {
            "POST /paid": {
                "accepts": {
                    "scheme": "batch-settlement",
                    "payTo": pay_to,
                    "price": "$0.001",
                    "network": "eip155:84532",
                },
                "description": "an SDK-protected resource paid from a channel",
            }
        }
        middleware = payment_middleware(routes, server)

        @app.middleware("http")
        async def x402(request: Any, call_next: Any) -> Any:
            return await middleware(request, call_next)

        @app.post("/paid")
        async def paid(body: dict[str, Any]) -> dict[str, Any]:
            return {"echo": body, "paid": True}

        self._served = UvicornThread(app, "sdk-batch")

    def start(self) -> str:
        return self._served.start()

    def close(self) -> None:
        self._served.close()


@pytest.fixture
def sdk_batch_server(facilitator: Any, seller: str) -> Iterator[str]:
    server = SdkBatchServer(facilitator.url, seller)
    try:
        yield server.start()
    finally:
        server.close()


def test_transport_pays_the_sdk_batch_settlement_middleware_then_refunds(
    sdk_batch_server: str, usdc: Any, payer: Any, seller: str
) -> None:
    escrow = usdc.balance_of(SETTLEMENT_ADDRESS)
    transport = PaygateTransport(envelope="plain", wallet=payer, spend=SPEND)
    with httpx.Client(transport=transport, base_url=sdk_batch_server, timeout=60) as client:
        for n in range(5):
            reply = client.post("/paid", json={"n": n})
            assert reply.status_code == 200, reply.text
            assert reply.json() == {"echo": {"n": n}, "paid": True}
    records = transport.payments
    assert [r.scheme for r in records] == ["batch-settlement"] * 5
    assert [(r.settled, r.receipt_error) for r in records] == [(True, None)] * 5
    assert transport.spent == Decimal("0.02")  # the one deposit
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - DEPOSIT_ATOMIC
    assert usdc.balance_of(SETTLEMENT_ADDRESS) == escrow + DEPOSIT_ATOMIC

    (receipt,) = transport.refund(sdk_batch_server + "/paid")
    assert receipt.success
    assert transport.spent == Decimal("0.005")
    # The rest came back to the payer; the five requests' worth stays the seller's.
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 5 * PRICE_ATOMIC
