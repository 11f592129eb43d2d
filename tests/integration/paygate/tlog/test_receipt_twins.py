"""A receipt's leaf recorded in the log once (schema step 15: the unique key on
``tlog_receipts (leaf, twin)``), on both stores (SQLite file, PostgreSQL 15).

- a second record of a leaf (a process frozen past the recovery grace) is ignored at its insert,
  before any cut; recovery's record of a leaf the log has adds nothing, and is not counted as
  recovered when the leaf's record lands between recovery's check and its insert;
- a v14 log already holding twins migrates: the open twins go, the twins a published period
  counts stay (its root, count and every receipt's inclusion proof unchanged), each leaf is
  recorded once from then on, and the next period counts only what was never counted;
- a v13 ledger (main before this session's two steps) takes steps 14 and 15 in one migration:
  its channels' readings are ordered from then on, its log's open twins go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from enclave import SoftwareKey, receipts
from enclave.tlog import entries, merkle
from paygate.tlog.open_store import open_log_store
from paygate.tlog.service import LogConfig, TransparencyLog, receipt_facts
from paygate.tlog.store import MissingReceipt
from paygate.tlog.store_rules import record_missing_plan
from paygate.x402.ledger_store import LedgerLocation, open_ledger, parse_ledger_url
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig
from paygate.x402.schemes.batch_settlement.store import ChannelStore
from tests.fixtures.ledger_support import BEFORE_V15
from tests.fixtures.tlog_support import ORIGIN

KEY = SoftwareKey.generate()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerLocation:
    if request.param == "sqlite":
        return LedgerLocation(kind="sqlite", path=tmp_path / "payments.db")
    return parse_ledger_url(request.getfixturevalue("pg_url"))


def _token(n: int, charged: int) -> str:
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
            "authorized": str(charged),
            "charged": str(charged),
            "prices": None,
            "transaction": "pending",
        },
        "issued_at": 1_700_000_000 + n,
    }
    return receipts.sign(claims, KEY)


async def _opened(location: LedgerLocation) -> TransparencyLog:
    store = await open_log_store(location)
    return TransparencyLog(LogConfig(origin=ORIGIN, replica="r1"), store, KEY)


def _sql(*statements: tuple[str, tuple[Any, ...]]) -> Any:
    """A plan of raw statements (``?`` placeholders); the rows of the last."""
    rows: Any = []
    for text, params in statements:
        rows = yield text, params
    return rows


async def _run(tlog: TransparencyLog, *statements: tuple[str, tuple[Any, ...]]) -> Any:
    store: Any = tlog._store
    marked = [(store.SQL._sql(text), params) for text, params in statements]
    return await store._write(_sql(*marked))


async def _rows(tlog: TransparencyLog) -> list[tuple[bytes, int | None, int]]:
    """(leaf, entry, twin) of every record, in seq order."""
    rows = await _run(tlog, ("SELECT leaf, entry, twin FROM tlog_receipts ORDER BY seq", ()))
    return [(bytes(r[0]), r[1], int(r[2])) for r in rows]


async def _last_entry(tlog: TransparencyLog) -> dict[str, Any]:
    latest = await tlog._store.latest()
    assert latest is not None
    bundle = await tlog._store.bundle(0, latest.size)
    assert bundle is not None
    return entries.parse(bundle[-1])


async def test_a_second_record_of_a_leaf_is_ignored_at_its_insert(location):
    tlog = await _opened(location)
    try:
        await tlog.start([b"genesis"])
        token = _token(1, 500)
        await tlog.record_receipt(token)
        await tlog.record_receipt(token)  # the frozen process, woken: no error, no second row
        leaf = receipt_facts(token).leaf
        assert await _rows(tlog) == [(leaf, None, 0)]
        again = MissingReceipt(leaf, 500, 1.0)
        assert await tlog._store.record_missing([again], "r2") == 0
        assert len(await _rows(tlog)) == 1
    finally:
        await tlog.close()


def _raced(sql: Any, missing: list[MissingReceipt]) -> Any:
    """Recovery's record, with the frozen request path's record of the same leaf landing just
    before recovery's insert (on PostgreSQL the request path does not take the append lock, so
    it can commit between recovery's check and its insert; here in the same transaction)."""
    plan = record_missing_plan(sql, missing, "r2")
    request = next(plan)
    raced = False
    while True:
        if not raced and isinstance(request, tuple) and "INSERT INTO tlog_receipts" in request[0]:
            raced = True
            first = missing[0]
            yield sql.record_receipt(first.leaf, first.amount, "r1", first.issued_at)
        answer = yield request
        try:
            request = plan.send(answer)
        except StopIteration as done:
            return done.value


