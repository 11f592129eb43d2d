"""batch-settlement's channel state in the ledger, on both stores (SQLite and PostgreSQL): the
rules replicas rely on when they share a channel — one request at a time, a charge committed
once and only under a voucher that covers it, one claimer at a time."""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest

from paygate.x402.ledger import AlreadyReserved, LeaseLost, LedgerUnavailable, WriteNotMade
from paygate.x402.ledger import PaymentState as S
from paygate.x402.ledger_sqlite import SqliteLedger
from paygate.x402.ledger_store import open_ledger, parse_ledger_url
from paygate.x402.schemes.batch_settlement import store as store_module
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig
from paygate.x402.schemes.batch_settlement.store import (
    ChannelBusy,
    ChannelStore,
    ClaimEntry,
    Stamp,
    charged,
    taken,
)
from paygate.x402.settler import ReviewRequired
from tests.fixtures.ledger_support import BEFORE_V15, nonce, request

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
SIG2 = "0x" + "6" * 130
SIG3 = "0x" + "7" * 130
CHARGE_LOST = "invalid_batch_settlement_evm_charge_lost"


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
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
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
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    await a.take(CHANNEL, "dead")
    clock.now += 31
    assert (await b.take(CHANNEL, "next")).pending_owner == "next"


async def test_a_charge_commits_once_and_never_past_its_voucher(ledger_store):
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
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
    # An older voucher never charged never lowers the channel, nor passes for committed: the
    # channel went past it without its charge.
    with pytest.raises(ValueError, match=CHARGE_LOST):
        await a.commit(CHANNEL, "v0", max_claimable=500, signature=SIG, charge=500, payment_id="p0")
    channel = await a.get(CHANNEL)
    assert (channel.charged, channel.signed_max) == (1_000, 1_000)


async def test_one_claimer_at_a_time_and_claims_are_durable(ledger_store):
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
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


class LosesTheCharge:
    """A real ledger on which, once armed, the process dies at its second try to charge the
    channel: the commit's fallback, after its first compare-and-set (in one transaction with
    the voucher's record) lost to another writer — the record committed, the charge never
    made."""

    def __init__(self, ledger) -> None:
        self.ledger = ledger
        self.armed = False
        self.tries = 0

    def _dies(self, statements) -> None:
        if self.armed and any(
            sql.startswith("UPDATE bs_channels SET charged") for sql, _ in statements
        ):
            self.tries += 1
            if self.tries == 2:
                self.armed = False
                raise LedgerUnavailable("the process died here")

    async def scheme_sql(self, sql, params):
        self._dies([(sql, params)])
        return await self.ledger.scheme_sql(sql, params)

    async def scheme_sql_all(self, statements):
        self._dies(statements)
        return await self.ledger.scheme_sql_all(statements)


async def lost_charge(ledger_store, clock) -> tuple[ChannelStore, ChannelStore, LosesTheCharge]:
    """A channel charged 1 000 (voucher v1), then voucher v2 (ceiling 2 000, charge 1 000)
    recorded but never charged: between its take and its commit another replica's claim
    mirror changed the channel (the commit's compare-and-set lost; the voucher's record
    committed), and the process died before the fallback's charge."""
    faulty = LosesTheCharge(await ledger_store(replica="a"))
    a = ChannelStore(faulty, clock=clock, pending_seconds=30.0)
    b = ChannelStore(await ledger_store(replica="b"), clock=clock, pending_seconds=30.0)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    taken = await a.take(CHANNEL, "v1")
    await a.commit(
        CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id="p1",
        taken=taken,
    )  # fmt: skip
    taken = await a.take(CHANNEL, "v2")
    await b.claimed(CHANNEL, 1_000)  # the claim loop's mirror, on another replica
    faulty.armed = True
    with pytest.raises(LedgerUnavailable):
        await a.commit(
            CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="p2",
            taken=taken,
        )  # fmt: skip
    assert (await b.get(CHANNEL)).charged == 1_000  # v2's charge is lost
    return a, b, faulty


async def test_a_lost_charge_overtaken_by_a_later_voucher_is_never_taken_as_committed(
    ledger_store,
):
    """The payer, told the channel is charged 1 000, signs its next (pricier, 2 000) request's
    voucher for 3 000: it never counted v2's charge. v2 committed again (the reconciler, or a
    retry) must not answer "committed already" because the channel's ceiling passed v2's:
    its charge is not in the total the claim takes, and the payer never signed for it."""
    clock = Clock()
    a, b, _ = await lost_charge(ledger_store, clock)
    clock.now += 31  # v2's request died: its hold on the channel runs out
    taken = await b.take(CHANNEL, "v3")
    channel, charged = await b.commit(
        CHANNEL, "v3", max_claimable=3_000, signature=SIG3, charge=2_000, payment_id="p3",
        taken=taken,
    )  # fmt: skip
    assert (channel.charged, channel.signed_max, charged) == (3_000, 3_000, 2_000)
    with pytest.raises(ValueError, match=CHARGE_LOST):
        await a.commit(
            CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="p2"
        )
    # Nothing changed; the vouchers that were charged still commit as done (charging nothing).
    assert (await a.get(CHANNEL)).charged == 3_000
    for key, ceiling, charge in (("v1", 1_000, 1_000), ("v3", 3_000, 2_000)):
        _, again = await b.commit(
            CHANNEL, key, max_claimable=ceiling, signature=SIG, charge=charge, payment_id=key
        )
        assert again == 0
    assert (await a.get(CHANNEL)).charged == 3_000


async def test_a_lost_charge_still_next_is_charged_once_when_committed_again(ledger_store):
    clock = Clock()
    a, b, _ = await lost_charge(ledger_store, clock)
    # The reconciler (any replica) commits v2 again: nothing was committed above it, so its
    # charge is made now, and only once.
    commits = await asyncio.gather(
        a.commit(CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="p2"),
        b.commit(CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="p2"),
    )
    assert sorted(charged for _, charged in commits) == [0, 1_000]
    channel = await a.get(CHANNEL)
    assert (channel.charged, channel.signed_max, channel.pending_owner) == (2_000, 2_000, None)


