"""`batch-settlement` chain readings across a chain that falls back (a real anvil put back with
``evm_revert``, then going on with other blocks; the real gateway, its ledger on SQLite and on
PostgreSQL). Each mirrored reading is stamped with its block, and an older one never undoes a
newer one — but once the chain no longer holds the block a mirror was read at, the chain as it
is now must count: a top-up reorganised away must not keep serving vouchers on money that is
no longer deposited, and a payer's withdrawal requested in the blocks that replaced those the
claimer's scan had passed must still be learnt."""

from __future__ import annotations

import pytest

from paygate import wire
from paygate.x402.schemes.batch_settlement.chain import config_tuple
from tests.fixtures.batch_settlement_support import (
    chain_batch,
    claimer,
    header_for,
    ledger_for,
    opened_channel,
    payer_sends,
    settlement_contract,
)
from tests.fixtures.payment_support import PRICE_ATOMIC, post, receipt_of

DEPOSIT = 10 * PRICE_ATOMIC
COMPLETIONS = "POST /v1/chat/completions"


async def _pass(ledger, anvil, gas_key) -> int:
    async with claimer(ledger, anvil, gas_key) as channels:
        return await channels.claim_once()


async def _mirrored(ledger, anvil, gas_key, channel_id):
    async with claimer(ledger, anvil, gas_key) as channels:
        mirrored = await channels.store.get(channel_id)
    assert mirrored is not None
    return mirrored


def _fall_back(anvil, snapshot: str, *, later_than: int) -> None:
    """The chain put back to ``snapshot`` and going on from there: its next block later in
    time than ``later_than`` (a block of the chain it replaced)."""
    anvil.rpc("evm_revert", [snapshot])
    anvil.rpc("evm_setNextBlockTimestamp", [later_than + 1])
    anvil.mine()


