"""`paygate ledger copy` moves every table of the ledger, on real stores (SQLite files and the
PostgreSQL the tests start): SQLite -> PostgreSQL -> SQLite keeps every row of every table
(receipts, idempotency keys, the free quota and sign-in key, economics and console tables, the
transparency log with its roots, batch-settlement channels); a second copy copies nothing; a
conflicting target is refused before anything is written; schemas must match; and the copy's
table list is the migrated schema's, on both stores.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from paygate.economics.open_store import economics_store
from paygate.economics.store import LimitEvent
from paygate.tlog.store_sqlite import SqliteLogStore
from paygate.x402.ledger import FreeAddressUsed, ReceiptUsage
from paygate.x402.ledger_copy import NOT_COPIED, STORE_OWN, TABLES, Store, _canon
from paygate.x402.ledger_sqlite_schema import MIGRATIONS
from paygate.x402.ledger_store import LedgerLocation, open_ledger, parse_ledger_url

ROOT = Path(__file__).resolve().parents[4]
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
SIGNATURE = "0x" + "5a" * 65
RECEIPT = "eyJhbGciOiJFUzI1NksifQ.receipt-body.sig"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
    )


def sign(checkpoint: Any) -> str:
    return f"example.test/log\n{checkpoint.size}\n{checkpoint.root.hex()}\n\n— test note\n"


async def fill(path: Path) -> bytes:
    """A SQLite ledger holding a row in every table, through the stores' own APIs; the tlog's
    root."""
    ledger = await open_ledger(LedgerLocation(kind="sqlite", path=path), replica="filler")
    try:
        for n in range(3):
            record = await ledger.reserve(
                network="eip155:84532",
                asset=USDC,
                payer=PAYER,
                nonce=f"0x{n + 1:064x}",
                pay_to=PAY_TO,
                amount=10**30 + n,  # beyond 64 bits: kept as text / numeric(78)
                x402_version=2,
                route="chat.completions",
                payload=f'{{"payload": {{"signature": "{SIGNATURE}"}}}}',
                requirements="{}",
                idempotency_key=f"payment-identifier-{n:04d}",
                model="llama",
            )
            await ledger.mark_served(record.id)
            usage = ReceiptUsage(tokens_in=12, tokens_out=34, source="upstream")
            await ledger.add_receipt(record.id, "reply", f"{RECEIPT}{n}", usage=usage)
        assert await ledger.take_free(
            payer=PAYER,
            nonce="signin-1",
            day="2025-01-02",
            limit=3,
            address="ad" * 32,
            address_limit=3,
        )
        await ledger.signin_key()
        economics = economics_store(ledger)
        await economics.record_tokens(payer=PAYER, model="llama", tokens_in=5, tokens_out=7)
        await economics.record_limit_event(
            LimitEvent(1.5e9, "tokens", "*", PAYER, "llama", True, "over")
        )
        assert await economics.claim_alert("alert-1")
        await economics.put_login("ab" * 32, 2e9)
        # A batch-settlement channel, a voucher and a claim (opening one needs the chain).
        await ledger.scheme_sql_all(  # type: ignore[attr-defined]
            [
                (
                    "INSERT INTO bs_channels VALUES (?, 'eip155:84532', ?, '{}', ?, '0', ?,"
                    " ?, ?, NULL, NULL, 3, 1.7e9, 42, 1700000000, '9000', 1700000900.5,"
                    " ?, 1699999990)",
                    # read at block 42 (ledger v14; its hash and time, v17); its payer's
                    # withdrawal pending (v16)
                    (
                        "0x" + "c1" * 32,
                        PAYER,
                        str(10**25),
                        "500",
                        "800",
                        SIGNATURE,
                        "0x" + "b4" * 32,
                    ),
                ),
                (  # the withdrawal scan's place (its block's hash and time: v17)
                    "INSERT INTO bs_scan VALUES (1, 4242, NULL, ?, 1699999999)",
                    ("0x" + "b5" * 32,),
                ),
                (
                    "INSERT INTO bs_vouchers VALUES (?, '800', ?, 'pay-1', '300', 1.7e9, 1)",
                    ("0x" + "c1" * 32, SIGNATURE),
                ),
                (
                    "INSERT INTO bs_claims VALUES ('claim-1', 'pending', '[]', NULL, NULL,"
                    " NULL, 1.7e9, 1.7e9)",
                    (),
                ),
            ]
        )
    finally:
        await ledger.close()
    log = await SqliteLogStore.open(path)
    try:
        await log.claim_origin("example.test/log")
        await log.append([b"leaf one", b"leaf two", b"leaf three"], sign, "filler")
        appended = await log.append([f"leaf {i}".encode() for i in range(300)], sign, "filler")
        await log.set_cosignatures(appended.checkpoint.size, "— witness sig\n")
        await log.record_receipt(b"\x01" * 32, 1000, "filler", 1.7e9)
        await log.recovery_turn("filler", 60.0)  # the recovery's turn and its kept place
        await log.save_recovery("filler", (1.7e9, "pay-1", "reply"), 1.7e9)
        return appended.checkpoint.root
    finally:
        await log.close()


async def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every copied table's rows (the columns both stores share), in key order, canonical."""
    location = parse_ledger_url(url)
    ledger = await open_ledger(location, migrate=False, replica="check")
    try:
        store = Store(ledger, location.kind)
        out = {}
        for table in TABLES:
            columns = [
                c for c in await store.columns(table.name) if (table.name, c) not in STORE_OWN
            ]
            rows = await store.query(
                f"SELECT {', '.join(columns)} FROM {table.name}"  # noqa: S608 - test constants
                f" ORDER BY {', '.join(table.key)}"
            )
            out[table.name] = [tuple(_canon(v) for v in row) for row in rows]
        return out
    finally:
        await ledger.close()