async def test_vouchers_recorded_before_v11_are_marked_charged_only_where_proven(ledger_store):
    """Ledger step 11 on a v10 store: the channel's last committed voucher is marked charged
    (that commit made its charge); an earlier one, passed by it, cannot be told apart from a
    lost charge and is flagged for review if ever committed again, never SETTLED on a maybe;
    one recorded above the channel's ceiling was never charged and is charged as usual."""
    clock = Clock()
    ledger = await ledger_store(replica="v10")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    for key, ceiling, sig in (("v1", 1_000, SIG), ("v2", 2_000, SIG2)):
        taken = await store.take(CHANNEL, key)
        await store.commit(
            CHANNEL, key, max_claimable=ceiling, signature=sig, charge=1_000, payment_id=key,
            taken=taken,
        )  # fmt: skip
    await ledger.scheme_sql(
        "INSERT INTO bs_vouchers (channel_id, max_claimable, signature, payment_id, charge,"
        " created_at) VALUES (?, '3000', ?, 'v3', '1000', 1)",
        (CHANNEL, SIG3),
    )
    # The store as v10 left it (nor step 12's or 14's columns).
    await ledger.scheme_sql("ALTER TABLE bs_vouchers DROP COLUMN charged", ())
    await ledger.scheme_sql("ALTER TABLE payments DROP COLUMN history", ())
    for statement in BEFORE_V15:  # nor step 15's
        await ledger.scheme_sql(statement, ())
    await ledger.scheme_sql("ALTER TABLE bs_channels DROP COLUMN read_block", ())
    await ledger.scheme_sql("UPDATE ledger_schema SET version = 10 WHERE id = 1", ())
    await ledger.close()

    migrated = await ledger_store(replica="v11")
    assert migrated.found_version == 10
    _, rows = await migrated.scheme_sql(
        "SELECT max_claimable, charged FROM bs_vouchers ORDER BY payment_id", ()
    )
    assert [(str(m), c) for m, c in rows] == [("1000", None), ("2000", 1), ("3000", None)]
    store = ChannelStore(migrated, clock=clock, pending_seconds=30.0)
    _, again = await store.commit(
        CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="v2"
    )
    assert again == 0
    with pytest.raises(ReviewRequired):
        await store.commit(
            CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id="v1"
        )
    channel, charged = await store.commit(
        CHANNEL, "v3", max_claimable=3_000, signature=SIG3, charge=1_000, payment_id="v3"
    )
    assert (channel.charged, charged) == (3_000, 1_000)


async def test_a_lost_charge_waits_while_another_request_holds_the_channel(ledger_store):
    """Committed again while another voucher's request holds the channel, a lost charge is
    neither refused for good nor charged: the other request decides (its commit passes it: it
    is lost; its release leaves it next: it is charged)."""
    clock = Clock()
    a, b, _ = await lost_charge(ledger_store, clock)
    clock.now += 31
    await b.take(CHANNEL, "v3")
    with pytest.raises(ChannelBusy):
        await a.commit(
            CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="p2"
        )
    await b.release(CHANNEL, "v3")
    channel, charged = await a.commit(
        CHANNEL, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id="p2"
    )
    assert (channel.charged, charged) == (2_000, 1_000)


async def test_a_charge_made_with_settled_is_all_or_nothing(ledger_store):
    """The request's path: the charge (its compare-and-set on the channel as the request took
    it), the voucher's record and mark go in the transaction that records the payment SERVED,
    SETTLING and SETTLED. The channel changed since its take: nothing at all is recorded (the
    payment as it was, no voucher row, no charge) and the usual steps follow."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    other = ChannelStore(await ledger_store(replica="b"), clock=clock, pending_seconds=30.0)
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    via = (S.VERIFIED, S.SERVED, S.SETTLING)

    record = await ledger.reserve(**request(1, nonce=nonce(1)))
    taken = await store.take(CHANNEL, "v1")
    write = store.charge(
        taken, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id=nonce(1)
    )
    settled = await ledger.transition(
        record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=1_000, write=write
    )
    assert (settled.state, settled.settled_amount) == (S.SETTLED, 1_000)
    assert (charged(write).charged, charged(write).pending_owner) == (1_000, None)
    _, again = await store.commit(
        CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id=nonce(1)
    )
    assert again == 0  # marked with the charge

    record = await ledger.reserve(**request(2, nonce=nonce(2)))
    taken = await store.take(CHANNEL, "v2")
    await other.claimed(CHANNEL, 1_000)  # another replica changed the channel since
    write = store.charge(
        taken, "v2", max_claimable=2_000, signature=SIG2, charge=1_000, payment_id=nonce(2)
    )
    with pytest.raises(WriteNotMade):
        await ledger.transition(
            record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=1_000, write=write
        )
    assert await ledger.get(record.id) == record
    _, rows = await ledger.scheme_sql("SELECT max_claimable FROM bs_vouchers", ())
    assert [str(r[0]) for r in rows] == ["1000"]
    assert (await store.get(CHANNEL)).charged == 1_000
    # A charge that does not fit what the request took is never offered as a write.
    assert (
        store.charge(
            taken, "v2", max_claimable=2_000, signature=SIG2, charge=1_001, payment_id=nonce(2)
        )
        is None
    )


async def test_a_charge_made_with_settled_marks_its_voucher_in_two_statements(ledger_store):
    """The request's charge is two statements (the record written marked, the required
    compare-and-set), and marks a record already there unmarked (an earlier attempt's whose
    compare-and-set lost): committed again, it is found charged, never charged twice."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    via = (S.VERIFIED, S.SERVED, S.SETTLING)
    record = await ledger.reserve(**request(1, nonce=nonce(1)))
    took = await store.take(CHANNEL, "v1")
    await ledger.scheme_sql(  # recorded, not charged (no mark)
        "INSERT INTO bs_vouchers (channel_id, max_claimable, signature, payment_id, charge,"
        " created_at, charged) VALUES (?, '1000', ?, ?, '1000', 1.0, 0)",
        (CHANNEL, SIG, nonce(1)),
    )
    write = store.charge(
        took, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id=nonce(1)
    )
    assert write is not None
    assert len(write.statements) == 2
    await ledger.transition(
        record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=1_000, write=write
    )
    _, rows = await ledger.scheme_sql("SELECT max_claimable, charged FROM bs_vouchers", ())
    assert [(str(m), int(c)) for m, c in rows] == [("1000", 1)]
    channel, again = await store.commit(
        CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id=nonce(1)
    )
    assert (again, channel.charged) == (0, 1_000)


