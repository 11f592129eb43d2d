"""`batch-settlement` when the channel is contended, a request ends early or is metered (chain
mode, a real anvil, the real gateway and ledger, the official SDK's client): a deposit that moved
on chain is always mirrored however busy the channel is; a request that ends without earning
its payment leaves the channel free for the payer's next voucher at once; a metered charge is
exactly what the signed receipt states, and never 0 (a stalled channel)."""

from __future__ import annotations

import asyncio

import pytest

from enclave import SoftwareKey, receipts
from paygate import wire
from paygate.x402.ledger import LedgerUnavailable, PaymentState
from paygate.x402.schemes.batch_settlement.bound import BoundBatchSettlement
from paygate.x402.schemes.batch_settlement.chain import BatchChain
from paygate.x402.schemes.batch_settlement.store import ChannelStore
from paygate.x402.settler import SettlementUnknown
from tests.fixtures.batch_settlement_support import (
    batch_offer,
    chain_batch,
    claimer,
    header_for,
    opened_channel,
    pause_top_up,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    post,
    receipt_of,
    records,
    states,
    until,
)

DEPOSIT = 10 * PRICE_ATOMIC


def busy_replica(monkeypatch) -> list[bool]:
    """Another replica writing the channel between each of this gateway's reads of it and its
    next write (its own takes and releases): every compare-and-set from a read loses. Armed
    while the list holds True."""
    armed: list[bool] = []
    real = ChannelStore.get

    async def get(self, channel_id):
        found = await real(self, channel_id)
        if armed:
            await self._sql(
                "UPDATE bs_channels SET version = version + 1 WHERE channel_id = ?",
                (channel_id,),
            )
        return found

    monkeypatch.setattr(ChannelStore, "get", get)
    return armed


