"""The gateway in chain mode with batched settlement (PAYGATE_CHAIN_BATCH_MAX > 1): paid requests
settle together in one Multicall3 transaction, each recorded SETTLED on its own proof; a gateway
killed after sending a batch and before recording it settles each payment exactly once after a
restart (reconciled by nonce). Real anvil, Circle's FiatToken, SDK-signed payments."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from paygate import wire
from paygate.x402 import smartwallet
from paygate.x402.ledger import PaymentState
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    paid_stack,
    post,
    receipt_of,
    records,
    states,
    until,
    v2_header,
)
from tests.fixtures.serve_support import gateway_process

N = 5


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "payments.db"


def batched(seller: str, ledger: Path, anvil, gas_key, **extra) -> dict:
    return {
        "seller": seller,
        "facilitator_url": None,
        "ledger": ledger,
        "payment_mode": "chain",
        "chain_rpc_url": anvil.rpc_url,
        "gas_key": gas_key.key,
        "chain_batch_max": 10,
        "chain_batch_window_ms": 500,
        **extra,
    }


async def test_paid_requests_settle_in_one_transaction_each_on_its_own_proof(
    anvil, usdc, payer, seller, ledger, gas_key
):
    async with paid_stack(**batched(seller, ledger, anvil, gas_key)) as stack:
        headers = [await v2_header(stack, payer) for _ in range(N)]
        answers = await asyncio.gather(*(post(stack, header) for header in headers))
        # A replayed authorization is refused before it could reach a batch.
        status, replayed, _ = await post(stack, headers[0])
        assert status == 402
        assert replayed["X-Paygate-Error"] == "invalid_exact_evm_nonce_already_used"
    assert [status for status, _, _ in answers] == [200] * N
    receipts = [receipt_of(h) for _, h, _ in answers]
    assert all(r["success"] for r in receipts)
    (tx_hash,) = {r["transaction"] for r in receipts}
    found = await records(ledger)
    assert [r.state for r in found] == [PaymentState.SETTLED] * N
    assert {r.transaction for r in found} == {tx_hash}
    receipt = anvil.w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["to"] == smartwallet.MULTICALL3_ADDRESS
    assert usdc.balance_of(seller) == N * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == 100_000_000 - N * PRICE_ATOMIC


async def test_batching_off_keeps_one_transaction_per_paid_request(
    anvil, usdc, payer, seller, ledger, gas_key
):
    settings = batched(seller, ledger, anvil, gas_key)
    del settings["chain_batch_max"], settings["chain_batch_window_ms"]  # the defaults: off
    async with paid_stack(**settings) as stack:
        headers = [await v2_header(stack, payer) for _ in range(3)]
        answers = await asyncio.gather(*(post(stack, header) for header in headers))
    assert [status for status, _, _ in answers] == [200] * 3
    found = await records(ledger)
    assert [r.state for r in found] == [PaymentState.SETTLED] * 3
    assert len({r.transaction for r in found}) == 3
    for record in found:
        receipt = anvil.w3.eth.get_transaction_receipt(record.transaction)
        assert receipt["to"] == usdc.address
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


async def test_killed_after_sending_a_batch_settles_each_payment_once_after_restart(
    anvil, usdc, payer, seller, tmp_path, key_file, gas_key
):
    ledger = tmp_path / "payments.db"
    gas = gas_key.address
    async with running_stack() as fake_stack:
        settings = {
            "key_file": key_file,
            "ledger": ledger,
            "seller": seller,
            "facilitator_url": "http://127.0.0.1:9",  # unused in chain mode
            "upstream": fake_stack.fake_url,
            "chain_rpc_url": anvil.rpc_url,
            "extra_env": {
                "PAYGATE_PAYMENT_MODE": "chain",
                "PAYGATE_GAS_KEY": gas_key.key,
                "PAYGATE_CHAIN_BATCH_MAX": "10",
                "PAYGATE_CHAIN_BATCH_WINDOW_MS": "500",
            },
        }
        anvil.set_automine(False)  # the batch is sent, and waits in the mempool
        try:
            async with gateway_process(**settings) as (url, proc):
                fake_stack.url = url
                headers = [await v2_header(fake_stack, payer) for _ in range(3)]
                sent_before = anvil.w3.eth.get_transaction_count(gas, "pending")
                requests = [
                    asyncio.ensure_future(
                        fake_stack.client.post(
                            url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: h}
                        )
                    )
                    for h in headers
                ]
                await until(ledger, lambda found: states(found) == [PaymentState.SETTLING] * 3)
                async with asyncio.timeout(20):  # the batch transaction is out
                    while anvil.w3.eth.get_transaction_count(gas, "pending") == sent_before:
                        await asyncio.sleep(0.05)
                assert anvil.w3.eth.get_transaction_count(gas, "pending") == sent_before + 1
                proc.send_signal(signal.SIGKILL)  # before any answer is recorded
                await asyncio.to_thread(proc.wait, 10)
                for request in requests:
                    with pytest.raises(Exception):  # noqa: B017, PT011 - the connection died
                        await request
            assert states(await records(ledger)) == [PaymentState.SETTLING] * 3
            anvil.mine()  # the batch lands while no gateway runs
        finally:
            anvil.set_automine(True)
        assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
        # Restart on the same ledger: each payment is proven from the chain by its nonce.
        async with gateway_process(**settings):
            await until(ledger, lambda found: states(found) == [PaymentState.SETTLED] * 3)
    found = await records(ledger)
    (tx_hash,) = {r.transaction for r in found}  # the one batch, found by each nonce's event
    receipt = anvil.w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["to"] == smartwallet.MULTICALL3_ADDRESS
    assert anvil.w3.eth.get_transaction_count(gas) == sent_before + 1  # nothing re-sent
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC  # exactly once
    assert usdc.balance_of(payer.address) == 100_000_000 - 3 * PRICE_ATOMIC
