"""POST /v1/batch/chat/completions: one payment covers every item — the sum of the items'
prices (exact) or of their maxima (upto, settled on the summed usage) — items are forwarded
concurrently and answered in order, each a completion or an error object."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.integration.payment_support import PRICE_ATOMIC, challenge_of, paid_stack, post
from tests.integration.upto_support import charge, receipt_header, upto_offer, upto_settings

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


async def test_exact_pays_the_sum_and_items_answer_in_order(
    facilitator, usdc, payer, seller, ledger
):
    body = [item(2), {**item(1), "stream": True}, item(3, "fake-error-500"), item(4)]
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        required = await challenge_of(stack, BATCH, body)
        exact = required["accepts"][0]
        assert int(exact["amount"]) == 4 * PRICE_ATOMIC  # every item priced, as the 402 says
        header = encode_header(sign_v2_payment(payer, exact))
        status, _, raw = await post(stack, header, path=BATCH, json=body)
        hits = stack.fake.hits[HITS]
    assert status == 200, raw
    results = json.loads(raw)["results"]
    assert [r.get("object") for r in results] == ["chat.completion", None, None, "chat.completion"]
    assert results[0]["usage"]["completion_tokens"] == 2
    assert results[3]["usage"]["completion_tokens"] == 4
    assert results[1]["error"]["code"] == "invalid_batch_item"
    assert (results[2]["error"]["status"], results[2]["error"]["code"]) == (500, "upstream_error")
    assert hits == 3  # the streamed item never left
    assert usdc.balance_of(seller) == 4 * PRICE_ATOMIC


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
