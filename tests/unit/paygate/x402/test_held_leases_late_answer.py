"""``HeldLeases``'s local window (what ``confirm`` counts on without asking the ledger) starts
when the lease was *asked for*, never when the ledger's answer was read: a process stopped
between the ledger's write and reading its answer (the very stall leases guard against) wakes
with a lease that began long before, and a window started at the answer would outlive the lease
— a stream's head sent for a payment another replica has released. Both stores; two clocks, the
ledger's and the process's local one, both moving through the stall."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from paygate.x402.leases import HeldLeases, boot_clock
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


def test_a_platform_without_a_boot_time_clock_has_none_to_count_on() -> None:
    without = SimpleNamespace(clock_gettime=time.clock_gettime, monotonic=time.monotonic)
    assert boot_clock(without) is None
    if hasattr(time, "CLOCK_BOOTTIME"):  # Linux: the boot time, which counts a host's sleep
        clock = boot_clock(time)
        assert clock is not None
        assert clock() <= time.clock_gettime(time.CLOCK_BOOTTIME)


async def test_without_a_boot_time_clock_every_confirmation_asks_the_ledger(
    ledger_store: Opener,
) -> None:
    """No clock that counts a sleeping host's time: a lease is never counted on locally, so a
    host woken past its lease learns it is lost however little its own (stopped) clock moved."""
    clock = Clock()
    a = await ledger_store(clock=clock, replica="a", lease_seconds=LEASE)
    b = await ledger_store(clock=clock, replica="b", lease_seconds=LEASE)
    leases = HeldLeases(a, clock=None)
    record = await a.reserve(**request())
    leases.hold(record, asked=leases.now())
    assert await leases.confirm(record) is None  # asked, and still ours
    clock.now += LEASE + 1  # the host slept; its monotonic clock did not move
    await _released_by_b(b, record.id)
    assert await leases.confirm(record) == LeaseLost.code
