"""`batch-settlement` under attack and failure (chain mode, a real anvil): one voucher sent on
two connections at once, the next two vouchers of a channel racing, and a charge whose SETTLED
record was lost — each charged once, nothing served unpaid, the channel's books equal to what the
replies said."""

from __future__ import annotations

import asyncio

from paygate import wire
from paygate.x402.ledger import LedgerUnavailable, PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from tests.fixtures.batch_settlement_support import (
    CHAIN_ID,
    chain_batch,
    claimer,
    header_for,
    opened_channel,
)
from tests.fixtures.payment_support import (
    PRICE_ATOMIC,
    post,
    receipt_of,
    records,
)

DEPOSIT = 10 * PRICE_ATOMIC


async def charged(ledger, anvil, gas_key, channel: PayerChannel) -> int:
    async with claimer(ledger, anvil, gas_key) as channels:
        state = await channels.store.get(channel.channel_id)
    assert state is not None
    return state.charged


async def test_one_voucher_on_two_connections_at_once_is_served_and_charged_once(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        header = header_for(required, channel.pay(offer))
        served = stack.fake.completed["POST /v1/chat/completions"]
        answers = await asyncio.gather(post(stack, header), post(stack, header))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses[0] == 200, answers
        assert statuses[1] in (402, 409), answers
        loser = next(headers for status, headers, _ in answers if status != 200)
        assert loser[wire.ERROR_HEADER] in (
            "payment_in_progress",
            "invalid_batch_settlement_evm_cumulative_amount_mismatch",
            "invalid_batch_settlement_evm_channel_busy",
        )
        assert stack.fake.completed["POST /v1/chat/completions"] == served + 1
    assert await charged(ledger, anvil, gas_key, channel) == 2 * PRICE_ATOMIC


async def test_the_next_two_vouchers_racing_are_charged_as_they_were_served(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        following = PayerChannel(payer, channel.config, CHAIN_ID, charged=channel.charged)
        following.charged += PRICE_ATOMIC  # the voucher after the next, signed ahead
        headers = [header_for(required, c.pay(offer)) for c in (channel, following)]
        served = stack.fake.completed["POST /v1/chat/completions"]
        answers = await asyncio.gather(*(post(stack, h) for h in headers))
        paid = [status == 200 for status, _, _ in answers]
        assert paid[0] or not paid[1]  # the one after the next never pays before the next
        for status, found, _ in answers:
            if status != 200:
                assert found[wire.ERROR_HEADER] in (
                    "invalid_batch_settlement_evm_cumulative_amount_mismatch",
                    "invalid_batch_settlement_evm_channel_busy",
                    "payment_in_progress",
                )
        assert stack.fake.completed["POST /v1/chat/completions"] == served + sum(paid)
    # Charged exactly what was served: the deposit's request and each 200.
    assert await charged(ledger, anvil, gas_key, channel) == (1 + sum(paid)) * PRICE_ATOMIC


async def test_a_charge_whose_settled_record_was_lost_is_settled_once_by_the_next_run(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """A channel's charge is a write to the ledger itself, made once: on the request's path
    with SERVED, SETTLING and SETTLED in one transaction; when that fails (here: the disk
    failed, nothing recorded), SERVED and SETTLING come before the charge in one transaction,
    SETTLED after it. A ledger failure (or a crash) between the charge and SETTLED leaves the
    payment SETTLING; the next run asks the channel for the outcome (never a second charge)
    and the channel is charged once."""
    ledger = tmp_path / "payments.db"
    real = SqliteLedger.transition
    lost: list[str] = []

    async def transition(self, payment_id, to, **change):
        if to is PaymentState.SETTLED and lost and lost[-1] == "armed":
            # The fault, twice: the one transaction with the charge, then SETTLED after it.
            lost[-1] = payment_id
            if len(lost) == 1:
                lost.append("armed")
            raise LedgerUnavailable("the disk failed")
        return await real(self, payment_id, to, **change)

    monkeypatch.setattr(SqliteLedger, "transition", transition)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        lost.append("armed")
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body  # charged: the receipt says so
        assert receipt_of(headers)["extra"]["channelState"]["chargedCumulativeAmount"] == str(
            2 * PRICE_ATOMIC
        )
        channel.charged_by(receipt_of(headers), offer)
    payment_id, again = lost
    assert again == payment_id
    left = {r.id: r for r in await records(ledger)}[payment_id]
    assert left.state is PaymentState.SETTLING  # written with SERVED, before the charge
    assert await charged(ledger, anvil, gas_key, channel) == 2 * PRICE_ATOMIC
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        for _ in range(200):
            found = {r.id: r for r in await records(ledger)}[payment_id]
            if found.state is PaymentState.SETTLED:
                break
            await asyncio.sleep(0.05)
        assert (found.state, found.settled_amount) == (PaymentState.SETTLED, PRICE_ATOMIC)
        # Charged once, and the channel goes on from there.
        assert await charged(ledger, anvil, gas_key, channel) == 2 * PRICE_ATOMIC
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        state = receipt_of(headers)["extra"]["channelState"]
        assert state["chargedCumulativeAmount"] == str(3 * PRICE_ATOMIC)
    async with claimer(ledger, anvil, gas_key) as channels:
        assert await channels.claim_once() == 1
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
