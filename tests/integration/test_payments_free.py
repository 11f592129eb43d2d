"""The free quota: a wallet that proves itself with x402's sign-in-with-x extension (signed by
the official SDK's SIWX client) gets N free requests a day, durable in the ledger; then it pays.
A forged, replayed or foreign sign-in gets nothing."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header

from paygate import wire
from tests.integration.payment_support import CHAT, CHAT_BODY, challenge_of, paid_stack

HITS = "POST /v1/chat/completions"


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


async def signed_in(stack, account) -> str:
    """A fresh SIGN-IN-WITH-X header, built by the SDK from a fresh 402's declaration."""
    required = await challenge_of(stack)
    declared = required["extensions"]["sign-in-with-x"]
    info = {**declared["info"], **declared["supportedChains"][0]}
    payload = await create_siwx_payload(info, account, stack.url + CHAT)
    return encode_siwx_header(payload)


async def send(stack, header: str | None) -> tuple[int, dict]:
    headers = {wire.SIGN_IN_WITH_X: header} if header else {}
    async with stack.client.post(
        stack.url + CHAT, json=CHAT_BODY, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_a_signed_in_wallet_gets_its_free_requests_then_pays(
    facilitator, payer, seller, ledger
):
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, free_requests_per_day=2
    ) as stack:
        answers = [await send(stack, await signed_in(stack, payer)) for _ in range(3)]
        served = stack.fake.hits[HITS]
    assert [status for status, _ in answers] == [200, 200, 402]
    assert [h.get(wire.FREE_REMAINING_HEADER) for _, h in answers[:2]] == ["1", "0"]
    assert answers[2][1][wire.ERROR_HEADER] == "free_quota_exhausted"
    assert served == 2
    # Durable: another gateway on the same ledger knows the quota is spent.
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, free_requests_per_day=2
    ) as stack:
        status, headers = await send(stack, await signed_in(stack, payer))
    assert status == 402
    assert headers[wire.ERROR_HEADER] == "free_quota_exhausted"


async def test_a_concurrent_burst_gets_exactly_the_quota(facilitator, payer, seller, ledger):
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, free_requests_per_day=3
    ) as stack:
        headers = [await signed_in(stack, payer) for _ in range(10)]
        answers = await asyncio.gather(*(send(stack, h) for h in headers))
        served = stack.fake.hits[HITS]
    assert sorted(status for status, _ in answers) == [200] * 3 + [402] * 7
    assert served == 3


async def test_forged_replayed_and_foreign_sign_ins_get_nothing(facilitator, payer, seller, ledger):
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, free_requests_per_day=5
    ) as stack:
        good = await signed_in(stack, payer)
        assert (await send(stack, good))[0] == 200
        replayed = await send(stack, good)
        proof = json.loads(base64.b64decode(good))
        forged = {**proof, "address": seller}  # claims another wallet
        foreign = {**proof, "domain": "evil.example", "nonce": "a" * 32}
        answers = [
            (await send(stack, base64.b64encode(json.dumps(doc).encode()).decode()))
            for doc in (forged, foreign)
        ]
        garbage = await send(stack, "not base64 ***")
        served = stack.fake.hits[HITS]
    assert replayed[0] == 402
    assert replayed[1][wire.ERROR_HEADER] == "invalid_siwx_nonce"
    assert [h[wire.ERROR_HEADER] for _, h in answers] == [
        "invalid_siwx_signature",  # the signature recovers the payer, not the claimed wallet
        "invalid_siwx_domain_mismatch",
    ]
    assert garbage[0] == 402
    assert garbage[1][wire.ERROR_HEADER] == "invalid_siwx_payload"
    assert served == 1