async def test_a_charge_with_settled_not_made_leaves_a_recorded_voucher_unmarked(ledger_store):
    """The request's charge writes its voucher's record marked before its compare-and-set:
    the channel changed since its take (the compare-and-set finds no row), an unmarked record
    already there (an earlier attempt's) must stay unmarked — the mark rolled back with the
    rest — or a commit would take the voucher as charged and its payment SETTLED with nothing
    in the channel. Committed again, it is charged, once."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    other = ChannelStore(await ledger_store(replica="b"), clock=clock, pending_seconds=30.0)
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    record = await ledger.reserve(**request(1, nonce=nonce(1)))
    took = await store.take(CHANNEL, "v1")
    await ledger.scheme_sql(
        "INSERT INTO bs_vouchers (channel_id, max_claimable, signature, payment_id, charge,"
        " created_at, charged) VALUES (?, '1000', ?, ?, '1000', 1.0, 0)",
        (CHANNEL, SIG, nonce(1)),
    )
    voucher = {"max_claimable": 1_000, "signature": SIG, "payment_id": nonce(1)}
    write = store.charge(took, "v1", charge=1_000, **voucher)
    assert write is not None
    await other.claimed(CHANNEL, 0)  # another replica changed the channel since the take
    with pytest.raises(WriteNotMade):
        await ledger.transition(
            record.id,
            S.SETTLED,
            via=(S.VERIFIED, S.SERVED, S.SETTLING),
            lease=record.lease,
            settled_amount=1_000,
            write=write,
        )
    assert await ledger.get(record.id) == record
    _, rows = await ledger.scheme_sql("SELECT charged FROM bs_vouchers", ())
    assert [int(r[0]) for r in rows] == [0]
    assert (await store.get(CHANNEL)).charged == 0
    channel, now = await store.commit(CHANNEL, "v1", charge=1_000, **voucher)
    assert (now, channel.charged) == (1_000, 1_000)
    _, again = await store.commit(CHANNEL, "v1", charge=1_000, **voucher)
    assert again == 0


async def test_a_chain_reading_that_only_agrees_leaves_a_charge_in_flight_its_compare_and_set(
    ledger_store,
):
    """The claim loop writes each owed channel's chain reading every pass (its block, so that
    an older reading never undoes it), mostly agreeing with the row: a request's charge in
    flight on that channel, written from the channel as it took it, is still made with its
    SETTLED record (not rolled back to the slower commit every pass). A reading that moves the
    balance or the claims does change the channel under it."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    claimer = ChannelStore(await ledger_store(replica="b"), clock=clock, pending_seconds=30.0)
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=10
    )
    via = (S.VERIFIED, S.SERVED, S.SETTLING)
    record = await ledger.reserve(**request(1, nonce=nonce(1)))
    taken = await store.take(CHANNEL, "v1")
    for block in (11, 12, 12, 5):  # newer, the same again, an older one: all agree
        await claimer.refunded(CHANNEL, 10_000, 0, block=block)
    write = store.charge(
        taken, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id=nonce(1)
    )
    settled = await ledger.transition(
        record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=1_000, write=write
    )
    assert (settled.state, charged(write).charged) == (S.SETTLED, 1_000)
    for balance, claims, block in ((9_000, 0, 20), (9_000, 500, 21)):  # the balance; claims
        taken = await store.take(CHANNEL, "v2")
        await claimer.refunded(CHANNEL, balance, claims, block=block)
        assert (await store.get(CHANNEL)).version != taken.version
        await store.release(CHANNEL, "v2")