async def latest_root(path: Path) -> tuple[int, bytes, str]:
    log = await SqliteLogStore.open(path)
    try:
        latest = await log.latest()
        assert latest is not None
        return latest.size, latest.root, latest.served()
    finally:
        await log.close()


def test_copy_sqlite_to_postgresql_to_sqlite_keeps_every_table(tmp_path: Path, pg_url: str) -> None:
    first, last = tmp_path / "a" / "payments.db", tmp_path / "b" / "payments.db"
    root = asyncio.run(fill(first))
    a, b = f"sqlite:///{first}", f"sqlite:///{last}"
    for url in (pg_url, b):
        assert cli("ledger", "migrate", "--ledger-url", url).returncode == 0

    there = cli("ledger", "copy", "--from", a, "--to", pg_url)
    assert there.returncode == 0, there.stderr
    back = cli("ledger", "copy", "--from", pg_url, "--to", b)
    assert back.returncode == 0, back.stderr
    source = asyncio.run(dump(a))
    assert all(source[t.name] for t in TABLES), [t.name for t in TABLES if not source[t.name]]
    assert asyncio.run(dump(pg_url)) == source
    assert asyncio.run(dump(b)) == source
    rows = sum(len(r) for r in source.values())
    assert there.stdout.splitlines()[-1] == f"copied {rows} rows (0 already there)"
    assert "  tlog_hashes: " in there.stdout
    assert "  bs_channels: 1 copied" in there.stdout

    # The log's tree and checkpoints are the same: same root, and it extends at the target.
    size, copied_root, note = asyncio.run(latest_root(last))
    assert (size, copied_root) == (303, root)
    assert note.endswith("— witness sig\n")

    async def extend() -> None:
        log = await SqliteLogStore.open(last)
        try:
            appended = await log.append([b"after the move"], sign, "new")
            assert appended.first == 303
            assert (await log.checkpoint(303)).root == root  # type: ignore[union-attr]
        finally:
            await log.close()

    asyncio.run(extend())

    # Twice: nothing copied, everything reported as already there.
    again = cli("ledger", "copy", "--from", a, "--to", pg_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == f"copied 0 rows ({rows} already there)"

    for output in (there, back, again):
        assert pg_url not in output.stdout + output.stderr
        assert SIGNATURE[2:12] not in output.stdout + output.stderr
        assert RECEIPT not in output.stdout + output.stderr

    # The target gateway's store works on: new rows after the copied ones (PostgreSQL's
    # sequences were moved past the copied values).
    async def use_target() -> None:
        ledger = await open_ledger(parse_ledger_url(pg_url), replica="after")
        try:
            economics = economics_store(ledger)
            await economics.record_tokens(payer=PAYER, model="llama", tokens_in=1, tokens_out=1)
            assert (
                await ledger.take_free(payer=PAYER, nonce="signin-2", day="2025-01-02", limit=3)
                == 1
            )
            # The address's count came along: its one free request of the day is used.
            with pytest.raises(FreeAddressUsed):
                await ledger.take_free(
                    payer=PAYER,
                    nonce="signin-3",
                    day="2025-01-02",
                    limit=3,
                    address="ad" * 32,
                    address_limit=1,
                )
        finally:
            await ledger.close()

    asyncio.run(use_target())


def test_a_conflicting_target_is_refused_and_nothing_is_written(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "payments.db"
    asyncio.run(fill(path))

    async def own_key() -> bytes:  # the target made its own sign-in key
        ledger = await open_ledger(parse_ledger_url(pg_url), replica="other")
        try:
            return await ledger.signin_key()
        finally:
            await ledger.close()

    asyncio.run(own_key())
    refused = cli("ledger", "copy", "--from", f"sqlite:///{path}", "--to", pg_url)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error [ledger_conflict]"), refused.stderr
    assert "signin_key" in refused.stderr
    assert "Traceback" not in refused.stderr
    after = asyncio.run(dump(pg_url))
    # signin_key comes after payments in the copy's order: nothing was half-written.
    assert after["payments"] == []
    assert after["receipts"] == []
    assert len(after["signin_key"]) == 1

    # A different tlog entry under the same index (a fork) is refused the same way.
    other, first = tmp_path / "other.db", tmp_path / "first.db"
    for copy in (other, first):
        assert cli("ledger", "migrate", "--ledger-url", f"sqlite:///{copy}").returncode == 0
        done = cli("ledger", "copy", "--from", f"sqlite:///{path}", "--to", f"sqlite:///{copy}")
        assert done.returncode == 0, done.stderr
    db = sqlite3.connect(other)
    db.execute("UPDATE tlog_entries SET data = ? WHERE idx = 0", (b"forked",))
    db.commit()
    db.close()
    fork = cli("ledger", "copy", "--from", f"sqlite:///{other}", "--to", f"sqlite:///{first}")
    assert fork.returncode == 2
    assert "tlog_entries" in fork.stderr
    assert "forked" not in fork.stderr


def test_schemas_must_match(tmp_path: Path, pg_url: str) -> None:
    old = tmp_path / "v7.db"
    db = sqlite3.connect(old)
    for step in range(1, 8):
        for statement in MIGRATIONS[step]:
            db.execute(statement)
    db.execute(
        "CREATE TABLE ledger_schema (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " version INTEGER NOT NULL, migrated_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO ledger_schema VALUES (1, 7, 1700000000.0)")
    db.commit()
    db.close()
    assert cli("ledger", "migrate", "--ledger-url", pg_url).returncode == 0
    for args in (
        ("--from", f"sqlite:///{old}", "--to", pg_url),
        ("--from", pg_url, "--to", f"sqlite:///{old}"),
    ):
        refused = cli("ledger", "copy", *args)
        assert refused.returncode == 2
        assert "v7" in refused.stderr
        assert "paygate ledger migrate" in refused.stderr
    # Not migrated by the copy either.
    assert sqlite3.connect(old).execute("SELECT version FROM ledger_schema").fetchone() == (7,)


def test_the_copy_covers_every_table_and_key_of_the_schema_on_both_stores(
    tmp_path: Path, pg_url: str
) -> None:
    async def schema(url: str) -> tuple[set[str], dict[str, tuple[str, ...]]]:
        location = parse_ledger_url(url)
        ledger = await open_ledger(location, replica="check")
        try:
            store = Store(ledger, location.kind)
            tables = await store.tables() - NOT_COPIED
            keys = {}
            for name in tables:
                if location.kind == "sqlite":
                    rows = await store.query(
                        "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", (name,)
                    )
                else:
                    rows = await store.query(
                        "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
                        " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                        " WHERE i.indrelid = ?::regclass AND i.indisprimary"
                        " ORDER BY array_position(i.indkey, a.attnum)",
                        (name,),
                    )
                keys[name] = tuple(r[0] for r in rows)
            return tables, keys
        finally:
            await ledger.close()

    expected = {t.name: t.key for t in TABLES}
    for url in (f"sqlite:///{tmp_path / 'p.db'}", pg_url):
        tables, keys = asyncio.run(schema(url))
        assert tables == set(expected)
        assert keys == expected

    # Every unique index of the SQLite schema is a key the copy checks.
    db = sqlite3.connect(tmp_path / "p.db")
    for table in TABLES:
        for _, index, unique, origin, _ in db.execute(f"PRAGMA index_list({table.name})"):
            if unique and origin != "pk":
                columns = tuple(r[2] for r in db.execute(f"PRAGMA index_info({index})"))
                assert columns in table.unique, (table.name, columns)
    db.close()