async def _served_up_to(stack, required, offer, channel, balance: int) -> None:
    """Vouchers up to ``balance`` are served; the next one is refused and nothing served."""
    while channel.charged + PRICE_ATOMIC <= balance:
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
    served = stack.fake.completed[COMPLETIONS]
    status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
    assert (status, headers[wire.ERROR_HEADER]) == (
        402,
        "invalid_batch_settlement_evm_cumulative_exceeds_balance",
    )
    assert stack.fake.completed[COMPLETIONS] == served


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    "height",
    ["below", "same"],
    ids=["the-chain-stays-below-the-mirrors-block", "the-chain-regains-the-mirrors-height"],
)
async def test_a_top_up_reorganised_away_no_longer_serves_vouchers(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, request, store, height
):
    """The attack: the payer tops a channel up and the gateway mirrors it; the chain then
    falls back to before the top-up and goes on with other blocks — staying below the block
    the mirror was read at, or regaining its height with another block there. The claim
    loop's reading of the chain as it is now (an older block, or the same number) replaces
    the mirror: vouchers up to what the contract holds are served, one past it is refused
    and nothing is served for it."""
    ledger = ledger_for(store, tmp_path, request)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        snapshot = anvil.rpc("evm_snapshot")
        anvil.mine(3)  # the top-up's block well above where the chain falls back to
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        topped = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert topped.balance == 2 * DEPOSIT
        replaced = anvil.w3.eth.get_block(topped.read_block)
        _fall_back(anvil, snapshot, later_than=int(replaced["timestamp"]))
        if height == "same":
            anvil.mine(topped.read_block - anvil.w3.eth.block_number)
        else:
            assert anvil.w3.eth.block_number < topped.read_block
        await _pass(ledger, anvil, gas_key)
        mirrored = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert mirrored.balance == DEPOSIT
        await _served_up_to(stack, required, offer, channel, DEPOSIT)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_top_up_reorganised_away_is_read_again_at_the_next_wake(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, request, store
):
    """The same attack between claim intervals: the claimer's scan had passed the blocks
    before the top-up (its place is still on the chain), and a wake between claim intervals
    reads only withdrawing channels. The channel mirrored from a block above the newest is
    read again at that wake all the same: a voucher past what the contract holds is
    refused."""
    ledger = ledger_for(store, tmp_path, request)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        snapshot = anvil.rpc("evm_snapshot")
        anvil.mine(3)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        topped = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert topped.balance == 2 * DEPOSIT
        replaced = anvil.w3.eth.get_block(topped.read_block)
        _fall_back(anvil, snapshot, later_than=int(replaced["timestamp"]))
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once(withdrawing_only=True) == 0
        mirrored = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert mirrored.balance == DEPOSIT
        await _served_up_to(stack, required, offer, channel, DEPOSIT)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_withdrawal_requested_in_blocks_that_replaced_scanned_ones_is_learnt(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, request, store
):
    """The claimer's scan has passed blocks the chain then drops (it falls back and goes on
    with other blocks, below the scan's place), and the payer's withdrawal request is mined
    in one of those. The next pass finds its place reorganised away, goes back over the
    channels and learns the withdrawal (pending, its request's time) — not only once the
    chain passes the old place, nor never (its block then far behind the place)."""
    ledger = ledger_for(store, tmp_path, request)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        _, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the channel owes nothing now
        snapshot = anvil.rpc("evm_snapshot")
        anvil.mine(20)
        await _pass(ledger, anvil, gas_key)  # the scan's place: 20 blocks on
        scanned = anvil.w3.eth.get_block("latest")
        _fall_back(anvil, snapshot, later_than=int(scanned["timestamp"]))
        call = settlement_contract(anvil).functions.initiateWithdraw(
            config_tuple(channel.config), DEPOSIT - PRICE_ATOMIC
        )
        receipt = payer_sends(anvil, payer, call)
        assert receipt["blockNumber"] < scanned["number"]
        requested = int(anvil.w3.eth.get_block(receipt["blockNumber"])["timestamp"])
        await _pass(ledger, anvil, gas_key)
        mirrored = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert (mirrored.withdraw_requested_at, mirrored.withdraw_amount) == (
            requested,
            DEPOSIT - PRICE_ATOMIC,
        )
        assert mirrored.withdraw_due is not None


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_refund_after_the_chain_fell_back_returns_what_the_contract_holds(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, request, store
):
    """The payer asks for the rest back after its top-up was reorganised away (the chain
    below the mirror's block): the refund reads the channel no older than its mirror's block,
    which the chain no longer holds — proven gone, the chain as it is now counts, and the
    refund returns what the contract holds (not "ask again" until the chain regains the
    height, nor the mirror's amount, which the contract would refuse)."""
    ledger = ledger_for(store, tmp_path, request)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        snapshot = anvil.rpc("evm_snapshot")
        anvil.mine(3)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        topped = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        replaced = anvil.w3.eth.get_block(topped.read_block)
        _fall_back(anvil, snapshot, later_than=int(replaced["timestamp"]))
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body
        assert int(receipt_of(headers)["amount"]) == DEPOSIT - channel.charged
        mirrored = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert mirrored.balance == channel.charged


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_top_up_reorganised_away_at_the_tip_is_read_again_at_the_next_wake(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, request, store
):
    """The usual reorganisation: the blocks after the claimer's scan are replaced by as many
    others or more (the chain regains, then passes, the top-up's height), so neither the
    scan's place nor a block above the newest tells it. A wake between claim intervals claims
    only withdrawing channels — yet the payer would spend the top-up that is gone until the
    claim interval's pass reads the channel (if it is among those claimed then). The wake
    finds the block the mirror was read at replaced and reads the channel again: a voucher
    past what the contract holds is refused."""
    ledger = ledger_for(store, tmp_path, request)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        snapshot = anvil.rpc("evm_snapshot")
        anvil.mine(3)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        topped = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert topped.balance == 2 * DEPOSIT
        replaced = anvil.w3.eth.get_block(topped.read_block)
        _fall_back(anvil, snapshot, later_than=int(replaced["timestamp"]))
        anvil.mine(topped.read_block + 2 - anvil.w3.eth.block_number)
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once(withdrawing_only=True) == 0
        mirrored = await _mirrored(ledger, anvil, gas_key, channel.channel_id)
        assert mirrored.balance == DEPOSIT
        await _served_up_to(stack, required, offer, channel, DEPOSIT)
