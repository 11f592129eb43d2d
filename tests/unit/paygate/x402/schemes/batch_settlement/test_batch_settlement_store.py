"""batch-settlement's channel state in the ledger, on both stores (SQLite and PostgreSQL): the
rules replicas rely on when they share a channel — one request at a time, a charge committed
once and only under a voucher that covers it, one claimer at a time."""

from __future__ import annotations

import asyncio

import pytest

from paygate.x402.schemes.batch_settlement.payload import ChannelConfig
from paygate.x402.schemes.batch_settlement.store import ChannelBusy, ChannelStore, ClaimEntry

CHANNEL = "0x" + "ab" * 32
CONFIG = ChannelConfig(
    payer="0x" + "11" * 20,
    payer_authorizer="0x" + "11" * 20,
    receiver="0x" + "22" * 20,
    receiver_authorizer="0x" + "33" * 20,
    token="0x" + "44" * 20,
    withdraw_delay=900,
    salt="0x" + "00" * 32,
)
SIG = "0x" + "5" * 130


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def two_replicas(ledger_store, clock) -> tuple[ChannelStore, ChannelStore]:
    a = await ledger_store(replica="a")
    b = await ledger_store(replica="b")
    return (
        ChannelStore(a, clock=clock, pending_seconds=30.0),
        ChannelStore(b, clock=clock, pending_seconds=30.0),
    )


async def test_a_channel_serves_one_voucher_at_a_time_across_replicas(ledger_store):
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0)
    assert (await a.take(CHANNEL, "voucher-1")).pending_owner == "voucher-1"
    with pytest.raises(ChannelBusy):
        await b.take(CHANNEL, "voucher-2")
    # The same voucher sent again (a retry) takes it back at once.
    assert (await b.take(CHANNEL, "voucher-1")).pending_owner == "voucher-1"
    channel, charged = await b.commit(
        CHANNEL, "voucher-1", max_claimable=1_000, signature=SIG, charge=700, payment_id="p1"
    )
    assert (channel.charged, channel.signed_max, charged, channel.pending_owner) == (
        700,
        1_000,
        700,
        None,
    )
    assert (await a.take(CHANNEL, "voucher-2")).pending_owner == "voucher-2"


async def test_a_lease_left_by_a_dead_request_runs_out(ledger_store):
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0)
    await a.take(CHANNEL, "dead")
    clock.now += 31
    assert (await b.take(CHANNEL, "next")).pending_owner == "next"


async def test_a_charge_commits_once_and_never_past_its_voucher(ledger_store):
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0)
    await a.take(CHANNEL, "v1")
    commits = await asyncio.gather(
        a.commit(CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id="p"),
        b.commit(CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id="p"),
    )
    assert sorted(charged for _, charged in commits) == [0, 1_000]
    assert (await a.get(CHANNEL)).charged == 1_000
    await a.take(CHANNEL, "v2")
    with pytest.raises(ValueError, match="charge_exceeds_signed_cumulative"):
        await a.commit(
            CHANNEL, "v2", max_claimable=1_500, signature=SIG, charge=600, payment_id="p2"
        )
    # An older voucher never lowers the channel.
    channel, charged = await a.commit(
        CHANNEL, "v0", max_claimable=500, signature=SIG, charge=500, payment_id="p0"
    )
    assert (channel.charged, channel.signed_max, charged) == (1_000, 1_000, 0)


async def test_one_claimer_at_a_time_and_claims_are_durable(ledger_store):
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0)
    await a.take(CHANNEL, "v1")
    await a.commit(CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=900, payment_id="p")
    assert await a.take_claimer("a", 60)
    assert not await b.take_claimer("b", 60)
    (owed,) = await b.claimable(10)
    entry = ClaimEntry(CHANNEL, CONFIG, owed.signed_max, owed.signature, owed.charged)
    claim = await a.new_claim("c1", [entry])
    await a.claim_moved(claim.id, "submitted", "0x" + "cd" * 32)
    (open_,) = await b.open_claims()
    assert (open_.state, open_.tx_hash, open_.entries) == ("submitted", "0x" + "cd" * 32, (entry,))
    clock.now += 61  # the claimer died: its lease runs out
    assert await b.take_claimer("b", 60)
    await b.claimed(CHANNEL, 900)
    await b.claim_moved(claim.id, "settled", None)
    assert await b.claimable(10) == []
    assert await a.open_claims() == []