async def test_a_top_up_on_a_channel_another_replica_keeps_changing_is_mirrored_and_served(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The deposit moved on chain before its mirror is written: that write must never give
    up (it was ChannelBusy out of verify: a 500 and a deposit the ledger never counted)."""
    ledger = tmp_path / "payments.db"
    armed = busy_replica(monkeypatch)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        armed.clear()
        assert status == 200, (status, dict(headers), body)
        state = receipt_of(headers)["extra"]["channelState"]
        assert state["balance"] == str(2 * DEPOSIT)
        assert state["chargedCumulativeAmount"] == str(2 * PRICE_ATOMIC)
    async with claimer(ledger, anvil, gas_key) as channels:
        mirrored = await channels.store.get(channel.channel_id)
        on_chain = await channels.chain.state(channel.channel_id)
    assert mirrored is not None
    assert mirrored.balance == on_chain.balance == 2 * DEPOSIT


# A second model at twice the price: the payer's next voucher there is not the one let go.
DOUBLE = "fake-llama-double"
PRICES = {"model_prices": {DOUBLE: "0.002"}}
DOUBLE_BODY = {**CHAT_BODY, "model": DOUBLE}


async def _state(ledger, anvil, gas_key, channel_id: str):
    async with claimer(ledger, anvil, gas_key) as channels:
        found = await channels.store.get(channel_id)
    assert found is not None
    return found


async def _held_until_the_refund_is_asked_again(
    stack, ledger, anvil, gas_key, required, offer, channel
) -> None:
    """A refund moved on chain but not mirrored: the payer's next voucher (under the old
    balance) is refused busy and not served; the refund asked again mirrors the chain first,
    finds nothing left to refund, and lets the channel go with the books matching the
    contract (what was charged is what it holds)."""
    served = stack.fake.completed["POST /v1/chat/completions"]
    status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
    assert (status, headers[wire.ERROR_HEADER]) == (
        402,
        "invalid_batch_settlement_evm_channel_busy",
    )
    assert stack.fake.completed["POST /v1/chat/completions"] == served
    status, headers, _ = await post(stack, header_for(required, channel.refund()))
    assert (status, headers[wire.ERROR_HEADER]) == (
        402,
        "invalid_batch_settlement_evm_refund_no_balance",
    )
    mirrored = await _state(ledger, anvil, gas_key, channel.channel_id)
    assert (mirrored.balance, mirrored.charged, mirrored.pending_owner) == (
        PRICE_ATOMIC,
        PRICE_ATOMIC,
        None,
    )


async def _next_voucher_is_served_at_once(stack, payer_channel) -> None:
    """The payer's next voucher, on the dearer model (another voucher than the one let go):
    served, charged at its price from where the channel stood."""
    required = await challenge_of(stack, body=DOUBLE_BODY)
    offer = batch_offer(required)
    assert offer["amount"] == str(2 * PRICE_ATOMIC)
    status, headers, body = await post(
        stack, header_for(required, payer_channel.pay(offer)), json=DOUBLE_BODY
    )
    assert status == 200, (status, dict(headers), body)
    state = receipt_of(headers)["extra"]["channelState"]
    assert state["chargedCumulativeAmount"] == str(3 * PRICE_ATOMIC)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_request_whose_upstream_failed_leaves_the_channel_free_for_the_next_voucher(
    anvil, usdc, payer, seller, tmp_path, gas_key, request, store
):
    """Nothing earned (the model server answered 500): the reservation is released and the
    channel's hold with it, in one transaction — the payer's next voucher is not refused
    `…_channel_busy` until the hold runs out (PAYGATE_MAX_TIMEOUT_SECONDS). On either
    ledger store."""
    ledger = tmp_path / "payments.db" if store == "sqlite" else request.getfixturevalue("pg_url")
    async with chain_batch(seller, ledger, anvil, gas_key, **PRICES) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        failing = {**CHAT_BODY, "model": "fake-error-500"}
        status, _, _ = await post(stack, header_for(required, channel.pay(offer)), json=failing)
        assert status >= 500
        async with asyncio.timeout(20):  # the release follows the reply
            while (held := await _state(ledger, anvil, gas_key, channel.channel_id)).pending_owner:
                await asyncio.sleep(0.05)
        assert held.charged == PRICE_ATOMIC
        await _next_voucher_is_served_at_once(stack, channel)


async def test_a_caller_gone_during_verification_leaves_the_channel_free_for_the_next_voucher(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The caller went away while its voucher was being verified (the gateway cancels its
    handler, after the reservation took the channel): the reservation and the hold are let go
    together; the payer goes on at once with its next voucher."""
    ledger = tmp_path / "payments.db"
    verifying = asyncio.Event()
    armed: list[bool] = []
    real = BoundBatchSettlement.verify

    async def verify(self, settler, payment, requirements):
        answer = await real(self, settler, payment, requirements)
        if armed:
            armed.clear()
            verifying.set()
            await asyncio.sleep(60)  # a verify that never ends: the caller gives up first
        return answer

    monkeypatch.setattr(BoundBatchSettlement, "verify", verify)
    async with chain_batch(seller, ledger, anvil, gas_key, **PRICES) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        served = stack.fake.completed["POST /v1/chat/completions"]
        gone = asyncio.ensure_future(post(stack, header_for(required, channel.pay(offer))))
        await asyncio.wait_for(verifying.wait(), timeout=10)
        held = await _state(ledger, anvil, gas_key, channel.channel_id)
        assert held.pending_owner is not None  # taken with the reservation
        gone.cancel()  # the caller closes its connection
        await asyncio.gather(gone, return_exceptions=True)
        await until(ledger, lambda found: PaymentState.RELEASED in states(found))
        let_go = await _state(ledger, anvil, gas_key, channel.channel_id)
        assert (let_go.pending_owner, let_go.charged) == (None, PRICE_ATOMIC)
        await _next_voucher_is_served_at_once(stack, channel)
        assert stack.fake.completed["POST /v1/chat/completions"] == served + 1


