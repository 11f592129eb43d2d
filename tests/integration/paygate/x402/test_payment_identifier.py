"""Idempotent retries with x402's payment-identifier extension, through the real gateway, the
SDK facilitator and the chain: a caller who retries is charged once.

A retry signs a new authorization (a fresh nonce, as the SDK's client does on every 402) or
re-sends the same header; both carry the same identifier. Balances on chain are the proof.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import aiohttp
import pytest

from paygate import wire
from paygate.x402.ledger import PaymentState
from tests.fixtures.gateway_support import eventually
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    paid_stack,
    post,
    receipt_of,
    records,
    v2_header,
)

CHAT_HITS = "POST /v1/chat/completions"
STREAM = {**CHAT_BODY, "stream": True, "fake": {"chunks": 50, "pace": 0.05}}


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


def with_id(header: str, payment_id: str) -> str:
    # Extensions are outside the EIP-712 signature: the client adds its identifier.
    payment = json.loads(base64.b64decode(header))
    payment.setdefault("extensions", {})["payment-identifier"] = {
        "info": {"required": False, "id": payment_id}
    }
    return base64.b64encode(json.dumps(payment).encode()).decode()


def new_id() -> str:
    return "pay_" + uuid.uuid4().hex


async def settled(ledger, count: int = 1) -> list:
    async with asyncio.timeout(15):
        while True:
            found = await records(ledger)
            if len(found) == count and all(r.state is PaymentState.SETTLED for r in found):
                return found
            await asyncio.sleep(0.05)


async def test_a_retry_after_a_dropped_connection_is_charged_once(
    facilitator, usdc, payer, seller, ledger
):
    key = new_id()
    payer_before = usdc.balance_of(payer.address)
    settles_before = facilitator.stats.settle_calls
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        first = with_id(await v2_header(stack, payer, body=STREAM), key)
        async with aiohttp.ClientSession() as client:
            response = await client.post(
                stack.url + CHAT, json=STREAM, headers={wire.PAYMENT_SIGNATURE: first}
            )
            assert response.status == 200
            await asyncio.wait_for(response.content.readline(), 5)
            response.close()  # the connection drops mid-reply
        await eventually(lambda: stack.fake.cancelled[CHAT_HITS] == 1, timeout=10)
        (record,) = await settled(ledger)  # served in part: charged (settle_on_disconnect)

        # The caller retries with a fresh authorization and the same identifier...
        retry = with_id(await v2_header(stack, payer, body=STREAM), key)
        status, headers, body = await post(stack, retry, json=STREAM)
        assert status == 409, body
        assert headers[wire.ERROR_HEADER] == "payment_already_served"
        receipt = receipt_of(headers)  # ...and learns what it paid, and when
        assert receipt["success"] is True
        assert receipt["transaction"] == record.transaction
        # ...or re-sends the very header it sent first: the same outcome.
        status, headers, _ = await post(stack, first, json=STREAM)
        assert (status, headers[wire.ERROR_HEADER]) == (409, "payment_already_served")

        # The same identifier for another purchase (another route) is a conflict.
        other_body = {"model": "fake-llama", "prompt": "hello"}
        other = with_id(await v2_header(stack, payer, path="/v1/completions", body=other_body), key)
        status, headers, _ = await post(stack, other, path="/v1/completions", json=other_body)
        assert (status, headers[wire.ERROR_HEADER]) == (409, "idempotency_key_reused")
        assert stack.fake.hits[CHAT_HITS] == 1
        assert stack.fake.hits["POST /v1/completions"] == 0
    (record,) = await records(ledger)
    assert (record.state, record.idempotency_key) == (PaymentState.SETTLED, key)
    assert facilitator.stats.settle_calls == settles_before + 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == payer_before - PRICE_ATOMIC


async def test_a_retry_while_the_first_is_served_waits_then_gets_the_outcome(
    facilitator, usdc, payer, seller, ledger
):
    key = new_id()
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 10, "pace": 0.05}}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        first = with_id(await v2_header(stack, payer, body=body), key)
        async with aiohttp.ClientSession() as client:
            response = await client.post(
                stack.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: first}
            )
            await asyncio.wait_for(response.content.readline(), 5)
            # The caller thinks the reply stalled and retries while it is still coming.
            retry = with_id(await v2_header(stack, payer, body=body), key)
            status, headers, _ = await post(stack, retry, json=body)
            assert (status, headers[wire.ERROR_HEADER]) == (409, "payment_in_progress")
            assert "Retry-After" in headers
            await asyncio.wait_for(response.read(), 10)  # the first reply ends whole
        await settled(ledger)
        status, headers, _ = await post(stack, retry, json=body)
        assert (status, headers[wire.ERROR_HEADER]) == (409, "payment_already_served")
        assert stack.fake.hits[CHAT_HITS] == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_an_identifier_whose_payment_was_released_pays_the_retry_once(
    facilitator, usdc, payer, seller, ledger
):
    # The upstream fails: nothing is charged and the payment is released. The caller's retry
    # with the same identifier is a purchase like any other — served, and charged once.
    key = new_id()
    failing = {**CHAT_BODY, "model": "fake-error-503"}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        first = with_id(await v2_header(stack, payer, body=failing), key)
        status, _, _ = await post(stack, first, json=failing)
        assert status == 503
        assert [r.state for r in await records(ledger)] == [PaymentState.RELEASED]
        retry = with_id(await v2_header(stack, payer), key)
        status, headers, body = await post(stack, retry)
        assert status == 200, body
        assert receipt_of(headers)["success"] is True
        status, headers, _ = await post(stack, retry)
        assert (status, headers[wire.ERROR_HEADER]) == (409, "payment_already_served")
    states = sorted((r.state, r.idempotency_key) for r in await records(ledger))
    assert states == [(PaymentState.RELEASED, None), (PaymentState.SETTLED, key)]
    assert usdc.balance_of(seller) == PRICE_ATOMIC
