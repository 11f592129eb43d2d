"""A paid gateway for the payment tests: the real gateway, the FAKE model server, anvil with
Circle's FiatToken as USDC, and the official x402 SDK's facilitator over HTTP
(tests/fixtures/chain.py)."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from paygate import wire
from paygate.x402.ledger import PaymentRecord
from paygate.x402.ledger_sqlite import SqliteLedger
from tests.fixtures.chain import encode_header, sign_v1_payment, sign_v2_payment
from tests.integration.gateway_support import Stack, running_stack

PRICE_ATOMIC = 1000  # the default price, 0.001 USDC
CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "fake-llama", "messages": [{"role": "user", "content": "hello"}]}


def paid_settings(
    *, seller: str, facilitator_url: str | None, ledger: Path, **overrides: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "payment_mode": "facilitator",
        "pay_to": seller,
        "network": "base-sepolia",
        "facilitator_url": facilitator_url,
        "ledger_path": ledger,
        "facilitator_timeout": 2.0,
        "settle_timeout": 5.0,
        "reconcile_interval_seconds": 3600.0,  # tests restart the gateway to reconcile
    }
    settings.update(overrides)
    return settings


@contextlib.asynccontextmanager
async def paid_stack(
    *, seller: str, facilitator_url: str | None, ledger: Path, **overrides: Any
) -> AsyncIterator[Stack]:
    async with running_stack(
        **paid_settings(seller=seller, facilitator_url=facilitator_url, ledger=ledger, **overrides)
    ) as stack:
        yield stack


async def challenge_of(stack: Stack, path: str = CHAT, body: Any = CHAT_BODY) -> dict[str, Any]:
    """POST without payment; the 402's v2 header, decoded."""
    async with stack.client.post(stack.url + path, json=body) as response:
        assert response.status == 402, await response.text()
        return json.loads(base64.b64decode(response.headers[wire.PAYMENT_REQUIRED]))


async def v2_header(stack: Stack, payer: Any, path: str = CHAT, body: Any = CHAT_BODY) -> str:
    """A PAYMENT-SIGNATURE value for the first requirement of a fresh challenge (SDK-signed)."""
    required = await challenge_of(stack, path, body)
    return encode_header(
        sign_v2_payment(payer, required["accepts"][0], resource=required["resource"]["url"])
    )


async def v1_header(stack: Stack, payer: Any, path: str = CHAT, body: Any = CHAT_BODY) -> str:
    """An X-PAYMENT value from the 402's v1 body (SDK's v1 client)."""
    async with stack.client.post(stack.url + path, json=body) as response:
        assert response.status == 402
        accepts = (await response.json())["accepts"]
    return encode_header(sign_v1_payment(payer, accepts[0]))


def receipt_of(headers: Any, name: str = wire.PAYMENT_RESPONSE) -> dict[str, Any]:
    return json.loads(base64.b64decode(headers[name]))


async def records(ledger: Path) -> list[PaymentRecord]:
    """The ledger's records, read by a second, read-only reader (as an operator would)."""
    async with await SqliteLedger.open(ledger, read_only=True) as reader:
        return await reader.list(limit=100)


async def post(
    stack: Stack, header: str | None, *, name: str = wire.PAYMENT_SIGNATURE, **kw: Any
) -> tuple[int, Any, bytes]:
    headers = {name: header} if header else {}
    body = kw.pop("json", CHAT_BODY)
    path = kw.pop("path", CHAT)
    async with stack.client.post(
        stack.url + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    ) as response:
        return response.status, response.headers, await response.read()
