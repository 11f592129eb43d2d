"""x402 payments through the real gateway, settled on a real chain by the real SDK facilitator.

Balances on chain are the proof: after N paid requests the seller holds exactly N times the price.
"""

from __future__ import annotations

import asyncio
import base64
import json
from decimal import Decimal

import aiohttp
import pytest
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from paygate import wire
from paygate.x402.inband import NDJSON_KEY, SSE_PREFIX
from paygate.x402.ledger import EventAction, PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger
from tests.fixtures.gateway_support import eventually
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    drain_wallet,
    paid_stack,
    post,
    receipt_of,
    records,
    v1_header,
    v2_header,
)

CHAT_HITS = "POST /v1/chat/completions"


def sdk_http_client(payer) -> x402HttpxClient:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    return x402HttpxClient(client, timeout=30)


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


# --- the official client pays -------------------------------------------------------------


async def test_sdk_client_pays_for_a_chat_completion(facilitator, usdc, payer, seller, ledger):
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        async with sdk_http_client(payer) as client:
            for _ in range(3):
                response = await client.post(stack.url + CHAT, json=CHAT_BODY)
                assert response.status_code == 200
                assert response.json()["object"] == "chat.completion"
                assert response.headers["Cache-Control"] == "private, no-store"
                receipt = receipt_of(response.headers)
                assert receipt["success"] is True
                assert receipt["network"] == "eip155:84532"
                assert receipt["transaction"].startswith("0x")
        assert stack.fake.hits[CHAT_HITS] == 3
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == 100_000_000 - 3 * PRICE_ATOMIC
    states = [r.state for r in await records(ledger)]
    assert states == [PaymentState.SETTLED] * 3
    assert facilitator.stats.settle_calls == 3


async def test_sdk_client_pays_for_a_stream_with_the_receipt_in_band(
    facilitator, usdc, payer, seller, ledger
):
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 6, "pace": 0.01}}
    async with (
        paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack,
        sdk_http_client(payer) as client,
        client.stream("POST", stack.url + CHAT, json=body) as response,
    ):
        assert response.status_code == 200
        assert wire.PAYMENT_RESPONSE not in response.headers  # settled at the end
        assert response.headers["Cache-Control"] == "private, no-store"
        lines = [line async for line in response.aiter_lines()]
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 8  # six words, the finish_reason chunk, [DONE]
    comments = [line for line in lines if line.startswith(SSE_PREFIX.decode().strip())]
    assert len(comments) == 1
    receipt = json.loads(base64.b64decode(comments[0].split(" ", 2)[2]))
    assert receipt["success"] is True
    assert lines.index(comments[0]) > lines.index("data: [DONE]")
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_v1_payment_from_the_sdk(facilitator, usdc, payer, seller, ledger):
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v1_header(stack, payer)
        status, headers, body = await post(stack, header, name=wire.X_PAYMENT)
        assert status == 200, body
        receipt = receipt_of(headers, wire.X_PAYMENT_RESPONSE)
        assert receipt["success"] is True
        assert wire.PAYMENT_RESPONSE not in headers
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    (record,) = await records(ledger)
    assert record.x402_version == 1
    assert record.state is PaymentState.SETTLED


async def test_ollama_stream_receipt_rides_in_the_done_line(
    facilitator, usdc, payer, seller, ledger
):
    body = {"model": "fake-llama", "prompt": "hi", "fake": {"chunks": 5}}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer, "/api/generate", body)
        status, _, raw = await post(stack, header, path="/api/generate", json=body)
    assert status == 200
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [line["done"] for line in lines] == [False] * 5 + [True]
    receipt = json.loads(base64.b64decode(lines[-1][NDJSON_KEY]))
    assert receipt["success"] is True
    assert all(NDJSON_KEY not in line for line in lines[:-1])
    assert usdc.balance_of(seller) == PRICE_ATOMIC


# --- challenges and refusals ----------------------------------------------------------------


