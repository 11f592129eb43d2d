"""Interop the other way round: our transport pays a server built on the official x402 SDK.

The server is a FastAPI app behind the SDK's own FastAPI payment middleware, served by uvicorn on
127.0.0.1 in its own thread, verifying and settling through the real SDK facilitator on anvil.
Nothing of paygate runs on the server side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.exact import register_exact_evm_server

from paygate.client import (
    AsyncPaygateTransport,
    PaygateTransport,
    PaymentRefused,
    SpendPolicy,
    SpendRefused,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.uvicorn_thread import UvicornThread

PRICE_ATOMIC = 1000  # "$0.001" in USDC (6 decimals)
SPEND = SpendPolicy(max_per_request="0.01", max_total="0.1", networks=["base-sepolia"])


class SdkServer:
    """The SDK-protected FastAPI app under uvicorn, in a thread; stopped in ``close``."""

    def __init__(self, facilitator_url: str, pay_to: str) -> None:
        app = FastAPI()
        server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url)))
        register_exact_evm_server(server, "eip155:84532")
        routes = {
            "POST /paid": {
                "accepts": {
                    "scheme": "exact",
                    "payTo": pay_to,
                    "price": "$0.001",
                    "network": "eip155:84532",
                },
                "description": "an SDK-protected resource",
            }
        }
        middleware = payment_middleware(routes, server)

        @app.middleware("http")
        async def x402(request: Any, call_next: Any) -> Any:
            return await middleware(request, call_next)

        @app.post("/paid")
        async def paid(body: dict[str, Any]) -> dict[str, Any]:
            return {"echo": body, "paid": True}

        @app.get("/free")
        async def free() -> dict[str, str]:
            return {"free": "yes"}

        self._served = UvicornThread(app, "sdk-server")

    def start(self) -> str:
        return self._served.start()

    def close(self) -> None:
        self._served.close()


@pytest.fixture
def sdk_server(facilitator: Any, seller: str) -> Iterator[str]:
    server = SdkServer(facilitator.url, seller)
    try:
        yield server.start()
    finally:
        server.close()


def test_transport_pays_the_sdk_fastapi_middleware(
    sdk_server: str, usdc: Any, payer: Any, seller: str
) -> None:
    receipts: list[Any] = []
    transport = PaygateTransport(
        envelope="plain", wallet=payer, spend=SPEND, on_receipt=receipts.append
    )
    with httpx.Client(transport=transport, base_url=sdk_server, timeout=30) as client:
        free = client.get("/free")
        reply = client.post("/paid", json={"q": 1})
    assert free.json() == {"free": "yes"}
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"echo": {"q": 1}, "paid": True}
    record = reply.extensions["paygate"].payment
    assert record.x402_version == 2
    assert record.receipt is not None
    assert record.receipt.success
    assert record.receipt_source == "header"
    assert receipts == [record]
    assert transport.last_receipt == record.receipt
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC
    assert usdc.authorization_state(payer.address, record.nonce)


async def test_async_transport_pays_the_sdk_fastapi_middleware(
    sdk_server: str, usdc: Any, payer: Any, seller: str
) -> None:
    transport = AsyncPaygateTransport(envelope="plain", wallet=payer, spend=SPEND)
    async with httpx.AsyncClient(transport=transport, base_url=sdk_server, timeout=30) as client:
        replies = await asyncio.gather(*(client.post("/paid", json={"n": n}) for n in range(3)))
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert all(p.settled for p in transport.payments)
    assert len({p.transaction for p in transport.payments}) == 3
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


def test_sdk_server_price_above_the_policy_is_never_signed(
    sdk_server: str, usdc: Any, payer: Any, seller: str
) -> None:
    stingy = SpendPolicy(max_per_request="0.0005")
    transport = PaygateTransport(envelope="plain", wallet=payer, spend=stingy)
    with (
        httpx.Client(transport=transport, base_url=sdk_server, timeout=30) as client,
        pytest.raises(SpendRefused, match="above max per request"),
    ):
        client.post("/paid", json={})
    assert transport.payments == []
    assert usdc.balance_of(seller) == 0


def test_sdk_server_refusal_reason_reaches_the_caller(
    sdk_server: str, usdc: Any, seller: str
) -> None:
    from paygate_dev.chain.accounts import new_account

    broke = new_account()  # no USDC: the facilitator's verify says insufficient_funds
    transport = PaygateTransport(envelope="plain", wallet=broke, spend=SPEND)
    with (
        httpx.Client(transport=transport, base_url=sdk_server, timeout=30) as client,
        pytest.raises(PaymentRefused) as refused,
    ):
        client.post("/paid", json={})
    assert refused.value.code == "payment_refused"
    assert "insufficient" in refused.value.reason
    assert usdc.balance_of(seller) == 0
