"""The recovery of kept receipts scanned by one process per ledger at a time (``tlog_recovery``:
a turn with a lease, and the scan's place), on both stores (SQLite file, PostgreSQL 15).

- of several processes on one ledger, one scans; the others only ask for the turn;
- a holder that dies (its lease runs out) is taken over, and the successor goes on from the
  place the dead holder kept: nothing read twice, nothing skipped;
- a clean stop hands the turn over at once;
- a holder frozen past its lease finishes its pass harmlessly: it cannot move its successor's
  place back, and finds the turn gone;
- every process reports the ledger's scan on /metrics (the lag of whoever holds the turn), and
  whether it holds it;
- two real gateways on one ledger: one scans, the gap is recovered once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclave import SoftwareKey, receipts
from paygate.server.metrics import Metrics
from paygate.tlog.errors import LogStoreError
from paygate.tlog.open_store import open_log_store
from paygate.tlog.recovery import RecoveryConfig
from paygate.tlog.service import LogConfig, TransparencyLog, receipt_facts
from paygate.x402.ledger_store import LedgerLocation, open_ledger, parse_ledger_url
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.ledger_support import request
from tests.fixtures.tlog_support import ORIGIN, gateway_settings

KEY = SoftwareKey.generate()
LONG = 3600.0  # an interval whose lease (three of them) never runs out in a test


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerLocation:
    if request.param == "sqlite":
        return LedgerLocation(kind="sqlite", path=tmp_path / "payments.db")
    return parse_ledger_url(request.getfixturevalue("pg_url"))


def _token(n: int) -> str:
    claims = {
        "kind": "reply",
        "request_digest": "sha256:" + f"{n:064x}",
        "reply_digest": "sha256:" + "ab" * 32,
        "model": "fake-llama",
        "model_digest": None,
        "usage": None,
        "payment": {
            "id": f"0x{n:064x}",
            "scheme": "exact",
            "network": "eip155:84532",
            "asset": "0x" + "33" * 20,
            "pay_to": "0x" + "22" * 20,
            "payer": "0x" + "11" * 20,
            "authorized": "10",
            "charged": "10",
            "prices": None,
            "transaction": "pending",
        },
        "issued_at": 1_700_000_000 + n,
    }
    return receipts.sign(claims, KEY)


async def _keep(location: LedgerLocation, numbers: range) -> list[str]:
    """Payments served, each with its reply receipt kept in the ledger and not in the log."""
    ledger = await open_ledger(location, replica="server")
    tokens = [_token(n) for n in numbers]
    try:
        for n, token in zip(numbers, tokens, strict=True):
            record = await ledger.reserve(**request(n))
            await ledger.mark_served(record.id)
            await ledger.add_receipt(record.id, "reply", token)
    finally:
        await ledger.close()
    return tokens


@contextlib.asynccontextmanager
async def _log(
    location: LedgerLocation, replica: str, events: Any = None, **recovery: Any
) -> AsyncIterator[TransparencyLog]:
    store = await open_log_store(location)
    config = LogConfig(
        origin=ORIGIN,
        replica=replica,
        recovery=RecoveryConfig(**{"grace": 0.0, "interval": LONG, **recovery}),
    )
    tlog = TransparencyLog(config, store, KEY, events)
    try:
        yield tlog
    finally:
        await tlog.close()


async def _counts(tlog: TransparencyLog, tokens: list[str]) -> list[int]:
    store: Any = tlog._store

    def plan(leaf: bytes) -> Any:
        rows = yield store.SQL._sql("SELECT COUNT(*) FROM tlog_receipts WHERE leaf = ?"), (leaf,)
        return int(rows[0][0])

    return [await store._read(plan(receipt_facts(t).leaf)) for t in tokens]


async def _turn_row(tlog: TransparencyLog) -> tuple[Any, ...]:
    store: Any = tlog._store

    def plan() -> Any:
        rows = yield "SELECT holder, at, payment_id, kind, checked FROM tlog_recovery", ()
        return tuple(rows[0])

    return await store._read(plan())


async def _taken_over(tlog: TransparencyLog) -> None:
    """Ask for the turn until the holder's lease has run out (bounded)."""
    async with asyncio.timeout(20):
        while not await tlog.recovery.take_turn():
            await asyncio.sleep(0.1)


def _scraped(metrics: Metrics) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.render(in_flight=0).decode())
        for s in family.samples
        if not s.labels
    }


async def test_one_process_scans_a_ledger_while_the_others_only_ask(location):
    tokens = await _keep(location, range(1, 4))
    async with _log(location, "r1") as one, _log(location, "r2") as two:
        await one.start([b"genesis"])
        assert await one.recovery.take_turn()
        assert not await two.recovery.take_turn()
        assert await one.recovery.take_turn()  # renewed by its holder
        assert not await two.recovery.take_turn()
        assert (one.recovery.holding, two.recovery.holding) == (True, False)
        assert (await one.recovery.pass_once()).recorded == 3
        await one.recovery.keep_place()
        assert await _counts(one, tokens) == [1, 1, 1]