async def test_challenge_is_dual_stack_and_nothing_reaches_the_upstream(
    facilitator, seller, ledger
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        network="base-sepolia,base",
        public_url="https://gw.example",
    ) as stack:
        async with stack.client.post(stack.url + CHAT, json=CHAT_BODY) as response:
            assert response.status == 402
            assert response.headers["X-Paygate-Error"] == "payment_required"
            v1 = await response.json()
            v2 = json.loads(base64.b64decode(response.headers[wire.PAYMENT_REQUIRED]))
        assert v1["x402Version"] == 1
        assert [a["network"] for a in v1["accepts"]] == ["base-sepolia", "base"]
        assert v1["accepts"][0]["resource"] == "https://gw.example/v1/chat/completions"
        assert v2["resource"]["url"] == "https://gw.example/v1/chat/completions"
        assert v2["resource"]["mimeType"] == "application/json"
        assert [a["network"] for a in v2["accepts"]] == ["eip155:84532", "eip155:8453"]
        assert all(a["amount"] == "1000" and a["payTo"] == seller for a in v2["accepts"])
        assert stack.fake.hits[CHAT_HITS] == 0
    assert facilitator.stats.verify_calls == 0


async def test_each_challenge_names_the_url_it_was_asked_at(facilitator, seller, ledger):
    # Without a public URL the resource is the request's own URL (its Host header and path):
    # kept per URL, never one caller's host named in another's challenge.
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        asked = [
            ("a.example", CHAT),
            ("b.example:8080", CHAT),
            ("a.example", CHAT),
            ("a.example", "/v1/completions"),
            ("b.example:8080", CHAT),
        ]
        named = []
        for host, path in asked:
            async with stack.client.post(
                stack.url + path, json=CHAT_BODY, headers={"Host": host}
            ) as response:
                assert response.status == 402
                v1 = await response.json()
                v2 = json.loads(base64.b64decode(response.headers[wire.PAYMENT_REQUIRED]))
            assert v1["accepts"][0]["resource"] == v2["resource"]["url"]
            named.append(v2["resource"]["url"])
    assert named == [
        "http://a.example/v1/chat/completions",
        "http://b.example:8080/v1/chat/completions",
        "http://a.example/v1/chat/completions",
        "http://a.example/v1/completions",
        "http://b.example:8080/v1/chat/completions",
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("%%%", "not base64"),
        (base64.b64encode(b"{}").decode(), "x402Version"),
        (base64.b64encode(b'{"x402Version":2,"accepted":{}}').decode(), "accepted"),
    ],
)
async def test_malformed_payment_is_400_with_the_reason(facilitator, seller, ledger, value, reason):
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        status, headers, body = await post(stack, value)
        assert status == 400
        assert reason in json.loads(body)["error"]
        assert wire.PAYMENT_REQUIRED in headers  # the caller can still pay properly
        assert stack.fake.hits[CHAT_HITS] == 0
    assert facilitator.stats.verify_calls == 0


async def test_forged_and_mismatched_payments_never_reach_the_facilitator(
    facilitator, usdc, payer, seller, ledger
):
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        good = json.loads(base64.b64decode(await v2_header(stack, payer)))
        forged = json.loads(json.dumps(good))
        forged["payload"]["authorization"]["value"] = "1"  # sign for 1000, claim 1
        forged["accepted"]["amount"] = "1"
        other_payee = json.loads(json.dumps(good))
        other_payee["payload"]["authorization"]["from"] = seller  # not who signed
        for payment, reason in (
            (forged, "invalid_exact_evm_payload_authorization_value_mismatch"),
            (other_payee, "invalid_exact_evm_payload_signature"),
        ):
            value = base64.b64encode(json.dumps(payment).encode()).decode()
            status, headers, body = await post(stack, value)
            assert status == 402
            assert headers["X-Paygate-Error"] == reason
            assert json.loads(body)["error"] == reason
            fresh = json.loads(base64.b64decode(headers[wire.PAYMENT_REQUIRED]))
            assert fresh["accepts"][0]["amount"] == "1000"
        assert stack.fake.hits[CHAT_HITS] == 0
    assert facilitator.stats.verify_calls == 0
    assert usdc.balance_of(seller) == 0
    assert await records(ledger) == []


