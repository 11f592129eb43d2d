"""``HeldLeases.confirm``, on both stores: whether this process may still serve a payment whose
charge it records only after the reply has left (a stream settled after its reply). Known from
the process's own clock while the lease it last took or renewed has time left — no ledger call
on the usual path — and past that decided by a fenced renewal. Two clocks here: the ledger's
(leases run out on it) and the process's local one (a process stopped past its lease sees it
jump when it wakes)."""

from __future__ import annotations

from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import LeaseLost, LedgerUnavailable, PaymentState
from tests.fixtures.ledger_support import Clock, request
from tests.fixtures.ledgers import Opener

LEASE = 10.0


async def test_a_lease_held_within_its_time_is_confirmed_without_asking_the_ledger(
    ledger_store: Opener,
) -> None:
    clock, local = Clock(), Clock(now=0.0)
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    b = await ledger_store(clock=clock, replica="b", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=local)
    record = await a.reserve(**request())
    leases.hold(record)
    # The ledger would say it is lost (released by another replica): no call was made.
    clock.now += LEASE + 1
    (released,) = await b.release_abandoned()
    assert released.id == record.id
    assert await leases.confirm(record) is None
    # The process's own clock past the time it counts on (it was stopped): the ledger decides.
    local.now += LEASE
    assert await leases.confirm(record) == LeaseLost.code
    assert not leases.holds(record)
    assert await leases.confirm(record) == LeaseLost.code  # and stays so, without a call


async def test_a_lease_past_its_local_time_but_still_ours_is_renewed_and_counted_on_again(
    ledger_store: Opener,
) -> None:
    clock, local = Clock(), Clock(now=0.0)
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=local)
    record = await a.reserve(**request())
    leases.hold(record)
    local.now += LEASE  # a long reply, its renewals not yet run: still ours in the ledger
    assert await leases.confirm(record) is None
    mine = await a.get(record.id)
    assert mine is not None
    assert mine.lease_until == clock.now + LEASE  # renewed by that confirmation
    assert leases.holds(record)


async def test_a_fenced_move_renews_the_lease_the_process_counts_on(ledger_store: Opener) -> None:
    clock, local = Clock(), Clock(now=0.0)
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=local)
    record = await a.reserve(**request())
    leases.hold(record)
    local.now += 0.7 * LEASE
    clock.now += 0.7 * LEASE
    moved = await leases.move(record, PaymentState.VERIFIED)
    local.now += 0.7 * LEASE  # past the first lease's time, within the renewed one's
    await a.close()  # asked now, the ledger could not answer
    assert await leases.confirm(moved) is None
    local.now += 0.2 * LEASE  # past the renewed one's too: asked, and it cannot say
    assert await leases.confirm(moved) == LedgerUnavailable.code