async def test_a_dead_holders_successor_goes_on_from_its_place(location):
    """r1 reads two of four receipts, keeps its place and dies (nothing more from it); once its
    lease has run out r2 takes the turn and reads the other two: not the first two again."""
    tokens = await _keep(location, range(1, 5))
    async with _log(location, "r1", batch=2, interval=0.2) as one:
        await one.start([b"genesis"])
        assert await one.recovery.take_turn()
        assert (await one.recovery.pass_once()).recorded == 2
        await one.recovery.keep_place()
        place = one.recovery.after
        async with _log(location, "r2", batch=2) as two:
            assert not await two.recovery.take_turn()  # its lease still runs
            await _taken_over(two)
            assert two.recovery.after == place
            done = await two.recovery.pass_once()
            assert (done.read, done.recorded) == (2, 2)
            assert (await two.recovery.pass_once()).read == 0
            assert await _counts(two, tokens) == [1, 1, 1, 1]
        # (r1's close, late: the turn is not its own any more, so it hands nothing over.)


async def test_a_clean_stop_hands_the_turn_over_at_once(location):
    await _keep(location, range(1, 2))
    async with _log(location, "r1") as one:
        await one.start([b"genesis"])
        assert await one.recovery.take_turn()
        await one.recovery.pass_once()
        await one.recovery.keep_place()
    async with _log(location, "r2") as two:
        assert await two.recovery.take_turn()  # its lease had hours to run
        assert two.recovery.after is not None  # and it goes on from r1's place


async def test_a_holder_frozen_past_its_lease_cannot_move_its_successors_place(location):
    tokens = await _keep(location, range(1, 4))
    async with (
        _log(location, "r1", batch=1, interval=0.2) as one,
        _log(location, "r2", batch=1) as two,
    ):
        await one.start([b"genesis"])
        assert await one.recovery.take_turn()
        await _taken_over(two)  # r1 froze: its lease ran out
        for _ in range(2):
            await two.recovery.pass_once()
            await two.recovery.keep_place()
        kept = await _turn_row(two)
        assert kept[0] == "r2"
        # r1 wakes in its pass: it reads from its own (older) place and records nothing twice.
        await one.recovery.pass_once()
        await one.recovery.keep_place()
        assert await _turn_row(two) == kept  # its successor's place, not moved back
        assert not await one.recovery.take_turn()
        assert not one.recovery.holding
        await two.recovery.pass_once()
        assert await _counts(two, tokens) == [1, 1, 1]


async def test_every_process_reports_the_ledgers_scan_and_whether_it_holds_the_turn(location):
    await _keep(location, range(1, 3))
    holder, other = Metrics(), Metrics()
    async with (
        _log(location, "r1", events=holder) as one,
        _log(location, "r2", events=other) as two,
    ):
        await one.start([b"genesis"])
        assert await one.recovery.take_turn()
        await one.recovery.pass_once()
        await one.recovery.keep_place()
        assert not await two.recovery.take_turn()
    scanning, asking = _scraped(holder), _scraped(other)
    assert (scanning["paygate_tlog_recovery_holding"], asking["paygate_tlog_recovery_holding"]) == (
        1,
        0,
    )
    assert scanning["paygate_tlog_recovered_receipts_total"] == 2
    assert asking["paygate_tlog_recovery_scan_seconds_count"] == 0  # it never scanned
    # The ledger's scan, as its holder kept it: the same checked time, a lag near 0.
    assert (
        asking["paygate_tlog_recovery_checked_timestamp_seconds"]
        == scanning["paygate_tlog_recovery_checked_timestamp_seconds"]
    )
    assert asking["paygate_tlog_recovery_lag_seconds"] < 30


async def _metrics(stack: Any) -> dict[str, float]:
    async with stack.client.get(stack.url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


async def test_two_gateways_on_one_ledger_scan_it_once(tmp_path):
    settings = gateway_settings(tmp_path, log_recovery_grace=0)
    location = LedgerLocation(kind="sqlite", path=settings["ledger_path"])
    tokens = await _keep(location, range(1, 4))
    async with (
        running_stack(**settings, replica_id="gw-a") as a,
        running_stack(**settings, replica_id="gw-b") as b,
    ):
        async with asyncio.timeout(30):
            while True:
                seen = [await _metrics(a), await _metrics(b)]
                if sum(m.get("paygate_tlog_recovered_receipts_total", 0) for m in seen) == 3:
                    break
                await asyncio.sleep(0.1)
    holding = [m["paygate_tlog_recovery_holding"] for m in seen]
    assert sorted(holding) == [0, 1]
    idle = seen[holding.index(0)]
    assert idle["paygate_tlog_recovery_scan_seconds_count"] == 0
    assert idle["paygate_tlog_recovered_receipts_total"] == 0
    async with _log(location, "reader") as reader:
        assert await _counts(reader, tokens) == [1, 1, 1]


async def test_a_failed_ask_for_the_turn_is_counted_and_no_longer_claims_the_turn(location):
    """A store that fails at the turn's own write (down, locked): the recovery loop counts it
    as a failure (what an operator alerts on) and stops saying it holds the turn, which another
    process takes once the lease runs out."""
    metrics = Metrics()
    async with _log(location, "r1", events=metrics) as one:
        await one.start([b"genesis"])
        assert await one.recovery.take_turn()
        assert _scraped(metrics)["paygate_tlog_recovery_holding"] == 1
        asked = asyncio.Event()

        async def fails(*args: Any, **kwargs: Any) -> Any:
            asked.set()
            raise LogStoreError("the log store failed: OperationalError")

        store: Any = one._store
        store.recovery_turn = fails
        task = asyncio.create_task(one.recovery.run())
        try:
            await asyncio.wait_for(asked.wait(), 10)
            await asyncio.sleep(0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        seen = _scraped(metrics)
        assert seen["paygate_tlog_recovery_failures_total"] == 1
        assert seen["paygate_tlog_recovery_holding"] == 0
        assert not one.recovery.holding