async def test_facilitator_says_insufficient_funds(facilitator, usdc, seller, ledger):
    from paygate_dev.chain.accounts import new_account

    broke = new_account()
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, broke))
        assert status == 402
        # The SDK facilitator's own reason for an empty wallet.
        assert headers["X-Paygate-Error"] == "invalid_exact_evm_insufficient_balance"
        assert stack.fake.hits[CHAT_HITS] == 0
    (record,) = await records(ledger)
    assert record.state is PaymentState.RELEASED


# --- replay guard ---------------------------------------------------------------------------


async def test_one_authorization_twenty_times_at_once_is_served_once(
    facilitator, usdc, payer, seller, ledger
):
    body = {**CHAT_BODY, "fake": {"pace": 0.05}}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer, body=body)
        results = await asyncio.gather(*(post(stack, header, json=body) for _ in range(20)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200] + [409] * 19
        refused = [h for s, h, _ in results if s == 409]
        assert all(h["X-Paygate-Error"] == "payment_in_progress" for h in refused)
        assert stack.fake.hits[CHAT_HITS] == 1
        # After settlement the same authorization is refused for good, with its receipt.
        status, headers, _ = await post(stack, header, json=body)
        assert status == 402
        assert headers["X-Paygate-Error"] == "invalid_exact_evm_nonce_already_used"
        assert receipt_of(headers)["success"] is True
        assert stack.fake.hits[CHAT_HITS] == 1
    assert facilitator.stats.settle_calls == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_v1_and_v2_replays_of_one_authorization_are_one_payment(
    facilitator, usdc, payer, seller, ledger
):
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        v2 = json.loads(base64.b64decode(await v2_header(stack, payer)))
        status, _, _ = await post(stack, base64.b64encode(json.dumps(v2).encode()).decode())
        assert status == 200
        # The same signed authorization dressed as v1.
        as_v1 = {
            "x402Version": 1,
            "scheme": "exact",
            "network": "base-sepolia",
            "payload": v2["payload"],
        }
        value = base64.b64encode(json.dumps(as_v1).encode()).decode()
        status, headers, _ = await post(stack, value, name=wire.X_PAYMENT)
        assert status == 402
        assert headers["X-Paygate-Error"] == "invalid_exact_evm_nonce_already_used"
        assert stack.fake.hits[CHAT_HITS] == 1
    assert usdc.balance_of(seller) == PRICE_ATOMIC


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["down", "slow", "http_500", "garbage"])
async def test_verifier_faults_are_503_never_an_unpaid_reply(
    facilitator, usdc, payer, seller, ledger, fault
):
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer)
        facilitator.set_fault(fault, "verify" if fault != "down" else None, delay=3.0)
        status, headers, body = await post(stack, header)
        assert status == 503, body
        assert headers["Retry-After"]
        assert headers["X-Paygate-Error"] == "payment_verifier_unavailable"
        assert stack.fake.hits[CHAT_HITS] == 0
        (record,) = await records(ledger)
        assert record.state is PaymentState.RELEASED
        # The facilitator is back: the same authorization now goes through, once.
        facilitator.reset()
        status, headers, _ = await post(stack, header)
        assert status == 200
        assert receipt_of(headers)["success"] is True
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_upstream_error_is_not_settled_and_the_payment_can_be_retried(
    facilitator, usdc, payer, seller, ledger
):
    failing = {**CHAT_BODY, "model": "fake-error-500"}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer, body=failing)
        status, headers, _ = await post(stack, header, json=failing)
        assert status == 500
        assert wire.PAYMENT_RESPONSE not in headers
        # Released before the 500 was sent: an immediate retry is not "in progress".
        (record,) = await records(ledger)
        assert record.state is PaymentState.RELEASED
        assert facilitator.stats.settle_calls == 0
        # Released: the caller may use the same authorization again.
        status, _, _ = await post(stack, header, json=CHAT_BODY)
        assert status == 200
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_settlement_pending_keeps_the_hash_and_is_flagged_without_a_chain(
    facilitator, usdc, payer, seller, ledger
):
    facilitator.set_fault("settlement_pending")
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, payer))
        assert status == 200  # verified and served; settlement confirmation follows
        receipt = receipt_of(headers)
        assert receipt["success"] is False
        assert receipt["errorReason"] == "settlement_pending"
        assert receipt["transaction"].startswith("0x")
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLING
    assert record.transaction == receipt["transaction"]
    assert record.needs_review  # "pending" proves nothing, and nothing here reads the chain
    facilitator.reset()
    # A restart reconciles: the re-sent authorization's nonce is spent — still no proof.
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger):
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLING
    assert record.needs_review
    assert record.transaction == receipt["transaction"]
    assert usdc.balance_of(seller) == PRICE_ATOMIC  # once, not twice; never recorded as paid


