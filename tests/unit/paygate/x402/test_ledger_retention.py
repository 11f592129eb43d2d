"""Retention of the day-keyed tables (free quotas, address allowances, used sign-in nonces) on
both stores: days before the cutoff go, today and yesterday stay, a used nonce stays refused
while its proof could be accepted, batches are bounded, and two pruners at once are safe."""

from __future__ import annotations

import asyncio
import calendar
import time

import pytest
from pydantic import ValidationError

from paygate.config import Settings
from paygate.x402 import siwx
from paygate.x402.ledger import PaymentState as S
from paygate.x402.ledger import SignInReused
from paygate.x402.ledger_base import Ledger
from paygate.x402.ledger_sqlite import SqliteLedger
from paygate.x402.ledger_tables import prune
from paygate.x402.retention import DAY, KEPT_DAYS, cutoff, prune_once
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig
from paygate.x402.schemes.batch_settlement.store import ChannelStore
from tests.fixtures.ledger_support import SIGNATURE, nonce, request
from tests.fixtures.ledgers import Opener

TODAY = "2026-12-06"
NOON = calendar.timegm(time.strptime(TODAY, "%Y-%m-%d")) + DAY / 2  # today, 12:00 UTC
WALLETS = [f"0x{n:040x}" for n in range(1, 301)]
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


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def day_of(moment: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(moment))


async def take(ledger: Ledger, n: int, day: str, nonce: str | None = None) -> int | None:
    return await ledger.take_free(
        payer=WALLETS[n],
        nonce=nonce or f"{day}-{n}",
        day=day,
        limit=5,
        address=f"{n:064x}",
        address_limit=5,
    )


async def left(ledger: Ledger, n: int, day: str) -> int | None:
    """What wallet ``n`` has left on ``day`` (taking one more request, with a fresh nonce)."""
    return await take(ledger, n, day, nonce=f"probe-{day}-{n}-{time.monotonic_ns()}")


async def test_days_before_yesterday_go_today_and_yesterday_stay(ledger_store: Opener) -> None:
    clock = Clock(NOON - 3 * DAY)
    ledger = await ledger_store(clock=clock)
    days = [day_of(NOON - k * DAY) for k in (3, 2, 1, 0)]  # the nonce of each used that day
    for k, day in enumerate(days):
        clock.now = NOON - (3 - k) * DAY
        assert await take(ledger, 0, day) == 4
        assert await take(ledger, 0, day, nonce=f"second-{day}") == 3
    clock.now = NOON
    assert cutoff(NOON) == days[2]  # yesterday
    # The fullest table: two days' two used nonces.
    assert await prune_once(ledger, NOON) == 4
    # Old days are gone: their counts start again, their nonces are free (and long expired).
    for day in days[:2]:
        assert await take(ledger, 0, day) == 4
    # Yesterday and today keep their counts and their used nonces.
    for day in days[2:]:
        assert await left(ledger, 0, day) == 2
        with pytest.raises(SignInReused):
            await take(ledger, 0, day)
    # The re-taken old days' counts only (their nonces were used now: kept).
    assert await prune_once(ledger, NOON) == 2
    assert await prune_once(ledger, NOON) == 0


async def test_a_used_nonce_stays_refused_for_as_long_as_its_proof_is_valid(
    ledger_store: Opener,
) -> None:
    # The cutoff keeps every nonce used since yesterday began: at least a day, far past the
    # longest a proof is accepted (siwx: issued at most MAX_AGE_SECONDS ago, a minute ahead).
    assert siwx.MAX_AGE_SECONDS + 60 < (KEPT_DAYS - 1) * DAY
    start_of_today = NOON - DAY / 2
    for used in (start_of_today + 1, start_of_today - 1):  # just after / before midnight
        clock = Clock(used)
        ledger = await ledger_store(clock=clock)
        nonce = f"used-at-{used}"
        assert await take(ledger, 1, day_of(used), nonce=nonce) == 4
        # Every prune while the proof could still be accepted (and well beyond) keeps it.
        for later in (0, siwx.MAX_AGE_SECONDS + 60, 3600, DAY - 1):
            clock.now = used + later
            await prune_once(ledger, used + later)
            with pytest.raises(SignInReused):
                await take(ledger, 2, day_of(used + later), nonce=nonce)


