"""paygate's own client pays `batch-settlement`: one deposit, a voucher a request, a refund.

Against paygate in chain mode (anvil, Circle's FiatToken as USDC, the x402BatchSettlement
stand-in at its canonical address), through the real sealed v2 flow of the transport. The chain
is the proof: the seller's balance is what was claimed, the payer's is its funds minus that.
"""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from paygate.client import AsyncPaygateTransport, ChannelStateRejected, SpendRefused
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from tests.fixtures.batch_settlement_support import DEPOSIT_ATOMIC, chain_batch, claimer, spend
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC


async def test_transport_pays_n_requests_on_one_deposit_then_claim_and_refund(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    transport = AsyncPaygateTransport(wallet=payer, spend=spend())
    escrow = usdc.balance_of(SETTLEMENT_ADDRESS)
    async with (
        chain_batch(seller, ledger, anvil, gas_key) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        for _ in range(7):
            reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"]  # the sealed reply opened
        records = transport.payments
        assert [r.scheme for r in records] == ["batch-settlement"] * 7
        assert [r.deposit for r in records] == [Decimal("0.02")] + [Decimal(0)] * 6
        assert [(r.settled, r.receipt_error) for r in records] == [(True, None)] * 7
        # Only the deposit counts against max_total, once.
        assert transport.spent == Decimal("0.02")
        # One deposit moved the payer's money into escrow; the seller has nothing yet.
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - DEPOSIT_ATOMIC
        assert usdc.balance_of(seller) == 0

        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
        assert usdc.balance_of(seller) == 7 * PRICE_ATOMIC

        (receipt,) = await transport.refund(stack.url)
        assert receipt.success
        assert receipt.transaction
        # The refund came back, and no longer counts against the policy.
        assert transport.spent == Decimal("0.007")
        with pytest.raises(SpendRefused):
            await transport.refund(stack.url)  # the drained channel is forgotten
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 7 * PRICE_ATOMIC
    assert usdc.balance_of(seller) == 7 * PRICE_ATOMIC
    assert usdc.balance_of(SETTLEMENT_ADDRESS) == escrow


async def test_a_lost_receipt_is_resynced_from_the_corrective_402_and_charged_once(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """Our count lags the seller's (a reply whose receipt never reached us): the next voucher
    is stale, paygate answers the corrective 402 with our own last voucher, and the client
    resynchronises from it and pays again — never signing past the vouchers it signed."""
    ledger = tmp_path / "payments.db"
    transport = AsyncPaygateTransport(wallet=payer, spend=spend())
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        async with httpx.AsyncClient(transport=transport, timeout=60) as http:
            for _ in range(2):
                assert (await http.post(stack.url + CHAT, json=CHAT_BODY)).status_code == 200
            assert transport._core.payer is not None
            book = transport._core.payer.channels
            assert book is not None
            (channel,) = book.channels()
            channel.payer.charged -= PRICE_ATOMIC  # as if the second receipt were lost
            reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
            assert channel.payer.charged == 3 * PRICE_ATOMIC
            assert channel.signed == 3 * PRICE_ATOMIC

            # A state older than the receipts we hold is refused, nothing more is signed.
            channel.payer.charged += PRICE_ATOMIC  # we now believe more was charged
            with pytest.raises(ChannelStateRejected):
                await http.post(stack.url + CHAT, json=CHAT_BODY)
            # One voucher on our own count (4 + 1 requests), none on the seller's word.
            assert channel.signed == 5 * PRICE_ATOMIC
            assert channel.payer.charged == 4 * PRICE_ATOMIC
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


async def test_a_min_deposit_above_the_policy_is_never_signed(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """paygate asks a deposit of ten requests' worth (0.01): a policy depositing 0.005 never
    signs one. The gateway offers batch-settlement alone, so nothing is paid at all: the
    caller hears why, and no money moves."""
    transport = AsyncPaygateTransport(wallet=payer, spend=spend(channel_deposit="0.005"))
    escrow = usdc.balance_of(SETTLEMENT_ADDRESS)
    payer_funds = usdc.balance_of(payer.address)
    async with (
        chain_batch(seller, tmp_path / "l.db", anvil, gas_key) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        with pytest.raises(SpendRefused, match="minDeposit"):
            await http.post(stack.url + CHAT, json=CHAT_BODY)
    assert transport.payments == []
    assert usdc.balance_of(SETTLEMENT_ADDRESS) == escrow
    assert usdc.balance_of(payer.address) == payer_funds