async def test_settlement_pending_is_proven_on_chain_when_the_gateway_reads_it(
    facilitator, anvil, usdc, payer, seller, ledger
):
    facilitator.set_fault("settlement_pending")
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, chain_rpc_url=anvil.rpc_url
    ) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, payer))
        assert status == 200
        receipt = receipt_of(headers)
    # The facilitator's transaction is mined: its receipt holds AuthorizationUsed + Transfer.
    assert receipt["success"] is True
    assert receipt["transaction"] == facilitator.stats.transactions[0]
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert record.transaction == receipt["transaction"]
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def _settled(ledger, count: int = 1) -> None:
    async with asyncio.timeout(15):
        while True:
            found = await records(ledger)
            if len(found) == count and all(r.state is PaymentState.SETTLED for r in found):
                return
            await asyncio.sleep(0.05)


async def test_settle_refused_for_good_withholds_a_whole_reply(
    facilitator, usdc, anvil, payer, seller, ledger
):
    # The payer empties the wallet between verify and settle: the reply is not given away.
    facilitator.set_fault("slow", "settle", delay=2.0)
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer)
        request = asyncio.ensure_future(post(stack, header))
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
        await asyncio.to_thread(drain_wallet, anvil, payer)
        status, headers, raw = await request
    assert status == 402
    assert headers["X-Paygate-Error"] == "settlement_failed"
    assert "fake" not in raw.decode()  # no reply content
    assert receipt_of(headers)["success"] is False
    (record,) = await records(ledger)
    assert record.state is PaymentState.FAILED
    assert usdc.balance_of(seller) == 0


async def test_caller_disconnect_mid_stream_still_settles(facilitator, usdc, payer, seller, ledger):
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 50, "pace": 0.05}}
    async with paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=ledger) as stack:
        header = await v2_header(stack, payer, body=body)
        async with aiohttp.ClientSession() as client:
            response = await client.post(
                stack.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
            )
            assert response.status == 200
            await asyncio.wait_for(response.content.readline(), 5)
            response.close()  # the caller walks away after the first chunk
        await eventually(lambda: stack.fake.cancelled[CHAT_HITS] == 1, timeout=10)
        await _settled(ledger)
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_caller_disconnect_releases_when_the_operator_says_so(
    facilitator, usdc, payer, seller, ledger
):
    body = {**CHAT_BODY, "stream": True, "fake": {"chunks": 50, "pace": 0.05}}
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, settle_on_disconnect=False
    ) as stack:
        header = await v2_header(stack, payer, body=body)
        async with aiohttp.ClientSession() as client:
            response = await client.post(
                stack.url + CHAT, json=body, headers={wire.PAYMENT_SIGNATURE: header}
            )
            await asyncio.wait_for(response.content.readline(), 5)
            response.close()
        await eventually(lambda: stack.fake.cancelled[CHAT_HITS] == 1, timeout=10)

        async def released() -> bool:
            return [r.state for r in await records(ledger)] == [PaymentState.RELEASED]

        async with asyncio.timeout(10):
            while not await released():
                await asyncio.sleep(0.05)
    assert facilitator.stats.settle_calls == 0
    assert usdc.balance_of(seller) == 0


