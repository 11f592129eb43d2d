"""`batch-settlement`'s answers to ask again (chain mode, a real anvil, the real gateway and
ledger): each says when (``Retry-After``) and under the code the payer's client acts on — a
refund the chain could not confirm (402 ``…_refund_transaction_failed``, as a busy channel's
402 does), and a voucher's verify that woke after its reservation was released (503
``lease_lost``, as every other lease-lost path answers, so paygate's client sends it again)."""

from __future__ import annotations

import asyncio

import pytest

from paygate import wire
from paygate.client.withheld import Withheld
from paygate.x402.leases import HeldLeases
from paygate.x402.schemes.batch_settlement.bound import BoundBatchSettlement
from paygate.x402.schemes.batch_settlement.chain import BatchChain
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable
from tests.fixtures.batch_settlement_support import (
    chain_batch,
    claimer,
    header_for,
    opened_channel,
    sdk_batch_client,
    sdk_batch_scheme,
)
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC, post, receipt_of

DEPOSIT = 10 * PRICE_ATOMIC
LEASE = 3.0  # replica "a"'s payment leases: they run out soon after it freezes
REFUND_FAILED = "invalid_batch_settlement_evm_refund_transaction_failed"


@pytest.mark.parametrize("failure", ["chain_unreadable", "outcome_unknown"])
async def test_a_refund_to_ask_again_says_when(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch, failure
):
    """A refund the chain could not confirm — the channel unreadable before it was sent, or
    sent with no receipt back — is a 402 to ask again with a ``Retry-After`` (the busy 402's
    header); asked again after it, the refund is answered."""
    armed: list[bool] = []
    real_state, real_refund = BatchChain.state, BatchChain.refund

    async def state(self, channel_id, **kw):
        if armed and failure == "chain_unreadable":
            armed.clear()
            raise SettlerUnavailable("the chain's RPC does not answer")
        return await real_state(self, channel_id, **kw)

    async def refund(self, request):
        if armed and failure == "outcome_unknown":
            armed.clear()
            raise SettlementUnknown("no receipt yet")  # not sent, as far as anyone knows
        return await real_refund(self, request)

    monkeypatch.setattr(BatchChain, "state", state)
    monkeypatch.setattr(BatchChain, "refund", refund)
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        required, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, _ = await post(stack, header_for(required, channel.refund()))
        assert not armed  # the failure was met
        assert (status, headers[wire.ERROR_HEADER]) == (402, REFUND_FAILED)
        assert int(headers["Retry-After"]) >= 1
        status, headers, body = await post(stack, header_for(required, channel.refund()))
        assert status == 200, body


async def test_a_refund_refused_on_chain_does_not_say_ask_again(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The same code for a refund the contract refused (the payer's, not the server's): no
    ``Retry-After`` — asking again would be refused again."""

    async def refund(self, request):
        raise ValueError(REFUND_FAILED)

    monkeypatch.setattr(BatchChain, "refund", refund)
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        required, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        status, headers, _ = await post(stack, header_for(required, channel.refund()))
        assert (status, headers[wire.ERROR_HEADER]) == (402, REFUND_FAILED)
        assert "Retry-After" not in headers


async def test_a_verify_that_woke_after_its_lease_was_lost_answers_lease_lost(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """Replica "a" reserves a voucher while another request holds the channel, then freezes
    before its verify (leases unrenewed) and is taken for dead: replica "b"'s reconciler
    releases its reservation. When "a" wakes, its verify takes nothing and answers the stable
    503 ``lease_lost`` with a ``Retry-After`` — the answer paygate's client sends again (not
    ``payment_verifier_unavailable``); sent again, the voucher is served once."""
    ledger = tmp_path / "payments.db"
    frozen: list[bool] = []
    verifying, wake = asyncio.Event(), asyncio.Event()
    real_verify = BoundBatchSettlement.verify
    real_renew = HeldLeases.renew_all

    async def verify(self, settler, payment, requirements):
        if frozen and not verifying.is_set():  # a's verify (b's go on)
            verifying.set()
            await asyncio.wait_for(wake.wait(), timeout=60)
        return await real_verify(self, settler, payment, requirements)

    async def renew_all(self) -> int:
        return 0 if frozen else await real_renew(self)

    monkeypatch.setattr(BoundBatchSettlement, "verify", verify)
    monkeypatch.setattr(HeldLeases, "renew_all", renew_all)
    scheme = sdk_batch_scheme(payer, deposit=DEPOSIT)
    async with (
        sdk_batch_client(scheme) as client,
        chain_batch(seller, ledger, anvil, gas_key, replica_id="a", lease_seconds=LEASE) as a,
    ):
        first = await client.post(a.url + CHAT, json=CHAT_BODY)
        assert first.status_code == 200, first.text
        channel_id = receipt_of(first.headers)["extra"]["channelState"]["channelId"]
        async with claimer(ledger, anvil, gas_key) as other:
            assert await other.store.take(channel_id, "another request") is not None
            frozen.append(True)
            late = asyncio.ensure_future(client.post(a.url + CHAT, json=CHAT_BODY))
            await asyncio.wait_for(verifying.wait(), timeout=30)
            await asyncio.sleep(LEASE + 0.5)  # a's lease runs out
            await other.store.release(channel_id, "another request")
        async with chain_batch(seller, ledger, anvil, gas_key, replica_id="b") as b:
            # b's start released a's reservation (the reconciler's step).
            frozen.clear()
            wake.set()  # a wakes up: its verify goes on
            answered = await asyncio.wait_for(late, timeout=60)
            assert (answered.status_code, answered.headers.get(wire.ERROR_HEADER)) == (
                503,
                "lease_lost",
            ), answered.text
            assert answered.json()["error"]["code"] == "lease_lost"
            assert int(answered.headers["Retry-After"]) >= 1
            assert Withheld().delay(answered, 0) is not None  # paygate's client sends it again
            served = b.fake.completed["POST /v1/chat/completions"]
            response = await client.post(b.url + CHAT, json=CHAT_BODY)
            assert response.status_code == 200, (response.headers, response.text)
            state = receipt_of(response.headers)["extra"]["channelState"]
            assert state["chargedCumulativeAmount"] == str(2 * PRICE_ATOMIC)
            assert b.fake.completed["POST /v1/chat/completions"] == served + 1
