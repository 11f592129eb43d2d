"""The one-holder-at-a-time rule (paygate.singleton_lease), met by both of its leases — the
batch-settlement claimer (``bs_claims``) and the log's recovery turn (``tlog_recovery``) —
through their own stores' calls, on both stores (SQLite file, PostgreSQL 15):

- one holder at a time; the holder renews its own lease;
- let go, the next to ask takes it at once, and the row still names who held it last;
- a holder whose lease ran out (it died) is taken over;
- a holder frozen past its lease cannot end its successor's lease.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

from paygate.tlog.open_store import open_log_store
from paygate.x402.ledger_store import LedgerLocation, open_ledger, parse_ledger_url
from paygate.x402.schemes.batch_settlement.store import CLAIMER, ChannelStore

SECONDS = 600.0  # never runs out by itself here: "its holder died" ages the row instead
ERA = 1_000_000.0  # the claimer's clock (the tlog's is the database's)


class Lease(Protocol):
    async def take(self, holder: str) -> bool: ...
    async def let_go(self, holder: str) -> None: ...
    async def run_out(self) -> None: ...  # its holder died, its lease ran out since
    async def last_holder(self) -> str | None: ...


class Claimer:
    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger
        self._store = ChannelStore(ledger, clock=lambda: ERA, pending_seconds=30.0)

    async def take(self, holder: str) -> bool:
        return await self._store.take_claimer(holder, SECONDS)

    async def let_go(self, holder: str) -> None:
        await self._store.let_go_claimer(holder)

    async def run_out(self) -> None:
        sql = "UPDATE bs_claims SET lease_until = ? WHERE id = ?"
        await self._ledger.scheme_sql(sql, (ERA - 1, CLAIMER))

    async def last_holder(self) -> str | None:
        _, rows = await self._ledger.scheme_sql(
            "SELECT owner FROM bs_claims WHERE id = ?", (CLAIMER,)
        )
        return rows[0][0]


class RecoveryTurn:
    def __init__(self, ledger: Any, store: Any) -> None:
        self._ledger = ledger
        self._store = store

    async def take(self, holder: str) -> bool:
        return (await self._store.recovery_turn(holder, SECONDS)).mine

    async def let_go(self, holder: str) -> None:
        await self._store.end_recovery_turn(holder)

    async def run_out(self) -> None:
        await self._ledger.scheme_sql("UPDATE tlog_recovery SET lease_until = 1 WHERE id = 1", ())

    async def last_holder(self) -> str | None:
        _, rows = await self._ledger.scheme_sql("SELECT holder FROM tlog_recovery WHERE id = 1", ())
        return rows[0][0]


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerLocation:
    if request.param == "sqlite":
        return LedgerLocation(kind="sqlite", path=tmp_path / "payments.db")
    return parse_ledger_url(request.getfixturevalue("pg_url"))


@asynccontextmanager
async def _lease(kind: str, location: LedgerLocation) -> AsyncIterator[Lease]:
    ledger = await open_ledger(location, replica="test")
    store = await open_log_store(location)
    try:
        yield Claimer(ledger) if kind == "claimer" else RecoveryTurn(ledger, store)
    finally:
        await store.close()
        await ledger.close()


@pytest.mark.parametrize("kind", ["claimer", "recovery turn"])
async def test_one_holder_at_a_time_taken_over_when_let_go_or_run_out(kind, location):
    async with _lease(kind, location) as lease:
        assert await lease.take("a")
        assert not await lease.take("b")
        assert await lease.take("a")  # renewed
        await lease.let_go("a")
        assert await lease.last_holder() == "a"  # who held it last, its lease ended
        assert await lease.take("b")  # at once
        assert not await lease.take("a")
        await lease.run_out()  # b died
        assert await lease.take("a")
        await lease.let_go("b")  # b, frozen past its lease, wakes and stops
        assert not await lease.take("c")  # a's lease stands
        assert await lease.last_holder() == "a"