# --- modes and prices -----------------------------------------------------------------------


def chain_mode(seller, ledger, rpc_url, gas_key) -> dict:
    """Settings of a gateway that settles on chain itself: no facilitator at all."""
    return {
        "seller": seller,
        "facilitator_url": None,
        "ledger": ledger,
        "payment_mode": "chain",
        "chain_rpc_url": rpc_url,
        "gas_key": gas_key.key,
    }


async def test_chain_mode_settles_on_chain_with_no_facilitator(
    anvil, usdc, payer, seller, ledger, gas_key
):
    async with paid_stack(**chain_mode(seller, ledger, anvil.rpc_url, gas_key)) as stack:
        async with sdk_http_client(payer) as client:
            for _ in range(2):
                response = await client.post(stack.url + CHAT, json=CHAT_BODY)
                assert response.status_code == 200
                receipt = receipt_of(response.headers)
                assert receipt["success"] is True
        header = await v2_header(stack, payer)
        status, _, _ = await post(stack, header)
        assert status == 200
        status, headers, _ = await post(stack, header)
        assert status == 402
        assert headers["X-Paygate-Error"] == "invalid_exact_evm_nonce_already_used"
        assert stack.fake.hits[CHAT_HITS] == 3
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


async def test_chain_mode_refuses_an_unfunded_payer_before_serving(
    anvil, usdc, seller, ledger, gas_key
):
    from paygate_dev.chain.accounts import new_account

    async with paid_stack(**chain_mode(seller, ledger, anvil.rpc_url, gas_key)) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, new_account()))
        assert status == 402
        # The same reason as the SDK facilitator gives (test_facilitator_says_insufficient_funds)
        assert headers["X-Paygate-Error"] == "invalid_exact_evm_insufficient_balance"
        assert stack.fake.hits[CHAT_HITS] == 0


async def test_chain_mode_with_the_rpc_down_is_503(usdc, payer, seller, ledger, gas_key):
    from tests.fixtures.components import free_port

    dead_rpc = f"http://127.0.0.1:{free_port()}"
    settings = chain_mode(seller, ledger, dead_rpc, gas_key)
    async with paid_stack(**settings, facilitator_timeout=1.0) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, payer))
        assert status == 503
        assert headers["X-Paygate-Error"] == "payment_verifier_unavailable"
        assert stack.fake.hits[CHAT_HITS] == 0


async def test_verify_only_serves_verified_payments_and_settles_nothing(
    facilitator, usdc, payer, seller, ledger
):
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, payment_mode="verify-only"
    ) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, payer))
        assert status == 200
        assert wire.PAYMENT_RESPONSE not in headers
    (record,) = await records(ledger)
    assert (record.state, record.served, record.owner) == (PaymentState.SERVED, True, None)
    # The fewest ledger transactions: the reservation, then VERIFIED → SERVED with the lease
    # given up in one (and the reply's receipt); nothing marked twice, no separate let-go.
    async with await SqliteLedger.open(ledger, read_only=True) as reader:
        events = await reader.history(record.id)
        history = [(e.action, e.state) for e in events]
        (kept,) = await reader.receipts(record.id)
    # The reply's signed receipt is kept in SERVED's transaction (one write, the same instant),
    # before the reply went out.
    assert (kept.kind, kept.created_at) == ("reply", events[-1].at)
    assert history == [
        (EventAction.RESERVED, PaymentState.RESERVED),
        (EventAction.MOVED, PaymentState.VERIFIED),
        (EventAction.MOVED, PaymentState.SERVED),
    ]
    assert facilitator.stats.settle_calls == 0
    assert usdc.balance_of(seller) == 0
    # A restart's reconciler leaves it alone too: settling is the operator's business here.
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, payment_mode="verify-only"
    ):
        await asyncio.sleep(1.0)
    assert facilitator.stats.settle_calls == 0
    assert [r.state for r in await records(ledger)] == [PaymentState.SERVED]
    assert usdc.balance_of(seller) == 0


