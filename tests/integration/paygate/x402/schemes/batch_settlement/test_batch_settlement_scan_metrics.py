"""`batch-settlement`'s withdrawal scan on ``/metrics`` (chain mode, a real anvil, the real
gateway and its own claim loop): the scan fails open — vouchers are served while the RPC cannot
be read — so what an operator alerts on must show it. A failed scan counts a failure and
leaves no success time; once the RPC answers, the scan's success time, how far behind the
chain it is and the payer's pending withdrawal are there (docs/OPERATIONS.md)."""

from __future__ import annotations

import asyncio

from paygate_dev.chain.build import load_contract
from prometheus_client.parser import text_string_to_metric_families
from web3 import Web3

from paygate.x402.schemes.batch_settlement.chain import BatchChain, config_tuple
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from paygate.x402.settler import SettlerUnavailable
from tests.fixtures.batch_settlement_support import CHAIN_ID, chain_batch, opened_channel
from tests.fixtures.payment_support import PRICE_ATOMIC

DEPOSIT = 10 * PRICE_ATOMIC
FAILURES = "paygate_batch_withdrawal_scan_failures_total"
SCANNED = "paygate_batch_withdrawal_scan_success_timestamp_seconds"
BEHIND = "paygate_batch_withdrawal_scan_behind_blocks"
PENDING = "paygate_batch_withdrawals_pending"


async def _scrape(stack) -> dict[str, float]:
    async with stack.client.get(stack.url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _until(stack, done) -> dict[str, float]:
    """Scrapes until ``done(values)`` (the claim loop wakes every half second)."""
    async with asyncio.timeout(30):
        while True:
            values = await _scrape(stack)
            if done(values):
                return values
            await asyncio.sleep(0.2)


def _initiate_withdraw(anvil, payer, channel) -> None:
    """The payer asks the contract for its money back (the timed withdrawal's first step)."""
    anvil.rpc("anvil_setBalance", [payer.address, hex(10**18)])
    bs = anvil.w3.eth.contract(
        address=Web3.to_checksum_address(SETTLEMENT_ADDRESS),
        abi=load_contract("X402BatchSettlement").abi,
    )
    tx = bs.functions.initiateWithdraw(config_tuple(channel.config), DEPOSIT).build_transaction(
        {
            "from": payer.address,
            "nonce": anvil.w3.eth.get_transaction_count(payer.address),
            "chainId": CHAIN_ID,
        }
    )
    anvil.wait_for_receipt(
        anvil.w3.eth.send_raw_transaction(payer.sign_transaction(tx).raw_transaction).hex()
    )


async def test_a_failed_and_a_completed_withdrawal_scan_show_on_metrics(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    unreadable = [True]
    real = BatchChain.withdrawal_moves

    async def withdrawal_moves(self, first, last):
        if unreadable:
            raise SettlerUnavailable("the chain's RPC does not answer")
        return await real(self, first, last)

    monkeypatch.setattr(BatchChain, "withdrawal_moves", withdrawal_moves)
    async with chain_batch(
        seller, tmp_path / "payments.db", anvil, gas_key, batch_claim_interval=0.5
    ) as stack:
        _, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        _initiate_withdraw(anvil, payer, channel)
        failed = await _until(stack, lambda values: values.get(FAILURES, 0) >= 1)
        # Failing scans leave no success behind them (the alert's clock runs from 0).
        assert (failed[SCANNED], failed[PENDING]) == (0, 0)
        unreadable.clear()
        scanned = await _until(stack, lambda values: values[SCANNED] > 0)
        assert scanned[FAILURES] >= 1  # a counter: the failures stay counted
        assert scanned[BEHIND] == 0  # caught up with the chain's newest block
        assert scanned[PENDING] == 1  # the payer's withdrawal, learnt
