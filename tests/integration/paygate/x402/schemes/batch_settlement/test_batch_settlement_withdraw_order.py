"""A `batch-settlement` payer's timed withdrawal that finishes while a top-up is between its
chain reading and its mirror (chain mode, a real anvil, the real gateway and ledger): the claim
loop mirrors the withdrawal from a later reading first, and the top-up's older reading, written
after, must not undo it — the books follow chain order, never the order writes land in. Its
own module: it moves the chain's clock forward (the withdraw delay), which other tests' fresh
authorizations must not see (each case puts the chain back after it)."""

from __future__ import annotations

import asyncio

import pytest
from paygate_dev.chain.build import load_contract
from web3 import Web3

from paygate import wire
from paygate.x402.schemes.batch_settlement.chain import config_tuple
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from tests.fixtures.batch_settlement_support import (
    CHAIN_ID,
    chain_batch,
    claimer,
    header_for,
    opened_channel,
    pause_top_up,
)
from tests.fixtures.payment_support import PRICE_ATOMIC, post, receipt_of

DEPOSIT = 10 * PRICE_ATOMIC


def _payer_sends(anvil, payer, call) -> None:
    tx = call.build_transaction(
        {
            "from": payer.address,
            "nonce": anvil.w3.eth.get_transaction_count(payer.address),
            "chainId": CHAIN_ID,
        }
    )
    signed = payer.sign_transaction(tx).raw_transaction
    anvil.wait_for_receipt(anvil.w3.eth.send_raw_transaction(signed).hex())


@pytest.mark.parametrize(
    "withdrawn",
    [DEPOSIT // 2, DEPOSIT],
    ids=["the-claim-loop-lowers-the-balance", "the-claim-loop-finds-the-balance-as-mirrored"],
)
async def test_a_withdrawal_mirrored_between_a_top_ups_reading_and_its_write_stays_mirrored(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch, rewound, withdrawn
):
    """The payer asks for a timed withdrawal, then tops up: the top-up is proven and read on
    chain under its hold (both deposits in the balance) and stops before its mirror. The
    withdrawal finishes on chain; the claim loop reads the channel (a later block) and mirrors
    it — a lower balance than mirrored, or, when the payer took back as much as it topped up,
    the balance the ledger already had. Then the top-up writes its older reading: the mirror
    stays the contract's balance, and a voucher past it is refused, never served for a charge
    no claim could pay."""
    ledger = tmp_path / "payments.db"
    paused = pause_top_up(monkeypatch, in_next_read=True)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        anvil.rpc("anvil_setBalance", [payer.address, hex(10**18)])
        settlement = anvil.w3.eth.contract(
            address=Web3.to_checksum_address(SETTLEMENT_ADDRESS),
            abi=load_contract("X402BatchSettlement").abi,
        )
        config = config_tuple(channel.config)
        _payer_sends(anvil, payer, settlement.functions.initiateWithdraw(config, withdrawn))
        paused.arm()
        top_up = asyncio.ensure_future(
            post(stack, header_for(required, channel.pay(offer, deposit=DEPOSIT)))
        )
        await asyncio.wait_for(paused.reached.wait(), timeout=30)
        anvil.rpc("evm_increaseTime", [901])
        anvil.mine()
        _payer_sends(anvil, payer, settlement.functions.finalizeWithdraw(config))
        left = 2 * DEPOSIT - withdrawn
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1  # the first request's charge
            assert (await channels.chain.state(channel.channel_id)).balance == left
            assert (await channels.store.get(channel.channel_id)).balance == left
        paused.proceed.set()
        status, headers, body = await asyncio.wait_for(top_up, timeout=30)
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        async with claimer(ledger, anvil, gas_key) as channels:
            mirrored = await channels.store.get(channel.channel_id)
            on_chain = await channels.chain.state(channel.channel_id)
        assert mirrored is not None
        assert (mirrored.balance, on_chain.balance) == (left, left)
        # Vouchers up to what the contract holds are served; one past it is refused.
        while channel.charged + PRICE_ATOMIC <= left:
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
        served = stack.fake.completed["POST /v1/chat/completions"]
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_cumulative_exceeds_balance",
        )
        assert stack.fake.completed["POST /v1/chat/completions"] == served
