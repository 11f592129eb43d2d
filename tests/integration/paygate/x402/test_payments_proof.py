"""Reconcile on proof: a payer who cancels the authorization while its settlement is in doubt
is never recorded as paid, in facilitator mode (with and without an RPC endpoint) and in chain
mode. The seller's balance on chain and the ledger agree in every test."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import pytest

from paygate.x402.ledger import PaymentState
from paygate.x402.schemes.exact.transfer import CANCELED
from tests.fixtures.gateway_support import eventually
from tests.fixtures.payment_support import (
    paid_stack,
    post,
    receipt_of,
    records,
    v2_header,
)


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


def nonce_of(header: str) -> str:
    return json.loads(base64.b64decode(header))["payload"]["authorization"]["nonce"]


async def _state(ledger, wanted: PaymentState, timeout: float = 15.0):
    async def reached() -> bool:
        found = await records(ledger)
        return len(found) == 1 and found[0].state is wanted

    async with asyncio.timeout(timeout):
        while not await reached():
            await asyncio.sleep(0.05)
    (record,) = await records(ledger)
    return record


async def _held_then_cancelled(facilitator, usdc, payer, seller, ledger, **settings):
    """A settlement whose answer never comes (the facilitator holds it, settling nothing); the
    payer then cancels the authorization on chain."""
    facilitator.set_fault("hold_settle")
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **settings
    ) as stack:
        header = await v2_header(stack, payer)
        status, headers, _ = await post(stack, header)
        assert status == 200  # served; the settle answer was lost
        assert receipt_of(headers)["errorReason"] == "settlement_pending"
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLING
    assert not record.needs_review
    usdc.chain.cancel_authorization(payer, nonce_of(header))
    assert usdc.authorization_state(payer.address, nonce_of(header))  # used — but by a cancel
    facilitator.reset()  # drops the held request; the next settle is answered normally


async def test_cancelled_during_a_held_settlement_is_failed_facilitator_with_chain(
    facilitator, anvil, usdc, payer, seller, ledger
):
    settings = {"chain_rpc_url": anvil.rpc_url, "settle_timeout": 2.0}
    await _held_then_cancelled(facilitator, usdc, payer, seller, ledger, **settings)
    # The restart reconciles: the facilitator says "nonce already used"; the chain shows the
    # nonce's AuthorizationCanceled and no transfer.
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **settings
    ):
        record = await _state(ledger, PaymentState.FAILED)
    assert record.error == CANCELED
    assert usdc.balance_of(seller) == 0


async def test_cancelled_during_a_held_settlement_without_a_chain_is_flagged_never_paid(
    facilitator, usdc, payer, seller, ledger, tmp_path
):
    await _held_then_cancelled(facilitator, usdc, payer, seller, ledger, settle_timeout=2.0)
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, settle_timeout=2.0
    ):
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)

        async def flagged() -> bool:
            return (await records(ledger))[0].needs_review

        async with asyncio.timeout(10):
            while not await flagged():
                await asyncio.sleep(0.05)
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLING  # owed, in doubt: never SETTLED
    assert usdc.balance_of(seller) == 0
    # The operator sees it: `paygate payments list --review`.
    listed = subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "payments", "list", "--review", "--json",
         "--ledger-path", str(ledger)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    (shown,) = json.loads(listed.stdout)
    assert shown["id"] == record.id
    assert shown["needs_review"] is True


async def test_cancelled_while_our_transaction_is_dropped_is_failed_chain_mode(
    anvil, usdc, payer, seller, ledger, gas_key
):
    settings = {
        "facilitator_url": None,
        "payment_mode": "chain",
        "chain_rpc_url": anvil.rpc_url,
        "gas_key": gas_key.key,
        "settle_timeout": 2.0,
    }
    anvil.set_automine(False)  # our settlement waits in the mempool: no receipt comes
    try:
        async with paid_stack(seller=seller, ledger=ledger, **settings) as stack:
            header = await v2_header(stack, payer)
            status, headers, _ = await post(stack, header)
            assert status == 200
            assert receipt_of(headers)["errorReason"] == "settlement_pending"
        (record,) = await records(ledger)
        assert record.state is PaymentState.SETTLING
        assert record.transaction
        # The transaction is dropped (or replaced) and the payer cancels: authorizationState
        # is true with no transfer — which the old reconcile took as paid.
        anvil.drop_transaction(record.transaction)
        anvil.cancel_authorization(payer, nonce_of(header), mine=False)
        anvil.mine()
    finally:
        anvil.set_automine(True)
    assert usdc.authorization_state(payer.address, nonce_of(header))
    async with paid_stack(seller=seller, ledger=ledger, **settings):
        record = await _state(ledger, PaymentState.FAILED)
    assert record.error == CANCELED
    assert usdc.balance_of(seller) == 0


@pytest.mark.parametrize("with_chain", [True, False])
async def test_a_payer_who_cancels_before_settlement_gets_no_whole_reply(
    facilitator, anvil, usdc, payer, seller, ledger, with_chain
):
    # The payer front-runs our settlement with a cancel: the facilitator then says "nonce
    # already used". The reply is withheld; with a chain the record is FAILED, without one it is
    # flagged for review (nobody here can tell a cancel from a third party's transfer to us).
    settings = {"chain_rpc_url": anvil.rpc_url} if with_chain else {}
    facilitator.set_fault("slow", "settle", delay=2.0)
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, **settings
    ) as stack:
        header = await v2_header(stack, payer)
        request = asyncio.ensure_future(post(stack, header))
        await eventually(lambda: facilitator.stats.settle_calls == 1, timeout=10)
        await asyncio.to_thread(usdc.chain.cancel_authorization, payer, nonce_of(header))
        status, headers, raw = await request
    assert status == 402
    assert headers["X-Paygate-Error"] == "settlement_failed"
    assert b"fake" not in raw  # no reply content
    (record,) = await records(ledger)
    if with_chain:
        assert record.state is PaymentState.FAILED
        assert record.error == CANCELED
    else:
        assert record.state is PaymentState.SETTLING
        assert record.needs_review
    assert usdc.balance_of(seller) == 0
