"""``HeldLeases``'s local window (what ``confirm`` counts on without asking the ledger) starts
when the lease was *asked for*, never when the ledger's answer was read: a process stopped
between the ledger's write and reading its answer (the very stall leases guard against) wakes
with a lease that began long before, and a window started at the answer would outlive the lease
— a stream's head sent for a payment another replica has released. Both stores; two clocks, the
ledger's and the process's local one, both moving through the stall."""

from __future__ import annotations

from typing import Any

from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import LeaseLost, PaymentState
from paygate.x402.ledger_base import Ledger
from tests.fixtures.ledger_support import Clock, request
from tests.fixtures.ledgers import Opener

LEASE = 10.0
STALL = 0.5 * LEASE  # the process stopped right after the ledger's write, before its answer


def _answer_late(ledger: Ledger, name: str, clocks: tuple[Clock, ...]) -> None:
    """``ledger``'s ``name`` call answers once its write is made, the process stalled meanwhile."""
    real = getattr(ledger, name)

    async def late(*args: Any, **kwargs: Any) -> Any:
        answer = await real(*args, **kwargs)
        for clock in clocks:
            clock.now += STALL
        return answer

    setattr(ledger, name, late)


async def _released_by_b(b: Ledger, payment_id: str) -> None:
    (released,) = await b.release_abandoned()
    assert released.id == payment_id


async def test_a_renewal_answered_late_is_counted_from_when_it_was_asked(
    ledger_store: Opener,
) -> None:
    clock, local = Clock(), Clock(now=0.0)
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    b = await ledger_store(clock=clock, replica="b", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=local)
    record = await a.reserve(**request())
    leases.hold(record)
    local.now += LEASE
    clock.now += 0.5 * LEASE
    _answer_late(a, "renew", (clock, local))
    assert await leases.confirm(record) is None  # renewed (its answer read STALL later)
    # The renewed lease runs out (on the ledger's clock), another replica releases it.
    clock.now += 0.6 * LEASE
    local.now += 0.6 * LEASE
    await _released_by_b(b, record.id)
    assert await leases.confirm(record) == LeaseLost.code


async def test_a_fenced_move_answered_late_is_counted_from_when_it_was_asked(
    ledger_store: Opener,
) -> None:
    clock, local = Clock(), Clock(now=0.0)
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    b = await ledger_store(clock=clock, replica="b", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=local)
    record = await a.reserve(**request())
    leases.hold(record)
    _answer_late(a, "transition", (clock, local))
    moved = await leases.move(record, PaymentState.VERIFIED)
    clock.now += 0.6 * LEASE
    local.now += 0.6 * LEASE
    await _released_by_b(b, record.id)
    assert await leases.confirm(moved) == LeaseLost.code


async def test_a_reservation_answered_late_is_held_from_when_it_was_asked(
    ledger_store: Opener,
) -> None:
    clock, local = Clock(), Clock(now=0.0)
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    b = await ledger_store(clock=clock, replica="b", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=local)
    asked = leases.now()
    record = await a.reserve(**request())
    clock.now += STALL  # the reservation's answer read late
    local.now += STALL
    leases.hold(record, asked=asked)
    clock.now += 0.6 * LEASE
    local.now += 0.6 * LEASE
    await _released_by_b(b, record.id)
    assert await leases.confirm(record) == LeaseLost.code
