"""A `batch-settlement` payer who takes its deposit back through the contract's escape hatch
(timed withdrawal) before the gateway claimed: the claim follows the chain and never reverts,
and the gateway stops taking vouchers past what is left. Its own module: it moves the chain's
clock forward (the withdraw delay), which the other tests' fresh authorizations must not see."""

from __future__ import annotations

from paygate_dev.chain.build import load_contract
from web3 import Web3

from paygate import wire
from paygate.x402.schemes.batch_settlement.chain import config_tuple
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from tests.fixtures.batch_settlement_support import (
    CHAIN_ID,
    batch_offer,
    chain_batch,
    claimer,
    header_for,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import PRICE_ATOMIC, challenge_of, post, receipt_of


async def test_a_payer_who_withdraws_before_the_claim_leaves_a_claim_that_does_not_revert(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required = await challenge_of(stack)
        offer = batch_offer(required)
        channel = PayerChannel.open(payer, offer, CHAIN_ID)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=10 * PRICE_ATOMIC))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        # The payer withdraws everything through the contract's escape hatch, unclaimed.
        anvil.rpc("anvil_setBalance", [payer.address, hex(10**18)])
        bs = anvil.w3.eth.contract(
            address=Web3.to_checksum_address(SETTLEMENT_ADDRESS),
            abi=load_contract("X402BatchSettlement").abi,
        )
        for call in (
            bs.functions.initiateWithdraw(config_tuple(channel.config), 10 * PRICE_ATOMIC),
            bs.functions.finalizeWithdraw(config_tuple(channel.config)),
        ):
            tx = call.build_transaction(
                {
                    "from": payer.address,
                    "nonce": anvil.w3.eth.get_transaction_count(payer.address),
                    "chainId": CHAIN_ID,
                }
            )
            anvil.wait_for_receipt(
                anvil.w3.eth.send_raw_transaction(payer.sign_transaction(tx).raw_transaction).hex()
            )
            anvil.rpc("evm_increaseTime", [901])
            anvil.mine()
        assert usdc.balance_of(payer.address) == PAYER_FUNDS
        async with claimer(ledger, anvil, gas_key) as channels:
            blocks = anvil.w3.eth.block_number
            assert await channels.claim_once() == 0  # nothing claimable: no reverting batch
            assert anvil.w3.eth.block_number == blocks
            assert (await channels.store.get(channel.channel_id)).balance == 0
        # The gateway's mirror followed the chain: the next voucher is past the deposit.
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_cumulative_exceeds_balance",
        )
