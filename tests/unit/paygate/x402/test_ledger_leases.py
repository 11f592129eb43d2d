"""Leases on both stores (SQLite file, PostgreSQL 15): ownership, renewal, fencing, exclusive
claims of abandoned work, release of abandoned reservations, and the history of who did what.

Replicas are separate ledger objects (separate connections) on one store, with one settable
clock, so "the lease ran out" is a clock step, not a sleep.
"""

from __future__ import annotations

import asyncio

import pytest

from paygate.x402.ledger import (
    EventAction,
    LeaseLost,
    LedgerConflict,
    PaymentRecord,
    PaymentState,
)
from tests.fixtures.ledger_support import Clock, request, tx
from tests.fixtures.ledgers import Opener

S = PaymentState
LEASE = 10.0


async def replicas(ledger_store: Opener, clock: Clock, *names: str) -> list:
    return [await ledger_store(clock=clock, replica=name, lease_seconds=LEASE) for name in names]


async def served(ledger, n: int = 1) -> PaymentRecord:
    record = await ledger.reserve(**request(n))
    record = await ledger.transition(record.id, S.VERIFIED, lease=record.lease)
    return await ledger.transition(record.id, S.SERVED, lease=record.lease)


async def test_a_reservation_is_owned_under_a_fresh_lease(ledger_store: Opener) -> None:
    clock = Clock()
    (a,) = await replicas(ledger_store, clock, "a")
    record = await a.reserve(**request())
    assert (record.owner, record.lease, record.lease_until) == ("a", 1, clock.now + LEASE)
    clock.now += 4
    renewed = await a.renew(record.id, record.lease)
    assert renewed.lease_until == clock.now + LEASE
    clock.now += 1
    moved = await a.transition(record.id, S.VERIFIED, lease=record.lease)
    assert (moved.owner, moved.lease, moved.lease_until) == ("a", 1, clock.now + LEASE)
    ended = await a.transition(record.id, S.RELEASED, lease=record.lease)
    assert (ended.owner, ended.lease_until) == (None, None)
    with pytest.raises(LeaseLost):
        await a.renew(record.id, record.lease)
    again = await a.reserve(**request())  # the retry of a released authorization: a new lease
    assert (again.id, again.owner, again.lease) == (record.id, "a", 2)
    actions = [(e.replica, e.action, e.state, e.lease) for e in await a.history(record.id)]
    assert actions == [
        ("a", EventAction.RESERVED, S.RESERVED, 1),
        ("a", EventAction.MOVED, S.VERIFIED, 1),
        ("a", EventAction.MOVED, S.RELEASED, 1),
        ("a", EventAction.RESERVED, S.RESERVED, 2),
    ]


async def test_live_work_is_not_claimed_expired_work_is_and_the_old_owner_is_fenced(
    ledger_store: Opener,
) -> None:
    clock = Clock()
    a, b = await replicas(ledger_store, clock, "a", "b")
    record = await served(a)
    assert await b.claim_unfinished(min_age=0) == []  # a's lease is live
    clock.now += LEASE - 1
    await a.renew(record.id, record.lease)
    clock.now += LEASE - 1
    assert await b.claim_unfinished(min_age=0) == []  # renewed: still live
    clock.now += 2  # a stopped renewing (frozen, dead): the lease runs out
    (claimed,) = await b.claim_unfinished(min_age=0)
    assert (claimed.id, claimed.owner, claimed.lease) == (record.id, "b", record.lease + 1)
    assert await b.claim_unfinished(min_age=0) == []  # once

    # a wakes up: every change under its old lease is refused, and nothing is written.
    for change in (
        a.transition(record.id, S.SETTLING, lease=record.lease),
        a.renew(record.id, record.lease),
        a.let_go(record.id, record.lease),
    ):
        with pytest.raises(LeaseLost) as caught:
            await change
        assert caught.value.code == "lease_lost"
        assert isinstance(caught.value, LedgerConflict)
    assert await b.get(record.id) == claimed

    settling = await b.transition(record.id, S.SETTLING, lease=claimed.lease)
    done = await b.transition(record.id, S.SETTLED, transaction=tx(1), lease=claimed.lease)
    assert (settling.attempts, done.owner) == (1, None)
    history = await b.history(record.id)
    who = [(e.replica, e.action, e.state) for e in history]
    assert who[-3:] == [
        ("b", EventAction.CLAIMED, S.SERVED),
        ("b", EventAction.MOVED, S.SETTLING),
        ("b", EventAction.MOVED, S.SETTLED),
    ]
    assert history[-3].detail == "a"
    assert history[-1].transaction == tx(1)


async def test_concurrent_claimers_split_abandoned_work_each_record_once(
    ledger_store: Opener,
) -> None:
    clock = Clock()
    dead, *claimers = await replicas(ledger_store, clock, "dead", "b", "c", "d")
    ids = {(await served(dead, n)).id for n in range(1, 13)}
    clock.now += LEASE + 1
    results = await asyncio.wait_for(
        asyncio.gather(*(c.claim_unfinished(min_age=0, limit=5) for c in claimers * 2)),
        timeout=30,
    )
    taken = [record.id for batch in results for record in batch]
    assert sorted(taken) == sorted(ids)  # every record claimed, none twice
    for batch in results:
        assert all(r.lease == 2 and r.owner in {"b", "c", "d"} for r in batch)