async def test_a_record_ignored_at_its_insert_is_not_counted_as_recovered(location):
    """The count is what recovery's metric and its warning report: a receipt the request path
    recorded after all is not one recovery recorded."""
    tlog = await _opened(location)
    try:
        await tlog.start([b"genesis"])
        first, second = (receipt_facts(_token(n, 500)) for n in (1, 2))
        missing = [MissingReceipt(f.leaf, f.amount, f.issued_at) for f in (first, second)]
        store: Any = tlog._store
        assert await store._write(_raced(store.SQL, missing)) == 1  # the second only
        assert [leaf for leaf, _, _ in await _rows(tlog)] == [first.leaf, second.leaf]
    finally:
        await tlog.close()


async def _back_to_v14(tlog: TransparencyLog) -> None:
    """The log as schema v14 left it: no ``twin`` column, the plain index on the leaf."""
    back = [(statement, ()) for statement in BEFORE_V15]
    await _run(tlog, *back, ("UPDATE ledger_schema SET version = 14 WHERE id = 1", ()))


async def test_a_v14_log_holding_twins_migrates_without_touching_a_published_period(
    location, monkeypatch
):
    a, b, c = (_token(n, 100 * n) for n in (1, 2, 3))
    leaf_a, leaf_b, leaf_c = (receipt_facts(t).leaf for t in (a, b, c))
    tlog = await _opened(location)
    try:
        await tlog.start([b"genesis"])
        await _back_to_v14(tlog)
        store: Any = tlog._store
        amount = (lambda n: str(n)) if store.SQL.amounts_as_text else (lambda n: n)

        def record(leaf: bytes, n: int) -> tuple[str, tuple[Any, ...]]:
            return (
                "INSERT INTO tlog_receipts (leaf, amount, replica, issued_at)"
                " VALUES (?, ?, 'v13', ?)",
                (leaf, amount(n), 1_700_000_000.0),
            )

        # A release before the cut dropped twins: A, B and A's twin in one published period.
        await _run(tlog, record(leaf_a, 100), record(leaf_b, 200), record(leaf_a, 100))
        monkeypatch.setattr(store.SQL, "drop_recorded_again", "SELECT 1")
        old_open = store.SQL._sql(
            "SELECT seq, leaf, amount, issued_at FROM tlog_receipts WHERE entry IS NULL"
            " ORDER BY seq LIMIT ?"
        )
        monkeypatch.setattr(store.SQL, "open_receipts", lambda limit: (old_open, (limit,)))
        assert await tlog.append_period() is not None
        published = await _last_entry(tlog)
        assert (published["count"], published["charged"]) == (3, "400")
        monkeypatch.undo()
        # Then, open: A again (its period is published), C twice.
        await _run(tlog, record(leaf_a, 100), record(leaf_c, 300), record(leaf_c, 300))
        held = await _run(tlog, ("SELECT COUNT(*) FROM tlog_receipts", ()))
        assert held[0][0] == 6
    finally:
        await tlog.close()

    ledger = await open_ledger(location, migrate=True, pool_size=1)
    try:
        assert ledger.found_version == 14  # type: ignore[attr-defined]
    finally:
        await ledger.close()

    tlog = await _opened(location)
    try:
        rows = await _rows(tlog)
        entry = rows[0][1]
        assert entry is not None
        # The open twins are gone; the published period's records all stay, A's twin marked.
        assert [(leaf, e, twin > 0) for leaf, e, twin in rows] == [
            (leaf_a, entry, False),
            (leaf_b, entry, False),
            (leaf_a, entry, True),
            (leaf_c, None, False),
        ]
        # The published period still proves its receipts against its root.
        period = await tlog._store.receipt_period(leaf_b)
        assert period is not None
        assert period.leaves == (leaf_a, leaf_b, leaf_a)
        assert merkle.LeafList(list(period.leaves)).root().hex() == published["root"]
        assert (await tlog._store.receipt_period(leaf_a)).position == 0  # type: ignore[union-attr]
        # From now on each leaf is recorded once: A, B and C again change nothing.
        for token in (a, b, c):
            await tlog.record_receipt(token)
        assert len(await _rows(tlog)) == 4
        # The next period counts C alone (A's and B's charges are counted already).
        assert await tlog.append_period() is not None
        after = await _last_entry(tlog)
        assert (after["count"], after["charged"]) == (1, "300")
        assert await tlog.append_period() is None
    finally:
        await tlog.close()


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