async def _metered_requests(ledger, anvil, gas_key, seller, payer, prices, count):
    """``count`` requests paid by the SDK's client on a metered route (token prices, a signed
    receipt key): per request (signed receipt's charged, PAYMENT-RESPONSE chargedAmount, the
    channel's charged total after it)."""
    key = SoftwareKey.generate()
    scheme = sdk_batch_scheme(payer, deposit=10**6)
    metered = {"token_prices": prices, "max_tokens_cap": 64, "key": key}
    seen = []
    async with chain_batch(seller, ledger, anvil, gas_key, **metered) as stack:
        maximum = int(batch_offer(await challenge_of(stack))["amount"])
        async with sdk_batch_client(scheme) as client:
            for chunks in range(3, 3 + count):
                body = {**CHAT_BODY, "fake": {"chunks": chunks}}
                response = await client.post(stack.url + CHAT, json=body)
                assert response.status_code == 200, (response.headers, response.text)
                signed = receipts.verify(
                    response.headers[wire.RECEIPT_HEADER], key.receipt_public_key
                )
                answer = receipt_of(response.headers)
                seen.append(
                    (
                        int(signed["payment"]["charged"]),
                        int(answer["extra"]["chargedAmount"]),
                        int(answer["extra"]["channelState"]["chargedCumulativeAmount"]),
                    )
                )
    settled = sorted(
        (r.created_at, r.settled_amount) for r in await records(ledger) if r.settled_amount
    )
    return maximum, seen, [amount for _, amount in settled]


