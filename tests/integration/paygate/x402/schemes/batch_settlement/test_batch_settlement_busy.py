"""`batch-settlement` when the channel is contended or a request ends early (chain mode, a real
anvil, the real gateway and ledger): a deposit that moved on chain is always mirrored however
busy the channel is, and a request cut short before its verify leaves the channel free for the
payer's next voucher at once."""

from __future__ import annotations

import asyncio

from paygate.x402.ledger import PaymentState
from paygate.x402.schemes.batch_settlement.bound import BoundBatchSettlement
from paygate.x402.schemes.batch_settlement.store import ChannelStore
from tests.fixtures.batch_settlement_support import (
    batch_offer,
    chain_batch,
    claimer,
    header_for,
    opened_channel,
)
from tests.fixtures.payment_support import (
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    post,
    receipt_of,
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


async def test_a_request_whose_upstream_failed_leaves_the_channel_free_for_the_next_voucher(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Nothing earned (the model server answered 500): the reservation is released and the
    channel's hold with it, in one transaction — the payer's next voucher is not refused
    `…_channel_busy` until the hold runs out (PAYGATE_MAX_TIMEOUT_SECONDS)."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key, **PRICES) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        failing = {**CHAT_BODY, "model": "fake-error-500"}
        status, _, _ = await post(stack, header_for(required, channel.pay(offer)), json=failing)
        assert status >= 500
        await until(ledger, lambda found: PaymentState.RELEASED in states(found))
        held = await _state(ledger, anvil, gas_key, channel.channel_id)
        assert (held.pending_owner, held.charged) == (None, PRICE_ATOMIC)
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