async def test_a_channel_taken_with_the_reservation_goes_with_it_or_not_at_all(ledger_store):
    """A voucher's channel is taken in the transaction of its payment's reservation: a
    reservation refused (a replay) takes nothing; a channel held by another request is not
    taken (the reservation stands; verify tells busy from unknown after)."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)

    write = store.take_write(CHANNEL, "v1")
    await ledger.reserve(**request(1), write=write)
    assert taken(write).pending_owner == "v1"
    assert (await store.get(CHANNEL)).pending_owner == "v1"
    await store.release(CHANNEL, "v1")

    replay = store.take_write(CHANNEL, "v1")
    with pytest.raises(AlreadyReserved):
        await ledger.reserve(**request(1), write=replay)
    assert taken(replay) is None
    assert (await store.get(CHANNEL)).pending_owner is None  # rolled back with it

    await store.take(CHANNEL, "v2")
    busy = store.take_write(CHANNEL, "v3")
    record = await ledger.reserve(**request(3), write=busy)
    assert taken(busy) is None
    assert record.state is S.RESERVED
    assert (await store.get(CHANNEL)).pending_owner == "v2"


async def test_a_write_not_made_in_a_shared_group_rolls_back_only_its_own_call(tmp_path):
    """SQLite's group commit runs concurrent calls in one transaction, each in a savepoint of
    its own. A settlement whose charge was not made there (WriteNotMade, after its moves, its
    history and its voucher's record were written in that savepoint) leaves nothing of them,
    nor does a refused reservation's take; the calls around them in the same COMMIT keep
    everything of theirs."""
    other, third, fourth = ("0x" + c * 32 for c in ("cd", "ce", "cf"))
    clock = Clock()
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    sizes: list[int] = []
    hold = threading.Event()

    def held(calls: int) -> None:
        sizes.append(calls)
        if len(sizes) == 1:
            hold.wait(timeout=30)

    try:
        for channel in (CHANNEL, other, third, fourth):
            await store.deposited(
                channel, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0
            )
        good = await ledger.reserve(**request(1))
        stale = await ledger.reserve(**request(2))
        took = await store.take(CHANNEL, "v1")
        took_stale = await store.take(other, "v2")
        await store.take(other, "v2")  # the channel changed since that take (its version)
        via = (S.VERIFIED, S.SERVED, S.SETTLING)
        charge = {"max_claimable": 1_000, "charge": 1_000}
        good_write = store.charge(took, "v1", signature=SIG, payment_id=nonce(1), **charge)
        stale_write = store.charge(took_stale, "v2", signature=SIG2, payment_id=nonce(2), **charge)
        replay_take, fresh_take = store.take_write(third, "v9"), store.take_write(fourth, "v5")
        ledger.group_commit.after_commit = held
        opener = asyncio.create_task(ledger.reserve(**request(100)))
        await asyncio.sleep(0.1)  # its COMMIT is held: what follows queues into one group
        calls = [
            ledger.transition(
                good.id, S.SETTLED, via=via, lease=good.lease, settled_amount=1_000,
                write=good_write,
            ),
            ledger.transition(
                stale.id, S.SETTLED, via=via, lease=stale.lease, settled_amount=1_000,
                write=stale_write,
            ),
            ledger.reserve(**request(1), write=replay_take),  # a replay: AlreadyReserved
            ledger.reserve(**request(5), write=fresh_take),
        ]  # fmt: skip
        tasks = [asyncio.create_task(c) for c in calls]
        await asyncio.sleep(0.1)
        hold.set()
        await opener
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    finally:
        hold.set()
        await ledger.close()
    settled, not_made, replay, reserved = outcomes
    assert sizes[1] == len(calls)  # one group: one COMMIT for all four
    assert isinstance(not_made, WriteNotMade)
    assert isinstance(replay, AlreadyReserved)
    assert (settled.state, reserved.state) == (S.SETTLED, S.RESERVED)
    async with await SqliteLedger.open(tmp_path / "ledger.db") as again:
        store = ChannelStore(again, clock=clock, pending_seconds=30.0)
        assert (await again.get(good.id)).state is S.SETTLED
        assert await again.get(stale.id) == stale  # as it was: no move, no SETTLED
        assert [e.state for e in await again.history(stale.id)] == [S.RESERVED]  # no moves
        _, rows = await again.scheme_sql("SELECT channel_id, charged FROM bs_vouchers", ())
        assert [tuple(r) for r in rows] == [
            (CHANNEL, 1)
        ]  # the stale call's voucher record went with it
        assert [(await store.get(c)).charged for c in (CHANNEL, other)] == [1_000, 0]
        assert (await store.get(third)).pending_owner is None  # the replay took nothing
        assert (await store.get(fourth)).pending_owner == "v5"
        assert taken(fresh_take).pending_owner == "v5"


async def test_reservations_racing_on_two_replicas_take_the_channel_once(ledger_store):
    """Vouchers on one channel reserved at once on two replicas (their own connections): each
    reservation is made, and exactly one of their takes holds the channel — the one the
    channel names; the others found it held and took nothing."""
    clock = Clock()
    ledgers = [await ledger_store(replica="a"), await ledger_store(replica="b")]
    stores = [ChannelStore(ledger, clock=clock, pending_seconds=30.0) for ledger in ledgers]
    await stores[0].deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0
    )
    writes = [stores[n % 2].take_write(CHANNEL, f"v{n}") for n in range(8)]
    records = await asyncio.gather(
        *(ledgers[n % 2].reserve(**request(n + 1), write=w) for n, w in enumerate(writes))
    )
    assert all(r.state is S.RESERVED for r in records)
    held = [taken(w).pending_owner for w in writes if taken(w) is not None]
    assert len(held) == 1
    assert (await stores[1].get(CHANNEL)).pending_owner == held[0]


async def test_a_charge_made_with_settled_racing_another_replicas_commit_is_made_once(
    ledger_store,
):
    """The request's one-transaction charge (with SETTLED) and another replica committing the
    same voucher at once (a reconciler that took the payment over): the channel is charged
    once. Whichever lost finds it made: the write is not made (nothing recorded) and the
    voucher commits again as done, or the other's commit charges nothing."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    other = ChannelStore(await ledger_store(replica="b"), clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    via = (S.VERIFIED, S.SERVED, S.SETTLING)
    for n in range(1, 9):
        record = await ledger.reserve(**request(n))
        took = await store.take(CHANNEL, f"v{n}")
        voucher = {"max_claimable": 1_000 * n, "signature": SIG, "charge": 1_000}
        write = store.charge(took, f"v{n}", payment_id=nonce(n), **voucher)
        settled, (_, by_other) = await asyncio.gather(
            ledger.transition(
                record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=1_000,
                write=write,
            ),
            other.commit(CHANNEL, f"v{n}", payment_id=nonce(n), **voucher),
            return_exceptions=True,
        )  # fmt: skip
        if isinstance(settled, WriteNotMade):
            assert by_other == 1_000
            assert await ledger.get(record.id) == record
            _, again = await store.commit(CHANNEL, f"v{n}", payment_id=nonce(n), **voucher)
            assert again == 0
        else:
            assert settled.state is S.SETTLED
            assert by_other == 0
        channel = await store.get(CHANNEL)
        assert (channel.charged, channel.signed_max) == (1_000 * n, 1_000 * n)


async def test_a_charge_with_settled_and_a_commit_of_its_recorded_voucher_never_deadlock(pg_url):
    """PostgreSQL, replicas at once, a voucher already recorded unmarked (an earlier attempt
    whose compare-and-set lost): another replica's commit of it is running — its record
    written, the channel charged, not yet marked nor committed — when the request's charge
    (with SETTLED) comes. Both take the voucher's row before the channel's, so the charge
    waits for the commit and finds it made (not made itself: nothing recorded), never a
    deadlock that aborts one of them; the channel is charged once, the voucher marked."""
    clock = Clock()
    ledger = await open_ledger(parse_ledger_url(pg_url), replica="a")
    try:
        store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
        await store.deposited(
            CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0
        )
        via = (S.VERIFIED, S.SERVED, S.SETTLING)
        record = await ledger.reserve(**request(1, nonce=nonce(1)))
        took = await store.take(CHANNEL, "v1")
        await ledger.scheme_sql(
            "INSERT INTO bs_vouchers (channel_id, max_claimable, signature, payment_id, charge,"
            " created_at, charged) VALUES (?, '1000', ?, ?, '1000', 1.0, 0)",
            (CHANNEL, SIG, nonce(1)),
        )
        voucher = {"max_claimable": 1_000, "signature": SIG, "payment_id": nonce(1)}
        write = store.charge(took, "v1", charge=1_000, **voucher)
        assert write is not None
        record_it, charge_it, mark_it = store._charged(took, 1_000, **voucher)
        async with await psycopg.AsyncConnection.connect(pg_url) as committing:
            for sql, params in (record_it, charge_it):
                await committing.execute(sql.replace("?", "%s"), params)
            settle = asyncio.ensure_future(
                ledger.transition(
                    record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=1_000,
                    write=write,
                )
            )  # fmt: skip
            await asyncio.wait({settle}, timeout=1.0)  # it comes while the commit runs
            sql, params = mark_it
            await committing.execute(sql.replace("?", "%s"), params)
            await committing.commit()
        with pytest.raises(WriteNotMade):
            await asyncio.wait_for(settle, timeout=30)
        assert await ledger.get(record.id) == record
        channel = await store.get(CHANNEL)
        assert (channel.charged, channel.signed_max) == (1_000, 1_000)
        _, rows = await ledger.scheme_sql("SELECT charged FROM bs_vouchers", ())
        assert [int(r[0]) for r in rows] == [1]
        _, again = await store.commit(CHANNEL, "v1", charge=1_000, **voucher)
        assert again == 0
    finally:
        await ledger.close()


async def test_deposits_mirrored_by_two_replicas_at_once_keep_the_largest_reading(ledger_store):
    """A deposit's mirror is one statement that only raises each amount (it cannot lose a
    compare-and-set and give up: the money moved on chain already): readings of the chain
    applied concurrently, out of order, beside the channel's own takes and charges, leave the
    largest; amounts past 64 bits and of different lengths compare as numbers."""
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=999, total_claimed=0, block=0)
    readings = [10**30 + n for n in range(0, 12, 3)] + [1_000, 10**29, 5 * 10**29]
    results = await asyncio.gather(
        *(
            (a, b)[n % 2].deposited(
                CHANNEL, "eip155:84532", CONFIG, balance=r, total_claimed=0, block=0
            )
            for n, r in enumerate(readings)
        ),
        a.take(CHANNEL, "v1"),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    channel = await b.get(CHANNEL)
    assert (channel.balance, channel.charged, channel.total_claimed) == (10**30 + 9, 0, 0)
    assert channel.pending_owner == "v1"  # the take held: the mirror does not touch the lease
    committed, _ = await a.commit(
        CHANNEL, "v1", max_claimable=1_000, signature=SIG, charge=1_000, payment_id=nonce(1)
    )
    assert committed.charged == 1_000
    # A later reading with claims proven on chain (a baseline after state loss) raises
    # total_claimed and charged at least to it; a stale one lowers nothing.
    after = await b.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10**30 + 9, total_claimed=5_000, block=0
    )
    assert (after.balance, after.charged, after.total_claimed) == (10**30 + 9, 5_000, 5_000)
    stale = await a.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0
    )
    assert (stale.balance, stale.charged, stale.total_claimed) == (10**30 + 9, 5_000, 5_000)
    assert (stale.signed_max, stale.signature) == (1_000, SIG)


