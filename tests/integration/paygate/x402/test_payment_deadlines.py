"""Replies are only delivered on authorizations that can still settle, and paid plaintext
replies are held under their own limit (issue 10: expiring authorizations, reply limits)."""

from __future__ import annotations

import aiohttp

from paygate import wire
from paygate.x402.inband import SSE_PREFIX
from paygate.x402.ledger import PaymentState
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    paid_stack,
    records,
    v2_header,
)


async def test_a_stream_outliving_its_authorization_ends_in_band_and_is_settled(
    facilitator, usdc, payer, seller, tmp_path
):
    # The payer signs for 18 s (the offer's maxTimeoutSeconds); the stream would take 20 s.
    # It must end at validBefore - 8 s with an in-band error, and settle for what was served
    # (the facilitator itself wants 6 s left to settle).
    ledger = tmp_path / "p.db"
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 40, "pace": 0.5}}
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        max_timeout_seconds=18,
        settle_margin_seconds=8,
    ) as stack:
        header = await v2_header(stack, payer, CHAT, body)
        async with stack.client.post(
            stack.url + CHAT,
            json=body,
            headers={wire.PAYMENT_SIGNATURE: header},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            assert response.status == 200
            text = await response.read()
    events = [line for line in text.split(b"\n\n") if line]
    words = [e for e in events if e.startswith(b"data: {") and b'"choices"' in e]
    assert 5 < len(words) < 30  # cut, not served in full
    assert b'"code":"authorization_expiring"' in text
    # The payment receipt comes after the content, and the signed receipt (over all of it) last.
    lines = text.rstrip().split(b"\n")
    assert lines[-1].startswith(b": paygate-receipt ")
    assert lines[-3].startswith(SSE_PREFIX)
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert [r.state for r in await records(ledger)] == [PaymentState.SETTLED]


async def test_an_authorization_too_short_to_serve_and_settle_is_refused_up_front(
    facilitator, usdc, payer, seller, tmp_path
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "p.db",
        max_timeout_seconds=7,  # the payer signs for 7 s; serving needs 2 + 6
        settle_margin_seconds=2,
    ) as stack:
        header = await v2_header(stack, payer)
        async with stack.client.post(
            stack.url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
        ) as response:
            assert response.status == 402
            assert (
                response.headers[wire.ERROR_HEADER]
                == "invalid_exact_evm_payload_authorization_valid_before"
            )
        assert sum(stack.fake.hits.values()) == 0
    assert usdc.balance_of(seller) == 0


async def test_paid_plaintext_replies_have_their_own_limit(
    facilitator, usdc, payer, seller, tmp_path
):
    ledger = tmp_path / "p.db"
    body = {**CHAT_BODY, "fake": {"chunks": 20, "pad": 200}}  # about 4 KB, not streamed
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        max_sealed_reply_bytes=1024,  # only for replies sealed whole: not this one
    ) as stack:
        header = await v2_header(stack, payer, CHAT, body)
        async with stack.client.post(
            stack.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
        ) as response:
            assert response.status == 200
            assert len(await response.read()) > 4000
    assert usdc.balance_of(seller) == PRICE_ATOMIC

    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        max_plain_reply_bytes=1024,
    ) as stack:
        header = await v2_header(stack, payer, CHAT, body)
        async with stack.client.post(
            stack.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
        ) as response:
            assert response.status == 502
            assert response.headers[wire.ERROR_HEADER] == "reply_too_large"
            assert "holds for settlement" in (await response.json())["error"]["message"]
    assert usdc.balance_of(seller) == PRICE_ATOMIC  # nothing more: the second was released
    states = sorted(r.state for r in await records(ledger))
    assert states == sorted([PaymentState.SETTLED, PaymentState.RELEASED])