async def test_let_go_work_waits_min_age_then_anyone_may_claim_it(ledger_store: Opener) -> None:
    clock = Clock()
    a, b = await replicas(ledger_store, clock, "a", "b")
    record = await served(a)
    pending = await a.transition(
        record.id, S.SETTLING, error="settlement_pending", lease=record.lease
    )
    loose = await a.let_go(pending.id, pending.lease)
    assert (loose.owner, loose.lease_until, loose.lease) == (None, None, pending.lease)
    assert await b.claim_unfinished(min_age=30) == []
    clock.now += 31
    (claimed,) = await b.claim_unfinished(min_age=30)
    assert (claimed.owner, claimed.lease, claimed.state) == ("b", pending.lease + 1, S.SETTLING)


async def test_a_move_that_lets_go_is_one_change_and_fences_like_let_go(
    ledger_store: Opener,
) -> None:
    """Verify-only's VERIFIED → SERVED gives the lease up in the same transaction: the record
    is served and unowned at once, the epoch is kept (its holder can still release it), and
    another replica's claim after the quiet period moves the epoch on (the old holder fenced)."""
    clock = Clock()
    a, b = await replicas(ledger_store, clock, "a", "b")
    record = await a.reserve(**request())
    verified = await a.transition(record.id, S.VERIFIED, lease=record.lease)
    loose = await a.transition(verified.id, S.SERVED, lease=verified.lease, let_go=True)
    assert (loose.state, loose.served, loose.owner, loose.lease_until, loose.lease) == (
        S.SERVED,
        True,
        None,
        None,
        verified.lease,
    )
    actions = [(e.action, e.state) for e in await a.history(record.id)]
    assert actions[-1] == (EventAction.MOVED, S.SERVED)  # one change, one history line
    assert await b.claim_unfinished(min_age=30) == []
    clock.now += 31
    (claimed,) = await b.claim_unfinished(min_age=30)
    assert (claimed.owner, claimed.lease) == ("b", loose.lease + 1)
    with pytest.raises(LeaseLost):
        await a.transition(record.id, S.RELEASED, lease=loose.lease)


async def test_a_move_via_a_state_is_two_checked_moves_in_one_change(
    ledger_store: Opener,
) -> None:
    """RESERVED → (VERIFIED) → SERVED in one transaction: both moves in the history, both held
    to the table and the fence; a refused second move leaves the first undone too."""
    clock = Clock()
    (a,) = await replicas(ledger_store, clock, "a")
    record = await a.reserve(**request())
    with pytest.raises(LedgerConflict):  # VERIFIED → SETTLED is not in the table
        await a.transition(record.id, S.SETTLED, lease=record.lease, via=S.VERIFIED)
    assert (await a.get(record.id)).state is S.RESERVED  # type: ignore[union-attr]
    with pytest.raises(LedgerConflict):  # RESERVED → SERVED is not either
        await a.transition(record.id, S.SERVED, lease=record.lease, via=S.SERVED)
    with pytest.raises(LeaseLost):
        await a.transition(record.id, S.SERVED, lease=record.lease + 1, via=S.VERIFIED)
    served = await a.transition(
        record.id, S.SERVED, lease=record.lease, via=S.VERIFIED, let_go=True
    )
    assert (served.state, served.served, served.owner) == (S.SERVED, True, None)
    actions = [(e.action, e.state) for e in await a.history(record.id)]
    assert actions == [
        (EventAction.RESERVED, S.RESERVED),
        (EventAction.MOVED, S.VERIFIED),
        (EventAction.MOVED, S.SERVED),
    ]


async def test_own_claims_and_releases_take_a_previous_run_s_work_at_once(
    ledger_store: Opener,
) -> None:
    clock = Clock()
    before, other = await replicas(ledger_store, clock, "r1", "r2")
    owed = await served(before, 1)
    held = await before.reserve(**request(2))
    theirs = await other.reserve(**request(3))
    # "r1" restarts (same name, new process): its old leases are still live on the clock.
    (after,) = await replicas(ledger_store, clock, "r1")
    assert await after.claim_unfinished(min_age=0) == []
    (adopted,) = await after.claim_unfinished(min_age=0, own=True)
    assert (adopted.id, adopted.lease) == (owed.id, owed.lease + 1)
    (released,) = await after.release_abandoned(own=True)
    assert (released.id, released.state, released.owner) == (held.id, S.RELEASED, None)
    assert (await after.get(theirs.id)).state is S.RESERVED  # r2's live work is left alone

    clock.now += LEASE + 1  # r2 died: anyone releases its reservation now
    (gone,) = await after.release_abandoned()
    assert gone.id == theirs.id
    last = (await after.history(theirs.id))[-1]
    assert (last.replica, last.action, last.detail) == ("r1", EventAction.RELEASED, "r2")
    with pytest.raises(LeaseLost):  # r2, were it alive after all, is fenced out
        await other.transition(theirs.id, S.VERIFIED, lease=theirs.lease)


async def test_unfenced_changes_stay_possible_for_operators(ledger_store: Opener) -> None:
    clock = Clock()
    a, op = await replicas(ledger_store, clock, "a", "operator")
    record = await served(a)
    moved = await op.transition(record.id, S.SETTLING)  # no lease: not fenced
    assert (moved.owner, moved.lease) == ("a", record.lease)  # ownership untouched
    with pytest.raises(ValueError, match="min_age"):
        await op.claim_unfinished(min_age=-1)