async def test_claims_and_refunds_are_mirrored_however_busy_the_channel_is(ledger_store):
    """A proven claim or refund is mirrored by one statement each (it used to be a
    compare-and-set that, losing 16 times to a busy channel, gave up silently: a balance left
    above the contract's takes vouchers no claim can pay). Claims are never lowered."""
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10**21, total_claimed=0, block=0)
    owners = [f"v{n}" for n in range(20)]
    results = await asyncio.gather(
        *(b.take(CHANNEL, owner) for owner in owners),
        *(b.release(CHANNEL, owner) for owner in owners),
        a.claimed(CHANNEL, 9 * 10**20),
        a.claimed(CHANNEL, 10**20),
        a.refunded(CHANNEL, 95 * 10**19, 10**20, block=0),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, ChannelBusy)]
    channel = await a.get(CHANNEL)
    assert (channel.balance, channel.total_claimed) == (95 * 10**19, 9 * 10**20)
    await b.claimed(CHANNEL, 10**21)
    await b.refunded(CHANNEL, 10**21, 0, block=0)
    channel = await a.get(CHANNEL)
    assert (channel.balance, channel.total_claimed) == (10**21, 10**21)


async def test_a_release_gives_back_its_own_hold_in_the_same_transaction_only(ledger_store):
    """A reservation released (its request ended unearned) with the channel's release write:
    its own hold goes in that transaction; a release naming another voucher (a request
    refused busy while another holds the channel) leaves the holder's hold; a release whose
    move is refused (its lease lost) gives nothing back."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    held = await ledger.reserve(**request(1), write=store.take_write(CHANNEL, "v1"))
    refused = await ledger.reserve(**request(2), write=store.take_write(CHANNEL, "v2"))
    assert (await store.get(CHANNEL)).pending_owner == "v1"
    await ledger.transition(
        refused.id, S.RELEASED, lease=refused.lease, write=store.release_write(CHANNEL, "v2")
    )
    assert (await store.get(CHANNEL)).pending_owner == "v1"
    with pytest.raises(LeaseLost):
        await ledger.transition(
            held.id, S.RELEASED, lease=held.lease + 1, write=store.release_write(CHANNEL, "v1")
        )
    assert (await store.get(CHANNEL)).pending_owner == "v1"
    released = await ledger.transition(
        held.id, S.RELEASED, lease=held.lease, write=store.release_write(CHANNEL, "v1")
    )
    assert released.state is S.RELEASED
    assert (await store.get(CHANNEL)).pending_owner is None
    # The next voucher takes it at once.
    assert (await store.take(CHANNEL, "v3")).pending_owner == "v3"


async def test_a_deposit_read_under_its_hold_sets_the_balance_exactly(ledger_store):
    """A top-up's mirror read while its deposit held the channel (``exact``) is the contract's
    balance, lower too (a withdrawal not mirrored yet); claims and charges are never lowered.
    Without ``exact`` the larger reading stays."""
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10**21, total_claimed=500, block=0)
    lower = await b.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10**20, total_claimed=0, exact=True, block=0
    )
    assert (lower.balance, lower.total_claimed, lower.charged) == (10**20, 500, 500)
    kept = await a.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10**19, total_claimed=0, block=0
    )
    assert kept.balance == 10**20


async def test_an_abandoned_reservation_gives_back_its_channel_hold_only_while_its_own(
    ledger_store,
):
    """A replica died holding two channels with its reservations (and a third reservation
    that took nothing). The reconcilers of two other replicas, at once, release the records
    with each one's release write in that transaction — each record once: the hold still its
    voucher's goes (the payer's next voucher is not refused busy until it runs out); the one
    that ran out and was taken by another voucher stays that voucher's."""
    clock = Clock()
    dead, b, c = [
        await ledger_store(replica=name, clock=clock, lease_seconds=10.0)
        for name in ("dead", "b", "c")
    ]
    store = ChannelStore(dead, clock=clock, pending_seconds=30.0)
    survivor = ChannelStore(b, clock=clock, pending_seconds=30.0)
    other = "0x" + "cd" * 32
    for channel in (CHANNEL, other):
        await store.deposited(
            channel, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0
        )
    holds = {}
    for n, (channel, voucher) in enumerate(((CHANNEL, "v1"), (other, "w1")), start=1):
        record = await dead.reserve(**request(n), write=store.take_write(channel, voucher))
        holds[record.id] = (channel, voucher)
    plain = await dead.reserve(**request(3))
    assert (await store.get(CHANNEL)).pending_owner == "v1"
    clock.now += 31  # the dead replica's leases ran out, and its holds with them
    assert (await survivor.take(other, "w2")).pending_owner == "w2"  # another voucher's now

    asked = []

    def writes(record):
        asked.append(record.id)
        found = holds.get(record.id)
        return survivor.release_write(*found) if found else None

    passes = await asyncio.gather(
        b.release_abandoned(writes=writes), c.release_abandoned(writes=writes)
    )
    released = sorted(r.id for found in passes for r in found)
    assert released == sorted(asked) == sorted([*holds, plain.id])
    assert {r.state for found in passes for r in found} == {S.RELEASED}
    assert (await survivor.get(CHANNEL)).pending_owner is None
    assert (await survivor.get(other)).pending_owner == "w2"
    assert (await survivor.take(CHANNEL, "v2")).pending_owner == "v2"


