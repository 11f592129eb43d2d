"""`batch-settlement` end to end: the official SDK's batch-settlement client pays paygate (chain
mode) on a real anvil with Circle's FiatToken as USDC and our x402BatchSettlement stand-in at its
canonical address. The chain is the proof: the seller's balance is what was claimed, the payer's
is what it deposited minus that plus the refund."""

from __future__ import annotations

import asyncio
import signal

from x402.mechanisms.evm.batch_settlement.client.refund import RefundOptions, _RefundResponse

from paygate import wire
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.store import ClaimEntry
from tests.fixtures.batch_settlement_support import (
    CHAIN_ID,
    batch_offer,
    chain_batch,
    claimer,
    header_for,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    post,
    receipt_of,
    records,
    v2_header,
)
from tests.fixtures.serve_support import gateway_process, make_key


async def test_the_402_offers_batch_settlement_with_the_channel_terms(
    anvil, usdc, seller, tmp_path, gas_key
):
    async with chain_batch(seller, tmp_path / "l.db", anvil, gas_key) as stack:
        required = await challenge_of(stack)
        offer = batch_offer(required)
    # Only what the operator listed: no `exact` beside it (an unlisted scheme's payment
    # would find no scheme to settle it).
    assert [o["scheme"] for o in required["accepts"]] == ["batch-settlement"]
    assert offer["amount"] == str(PRICE_ATOMIC)
    assert offer["payTo"] == seller
    assert offer["extra"]["receiverAuthorizer"] == gas_key.address
    assert offer["extra"]["withdrawDelay"] == "900"
    assert offer["extra"]["assetTransferMethod"] == "eip3009"


async def test_sdk_client_pays_100_requests_on_one_deposit_claimed_in_one_transaction(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    deposit = 150 * PRICE_ATOMIC
    scheme = sdk_batch_scheme(payer, deposit=deposit)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        async with sdk_batch_client(scheme) as client:
            for _ in range(100):
                response = await client.post(stack.url + CHAT, json=CHAT_BODY)
                assert response.status_code == 200, response.text
                receipt = receipt_of(response.headers)
                assert receipt["success"] is True
                assert receipt["extra"]["chargedAmount"] == str(PRICE_ATOMIC)
        # One deposit moved the payer's money into the channel; nothing reached the seller yet.
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - deposit
        assert usdc.balance_of(SETTLEMENT_ADDRESS) >= deposit
        assert usdc.balance_of(seller) == 0

        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
            assert await channels.claim_once() == 0  # nothing more is owed
            claims = await channels.store.claims()
        assert [c.state for c in claims] == ["settled"]
        (claim,) = claims
        assert claim.entries[0].total == 100 * PRICE_ATOMIC
        mined = anvil.wait_for_receipt(claim.tx_hash)
        assert mined["to"].lower() == SETTLEMENT_ADDRESS.lower()
        assert usdc.balance_of(seller) == 100 * PRICE_ATOMIC

        # The refund returns the rest, through the route, in the SDK's own flow.
        def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
            import httpx

            reply = httpx.post(url, json=CHAT_BODY, headers=headers, timeout=30)
            return _RefundResponse(status=reply.status_code, headers=dict(reply.headers))

        answer = await asyncio.to_thread(
            scheme.refund, stack.url + CHAT, RefundOptions(fetch=fetch)
        )
    assert answer.success is True
    assert int(answer.amount) == deposit - 100 * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 100 * PRICE_ATOMIC
    assert usdc.balance_of(seller) == 100 * PRICE_ATOMIC


async def test_forged_replayed_and_out_of_order_vouchers_are_refused_with_stable_codes(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    from eth_account import Account

    async with chain_batch(seller, tmp_path / "l.db", anvil, gas_key) as stack:
        required = await challenge_of(stack)
        offer = batch_offer(required)
        channel = PayerChannel.open(payer, offer, CHAIN_ID)
        # A deposit below the announced minimum (ten requests' worth) costs the gateway a
        # transaction's gas for crumbs: refused before anything is sent.
        status, headers, _ = await post(
            stack, header_for(required, channel.pay(offer, deposit=9 * PRICE_ATOMIC))
        )
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_deposit_below_min_deposit",
        )
        first = header_for(required, channel.pay(offer, deposit=10 * PRICE_ATOMIC))
        status, headers, body = await post(stack, first)
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)

        # Replayed: the voucher that just paid, sent again (a caller whose reply was lost): the
        # spec's stale-voucher code, and the corrective 402 to resynchronise from — the channel's
        # charges and the last voucher it committed, signed by the payer.
        status, headers, _ = await post(stack, first)
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_cumulative_amount_mismatch",
        )
        corrective = batch_offer(receipt_of(headers, wire.PAYMENT_REQUIRED))["extra"]
        assert corrective["channelState"]["chargedCumulativeAmount"] == str(PRICE_ATOMIC)
        signed = corrective["voucherState"]
        assert signed["signedMaxClaimable"] == str(PRICE_ATOMIC)
        assert signed["signature"] == channel.voucher(PRICE_ATOMIC)["signature"]
        # Forged: the next voucher signed by someone else.
        payload = channel.pay(offer)
        forger = PayerChannel(Account.create(), channel.config, CHAIN_ID)
        payload["voucher"] = forger.voucher(int(payload["voucher"]["maxClaimableAmount"]))
        status, headers, _ = await post(stack, header_for(required, payload))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_voucher_signature",
        )
        # Not monotonic: a ceiling below what was charged, and one skipping ahead.
        for ceiling in (PRICE_ATOMIC // 2, 3 * PRICE_ATOMIC):
            payload = {**channel.pay(offer), "voucher": channel.voucher(ceiling)}
            status, headers, _ = await post(stack, header_for(required, payload))
            assert (status, headers[wire.ERROR_HEADER]) == (
                402,
                "invalid_batch_settlement_evm_cumulative_amount_mismatch",
            )
        # The honest next vouchers still pay: nothing above moved the channel.
        for n in range(2, 11):
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            state = receipt_of(headers)["extra"]["channelState"]
            assert state["chargedCumulativeAmount"] == str(n * PRICE_ATOMIC)
            channel.charged_by(receipt_of(headers), offer)
        # Over the deposit: the channel held ten requests' worth, all spent.
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_cumulative_exceeds_balance",
        )


