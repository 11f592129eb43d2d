"""Metered payments (x402 `upto`) through the real gateway: the official SDK's upto client pays,
the SDK's upto facilitator settles on anvil through Uniswap's Permit2 and our
x402UptoPermit2Proxy stand-in, and the FAKE model server reports usage deterministically (prompt
tokens = words of the messages, completion tokens = words sent). Balances on chain are the proof:
the seller gains exactly usage x price, never more than the authorized maximum.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from paygate import wire
from paygate.config import ConfigError
from paygate.x402.inband import SSE_PREFIX
from paygate.x402.ledger import PaymentState
from tests.fixtures.chain import PAYER_FUNDS, encode_header, sign_v2_payment
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    paid_stack,
    post,
    records,
)
from tests.fixtures.upto_support import (
    CAP,
    charge,
    decoded,
    receipt_header,
    sdk_upto_client,
    upto_offer,
    upto_settings,
    usage_of_receipt,
)

HITS = "POST /v1/chat/completions"


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


def stack_for(facilitator, seller, ledger, **overrides):
    return paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **upto_settings(**overrides)
    )


async def upto_header(stack, payer, body=CHAT_BODY, path=CHAT) -> tuple[str, dict]:
    required = await challenge_of(stack, path, body)
    offer = upto_offer(required)
    payment = sign_v2_payment(payer, offer, resource=required["resource"]["url"])
    return encode_header(payment), payment


# --- the 402 ------------------------------------------------------------------------------


async def test_the_402_offers_upto_beside_exact_with_this_requests_maximum(
    facilitator, seller, ledger
):
    async with stack_for(facilitator, seller, ledger) as stack:
        required = await challenge_of(stack)
        async with stack.client.post(stack.url + CHAT, json=CHAT_BODY) as response:
            v1 = await response.json()
        small = await challenge_of(stack, body={**CHAT_BODY, "max_tokens": 2})
    schemes = [o["scheme"] for o in required["accepts"]]
    assert schemes == ["exact", "upto"]
    offer = upto_offer(required)
    assert offer["extra"]["assetTransferMethod"] == "permit2"
    assert offer["extra"]["facilitatorAddress"] == facilitator.address
    body_bytes = len(json.dumps(CHAT_BODY))  # as aiohttp sends it
    # prompt bound = body bytes + 16 + 8 per message; output bound = the cap
    assert int(offer["amount"]) == charge(body_bytes + 24, CAP)
    assert int(upto_offer(small)["amount"]) == charge(
        len(json.dumps({**CHAT_BODY, "max_tokens": 2})) + 24, 2
    )
    assert [o["scheme"] for o in v1["accepts"]] == ["exact"]  # v1 has no upto
    assert stack.fake.hits[HITS] == 0


# --- the official client pays -------------------------------------------------------------


async def test_sdk_upto_client_pays_exactly_what_was_used(
    facilitator, usdc, upto_payer, seller, ledger
):
    async with (
        stack_for(facilitator, seller, ledger) as stack,
        sdk_upto_client(upto_payer) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
        reply = response.json()
        receipt = receipt_header(response.headers)
        seen = stack.fake.hits[HITS]
    assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    owed = charge(1, 4)
    assert receipt["success"] is True
    assert receipt["amount"] == str(owed)
    usage = usage_of_receipt(receipt)
    assert usage["promptTokens"] == 1
    assert usage["completionTokens"] == 4
    assert usage["source"] == "upstream"
    assert usdc.balance_of(seller) == owed
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS - owed
    assert seen == 1
    (record,) = await records(ledger)
    assert record.scheme == "upto"
    assert record.state is PaymentState.SETTLED
    assert (record.tokens_in, record.tokens_out) == (1, 4)
    assert record.settled_amount == owed < record.amount  # settled ≤ the authorized maximum
    assert int(usage["maximum"]) == record.amount


async def test_sdk_upto_client_pays_for_a_stream_with_the_receipt_in_band(
    facilitator, usdc, upto_payer, seller, ledger
):
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 6, "pace": 0.01}}
    async with (
        stack_for(facilitator, seller, ledger) as stack,
        sdk_upto_client(upto_payer) as client,
        client.stream("POST", stack.url + CHAT, json=body) as response,
    ):
        assert response.status_code == 200
        assert wire.PAYMENT_RESPONSE not in response.headers
        lines = [line async for line in response.aiter_lines()]
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    # six words, the finish chunk, [DONE]: the usage chunk the gateway asked for is stripped
    assert len(events) == 8
    assert all('"usage"' not in event for event in events)
    (comment,) = [line for line in lines if line.startswith(SSE_PREFIX.decode().strip())]
    receipt = decoded(comment.split(" ", 2)[2])
    owed = charge(1, 6)
    assert receipt["success"] is True
    assert receipt["amount"] == str(owed)
    assert usage_of_receipt(receipt)["completionTokens"] == 6
    assert usdc.balance_of(seller) == owed


async def test_a_caller_who_asked_for_stream_usage_keeps_it(
    facilitator, usdc, upto_payer, seller, ledger
):
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    async with stack_for(facilitator, seller, ledger) as stack:
        header, _ = await upto_header(stack, upto_payer, body)
        status, _, raw = await post(stack, header, json=body)
    assert status == 200
    chunks = [
        json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert usdc.balance_of(seller) == charge(1, 4)


async def test_ollama_generate_is_metered_from_eval_counts(
    facilitator, usdc, upto_payer, seller, ledger
):
    body = {"model": "fake-llama", "prompt": "two words", "fake": {"chunks": 3}}
    async with stack_for(facilitator, seller, ledger) as stack:
        header, _ = await upto_header(stack, upto_payer, body, "/api/generate")
        status, _, raw = await post(stack, header, json=body, path="/api/generate")
    assert status == 200
    done = json.loads(raw.splitlines()[-1])
    assert (done["prompt_eval_count"], done["eval_count"]) == (2, 3)
    assert usdc.balance_of(seller) == charge(2, 3)


async def test_max_tokens_zero_is_no_limit_to_ollama_so_it_is_priced_at_the_cap(
    facilitator, usdc, upto_payer, seller, ledger
):
    # Ollama runs a num_predict of 0 without limit: pricing it as zero output would sell
    # unbounded model time for the price of the prompt.
    body = {**CHAT_BODY, "max_tokens": 0, "fake": {"chunks": 10_000}}
    async with stack_for(facilitator, seller, ledger) as stack:
        header, payment = await upto_header(stack, upto_payer, body)
        status, _, raw = await post(stack, header, json=body)
        (forwarded,) = [r for r in stack.fake.received if r.path == CHAT]
    assert status == 200, raw
    assert json.loads(forwarded.body)["max_tokens"] == CAP
    assert json.loads(raw)["usage"]["completion_tokens"] == CAP
    maximum = int(payment["payload"]["permit2Authorization"]["permitted"]["amount"])
    assert usdc.balance_of(seller) == charge(1, CAP) <= maximum


async def test_a_spent_upto_authorization_is_refused_in_its_own_scheme_s_words(
    facilitator, usdc, upto_payer, seller, ledger
):
    body = {**CHAT_BODY, "max_tokens": 4}
    async with stack_for(facilitator, seller, ledger) as stack:
        header, _ = await upto_header(stack, upto_payer, body)
        status, _, raw = await post(stack, header, json=body)
        assert status == 200, raw
    paid = usdc.balance_of(seller)
    assert paid > 0
    # The authorization is spent for this gateway: a replay is refused in the words of its
    # own scheme (not exact's EIP-3009 code), with the original receipt, and nothing moves.
    async with stack_for(facilitator, seller, ledger) as stack:
        status, headers, raw = await post(stack, header, json=body)
    assert status == 402
    assert headers["X-Paygate-Error"] == "invalid_upto_evm_nonce_already_used"
    assert decoded(headers[wire.PAYMENT_REQUIRED])["error"] == (
        "invalid_upto_evm_nonce_already_used"
    )
    assert receipt_header(headers)["amount"] == str(paid)
    assert usdc.balance_of(seller) == paid


async def test_without_max_tokens_a_model_that_never_stops_is_cut_at_the_cap(
    facilitator, usdc, upto_payer, seller, ledger
):
    # The FAKE stands in for a never-stopping model: 10 000 words unless told a limit.
    body = {**CHAT_BODY, "fake": {"chunks": 10_000}}
    async with stack_for(facilitator, seller, ledger) as stack:
        header, payment = await upto_header(stack, upto_payer, body)
        status, _, raw = await post(stack, header, json=body)
    assert status == 200
    reply = json.loads(raw)
    assert reply["usage"]["completion_tokens"] == CAP
    assert reply["choices"][0]["finish_reason"] == "length"
    maximum = int(payment["payload"]["permit2Authorization"]["permitted"]["amount"])
    assert usdc.balance_of(seller) == charge(1, CAP) <= maximum


@pytest.mark.parametrize(
    ("fallback", "source"), [("max", "fallback-max"), ("estimate", "fallback-estimate")]
)
async def test_no_usage_reported_charges_the_configured_fallback(
    facilitator, usdc, upto_payer, seller, ledger, fallback, source
):
    body = {**CHAT_BODY, "model": "fake-no-usage"}
    async with stack_for(facilitator, seller, ledger, usage_fallback=fallback) as stack:
        header, payment = await upto_header(stack, upto_payer, body)
        status, headers, raw = await post(stack, header, json=body)
    assert status == 200
    receipt = receipt_header(headers)
    assert usage_of_receipt(receipt)["source"] == source
    maximum = int(payment["payload"]["permit2Authorization"]["permitted"]["amount"])
    (record,) = await records(ledger)
    if fallback == "max":
        assert usdc.balance_of(seller) == maximum
    else:
        assert 0 < usdc.balance_of(seller) < maximum
        assert record.tokens_out == min(CAP, -(-len(raw) // 4))
    assert usdc.balance_of(seller) == record.settled_amount


# --- replays, outages, start --------------------------------------------------------------


async def test_twenty_concurrent_copies_of_one_authorization_are_served_once(
    facilitator, usdc, upto_payer, seller, ledger
):
    async with stack_for(facilitator, seller, ledger) as stack:
        header, _ = await upto_header(stack, upto_payer)
        answers = await asyncio.gather(*(post(stack, header) for _ in range(20)))
        served = stack.fake.hits[HITS]
    statuses = sorted(status for status, _, _ in answers)
    assert statuses.count(200) == 1, statuses
    assert set(statuses) <= {200, 402, 409}
    assert served == 1
    assert usdc.balance_of(seller) == charge(1, 4)


async def test_a_settled_upto_authorization_sent_again_is_refused_with_the_upto_code(
    facilitator, usdc, upto_payer, seller, ledger
):
    async with stack_for(facilitator, seller, ledger) as stack:
        header, _ = await upto_header(stack, upto_payer)
        first, _, _ = await post(stack, header)
        status, headers, raw = await post(stack, header)
        served = stack.fake.hits[HITS]
    assert first == 200
    assert status == 402
    assert headers["X-Paygate-Error"] == "invalid_upto_evm_nonce_already_used"
    assert json.loads(raw)["error"] == "invalid_upto_evm_nonce_already_used"  # the v1 body
    assert receipt_header(headers)["amount"] == str(charge(1, 4))  # the original receipt
    assert served == 1
    assert usdc.balance_of(seller) == charge(1, 4)


async def test_a_facilitator_that_is_down_gives_503_never_an_unpaid_reply(
    facilitator, usdc, upto_payer, seller, ledger
):
    async with stack_for(facilitator, seller, ledger) as stack:
        header, _ = await upto_header(stack, upto_payer)
        facilitator.down()
        status, headers, _ = await post(stack, header)
        served = stack.fake.hits[HITS]
    assert status == 503
    assert headers["Retry-After"]
    assert served == 0
    assert usdc.balance_of(seller) == 0


async def test_a_payment_for_another_maximum_or_facilitator_is_refused_locally(
    facilitator, upto_payer, seller, ledger
):
    async with stack_for(facilitator, seller, ledger) as stack:
        required = await challenge_of(stack)
        offer = upto_offer(required)
        low = {**offer, "amount": str(int(offer["amount"]) - 1)}
        other = {**offer, "extra": {**offer["extra"], "facilitatorAddress": seller}}
        answers = []
        for bad in (low, other):
            header = encode_header(sign_v2_payment(upto_payer, bad))
            status, headers, _ = await post(stack, header)
            answers.append((status, headers[wire.ERROR_HEADER]))
    assert answers == [(402, "permit2_amount_mismatch"), (402, "upto_facilitator_mismatch")]
    assert facilitator.stats.verify_calls == 0


async def test_upto_on_a_network_the_facilitator_does_not_support_refuses_to_start(
    facilitator, seller, ledger
):
    with pytest.raises(ConfigError, match="does not support upto on eip155:8453"):
        async with stack_for(facilitator, seller, ledger, network="base-sepolia,base"):
            pass


async def test_exact_still_pays_its_flat_price_beside_upto(
    facilitator, usdc, payer, seller, ledger
):
    from tests.fixtures.payment_support import v2_header

    async with stack_for(facilitator, seller, ledger) as stack:
        header = await v2_header(stack, payer)  # the first offer: exact
        status, _, _ = await post(stack, header)
    assert status == 200
    assert usdc.balance_of(seller) == PRICE_ATOMIC


# --- chain mode: the gateway's gas key is the facilitator ---------------------------------


def chain_upto(seller, ledger, anvil, gas_key, **overrides):
    return paid_stack(
        seller=seller,
        facilitator_url=None,
        ledger=ledger,
        payment_mode="chain",
        chain_rpc_url=anvil.rpc_url,
        gas_key=gas_key.key,
        **upto_settings(**overrides),
    )


async def test_chain_mode_settles_the_metered_amount_with_proof_on_chain(
    anvil, usdc, upto_payer, seller, ledger, gas_key
):
    async with (
        chain_upto(seller, ledger, anvil, gas_key) as stack,
        sdk_upto_client(upto_payer) as client,
    ):
        required = await challenge_of(stack)
        assert upto_offer(required)["extra"]["facilitatorAddress"] == gas_key.address
        response = await client.post(stack.url + CHAT, json={**CHAT_BODY, "fake": {"chunks": 3}})
        assert response.status_code == 200, response.text
        receipt = receipt_header(response.headers)
    owed = charge(1, 3)
    assert receipt["success"] is True
    assert receipt["amount"] == str(owed)
    mined = anvil.wait_for_receipt(receipt["transaction"])
    assert mined["to"].lower() == "0x4020a4f3b7b90cca423b9fabcc0ce57c6c240002"
    assert usdc.balance_of(seller) == owed
    (record,) = await records(ledger)
    assert record.settled_amount == owed
    assert record.transaction == receipt["transaction"]


async def test_chain_mode_refuses_a_payer_without_a_permit2_allowance(
    anvil, usdc, payer, seller, ledger, gas_key
):
    async with chain_upto(seller, ledger, anvil, gas_key) as stack:
        header, _ = await upto_header(stack, payer)
        status, headers, _ = await post(stack, header)
        served = stack.fake.hits[HITS]
    assert status == 402
    assert headers[wire.ERROR_HEADER] == "permit2_allowance_required"
    assert served == 0
    assert usdc.balance_of(seller) == 0


# --- operators: usage in list/show, earnings in summary ------------------------------------


def cli(*args: str, ledger) -> dict | list:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "paygate.cli.main",
            "payments",
            *args,
            "--ledger-path",
            str(ledger),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_payments_list_show_and_summary_show_usage_and_earnings(
    facilitator, upto_payer, payer, seller, ledger
):
    from tests.fixtures.payment_support import v2_header

    async with stack_for(facilitator, seller, ledger) as stack:
        for chunks in (2, 5):
            body = {**CHAT_BODY, "fake": {"chunks": chunks}}
            header, _ = await upto_header(stack, upto_payer, body)
            assert (await post(stack, header, json=body))[0] == 200
        assert (await post(stack, await v2_header(stack, payer)))[0] == 200  # exact
    rows = cli("list", ledger=ledger)
    metered = [r for r in rows if r["scheme"] == "upto"]
    assert sorted(r["tokens_out"] for r in metered) == [2, 5]
    assert all(r["model"] == "fake-llama" and r["usage_source"] == "upstream" for r in metered)
    shown = cli("show", metered[0]["id"], ledger=ledger)
    assert shown["settled"] == str(charge(1, shown["tokens_out"]))
    assert int(shown["amount"]) > int(shown["settled"])  # the maximum, above the charge
    by_model = cli("summary", "--by", "model", ledger=ledger)
    groups = {g["key"]: g for g in by_model["groups"]}
    assert groups["fake-llama"]["payments"] == 2
    assert groups["fake-llama"]["tokens_out"] == 7
    assert groups["fake-llama"]["settled"] == str(charge(1, 2) + charge(1, 5))
    assert groups["-"]["settled"] == str(PRICE_ATOMIC)  # exact has no model
    assert by_model["total"] == str(charge(1, 2) + charge(1, 5) + PRICE_ATOMIC)
    by_payer = cli("summary", "--by", "payer", "--since", "1h", ledger=ledger)
    assert {g["key"] for g in by_payer["groups"]} == {upto_payer.address, payer.address}
    (today,) = cli("summary", "--by", "day", ledger=ledger)["groups"]
    assert today["payments"] == 3
    assert cli("summary", "--since", "2999-01-01", ledger=ledger)["groups"] == []
