"""A voucher whose charge was lost, then passed by a later voucher (chain mode, a real anvil, the
real ledger on both stores): the lost charge is never recorded SETTLED. The payments SETTLED are
exactly what the channel's charged total holds, and that is what the claim moves on chain."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from paygate.x402.ledger import LedgerUnavailable, PaymentState
from paygate.x402.ledger_postgres import PostgresLedger
from paygate.x402.ledger_sqlite import SqliteLedger
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.schemes.batch_settlement.channels import Channels
from paygate.x402.schemes.batch_settlement.store import CHARGE_LOST
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
)

DEPOSIT = 10 * PRICE_ATOMIC
BIG = {**CHAT_BODY, "model": "fake-big"}  # twice the price (model_prices below)
HOLD = 2  # PAYGATE_MAX_TIMEOUT_SECONDS: how long a dead request holds its channel


async def payment_records(ledger: Any) -> list[Any]:
    location = (
        LedgerLocation(kind="postgresql", conninfo=ledger)
        if isinstance(ledger, str)
        else LedgerLocation(kind="sqlite", path=ledger)
    )
    store = await open_ledger(location, replica="reader")
    try:
        return await store.list(limit=100)
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "sqlite":
        return tmp_path / "payments.db"
    return request.getfixturevalue("pg_url")


async def test_a_lost_charge_passed_by_a_later_voucher_is_failed_not_settled(
    anvil, usdc, payer, seller, gas_key, ledger, monkeypatch
):
    """The scenario: the channel is charged P (the deposit's request). Voucher v1 (ceiling 2P)
    is served; between its take and its commit another replica's claim lands on the channel
    (a real claim: the commit's compare-and-set loses, its voucher record commits), and the
    process dies before the fallback charges the channel: v1's payment is left SETTLING, its
    voucher recorded, the channel still at P. Its hold runs out; the payer's next request, a
    2P one, carries a voucher for P + 2P = 3P — built on the channel's P, not counting v1 —
    and is committed. Then the reconciler (the next run) commits v1 again: the channel's
    ceiling (3P) is past v1's (2P), but v1's charge is not in its total. Before the fix it was
    recorded SETTLED (the seller's books one price over what any claim can take)."""
    armed: list[int] = []
    real_take = Channels.take

    async def take(self: Channels, checked: Any, *args: Any) -> Any:
        taken = await real_take(self, checked, *args)
        if armed:  # after this request took the channel: another replica's claim lands on it
            async with claimer(ledger, anvil, gas_key, replica="other") as channels:
                assert await channels.claim_once() == 1
        return taken

    def dies(statements: list[tuple[str, Any]]) -> None:
        if armed and any(s.startswith("UPDATE bs_channels SET charged") for s, _ in statements):
            armed[0] += 1
            if armed[0] == 2:  # the fallback's charge, after the first compare-and-set lost
                armed.clear()
                raise LedgerUnavailable("the process died here")

    monkeypatch.setattr(Channels, "take", take)
    for store in (SqliteLedger, PostgresLedger):
        one, all_ = store.scheme_sql, store.scheme_sql_all

        async def scheme_sql(self, sql, params, one=one):
            dies([(sql, params)])
            return await one(self, sql, params)

        async def scheme_sql_all(self, statements, all_=all_):
            dies(statements)
            return await all_(self, statements)

        monkeypatch.setattr(store, "scheme_sql", scheme_sql)
        monkeypatch.setattr(store, "scheme_sql_all", scheme_sql_all)

    settings = {"model_prices": {"fake-big": "0.002"}, "max_timeout_seconds": HOLD}
    async with chain_batch(seller, ledger, anvil, gas_key, **settings) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert channel.charged == PRICE_ATOMIC
        # v1: served, its charge lost.
        armed.append(0)
        v1 = channel.pay(offer)
        await post(stack, header_for(required, v1))
        assert not armed, "the fault did not happen"
        assert usdc.balance_of(seller) == PRICE_ATOMIC  # the other replica claimed P
        async with claimer(ledger, anvil, gas_key) as channels:
            state = await channels.store.get(channel.channel_id)
        assert state is not None
        assert state.charged == PRICE_ATOMIC
        await asyncio.sleep(HOLD + 0.5)  # v1's hold on the channel runs out
        # The payer's next request costs 2P: its voucher is the channel's P plus 2P.
        big_required = await challenge_of(stack, body=BIG)
        big_offer = batch_offer(big_required)
        assert int(big_offer["amount"]) == 2 * PRICE_ATOMIC
        status, headers, body = await post(
            stack, header_for(big_required, channel.pay(big_offer)), json=BIG
        )
        assert status == 200, body
        assert receipt_of(headers)["extra"]["channelState"]["chargedCumulativeAmount"] == str(
            3 * PRICE_ATOMIC
        )
    (left,) = [r for r in await payment_records(ledger) if r.state is PaymentState.SETTLING]
    # The next run's reconciler commits v1 again.
    async with chain_batch(seller, ledger, anvil, gas_key, **settings):
        async with asyncio.timeout(20):
            while True:
                found = {r.id: r for r in await payment_records(ledger)}[left.id]
                if found.terminal:
                    break
                await asyncio.sleep(0.05)
    assert (found.state, found.error) == (PaymentState.FAILED, CHARGE_LOST)
    settled = [r for r in await payment_records(ledger) if r.state is PaymentState.SETTLED]
    assert sorted(r.settled_amount for r in settled) == [PRICE_ATOMIC, 2 * PRICE_ATOMIC]
    # What was recorded SETTLED is what the channel holds and what the claims move.
    async with claimer(ledger, anvil, gas_key) as channels:
        assert await channels.claim_once() == 1
        state = await channels.store.get(channel.channel_id)
    assert state is not None
    assert state.charged == 3 * PRICE_ATOMIC
    assert usdc.balance_of(seller) == sum(r.settled_amount for r in settled) == 3 * PRICE_ATOMIC
