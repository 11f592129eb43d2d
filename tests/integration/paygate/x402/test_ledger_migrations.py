"""Schema migrations and moving stores, through the operator CLI on real stores.

- from an empty store (SQLite and PostgreSQL 15) to the current schema;
- from v9 with records, on both stores, to the current schema (step 10: two payment indexes
  fewer): every record, its history and receipts kept and readable, the queries that used those
  indexes still answered;
- from v10 with channel vouchers, on both stores, to v11: each voucher's charge marked where
  it can be proven (tests/unit/.../batch_settlement/test_batch_settlement_store.py);
- from v10 with records, on both stores, to v12 (a paid request's history in its own row): every
  record and history kept, the old records' new moves after their old lines, new records' in
  their row;
- from the SQLite schema as it stood on main when leases came (v1, commit 425e611): records kept,
  unfinished work claimable, the history starting there;
- `paygate ledger copy` from that SQLite file to PostgreSQL, twice (the second copies nothing;
  every table: tests/integration/paygate/x402/test_ledger_copy.py);
- `paygate payments --ledger-url` on PostgreSQL, with the history; URLs and passwords never shown.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from paygate.config import load_settings
from paygate.x402 import ledger_rules
from paygate.x402.ledger import (
    Budget,
    BudgetExceeded,
    EventAction,
    Meter,
    PaymentState,
    ReceiptUsage,
)
from paygate.x402.ledger_postgres import PostgresLedger
from paygate.x402.ledger_sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from paygate.x402.ledger_store import open_ledger, parse_ledger_url
from tests.fixtures.ledger_support import BEFORE_V15, request, tx
from tests.fixtures.ledgers import Opener

ROOT = Path(__file__).resolve().parents[4]
S = PaymentState
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
SIGNATURE = "0x" + "5a" * 65


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}, **env},
    )


def v1_ledger(path: Path) -> dict[str, str]:
    """A ledger file exactly as main's v1 code leaves it: its schema (migration step 1, never
    edited since) and rows as it wrote them: one settled, one owed (SERVED), one reserved."""
    db = sqlite3.connect(path)
    try:
        for statement in MIGRATIONS[1]:
            db.execute(statement)
        db.execute(
            "CREATE TABLE ledger_schema (id INTEGER PRIMARY KEY CHECK (id = 1),"
            " version INTEGER NOT NULL, migrated_at REAL NOT NULL)"
        )
        db.execute("INSERT INTO ledger_schema VALUES (1, 1, 1700000000.0)")
        ids = {}
        for n, (state, served, tx) in enumerate(
            [("settled", 1, "0x" + "cd" * 32), ("served", 1, None), ("reserved", 0, None)], 1
        ):
            ids[state] = f"{n:032x}"
            db.execute(
                "INSERT INTO payments (id, network, asset, payer, nonce, pay_to, amount,"
                " x402_version, route, state, served, payload, requirements, idempotency_key,"
                " tx_hash, error, attempts, created_at, updated_at)"
                " VALUES (?, 'eip155:84532', ?, ?, ?, ?, '1000', 2, 'chat.completions', ?, ?,"
                " ?, '{}', NULL, ?, NULL, ?, ?, ?)",
                (
                    ids[state],
                    USDC,
                    PAYER,
                    f"0x{n:064x}",
                    PAY_TO,
                    state,
                    served,
                    json.dumps({"payload": {"signature": SIGNATURE}}),
                    tx,
                    1 if tx else 0,
                    1700000000.0 + n,
                    1700000000.0 + n,
                ),
            )
        db.commit()
    finally:
        db.close()
    return ids


def test_migrate_from_main_s_sqlite_v1_and_from_empty_stores(tmp_path: Path, pg_url: str) -> None:
    old = tmp_path / "v1.db"
    ids = v1_ledger(old)
    url = f"sqlite:///{old}"

    # A v1 file is refused read-only (never migrated by a reader), migrated on request.
    listed = cli("payments", "list", "--ledger-url", url)
    assert listed.returncode == 2
    assert f"v1, not v{SCHEMA_VERSION}" in listed.stderr
    first = cli("ledger", "migrate", "--ledger-url", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"ledger sqlite:///{old}: schema v1 -> v{SCHEMA_VERSION}"
    again = cli("ledger", "migrate", "--ledger-url", url)
    assert again.stdout.strip().endswith(f"schema v{SCHEMA_VERSION}, up to date")

    async def check() -> None:
        ledger = await open_ledger(parse_ledger_url(url), replica="after")
        try:
            records = {r.id: r for r in await ledger.list()}
            assert {r.state for r in records.values()} == {S.SETTLED, S.SERVED, S.RESERVED}
            assert all(
                (r.owner, r.lease, r.lease_until) == (None, 0, None) for r in records.values()
            )
            assert records[ids["settled"]].transaction == "0x" + "cd" * 32
            # Unowned: the first reconcile pass takes the owed one, start-up releases the other.
            (owed,) = await ledger.claim_unfinished(min_age=0)
            assert (owed.id, owed.owner, owed.lease) == (ids["served"], "after", 1)
            (released,) = await ledger.release_abandoned(own=True)
            assert released.id == ids["reserved"]
            assert [e.action for e in await ledger.history(ids["served"])] == [EventAction.CLAIMED]
        finally:
            await ledger.close()

    asyncio.run(check())

    empty = tmp_path / "new" / "payments.db"
    fresh = cli("ledger", "migrate", "--ledger-url", f"sqlite:///{empty}")
    assert fresh.stdout.strip().endswith(f"schema v0 -> v{SCHEMA_VERSION}"), fresh.stderr
    pg = cli("ledger", "migrate", "--ledger-url", pg_url)
    assert pg.returncode == 0, pg.stderr
    assert pg.stdout.strip() == (
        f"ledger postgresql (PAYGATE_LEDGER_URL): schema v0 -> v{SCHEMA_VERSION}"
    )
    assert cli("ledger", "migrate", PAYGATE_LEDGER_URL=pg_url).stdout.strip().endswith("up to date")


def test_copy_from_sqlite_to_postgresql_keeps_every_record_and_its_history(
    tmp_path: Path, pg_url: str
) -> None:
    old = tmp_path / "v1.db"
    ids = v1_ledger(old)
    source = f"sqlite:///{old}"
    assert cli("ledger", "migrate", "--ledger-url", source).returncode == 0
    assert cli("ledger", "migrate", "--ledger-url", pg_url).returncode == 0
    copied = cli("ledger", "copy", "--from", source, "--to", pg_url)
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.splitlines()[0] == (
        f"ledger copy from sqlite:///{old} to postgresql (PAYGATE_LEDGER_URL):"
    )
    assert "  payments: 3 copied, 0 already there" in copied.stdout
    twice = cli("ledger", "copy", "--to", pg_url, PAYGATE_LEDGER_PATH=str(old))
    assert "  payments: 0 copied, 3 already there" in twice.stdout
    assert twice.stdout.splitlines()[-1].startswith("copied 0 rows")

    async def both() -> tuple[list, list]:
        out = []
        for url in (source, pg_url):
            ledger = await open_ledger(parse_ledger_url(url), read_only=True, replica="check")
            try:
                out.append(await ledger.list())
            finally:
                await ledger.close()
        return out[0], out[1]

    before, after = asyncio.run(both())
    assert after == before  # every field, payload included

    shown = cli("payments", "show", ids["served"], "--json", "--ledger-url", pg_url)
    assert shown.returncode == 0, shown.stderr
    facts = json.loads(shown.stdout)
    assert (facts["state"], facts["owner"]) == ("served", None)
    assert facts["history"] == []  # v1 kept none; the copy adds none
    table = cli("payments", "list", PAYGATE_LEDGER_URL=pg_url)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 4
    for output in (copied, twice, shown, table):
        assert pg_url not in output.stdout + output.stderr
        assert SIGNATURE[2:12] not in output.stdout


def test_ledger_urls_and_passwords_are_never_shown(tmp_path: Path) -> None:
    secret = "s3cret-Pa55word"
    unreachable = f"postgresql://paygate:{secret}@127.0.0.1:9/paygate"
    for args in (
        ("ledger", "migrate", "--ledger-url", unreachable),
        ("payments", "list", "--ledger-url", unreachable),
    ):
        out = cli(*args)
        assert out.returncode == 2
        assert out.stderr.startswith("error [ledger_unavailable]"), out.stderr
        assert secret not in out.stderr + out.stdout
        assert "127.0.0.1:9" not in out.stderr
        assert "Traceback" not in out.stderr
    bad = cli("ledger", "migrate", PAYGATE_LEDGER_URL=f"mysql://u:{secret}@h/db")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error [config_error]")
    assert secret not in bad.stderr
    relative = cli("ledger", "migrate", "--ledger-url", "sqlite:///relative.db")
    assert "four slashes" in relative.stderr


def test_the_password_comes_from_a_file_or_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://paygate@db.internal/paygate"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert load_settings(None, ledger_url=url).ledger_location().password is None
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ledger_password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    location = load_settings(None, ledger_url=url).ledger_location()
    assert (location.kind, location.password) == ("postgresql", "from-credential")
    (tmp_path / "pw").write_text("from-file\n")
    settings = load_settings(None, ledger_url=url, ledger_password_file=tmp_path / "pw")
    location = settings.ledger_location()
    assert location.password == "from-file"
    assert "from-file" not in repr(location) + location.describe() + repr(settings)
    assert "db.internal" not in repr(location) + location.describe() + repr(settings)
    # The URL wins over the path; the path alone is SQLite.
    assert load_settings(None, ledger_path=tmp_path / "x.db").ledger_location().path == (
        tmp_path / "x.db"
    )


async def as_v10(ledger: object) -> None:
    """Take a store written by this code back to schema v10 as v10 would have left it: every
    history line in payment_events (each payment's in its order), no ``history`` column (step
    12), no ``bs_vouchers.charged`` column (step 11), no ``bs_channels.read_block`` (step 14)."""
    run = ledger.scheme_sql  # type: ignore[attr-defined]
    _, held = await run(
        "SELECT id, history FROM payments WHERE history IS NOT NULL ORDER BY created_at", ()
    )
    for payment_id, history in held:
        for e in ledger_rules.inline_events(payment_id, history):
            await run(
                "INSERT INTO payment_events (payment_id, at, replica, action, state, lease)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (e.payment_id, e.at, e.replica, e.action.value, e.state.value, e.lease),
            )
    await run("ALTER TABLE payments DROP COLUMN history", ())
    await run("ALTER TABLE bs_vouchers DROP COLUMN charged", ())  # step 11's
    for statement in BEFORE_V15:  # step 15's (re-run from v10)
        await run(statement, ())
    await run("ALTER TABLE bs_channels DROP COLUMN read_block", ())  # step 14's
    await run("UPDATE ledger_schema SET version = 10 WHERE id = 1", ())


async def test_a_v10_ledger_with_records_migrates_to_v12_and_keeps_every_record(
    ledger_store: Opener,
) -> None:
    ledger = await ledger_store(replica="v10")
    settled = await ledger.reserve(**request(1))
    settled = await ledger.transition(settled.id, S.SETTLING, via=S.VERIFIED, lease=settled.lease)
    settled = await ledger.transition(
        settled.id, S.SETTLED, lease=settled.lease, transaction=tx(1), settled_amount=900
    )
    served = await ledger.reserve(**request(2))
    served = await ledger.transition(
        served.id, S.SERVED, via=S.VERIFIED, lease=served.lease, let_go=True
    )
    released = await ledger.reserve(**request(3))
    released = await ledger.transition(released.id, S.RELEASED, lease=released.lease)
    reserved = await ledger.reserve(**request(4))
    before = {r.id: r for r in await ledger.list()}
    ids = [settled.id, served.id, released.id, reserved.id]
    histories = {i: await ledger.history(i) for i in ids}
    assert [len(histories[i]) for i in ids] == [4, 3, 2, 1]
    await as_v10(ledger)  # (read back through v10's own table below, once migrated)
    await ledger.close()

    migrated = await ledger_store(replica="v12")
    assert migrated.found_version == 10  # type: ignore[attr-defined]
    assert {r.id: r for r in await migrated.list()} == before
    assert {i: await migrated.history(i) for i in ids} == histories
    _, rows = await migrated.scheme_sql("SELECT COUNT(*) FROM payments WHERE history IS NULL", ())
    assert rows[0][0] == 4  # the old rows' history stays where it was
    # An old reservation served now: its new lines follow its old ones, in payment_events.
    done = await migrated.transition(
        reserved.id, S.SERVED, via=S.VERIFIED, lease=reserved.lease, let_go=True
    )
    lines = [(e.replica, e.action, e.state) for e in await migrated.history(done.id)]
    assert lines == [
        ("v10", EventAction.RESERVED, S.RESERVED),
        ("v12", EventAction.MOVED, S.VERIFIED),
        ("v12", EventAction.MOVED, S.SERVED),
    ]
    # A released authorization reserved again: its history goes on where it is.
    again = await migrated.reserve(**request(3))
    assert [e.action for e in await migrated.history(again.id)][-1] is EventAction.RESERVED
    assert len(await migrated.history(again.id)) == 3
    # A new payment's ordinary course is kept in its own row.
    fresh = await migrated.reserve(**request(5))
    await migrated.transition(fresh.id, S.SERVED, via=S.VERIFIED, lease=fresh.lease)
    assert [e.state for e in await migrated.history(fresh.id)] == [S.RESERVED, S.VERIFIED, S.SERVED]
    _, rows = await migrated.scheme_sql(
        "SELECT COUNT(*) FROM payment_events WHERE payment_id = ?", (fresh.id,)
    )
    assert rows[0][0] == 0
    await migrated.close()


# The indexes step 10 drops, as v9 had them (their released statements).
V9_ONLY = {
    "payments_lease": next(s for s in MIGRATIONS[2] if "payments_lease" in s),
    "payments_payer": next(s for s in MIGRATIONS[3] if "payments_payer " in s),
}


async def _indexes(ledger: object) -> set[str]:
    if isinstance(ledger, PostgresLedger):
        sql = "SELECT indexname FROM pg_indexes WHERE tablename = 'payments'"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'payments'"
    _, rows = await ledger.scheme_sql(sql, ())  # type: ignore[attr-defined]
    return {row[0] for row in rows}


async def test_a_v9_ledger_with_records_migrates_to_v10_and_keeps_every_record(
    ledger_store: Opener,
) -> None:
    ledger = await ledger_store(replica="v9")
    settled = await ledger.reserve(**request(1, idempotency_key="payment-identifier-1"))
    for to in (S.VERIFIED, S.SETTLING):
        settled = await ledger.transition(settled.id, to, lease=settled.lease)
    settled = await ledger.transition(
        settled.id, S.SETTLED, lease=settled.lease, transaction=tx(1), settled_amount=900
    )
    await ledger.add_receipt(settled.id, "reply", "token-1", usage=ReceiptUsage(3, 4, "upstream"))
    served = await ledger.reserve(**request(2, model="m"))
    served = await ledger.transition(
        served.id,
        S.SERVED,
        via=S.VERIFIED,
        lease=served.lease,
        let_go=True,
        meter=Meter(tokens_in=5, tokens_out=6, source="upstream", settle_amount=700),
    )
    released = await ledger.reserve(**request(3))
    released = await ledger.transition(released.id, S.RELEASED, lease=released.lease)
    reserved = await ledger.reserve(**request(4))
    before = {r.id: r for r in await ledger.list()}
    ids = [settled.id, served.id, released.id, reserved.id]
    histories = {i: await ledger.history(i) for i in ids}
    receipts = await ledger.receipts(settled.id)
    # The store as v9 left it: the two indexes back (their released statements), v9 recorded.
    await as_v10(ledger)
    for statement in V9_ONLY.values():
        await ledger.scheme_sql(statement, ())
    await ledger.scheme_sql("UPDATE ledger_schema SET version = 9 WHERE id = 1", ())
    assert set(V9_ONLY) <= await _indexes(ledger)
    await ledger.close()

    migrated = await ledger_store(replica="v9")
    assert migrated.found_version == 9  # type: ignore[attr-defined]
    assert not set(V9_ONLY) & await _indexes(migrated)
    assert {r.id: r for r in await migrated.list()} == before
    assert [await migrated.get(i) for i in ids] == [before[i] for i in ids]
    assert {i: await migrated.history(i) for i in ids} == histories
    assert await migrated.receipts(settled.id) == receipts
    assert await migrated.by_idempotency_key("payment-identifier-1") == before[settled.id]
    assert [r.id for r in await migrated.by_nonce(request(2)["nonce"])] == [served.id]
    # What the dropped indexes served: a payer's spend (budgets), the sweeps by state.
    spent = 900 + 700 + 1000  # settled (what moved), served (its meter), reserved
    with pytest.raises(BudgetExceeded):
        await migrated.reserve(**request(5), budget=Budget(limit=spent + 999, since=0.0))
    fifth = await migrated.reserve(**request(5), budget=Budget(limit=spent + 1000, since=0.0))
    assert [r.id for r in await migrated.unfinished()] == [served.id]
    gone = await migrated.release_abandoned(own=True)
    assert [r.id for r in gone] == [reserved.id, fifth.id]