async def test_a_metered_channel_charge_is_what_the_signed_receipt_states(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """The signed reply receipt's ``charged``, the PAYMENT-RESPONSE's ``chargedAmount``, the
    channel's charge and the ledger's settled amount are one number: what the request used."""
    from tests.fixtures.upto_support import TOKEN_PRICES, charge

    ledger = tmp_path / "payments.db"
    maximum, seen, settled = await _metered_requests(
        ledger, anvil, gas_key, seller, payer, TOKEN_PRICES, 2
    )
    expected = [charge(1, 3), charge(1, 4)]
    assert [s for s, _, _ in seen] == [a for _, a, _ in seen] == settled == expected
    assert all(c < maximum for c in expected)
    assert [total for _, _, total in seen] == [expected[0], sum(expected)]


async def test_a_metered_request_whose_usage_rounds_to_nothing_does_not_stall_the_channel(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Usage at tiny token prices rounds to 0 atomic units. Charged 0, the channel's total
    would not move, so the payer's next voucher (what was charged plus the price) would be the
    very voucher just paid — refused as used (`…_cumulative_amount_mismatch`) for ever, the
    SDK's resynchronisation landing on it again. A channel charges at least one unit; the
    signed receipt and the PAYMENT-RESPONSE say so."""
    ledger = tmp_path / "payments.db"
    tiny = {"*": {"input": "0.01", "output": "0.01"}}
    _, seen, settled = await _metered_requests(ledger, anvil, gas_key, seller, payer, tiny, 3)
    assert seen == [(1, 1, 1), (1, 1, 2), (1, 1, 3)]
    assert settled == [1, 1, 1]


async def test_a_caller_gone_after_its_deposit_was_sent_still_has_the_deposit_mirrored(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The caller went away while the gateway waited on its top-up's proof (sent: the money
    is in the contract): the deposit is still proven and mirrored, so the channel's balance in
    the ledger counts it (vouchers up to it are taken), though this request is not served."""
    ledger = tmp_path / "payments.db"
    sent = pause_top_up(monkeypatch)  # the proof still out when the caller gives up
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        sent.arm()
        served = stack.fake.completed["POST /v1/chat/completions"]
        gone = asyncio.ensure_future(
            post(stack, header_for(required, channel.pay(offer, deposit=DEPOSIT)))
        )
        await asyncio.wait_for(sent.reached.wait(), timeout=10)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await until(ledger, lambda found: PaymentState.RELEASED in states(found))
        sent.proceed.set()
        async with asyncio.timeout(10):
            while (await _state(ledger, anvil, gas_key, channel.channel_id)).balance != (
                2 * DEPOSIT
            ):
                await asyncio.sleep(0.05)
        assert stack.fake.completed["POST /v1/chat/completions"] == served
        # The payer goes on under the larger balance at once: its next voucher is taken.
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, (status, dict(headers), body)
        assert receipt_of(headers)["extra"]["channelState"]["balance"] == str(2 * DEPOSIT)


async def test_a_refund_asked_while_the_ledger_is_unavailable_is_a_503_to_retry(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """A refund is an operation answered without serving the route: the ledger failing under
    it is a stable, retryable 503 (it was an internal error, a 500), and asked again it is
    made."""
    ledger = tmp_path / "payments.db"
    armed: list[bool] = []
    real = ChannelStore.take

    async def take(self, channel_id, owner):
        if armed:
            raise LedgerUnavailable("the disk failed")
        return await real(self, channel_id, owner)

    monkeypatch.setattr(ChannelStore, "take", take)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert (status, headers[wire.ERROR_HEADER]) == (503, "ledger_unavailable"), body
        assert int(headers["Retry-After"]) >= 1
        armed.clear()
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body
        assert int(receipt_of(headers)["amount"]) == DEPOSIT - PRICE_ATOMIC


async def test_a_refund_whose_mirror_failed_leaves_no_balance_to_spend_that_the_contract_lacks(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The refund moved on chain, then the ledger failed to mirror it: a 503, and meanwhile
    the channel stays held — a voucher under the old balance (more than the contract holds
    now) is refused, never served for a charge no claim could pay. The refund asked again
    mirrors the chain first: nothing is left to refund, and the books match the contract."""
    ledger = tmp_path / "payments.db"
    armed: list[bool] = []
    real = ChannelStore.refunded

    async def refunded(self, channel_id, balance, total_claimed, **chain_order):
        if armed:
            armed.clear()
            raise LedgerUnavailable("the disk failed")
        return await real(self, channel_id, balance, total_claimed, **chain_order)

    monkeypatch.setattr(ChannelStore, "refunded", refunded)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert (status, headers[wire.ERROR_HEADER]) == (503, "ledger_unavailable"), body
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC  # it moved
        await _held_until_the_refund_is_asked_again(
            stack, ledger, anvil, gas_key, required, offer, channel
        )


async def test_a_voucher_on_a_channel_another_request_holds_is_told_when_to_retry(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Another request (here: another replica's) holds the channel: the voucher is refused
    with the spec's `…_channel_busy` 402 and a Retry-After, nothing served; once that request
    let go, the same voucher is served."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        header = header_for(required, channel.pay(offer))
        async with claimer(ledger, anvil, gas_key) as other:
            assert await other.store.take(channel.channel_id, "another request") is not None
            served = stack.fake.completed["POST /v1/chat/completions"]
            status, headers, _ = await post(stack, header)
            assert (status, headers[wire.ERROR_HEADER], headers["Retry-After"]) == (
                402,
                "invalid_batch_settlement_evm_channel_busy",
                "1",
            )
            assert stack.fake.completed["POST /v1/chat/completions"] == served
            await other.store.release(channel.channel_id, "another request")
        status, headers, body = await post(stack, header)
        assert status == 200, body


async def test_a_top_up_read_before_a_refund_never_raises_the_balance_past_the_contract(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """A top-up proven and read on chain, then — before its mirror is written — the payer's
    refund takes the rest (the top-up included) and is mirrored: the top-up's reading is
    stale. Its mirror must not raise the balance back above the contract's (a voucher then
    served for a charge no claim can pay): the books match the contract, and the top-up's
    voucher, past what the contract holds now, is refused and not served."""
    ledger = tmp_path / "payments.db"
    read = pause_top_up(monkeypatch)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        read.arm()
        served = stack.fake.completed["POST /v1/chat/completions"]
        top_up = asyncio.ensure_future(
            post(stack, header_for(required, channel.pay(offer, deposit=DEPOSIT)))
        )
        await asyncio.wait_for(read.reached.wait(), timeout=30)
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body
        # Everything but the first request's charge came back, the top-up included.
        assert int(receipt_of(headers)["amount"]) == 2 * DEPOSIT - PRICE_ATOMIC
        read.proceed.set()
        status, headers, body = await asyncio.wait_for(top_up, timeout=30)
        assert (status, headers.get(wire.ERROR_HEADER)) == (
            402,
            "invalid_batch_settlement_evm_cumulative_exceeds_balance",
        ), body
        assert stack.fake.completed["POST /v1/chat/completions"] == served
    async with claimer(ledger, anvil, gas_key) as channels:
        mirrored = await channels.store.get(channel.channel_id)
        on_chain = await channels.chain.state(channel.channel_id)
    assert mirrored is not None
    assert (mirrored.balance, mirrored.pending_owner) == (on_chain.balance, None)
    assert on_chain.balance == PRICE_ATOMIC


async def test_a_top_up_on_a_held_channel_is_mirrored_once_the_hold_is_let_go(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Another request (another replica's) holds the channel when a top-up is proven: the
    mirror waits for that hold (it may be a refund's, whose mirror a reading taken now would
    undo), then counts the deposit, and the top-up's request is served."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        async with claimer(ledger, anvil, gas_key) as other:
            assert await other.store.take(channel.channel_id, "another request") is not None
            top_up = asyncio.ensure_future(
                post(stack, header_for(required, channel.pay(offer, deposit=DEPOSIT)))
            )
            async with asyncio.timeout(30):  # the deposit moved: the top-up waits on the hold
                while (await other.chain.state(channel.channel_id)).balance != 2 * DEPOSIT:
                    await asyncio.sleep(0.05)
            assert not top_up.done()
            assert (await other.store.get(channel.channel_id)).balance == DEPOSIT
            await other.store.release(channel.channel_id, "another request")
        status, headers, body = await asyncio.wait_for(top_up, timeout=30)
        assert status == 200, body
        assert receipt_of(headers)["extra"]["channelState"]["balance"] == str(2 * DEPOSIT)


async def test_a_top_up_whose_hold_could_not_be_let_go_is_still_served(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The ledger failed to let go the hold a top-up's mirror took (the mirror written): the
    hold is the request's own voucher's, so the request takes it again and is served — not a
    503 for a deposit that moved and was counted."""
    ledger = tmp_path / "payments.db"
    armed: list[bool] = []
    real = ChannelStore.release

    async def release(self, channel_id, owner):
        if armed:
            armed.clear()
            raise LedgerUnavailable("the disk failed")
        return await real(self, channel_id, owner)

    monkeypatch.setattr(ChannelStore, "release", release)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert not armed  # the failure was met
        assert status == 200, body
        assert receipt_of(headers)["extra"]["channelState"]["balance"] == str(2 * DEPOSIT)


async def test_a_refund_whose_outcome_is_unknown_leaves_no_balance_to_spend_that_the_contract_lacks(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The refund was sent and moved on chain, but its receipt never came back to the gateway
    (the RPC failed, the wait ran out): the payer is told to ask again, and meanwhile the
    channel stays held — a voucher under the old balance, more than the contract may hold now,
    is refused, never served for a charge no claim could pay. Asked again, the refund mirrors
    the chain: nothing is left to refund, and the books match the contract."""
    ledger = tmp_path / "payments.db"
    armed: list[bool] = []
    real = BatchChain.refund

    async def refund(self, request):
        done = await real(self, request)  # moved on chain
        if armed:
            armed.clear()
            raise SettlementUnknown("no receipt yet", transaction=done[0])
        return done

    monkeypatch.setattr(BatchChain, "refund", refund)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, _ = await post(stack, header_for(required, channel.refund()))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_refund_transaction_failed",
        )
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC  # it moved
        await _held_until_the_refund_is_asked_again(
            stack, ledger, anvil, gas_key, required, offer, channel
        )


async def test_a_top_up_puts_a_balance_left_above_the_contract_back_at_the_contract(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """The ledger's balance above the contract's (a payer's timed withdrawal nothing has
    mirrored yet, here written as such): a top-up's mirror, read on chain under the deposit's
    hold, sets the balance to the contract's — not the larger of the two, which would keep
    money the contract lacks spendable."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        async with claimer(ledger, anvil, gas_key) as other:
            await other.store._sql(
                "UPDATE bs_channels SET balance = ? WHERE channel_id = ?",
                (str(100 * DEPOSIT), channel.channel_id),
            )
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        assert receipt_of(headers)["extra"]["channelState"]["balance"] == str(2 * DEPOSIT)
    mirrored = await _state(ledger, anvil, gas_key, channel.channel_id)
    assert mirrored.balance == 2 * DEPOSIT


async def test_a_refund_refused_after_an_earlier_one_moved_mirrors_the_chain_before_letting_go(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """A refund whose outcome was unknown (held), asked again: the earlier one is mined only
    now, after the retry read the channel, so the retry's own transaction reverts (its refund
    nonce spent). The channel is read on chain before it is let go: the books follow the
    contract, and a voucher under the old balance is refused, never served for a charge no
    claim could pay."""
    ledger = tmp_path / "payments.db"
    calls: list[int] = []
    real = BatchChain.refund

    async def refund(self, request):
        calls.append(1)
        if len(calls) == 1:
            raise SettlementUnknown("no receipt yet")  # sent, maybe: mined only later
        await real(self, request)  # the earlier refund, mined now
        raise ValueError("invalid_batch_settlement_evm_refund_transaction_failed")

    monkeypatch.setattr(BatchChain, "refund", refund)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        for _ in range(2):
            status, headers, _ = await post(stack, header_for(required, channel.refund()))
            assert (status, headers[wire.ERROR_HEADER]) == (
                402,
                "invalid_batch_settlement_evm_refund_transaction_failed",
            )
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC  # it moved
        served = stack.fake.completed["POST /v1/chat/completions"]
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (
            402,
            "invalid_batch_settlement_evm_cumulative_exceeds_balance",
        )
        assert stack.fake.completed["POST /v1/chat/completions"] == served
    mirrored = await _state(ledger, anvil, gas_key, channel.channel_id)
    assert (mirrored.balance, mirrored.pending_owner) == (PRICE_ATOMIC, None)


async def test_a_caller_gone_during_its_top_ups_mirror_leaves_the_channel_held_until_it_is_written(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The caller went away while its top-up's mirror was being written (the deposit proven,
    the channel read on chain under the deposit's hold): the request's release must not let
    that hold go — a refund taking the channel then would be undone by the mirror's older
    reading, the balance left above the contract's (vouchers served that no claim can pay).
    The refund is told the channel is busy until the mirror is written; then it is made, and
    the books match the contract."""
    ledger = tmp_path / "payments.db"
    read = pause_top_up(monkeypatch, in_next_read=True)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        read.arm()
        gone = asyncio.ensure_future(
            post(stack, header_for(required, channel.pay(offer, deposit=DEPOSIT)))
        )
        await asyncio.wait_for(read.reached.wait(), timeout=30)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await until(ledger, lambda found: PaymentState.RELEASED in states(found))
        status, headers, _ = await post(stack, header_for(required, channel.refund()))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_channel_busy",
        )
        read.proceed.set()
        async with asyncio.timeout(30):  # the mirror written, its hold let go
            while (found := await _state(ledger, anvil, gas_key, channel.channel_id)).pending_owner:
                await asyncio.sleep(0.05)
        assert found.balance == 2 * DEPOSIT
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body
        assert int(receipt_of(headers)["amount"]) == 2 * DEPOSIT - PRICE_ATOMIC
    async with claimer(ledger, anvil, gas_key) as channels:
        mirrored = await channels.store.get(channel.channel_id)
        on_chain = await channels.chain.state(channel.channel_id)
    assert mirrored is not None
    assert (mirrored.balance, mirrored.pending_owner) == (on_chain.balance, None)
    assert on_chain.balance == PRICE_ATOMIC