class ReadRows:
    """A real ledger whose statements' returned rows are kept: what a store read."""

    def __init__(self, ledger) -> None:
        self.ledger = ledger
        self.read: list[list[tuple]] = []

    async def scheme_sql(self, sql, params):
        changed, rows = await self.ledger.scheme_sql(sql, params)
        self.read.append(rows)
        return changed, rows

    async def scheme_sql_all(self, statements):
        return await self.ledger.scheme_sql_all(statements)


async def test_the_claim_pass_reads_only_the_channels_that_owe_something(ledger_store):
    """The claim loop's read selects in SQL the channels charged beyond what was claimed
    (under a voucher), oldest change first, at most ``limit`` — not the whole table each
    pass. Amounts are decimal text: compared as numbers ("10" owes over "9", "9" does not
    over "10"; amounts past 64 bits), on both stores."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    reads = ReadRows(ledger)
    store = ChannelStore(reads, clock=clock, pending_seconds=30.0)
    big = 2**64
    channels = {  # (charged, total_claimed, signed_max), oldest change first
        "claimed-9-charged-10": (10, 9, 10),
        "settled": (5_000, 5_000, 5_000),
        "past-64-bits": (big + 1, big, big + 1),
        "claimed-10-charged-9": (9, 10, 9),
        "never-vouched": (0, 0, 0),
        "past-64-bits-settled": (big * 7, big * 7, big * 7),
        "far-past-64-bits": (10**30, 5, 10**30),
    }
    for n, (name, (charged_, claimed, ceiling)) in enumerate(channels.items()):
        channel_id = "0x" + f"{n:064x}"
        clock.now += 1
        await store.deposited(
            channel_id, "eip155:84532", CONFIG, balance=10**31, total_claimed=0, block=0
        )
        await ledger.scheme_sql(
            "UPDATE bs_channels SET charged = ?, total_claimed = ?, signed_max = ?,"
            " signature = ? WHERE channel_id = ?",
            (str(charged_), str(claimed), str(ceiling), SIG, channel_id),
        )
        channels[name] = channel_id
    owing = [channels[n] for n in ("claimed-9-charged-10", "past-64-bits", "far-past-64-bits")]

    reads.read.clear()
    found = await store.claimable(10)
    assert [c.channel_id for c in found] == owing
    assert [row[0] for row in reads.read[-1]] == owing  # read: only these rows
    assert [(c.charged - c.total_claimed) for c in found] == [1, 1, 10**30 - 5]
    reads.read.clear()
    assert [c.channel_id for c in await store.claimable(2)] == owing[:2]
    assert len(reads.read[-1]) == 2  # bounded in the read, not after it


async def test_a_take_for_a_payment_is_made_only_while_its_reservation_holds(ledger_store):
    """A paid request's take at verify names its payment: made while the payment is reserved
    (its release then gives the hold back); once the payment was released (a replica frozen
    in its verify, taken for dead, its reservation released by another replica's reconciler)
    it takes nothing — LeaseLost, the channel left as it was (free, or held by a voucher
    whose hold ran out)."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await store.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0)
    live = await ledger.reserve(**request(1))
    taken_live = await store.take_reserved(CHANNEL, nonce(1), nonce(1))
    assert taken_live is not None
    assert taken_live.pending_owner == nonce(1)
    await ledger.transition(
        live.id, S.RELEASED, lease=live.lease, write=store.release_write(CHANNEL, nonce(1))
    )
    assert (await store.get(CHANNEL)).pending_owner is None
    late = await ledger.reserve(**request(2))
    await ledger.transition(late.id, S.RELEASED, lease=late.lease)
    with pytest.raises(LeaseLost):
        await store.take_reserved(CHANNEL, nonce(2), nonce(2))
    assert (await store.get(CHANNEL)).pending_owner is None
    # Held by another voucher whose hold ran out: not taken from it either.
    assert (await store.take(CHANNEL, "other")).pending_owner == "other"
    clock.now += 31
    with pytest.raises(LeaseLost):
        await store.take_reserved(CHANNEL, nonce(2), nonce(2))
    assert (await store.get(CHANNEL)).pending_owner == "other"
    # Never reserved at all: nothing either; a refund's take (no payment) is not fenced.
    with pytest.raises(LeaseLost):
        await store.take_reserved(CHANNEL, nonce(3), nonce(3))
    assert (await store.take(CHANNEL, "refund")).pending_owner == "refund"


async def test_a_chain_reading_cannot_be_written_without_its_block(ledger_store):
    """A caller that forgets a reading's block must fail at once, not write block 0 — taken
    for the oldest reading of all, so silently ignored once the row holds a stamped one: a
    refund or withdrawal left unmirrored, the balance above the contract's (vouchers served
    that no claim can pay)."""
    store = ChannelStore(await ledger_store(replica="a"), clock=Clock(), pending_seconds=30.0)
    await store.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=100
    )
    with pytest.raises(TypeError):
        await store.refunded(CHANNEL, 5_000, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await store.deposited(  # type: ignore[call-arg]
            CHANNEL, "eip155:84532", CONFIG, balance=20_000, total_claimed=0
        )
    assert (await store.get(CHANNEL)).balance == 10_000


async def test_a_chain_reading_never_undoes_a_newer_one(ledger_store):
    """Readings of a channel reach the ledger out of order (a top-up's, read before a payer's
    timed withdrawal and written after the claim loop mirrored that withdrawal from a later
    block): each is written with its block, and one older than the row's changes nothing of
    the balance — neither a deposit's mirror (held or not) nor a refund's or the claim loop's;
    a newer one is the contract's balance, lower too; claims are never lowered either way."""
    clock = Clock()
    a, b = await two_replicas(ledger_store, clock)
    await a.deposited(CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=100)
    await b.refunded(CHANNEL, 5_000, 0, block=120)  # the withdrawal, mirrored
    for stale in (True, False):  # the top-up read at block 110, written now
        kept = await a.deposited(
            CHANNEL, "eip155:84532", CONFIG, balance=20_000, total_claimed=0, exact=stale,
            block=110,
        )  # fmt: skip
        assert kept.balance == 5_000
    await b.refunded(CHANNEL, 20_000, 300, block=110)
    after = await a.get(CHANNEL)
    assert (after.balance, after.total_claimed) == (5_000, 300)
    # A newer reading is the contract's, lower or higher; the claims stay the larger.
    newer = await a.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=15_000, total_claimed=0, block=130
    )
    assert (newer.balance, newer.total_claimed) == (15_000, 300)
    await b.refunded(CHANNEL, 1_000, 0, block=131)
    assert (await a.get(CHANNEL)).balance == 1_000
    # The same block read twice agrees with itself: written again, nothing moves back.
    await b.refunded(CHANNEL, 1_000, 0, block=131)
    await b.refunded(CHANNEL, 9_000, 0, block=130)
    assert (await a.get(CHANNEL)).balance == 1_000