async def test_batches_are_bounded_and_repeated(ledger_store: Opener) -> None:
    old = day_of(NOON - 5 * DAY)
    clock = Clock(NOON - 5 * DAY)
    ledger = await ledger_store(clock=clock)
    for n in range(25):
        await take(ledger, n, old)
    # One batch of 10: ten rows of each table go, the rest stays for the next call.
    assert await ledger.prune_days(before=TODAY, batch=10, batches=1) == 10
    assert await ledger.prune_days(before=TODAY, batch=10, batches=2) == 15
    assert await ledger.prune_days(before=TODAY, batch=10) == 0
    for n in range(25):  # every count and nonce went
        assert await take(ledger, n, old) == 4


@pytest.mark.parametrize(
    ("before", "batch"),
    [("2026-12-6", 10), ("yesterday", 10), ("2026-13-01", 10), ("", 10), (TODAY, 0), (TODAY, -1)],
)
async def test_bad_arguments_are_refused_before_any_io(
    ledger_store: Opener, before: str, batch: int
) -> None:
    ledger = await ledger_store()
    with pytest.raises(ValueError, match="before must be"):
        await ledger.prune_days(before=before, batch=batch)
    assert await ledger.prune_days(before=TODAY, batches=0) == 0  # nothing asked, nothing done


async def test_concurrent_prunes_from_two_ledgers_are_safe(ledger_store: Opener) -> None:
    old = day_of(NOON - 4 * DAY)
    clock = Clock(NOON - 4 * DAY)
    ledgers = [
        await ledger_store(replica="w1", clock=clock),
        await ledger_store(replica="w2", clock=clock),
    ]
    for n in range(300):
        await take(ledgers[n % 2], n, old)
    clock.now = NOON
    assert await take(ledgers[0], 0, TODAY) == 4
    # Both prune at once while free requests of today are taken, in small batches.
    results = await asyncio.gather(
        *(ledger.prune_days(before=cutoff(NOON), batch=7) for ledger in ledgers),
        *(take(ledgers[n % 2], n, TODAY) for n in range(1, 40)),
    )
    assert all(isinstance(r, int) for r in results)
    assert await ledgers[0].prune_days(before=cutoff(NOON)) == 0  # all old rows went
    for n in range(40):  # today's requests all counted, none lost to the prune
        assert await left(ledgers[1], n, TODAY) == 3


@pytest.mark.parametrize("interval", [0, -1, 86_401, "nan", "inf"])
def test_the_prune_interval_is_bounded(interval: object) -> None:
    with pytest.raises(ValidationError, match="ledger_prune_interval_seconds"):
        Settings(ledger_prune_interval_seconds=interval)


def test_the_prune_interval_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYGATE_LEDGER_PRUNE_INTERVAL_SECONDS", "5")
    assert Settings().ledger_prune_interval_seconds == 5.0
    monkeypatch.delenv("PAYGATE_LEDGER_PRUNE_INTERVAL_SECONDS")
    assert Settings().ledger_prune_interval_seconds == 3600.0


