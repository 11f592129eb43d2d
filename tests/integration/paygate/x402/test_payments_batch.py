"""POST /v1/batch/chat/completions: a batch is N requests under one payment — each item passes
the admission a single request would (its own rate-limit tokens, output bound, price), items
are forwarded concurrently and answered in order, each a completion or an error object. A
refused or failed item costs nothing: it is not priced (refused before payment), settles
nothing under upto, and under exact (which moves the signed value or nothing) makes the batch
settle nothing — chain balances are the proof."""

from __future__ import annotations

import json

import pytest

from paygate.x402.ledger import PaymentState
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.payment_support import (
    PRICE_ATOMIC,
    challenge_of,
    paid_stack,
    post,
    records,
)
from tests.fixtures.upto_support import charge, receipt_header, upto_offer, upto_settings

BATCH = "/v1/batch/chat/completions"
HITS = "POST /v1/chat/completions"


def item(words: int, model: str = "fake-llama") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "fake": {"chunks": words},
    }


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


async def test_exact_pays_the_forwarded_items_and_answers_in_order(
    facilitator, usdc, payer, seller, ledger
):
    body = [item(2), {**item(1), "stream": True}, item(4), {**item(1), "max_new_tokens": 9}]
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        required = await challenge_of(stack, BATCH, body)
        exact = required["accepts"][0]
        assert int(exact["amount"]) == 2 * PRICE_ATOMIC  # the refused items are not priced
        header = encode_header(sign_v2_payment(payer, exact))
        status, _, raw = await post(stack, header, path=BATCH, json=body)
        hits = stack.fake.hits[HITS]
    assert status == 200, raw
    results = json.loads(raw)["results"]
    assert [r.get("object") for r in results] == ["chat.completion", None, "chat.completion", None]
    assert results[0]["usage"]["completion_tokens"] == 2
    assert results[2]["usage"]["completion_tokens"] == 4
    assert results[1]["error"]["code"] == "invalid_batch_item"
    assert results[3]["error"]["code"] == "unsupported_limit_key"
    assert hits == 2  # the refused items never left
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC


async def test_an_exact_batch_with_a_failed_item_costs_nothing(
    facilitator, usdc, payer, seller, ledger
):
    body = [item(2), item(3, "fake-error-500"), item(4)]
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        required = await challenge_of(stack, BATCH, body)
        header = encode_header(sign_v2_payment(payer, required["accepts"][0]))
        status, _, raw = await post(stack, header, path=BATCH, json=body)
    assert status == 200, raw
    results = json.loads(raw)["results"]
    # exact moves the signed sum or nothing: unpaid, the served items' completions stay here
    assert [r["error"]["code"] for r in results] == [
        "batch_incomplete",
        "upstream_error",
        "batch_incomplete",
    ]
    assert usdc.balance_of(seller) == 0
    (record,) = await records(ledger)
    assert record.state is PaymentState.RELEASED


async def test_upto_charges_only_the_items_served(facilitator, usdc, upto_payer, seller, ledger):
    body = [item(2), item(3, "fake-error-500"), item(5)]
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **upto_settings()
    ) as stack:
        required = await challenge_of(stack, BATCH, body)
        header = encode_header(sign_v2_payment(upto_payer, upto_offer(required)))
        status, _, raw = await post(stack, header, path=BATCH, json=body)
    assert status == 200, raw
    assert usdc.balance_of(seller) == charge(1, 2) + charge(1, 5)


async def test_per_route_limits_count_items(facilitator, seller, ledger):
    limits = {"POST /v1/chat/completions": {"per_ip": 60, "burst": 4}}
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, rate_limits=limits
    ) as stack:
        three = await post(stack, None, path=BATCH, json=[item(1)] * 3)
        two = await post(stack, None, path=BATCH, json=[item(1)] * 2)
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, rate_limits=limits
    ) as stack:
        five = await post(stack, None, path=BATCH, json=[item(1)] * 5)
    assert three[0] == 402  # three requests, within the burst of four: challenged
    # two more are the fifth and sixth: past the burst, whatever the batch route's own limit
    assert (two[0], two[1]["X-Paygate-Error"]) == (429, "rate_limited")
    assert five[0] == 429


async def test_a_payer_limit_counts_items(facilitator, usdc, payer, seller, ledger):
    limits = {"model:fake-llama": {"per_payer": 60, "burst": 2}}
    body = [item(1)] * 3
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, rate_limits=limits
    ) as stack:
        required = await challenge_of(stack, BATCH, body)
        header = encode_header(sign_v2_payment(payer, required["accepts"][0]))
        status, headers, _ = await post(stack, header, path=BATCH, json=body)
        hits = stack.fake.hits[HITS]
    assert (status, headers["X-Paygate-Error"]) == (429, "rate_limited")
    assert hits == 0
    assert usdc.balance_of(seller) == 0


async def test_upto_settles_the_summed_usage(facilitator, usdc, upto_payer, seller, ledger):
    body = [item(2), item(5)]
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **upto_settings()
    ) as stack:
        required = await challenge_of(stack, BATCH, body)
        offer = upto_offer(required)
        header = encode_header(sign_v2_payment(upto_payer, offer))
        status, headers, raw = await post(stack, header, path=BATCH, json=body)
    assert status == 200, raw
    receipt = receipt_header(headers)
    assert receipt["amount"] == str(charge(1, 2) + charge(1, 5))
    assert usdc.balance_of(seller) == charge(1, 2) + charge(1, 5) < int(offer["amount"])


async def test_a_bad_batch_is_400_and_nothing_is_forwarded(facilitator, seller, ledger):
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, batch_max_items=2
    ) as stack:
        bad = ({"x": 1}, [], [item(1)] * 3, [1])
        # With a payment the body is judged before the payment is: 400, nothing charged.
        answers = [await post(stack, "e30=", path=BATCH, json=b) for b in bad]
        # Without one it is a probe: its 402 comes before the body is judged (bazaar).
        probes = [await post(stack, None, path=BATCH, json=b) for b in bad]
        hits = stack.fake.hits[HITS]
    assert [status for status, _, _ in answers] == [400, 400, 400, 400]
    assert all(h["X-Paygate-Error"] == "invalid_batch" for _, h, _ in answers)
    assert [status for status, _, _ in probes] == [402, 402, 402, 402]
    assert hits == 0