async def test_upfront_settles_before_forwarding(facilitator, usdc, payer, seller, ledger):
    stream = {**CHAT_BODY, "stream": True}
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, settle_timing="upfront"
    ) as stack:
        # A stream gets its receipt as a header: settlement happened before the first byte.
        status, headers, raw = await post(
            stack, await v2_header(stack, payer, body=stream), json=stream
        )
        assert status == 200
        assert receipt_of(headers)["success"] is True
        assert SSE_PREFIX not in raw
        # Upfront means paid even when the upstream then fails (the operator's choice).
        failing = {**CHAT_BODY, "model": "fake-error-502"}
        status, headers, _ = await post(
            stack, await v2_header(stack, payer, body=failing), json=failing
        )
        assert status == 502
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
    assert all(r.state is PaymentState.SETTLED and r.served for r in await records(ledger))


async def test_prices_per_route_and_model(facilitator, usdc, payer, seller, ledger):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        route_prices={"GET /api/tags": "0", "/v1/embeddings": "0.0005"},
        model_prices={"fake-big": "0.01"},
    ) as stack:
        async with stack.client.get(stack.url + "/api/tags") as response:
            assert response.status == 200  # free: no challenge
        required = await challenge_of(stack, "/v1/embeddings", {"model": "fake-big", "input": "x"})
        assert required["accepts"][0]["amount"] == "500"
        big = {**CHAT_BODY, "model": "fake-big"}
        required = await challenge_of(stack, CHAT, big)
        assert required["accepts"][0]["amount"] == "10000"
        status, _, _ = await post(stack, await v2_header(stack, payer, body=big), json=big)
        assert status == 200
        # A payment for the small model's price does not buy the big one.
        header = await v2_header(stack, payer)
        status, headers, _ = await post(stack, header, json=big)
        assert status == 402
        assert (
            headers["X-Paygate-Error"] == "invalid_exact_evm_payload_authorization_value_mismatch"
        )
    assert usdc.balance_of(seller) == 10 * PRICE_ATOMIC


async def test_price_per_million_tokens(facilitator, seller, ledger):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        price_per_million_tokens="2.5",
        token_estimate=2000,
    ) as stack:
        required = await challenge_of(stack)
    # 2.5 USDC per million tokens, 2000 tokens estimated: 0.005 USDC
    assert required["accepts"][0]["amount"] == str(int(Decimal("0.005") * 10**6))


def _with_payment_id(header: str, payment_id: str | None) -> str:
    # Extensions are outside the EIP-712 signature: a client may set them on a signed payment.
    payment = json.loads(base64.b64decode(header))
    payment["extensions"] = (
        {"payment-identifier": {"info": {"required": False, "id": payment_id}}}
        if payment_id
        else {}
    )
    return base64.b64encode(json.dumps(payment).encode()).decode()


async def test_payment_identifier_is_an_idempotency_key(facilitator, usdc, payer, seller, ledger):
    key = "order-0001-abcdefgh"
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        require_payment_identifier=True,
    ) as stack:
        required = await challenge_of(stack)
        assert required["extensions"]["payment-identifier"]["info"]["required"] is True
        first = await v2_header(stack, payer)
        status, headers, body = await post(stack, _with_payment_id(first, None))
        assert status == 400
        assert "payment-identifier" in json.loads(body)["error"]
        status, _, _ = await post(stack, _with_payment_id(first, key))
        assert status == 200
        # The same key on another authorization for the same purchase is a retry: answered
        # with the recorded outcome (paygate.x402.idempotency), not a second purchase.
        second = await v2_header(stack, payer)
        status, headers, _ = await post(stack, _with_payment_id(second, key))
        assert status == 409
        assert headers["X-Paygate-Error"] == "payment_already_served"
        # A malformed key is the caller's error, with the reason.
        status, _, body = await post(stack, _with_payment_id(second, "short"))
        assert status == 400
        assert "16-128" in json.loads(body)["error"]
        assert stack.fake.hits[CHAT_HITS] == 1
    (record,) = await records(ledger)
    assert record.idempotency_key == key
    assert usdc.balance_of(seller) == PRICE_ATOMIC