async def test_channel_vouchers_go_with_their_day_unless_their_payment_may_still_commit(
    ledger_store: Opener,
) -> None:
    """``bs_vouchers`` (a row per voucher accepted) is pruned by the same cutoff, except the
    rows a reconciler still reads: a voucher whose payment is not finished (SERVED, SETTLING…)
    keeps its charge's mark however old, so committing it again still finds its charge made."""
    clock = Clock(NOON - 3 * DAY)
    ledger = await ledger_store(clock=clock)
    channels = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await channels.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10**6, total_claimed=0, block=0
    )

    async def voucher(n: int) -> None:
        taken = await channels.take(CHANNEL, nonce(n))
        await channels.commit(
            CHANNEL, nonce(n), max_claimable=1_000 * n, signature=SIGNATURE,
            charge=1_000, payment_id=nonce(n), taken=taken,
        )  # fmt: skip

    # Three days ago: v1 SETTLED, v2 left SETTLING (its answer lost), v3 RELEASED, v4 with no
    # payment record; today: v5, SETTLED.
    settled = await ledger.reserve(**request(1))
    for to in (S.VERIFIED, S.SETTLING):
        settled = await ledger.transition(settled.id, to, lease=settled.lease)
    await voucher(1)
    await ledger.transition(settled.id, S.SETTLED, lease=settled.lease, settled_amount=1_000)
    settling = await ledger.reserve(**request(2))
    for to in (S.VERIFIED, S.SETTLING):
        settling = await ledger.transition(settling.id, to, lease=settling.lease)
    await voucher(2)
    released = await ledger.reserve(**request(3))
    await ledger.transition(released.id, S.RELEASED, lease=released.lease)
    await voucher(3)
    await voucher(4)
    clock.now = NOON
    await voucher(5)

    assert await prune_once(ledger, NOON) == 3
    _, rows = await ledger.scheme_sql("SELECT payment_id FROM bs_vouchers ORDER BY 1", ())
    assert [row[0] for row in rows] == [nonce(2), nonce(5)]
    # The payment still SETTLING commits again and finds its charge made (nothing charged).
    _, again = await channels.commit(
        CHANNEL, nonce(2), max_claimable=2_000, signature=SIGNATURE, charge=1_000,
        payment_id=nonce(2),
    )  # fmt: skip
    assert again == 0
    assert await prune_once(ledger, NOON) == 0


async def test_an_old_voucher_whose_payment_is_reserved_verified_or_served_is_kept(
    ledger_store: Opener,
) -> None:
    """Every payment state that may still commit keeps its voucher's row, not only SETTLING:
    a SERVED record whose charge was made before its crash (the reconciler resumes it from
    SERVED, needing no SETTLING mark) must find that charge marked days later, or it would be
    taken as lost and recorded FAILED while the claim takes its money."""
    clock = Clock(NOON - 3 * DAY)
    ledger = await ledger_store(clock=clock)
    channels = ChannelStore(ledger, clock=clock, pending_seconds=30.0)
    await channels.deposited(
        CHANNEL, "eip155:84532", CONFIG, balance=10**6, total_claimed=0, block=0
    )
    for n, states in ((1, ()), (2, (S.VERIFIED,)), (3, (S.VERIFIED, S.SERVED))):
        record = await ledger.reserve(**request(n))
        for to in states:
            record = await ledger.transition(record.id, to, lease=record.lease)
        taken = await channels.take(CHANNEL, nonce(n))
        await channels.commit(
            CHANNEL, nonce(n), max_claimable=1_000 * n, signature=SIGNATURE,
            charge=1_000, payment_id=nonce(n), taken=taken,
        )  # fmt: skip
    clock.now = NOON

    assert await prune_once(ledger, NOON) == 0
    _, rows = await ledger.scheme_sql("SELECT payment_id FROM bs_vouchers ORDER BY 1", ())
    assert [row[0] for row in rows] == [nonce(1), nonce(2), nonce(3)]
    _, again = await channels.commit(
        CHANNEL, nonce(3), max_claimable=3_000, signature=SIGNATURE, charge=1_000,
        payment_id=nonce(3),
    )  # fmt: skip
    assert again == 0  # found charged: never FAILED as lost, never charged twice


async def test_the_voucher_prune_reads_vouchers_by_when_they_were_recorded(
    ledger_store: Opener,
) -> None:
    """Ledger step 13: ``bs_vouchers`` has an index on ``created_at`` on both stores, and
    SQLite's plan for the prune's batch takes it (a search, not a scan of every voucher ever
    accepted)."""
    ledger = await ledger_store()
    if isinstance(ledger, SqliteLedger):
        found = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'bs_vouchers'"
    else:
        found = "SELECT indexname FROM pg_indexes WHERE tablename = 'bs_vouchers'"
    _, rows = await ledger.scheme_sql(found, ())
    assert "bs_vouchers_created" in {row[0] for row in rows}
    if isinstance(ledger, SqliteLedger):
        statement, params = prune("2026-01-01", float(NOON), 100, skip_locked=False)[3]
        assert "bs_vouchers" in statement
        _, plan = await ledger.scheme_sql(f"EXPLAIN QUERY PLAN {statement}", params)
        steps = [str(row[-1]) for row in plan]
        assert any("bs_vouchers_created" in step for step in steps), steps
        assert not any(step == "SCAN v" for step in steps), steps