async def test_a_v13_ledger_takes_steps_14_and_15_in_one_migration(location):
    """Both steps of this schema at once, from v13 with a channel and an open twin: the channel
    keeps its balance, its reading block unknown (0: the next reading counts, and one older
    than that changes nothing); the twin goes; the log records each leaf once."""
    a, b = _token(1, 100), _token(2, 200)
    leaf_a = receipt_facts(a).leaf
    tlog = await _opened(location)
    try:
        await tlog.start([b"genesis"])
        ledger = await open_ledger(location, migrate=True, pool_size=1)
        try:
            channels = ChannelStore(ledger, clock=lambda: 1_000.0, pending_seconds=30.0)
            await channels.deposited(
                CHANNEL, "eip155:84532", CONFIG, balance=1_000, total_claimed=0, block=7
            )
        finally:
            await ledger.close()
        await _back_to_v14(tlog)
        record = (
            "INSERT INTO tlog_receipts (leaf, amount, replica, issued_at) VALUES (?, ?, 'v13', ?)",
            (leaf_a, "100" if tlog._store.SQL.amounts_as_text else 100, 1_700_000_000.0),  # type: ignore[attr-defined]
        )
        await _run(
            tlog,
            record,
            record,
            ("ALTER TABLE bs_channels DROP COLUMN read_block", ()),
            ("UPDATE ledger_schema SET version = 13 WHERE id = 1", ()),
        )
    finally:
        await tlog.close()

    ledger = await open_ledger(location, migrate=True, pool_size=1)
    try:
        assert ledger.found_version == 13  # type: ignore[attr-defined]
        channels = ChannelStore(ledger, clock=lambda: 2_000.0, pending_seconds=30.0)
        channel = await channels.get(CHANNEL)
        assert channel is not None
        assert (channel.balance, channel.read_block) == (1_000, 0)
        await channels.refunded(CHANNEL, 900, 0, block=5)
        await channels.refunded(CHANNEL, 800, 0, block=4)  # read before it: changes nothing
        channel = await channels.get(CHANNEL)
        assert channel is not None
        assert (channel.balance, channel.read_block) == (900, 5)
    finally:
        await ledger.close()

    tlog = await _opened(location)
    try:
        assert await _rows(tlog) == [(leaf_a, None, 0)]
        for token in (a, b, a):
            await tlog.record_receipt(token)
        assert [leaf for leaf, _, _ in await _rows(tlog)] == [leaf_a, receipt_facts(b).leaf]
    finally:
        await tlog.close()