async def test_a_take_for_a_payment_waits_for_a_release_running_meanwhile_and_sees_it(pg_url):
    """PostgreSQL, replicas at once: a reconciler's release of the payment (the payment
    RELEASED and the channel's hold given back, one transaction) is running — written, not
    committed — when the late verify's take comes. The take must wait for it and see it
    (LeaseLost, nothing taken), never take the channel on the payment's old state: the
    release found no hold to give back, so that hold would be nobody's."""
    clock = Clock()
    ledger = await open_ledger(parse_ledger_url(pg_url), replica="a")
    try:
        store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
        await store.deposited(
            CHANNEL, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=0
        )
        await ledger.reserve(**request(1))
        async with await psycopg.AsyncConnection.connect(pg_url) as releasing:
            await releasing.execute(
                "UPDATE payments SET state = 'released', lease = lease + 1 WHERE nonce = %s",
                (nonce(1),),
            )
            await releasing.execute(
                "UPDATE bs_channels SET pending_owner = NULL WHERE channel_id = %s"
                " AND pending_owner = %s",
                (CHANNEL, nonce(1)),
            )
            take = asyncio.ensure_future(store.take_reserved(CHANNEL, nonce(1), nonce(1)))
            await asyncio.wait({take}, timeout=1.0)  # the take comes while the release runs
            await releasing.commit()
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(take, timeout=30)
        assert (await store.get(CHANNEL)).pending_owner is None
    finally:
        await ledger.close()