# --- replicas and crashes -------------------------------------------------------------------


async def test_two_replicas_on_one_postgresql_ledger_share_one_channel(
    anvil, usdc, payer, seller, tmp_path, gas_key, pg_url
):
    scheme = sdk_batch_scheme(payer, deposit=40 * PRICE_ATOMIC)
    replica = {"ledger_url": pg_url}
    async with (
        chain_batch(
            seller, tmp_path / "unused.db", anvil, gas_key, replica_id="r1", **replica
        ) as one,
        chain_batch(
            seller, tmp_path / "unused.db", anvil, gas_key, replica_id="r2", **replica
        ) as two,
        sdk_batch_client(scheme) as client,
    ):
        cumulative = []
        for n in range(20):  # the caller alternates: each voucher follows the other's charges
            stack = (one, two)[n % 2]
            response = await client.post(stack.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, response.text
            state = receipt_of(response.headers)["extra"]["channelState"]
            cumulative.append(int(state["chargedCumulativeAmount"]))
    assert cumulative == [PRICE_ATOMIC * (n + 1) for n in range(20)]
    async with claimer(pg_url, anvil, gas_key) as channels:
        assert await channels.claim_once() == 1
        (claim,) = await channels.store.claims()
    assert (claim.state, claim.entries[0].total) == ("settled", 20 * PRICE_ATOMIC)
    assert usdc.balance_of(seller) == 20 * PRICE_ATOMIC


async def test_a_claimer_killed_after_sending_its_claim_is_finished_once_by_the_next(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    scheme = sdk_batch_scheme(payer, deposit=20 * PRICE_ATOMIC)
    async with (
        chain_batch(seller, ledger, anvil, gas_key) as stack,
        sdk_batch_client(scheme) as client,
    ):
        for _ in range(5):
            response = await client.post(stack.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, response.text
    async with claimer(ledger, anvil, gas_key, replica="dies") as dying:
        # What a claimer does up to its death: the claim recorded, the transaction sent, its
        # hash never written down.
        assert await dying.store.take_claimer("dies", 1.0)
        (owed,) = await dying.store.claimable(10)
        entries = [ClaimEntry(owed.channel_id, owed.config, owed.signed_max, owed.signature, 5000)]
        await dying.store.new_claim("the-dead-one", entries)
        sent = await dying.chain.send_claim(entries)
        anvil.wait_for_receipt(sent)
    await asyncio.sleep(1.1)  # its claim lease runs out
    blocks_before = anvil.w3.eth.block_number
    async with claimer(ledger, anvil, gas_key, replica="next") as channels:
        assert await channels.claim_once() == 0  # the open claim proven; nothing else owed
        claims = await channels.store.claims()
    assert [(c.id, c.state) for c in claims] == [("the-dead-one", "settled")]
    assert anvil.w3.eth.block_number == blocks_before  # no second claim transaction
    assert usdc.balance_of(seller) == 5 * PRICE_ATOMIC


async def test_a_gateway_killed_between_vouchers_and_their_claim_loses_nothing_and_claims_once(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    key = make_key(tmp_path / "key.pem")
    ledger = tmp_path / "payments.db"
    env = {
        "PAYGATE_PAYMENT_MODE": "chain",
        "PAYGATE_PAYMENT_SCHEMES": "batch-settlement",
        "PAYGATE_GAS_KEY": gas_key.key,
        "PAYGATE_BATCH_CLAIM_INTERVAL": "3600",
    }
    scheme = sdk_batch_scheme(payer, deposit=20 * PRICE_ATOMIC)
    async with running_stack() as fake, sdk_batch_client(scheme) as client:
        common = {
            "key_file": key,
            "ledger": ledger,
            "seller": seller,
            "facilitator_url": "http://127.0.0.1:9",
            "upstream": fake.fake_url,
            "chain_rpc_url": anvil.rpc_url,
        }
        async with gateway_process(**common, extra_env=env) as (url, proc):
            for _ in range(7):
                response = await client.post(url + CHAT, json=CHAT_BODY)
                assert response.status_code == 200, response.text
            proc.send_signal(signal.SIGKILL)  # before any claim
            await asyncio.to_thread(proc.wait, 10)
        assert usdc.balance_of(seller) == 0
        # Restarted with a short claim interval: it claims what the killed run charged, and
        # its caller goes on paying on the same channel.
        env["PAYGATE_BATCH_CLAIM_INTERVAL"] = "0.5"
        async with gateway_process(**common, extra_env=env) as (url, _):
            response = await client.post(url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, response.text
            async with asyncio.timeout(20):
                while usdc.balance_of(seller) < 8 * PRICE_ATOMIC:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # more passes: nothing more is claimed
    assert usdc.balance_of(seller) == 8 * PRICE_ATOMIC
    async with claimer(ledger, anvil, gas_key) as channels:
        claims = await channels.store.claims()
    # One claim, or two when the restarted run's first pass came before its first request:
    # either way each charge was claimed once (the seller's balance above).
    assert [c.state for c in claims] in (["settled"], ["settled", "settled"])
    assert claims[-1].entries[0].total == 8 * PRICE_ATOMIC


async def test_a_metered_route_charges_what_each_request_used_up_to_its_voucher(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    from tests.fixtures.upto_support import CAP, TOKEN_PRICES, charge

    ledger = tmp_path / "payments.db"
    scheme = sdk_batch_scheme(payer, deposit=10**6)
    metered = {"token_prices": TOKEN_PRICES, "max_tokens_cap": CAP}
    async with chain_batch(seller, ledger, anvil, gas_key, **metered) as stack:
        maximum = int(batch_offer(await challenge_of(stack))["amount"])
        charged = []
        async with sdk_batch_client(scheme) as client:
            for chunks in (3, 5):
                body = {**CHAT_BODY, "fake": {"chunks": chunks}}
                response = await client.post(stack.url + CHAT, json=body)
                assert response.status_code == 200, response.text
                charged.append(int(receipt_of(response.headers)["extra"]["chargedAmount"]))
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert charged == [charge(1, 3), charge(1, 5)]
    assert all(c < maximum for c in charged)
    assert usdc.balance_of(seller) == sum(charged)


async def test_through_the_sdk_facilitator_deposits_claims_and_refunds_are_proven_on_chain(
    anvil, usdc, payer, seller, tmp_path, facilitator, gas_key
):
    from paygate_dev.chain.accounts import FACILITATOR

    ledger = tmp_path / "payments.db"
    deposit = 30 * PRICE_ATOMIC
    scheme = sdk_batch_scheme(payer, deposit=deposit)
    settings = {"payment_mode": "facilitator", "facilitator_url": facilitator.url}
    async with chain_batch(seller, ledger, anvil, gas_key, **settings) as stack:
        offer = batch_offer(await challenge_of(stack))
        # The facilitator's announced receiver authorizer signs this gateway's claims.
        assert offer["extra"]["receiverAuthorizer"] == anvil.accounts[FACILITATOR].address
        async with sdk_batch_client(scheme) as client:
            for _ in range(20):
                response = await client.post(stack.url + CHAT, json=CHAT_BODY)
                assert response.status_code == 200, response.text
        async with claimer(ledger, anvil, gas_key, facilitator_url=facilitator.url) as channels:
            assert await channels.claim_once() == 1
            (claim,) = await channels.store.claims()
        assert claim.state == "settled"
        assert usdc.balance_of(seller) == 20 * PRICE_ATOMIC

        def fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
            import httpx

            reply = httpx.post(url, json=CHAT_BODY, headers=headers, timeout=30)
            return _RefundResponse(status=reply.status_code, headers=dict(reply.headers))

        answer = await asyncio.to_thread(
            scheme.refund, stack.url + CHAT, RefundOptions(fetch=fetch)
        )
    assert answer.success is True
    assert int(answer.amount) == deposit - 20 * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 20 * PRICE_ATOMIC


async def test_a_sweep_whose_answer_is_lost_leaves_the_claim_proven_and_settled(
    anvil, usdc, payer, seller, tmp_path, facilitator, gas_key
):
    """Through a facilitator, the sweep after a claim is best effort: a facilitator whose
    answer to the sweep is lost (the connection cut after the request was read) does not make
    the claim's outcome unknown or failed. The claim, made and proven by its own transaction,
    is settled in the same pass; the next claim's sweep takes what is left."""
    import json

    from aiohttp import ClientSession, web

    ledger = tmp_path / "payments.db"
    scheme = sdk_batch_scheme(payer, deposit=10 * PRICE_ATOMIC)
    settings = {"payment_mode": "facilitator", "facilitator_url": facilitator.url}
    async with (
        chain_batch(seller, ledger, anvil, gas_key, **settings) as stack,
        sdk_batch_client(scheme) as client,
    ):
        for _ in range(3):
            response = await client.post(stack.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, response.text

    swept: list[str] = []

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/settle":
            payload = json.loads(body)["paymentPayload"]["payload"]
            if payload.get("type") == "settle":
                swept.append(payload["receiver"])
                assert request.transport is not None
                request.transport.abort()  # read, never answered
                return web.Response()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with (
            ClientSession() as session,
            session.request(
                request.method, facilitator.url + request.path_qs, data=body, headers=headers
            ) as upstream,
        ):
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type=upstream.content_type,
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with claimer(
            ledger, anvil, gas_key, facilitator_url=f"http://{host}:{port}"
        ) as channels:
            assert await channels.claim_once() == 1
            (claim,) = await channels.store.claims()
    finally:
        await runner.cleanup()
    assert swept, "the sweep was asked for"
    assert claim.state == "settled"
    assert claim.tx_hash is not None
    assert claim.tx_hash.startswith("0x")


async def test_exact_and_batch_settlement_in_chain_mode_share_one_gas_account_nonce_sequence(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Both schemes send from the one gas account: exact settlements and a channel deposit
    at the same moment all land (two senders each asking for the pending nonce would race
    and one transaction would replace or lose to the other)."""
    ledger = tmp_path / "payments.db"
    deposit = 20 * PRICE_ATOMIC
    scheme = sdk_batch_scheme(payer, deposit=deposit)
    schemes = ["exact", "batch-settlement"]
    async with chain_batch(seller, ledger, anvil, gas_key, payment_schemes=schemes) as stack:
        headers = [await v2_header(stack, payer) for _ in range(4)]
        async with sdk_batch_client(scheme) as client:

            async def by_channel() -> list[int]:
                replies = [await client.post(stack.url + CHAT, json=CHAT_BODY) for _ in range(3)]
                return [reply.status_code for reply in replies]

            exact, channel = await asyncio.gather(
                asyncio.gather(*(post(stack, header) for header in headers)), by_channel()
            )
        assert [status for status, _, _ in exact] == [200] * 4
        assert channel == [200] * 3
        settled: list[str] = []
        for _ in range(200):  # exact settles after each reply, in the background
            settled = [r.state for r in await records(ledger) if r.scheme == "exact"]
            if settled == ["settled"] * 4:
                break
            await asyncio.sleep(0.05)
        assert settled == ["settled"] * 4
    # Every exact transfer and the deposit moved: nothing was lost to a nonce collision.
    assert usdc.balance_of(seller) == 4 * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 4 * PRICE_ATOMIC - deposit