async def test_withdrawing_channels_are_claimed_first_and_the_scan_place_kept(
    ledger_store, monkeypatch
):
    """Ledger step 16: a channel whose payer's withdrawal is pending comes first among the
    owed ones (soonest due first), ahead of older changes, and alone when only withdrawing
    channels are asked for; the withdrawal cleared, it is an owed channel like any; the
    withdrawal scan's place survives a reopen (another claimer goes on from it)."""
    clock = Clock()
    ledger = await ledger_store(replica="a")
    store = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    ids = ["0x" + f"{n:02x}" * 32 for n in (1, 2, 3)]
    for n, channel_id in enumerate(ids):
        clock.now += 1
        await store.deposited(
            channel_id, "eip155:84532", CONFIG, balance=10_000, total_claimed=0, block=1
        )
        taken = await store.take(channel_id, f"v{n}")
        await store.commit(
            channel_id, f"v{n}", max_claimable=1_000, signature=SIG, charge=1_000,
            payment_id=f"v{n}", taken=taken,
        )  # fmt: skip
    assert [c.channel_id for c in await store.claimable(10)] == ids
    await store.withdrawal(ids[2], requested_at=1_700_000_000, amount=9_000, due=2_000.5)
    await store.withdrawal(ids[1], requested_at=1_700_000_001, amount=5, due=2_500.0)
    assert [c.channel_id for c in await store.claimable(10)] == [ids[2], ids[1], ids[0]]
    assert [c.channel_id for c in await store.claimable(1)] == [ids[2]]
    assert [c.channel_id for c in await store.claimable(10, withdrawing_only=True)] == [
        ids[2],
        ids[1],
    ]
    leaving = await store.get(ids[2])
    assert (leaving.withdraw_requested_at, leaving.withdraw_amount, leaving.withdraw_due) == (
        1_700_000_000,
        9_000,
        2_000.5,
    )
    # Least recently written first (the scan's re-reads go round them).
    assert [c.channel_id for c in await store.withdrawing(10)] == [ids[1], ids[2]]
    # Each owes no more than its withdrawal leaves (the finish cannot take it): not at risk;
    # one the finish would take from is.
    assert await store.at_risk(10) == []
    await store.withdrawal(ids[1], requested_at=1_700_000_001, amount=9_001, due=2_500.0)
    assert [c.channel_id for c in await store.at_risk(10)] == [ids[1]]
    monkeypatch.setattr(store_module, "_RISK_PAGE", 1)  # paged: found behind one that is not
    assert [c.channel_id for c in await store.at_risk(10)] == [ids[1]]
    await store.withdrawal(ids[2], requested_at=0, amount=0, due=None)
    assert [c.channel_id for c in await store.claimable(10, withdrawing_only=True)] == [ids[1]]
    assert [c.channel_id for c in await store.known([ids[0], "0x" + "ff" * 32])] == [ids[0]]
    assert [c.channel_id for c in await store.unspent_after(ids[0], 10)] == ids[1:]
    assert await store.scan_place() is None
    await store.scanned(Stamp(120, None), "")
    await store.scanned(Stamp(150, "0x" + "ee" * 32, 1_700), ids[1])
    await ledger.close()
    again = ChannelStore(await ledger_store(replica="b"), clock=clock, pending_seconds=30.0)
    assert await again.scan_place() == (Stamp(150, "0x" + "ee" * 32, 1_700), ids[1])


H1, H2, H3 = ("0x" + c * 64 for c in "123")


async def test_a_reading_of_a_block_reorganised_away_is_replaced_only_while_the_row_holds_it(
    ledger_store,
):
    """Chain readings stamped with their block's hash (ledger v17): of one number, a reading
    of another block is neither merged nor taken (one of the two was reorganised away; which
    is the chain's to prove); given the row's stamp proven gone, a reading of an older block
    replaces the row's balance and claims — but not once the row was read again since (its
    newer reading stands)."""
    clock = Clock()
    store = ChannelStore(await ledger_store(replica="a"), clock=clock, pending_seconds=30.0)
    net = "eip155:84532"
    await store.deposited(
        CHANNEL, net, CONFIG, balance=20_000, total_claimed=500, block=10, block_hash=H1,
        block_time=100,
    )  # fmt: skip
    # The same number, another block: not merged (deposited) nor taken (refunded).
    same = await store.deposited(
        CHANNEL, net, CONFIG, balance=30_000, total_claimed=0, block=10, block_hash=H2
    )
    assert (same.balance, same.read_hash) == (20_000, H1)
    same = await store.refunded(CHANNEL, 5_000, 0, block=10, block_hash=H2)
    assert same is not None
    assert (same.balance, same.read_block, same.read_hash) == (20_000, 10, H1)
    # An older block: ignored, until the row's block is proven gone.
    older = await store.refunded(CHANNEL, 10_000, 0, block=8, block_hash=H3, block_time=90)
    assert older is not None
    assert (older.balance, older.total_claimed, older.read_block) == (20_000, 500, 10)
    replaced = await store.refunded(
        CHANNEL, 10_000, 0, block=8, block_hash=H3, block_time=90, orphaned=older.stamp
    )
    assert replaced is not None
    assert (replaced.balance, replaced.total_claimed) == (10_000, 0)
    assert replaced.stamp == Stamp(8, H3, 90)
    # A proof about a stamp the row no longer holds changes nothing.
    stale = await store.deposited(
        CHANNEL, net, CONFIG, balance=1, total_claimed=0, block=5, block_hash=H1,
        orphaned=Stamp(10, H1, 100),
    )  # fmt: skip
    assert (stale.balance, stale.stamp) == (10_000, Stamp(8, H3, 90))
    # Same block and hash: as before (a deposit's amounts only rise).
    again = await store.deposited(
        CHANNEL, net, CONFIG, balance=12_000, total_claimed=0, block=8, block_hash=H3
    )
    assert (again.balance, again.stamp) == (12_000, Stamp(8, H3, 90))
