"""The log on the ledger's SQLite file: one worker thread owns a connection of its own; every
append is one ``BEGIN IMMEDIATE`` transaction (the file's write lock across processes)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from enclave.tlog.checkpoint import Checkpoint
from paygate.tlog.store import (
    Appended,
    LogStoreError,
    NoteSigner,
    PeriodEntry,
    ReceiptPeriod,
    StoredCheckpoint,
    check_entries,
)
from paygate.tlog.store_rules import HashRows, LogQueries, append_flow
from paygate.x402.ledger_commit import GroupCommit
from paygate.x402.ledger_worker import worker_call

T = TypeVar("T")
SQL = LogQueries("?", amounts_as_text=True)


class SqliteLogStore:
    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        # Group commit (paygate.x402.ledger_commit): the receipt leaves recorded by concurrent
        # replies share one COMMIT (one fsync); each caller still waits for its own.
        self._commits = GroupCommit("paygate-tlog", _lost)
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, busy_timeout: float = 5.0) -> SqliteLogStore:
        store = cls(path, busy_timeout)
        try:
            await store._run(store._connect, alone=True)
        except BaseException:
            await store.close()
            raise
        return store

    async def _run(self, fn: Callable[..., T], /, *args: Any, alone: bool = False) -> T:
        if self._closed:
            raise _closed()
        return await worker_call(self._commits, _closed, self._guarded, fn, *args, alone=alone)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise LogStoreError(f"the log store failed: {type(exc).__name__}") from None

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        db.execute("PRAGMA synchronous = FULL")
        self._db = db

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise _closed()
        return self._db

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """All or nothing, under the write lock (a savepoint in its group's transaction)."""
        with self._commits.transaction(self._conn) as db:
            return fn(db, *args)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self._run(self._disconnect, alone=True)
        finally:
            self._closed = True
            self._commits.stop()

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- the log: the statements of store_rules, run in one write transaction each ------

    async def claim_origin(self, origin: str) -> None:
        await self._run(self._write, _claim_origin, origin)

    async def append(self, entries: Sequence[bytes], sign: NoteSigner, replica: str) -> Appended:
        check_entries(entries)
        return await self._run(self._write, _append, list(entries), sign, replica)

    async def append_receipts(
        self, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
    ) -> Appended | None:
        return await self._run(self._write, _append_receipts, build, sign, replica, limit)

    async def record_receipt(
        self, leaf: bytes, amount: int, replica: str, issued_at: float
    ) -> None:
        query = SQL.record_receipt(leaf, amount, replica, issued_at)
        await self._run(self._write, lambda db: db.execute(*query))

    async def latest(self) -> StoredCheckpoint | None:
        return await self._run(self._checkpoint, None)

    async def checkpoint(self, size: int) -> StoredCheckpoint | None:
        return await self._run(self._checkpoint, size)

    def _checkpoint(self, size: int | None) -> StoredCheckpoint | None:
        return SQL.checkpoint_of(self._conn.execute(*SQL.checkpoint(size)).fetchone())

    async def set_cosignatures(self, size: int, lines: str) -> None:
        query = SQL.set_cosignatures(size, lines)
        await self._run(self._write, lambda db: db.execute(*query))

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        return await self._run(_tile, self._conn, level, index, width)

    async def bundle(self, index: int, width: int) -> list[bytes] | None:
        query = SQL.bundle(index, width)
        rows = await self._run(lambda: self._conn.execute(*query).fetchall())
        return SQL.bundle_of(rows, width)

    async def receipt_period(self, leaf: bytes) -> ReceiptPeriod | None:
        return await self._run(_receipt_period, self._conn, leaf)


def _tile(db: sqlite3.Connection, level: int, index: int, width: int) -> bytes | None:
    return SQL.tile_of(db.execute(*SQL.tile(level, index, width)).fetchall(), width)


def _claim_origin(db: sqlite3.Connection, origin: str) -> None:
    claim = SQL.claim_origin(db.execute(SQL.origin).fetchone(), origin)
    if claim is not None:
        db.execute(*claim)


def _append(
    db: sqlite3.Connection, entries: list[bytes], sign: NoteSigner, replica: str
) -> Appended:
    old = int(db.execute(SQL.size).fetchone()[0])
    now = time.time()
    db.executemany(SQL.insert_entry, SQL.entries(old, entries, replica, now))
    flow = append_flow(old, entries)
    try:
        step = next(flow)
        while True:
            if isinstance(step, HashRows):
                db.executemany(SQL.insert_hash, step.rows)
                step = flow.send(b"")
            else:
                step = flow.send(_tile(db, step.level or 0, step.index, step.width) or b"")
    except StopIteration as done:
        root: bytes = done.value
    new = old + len(entries)
    signed = sign(Checkpoint(SQL.origin_of(db.execute(SQL.origin).fetchone()), new, root))
    db.execute(*SQL.insert_checkpoint(new, root, signed, now))
    return Appended(old, StoredCheckpoint(new, root, signed))


def _append_receipts(
    db: sqlite3.Connection, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
) -> Appended | None:
    period = [SQL.open_receipt_of(r) for r in db.execute(*SQL.open_receipts(limit)).fetchall()]
    if not period:
        return None
    appended = _append(db, [build(period)], sign, replica)
    db.executemany(SQL.close_receipts, SQL.closed(appended.first, period))
    return appended


def _receipt_period(db: sqlite3.Connection, leaf: bytes) -> ReceiptPeriod | None:
    row = db.execute(*SQL.receipt_entry(leaf)).fetchone()
    if row is None:
        return None
    return SQL.period_of(row, db.execute(*SQL.period_leaves(row[0])).fetchall())


def _closed() -> LogStoreError:
    return LogStoreError("the log store is closed")


def _lost(exc: sqlite3.Error) -> LogStoreError:
    """The error of a call whose group's transaction did not commit."""
    return LogStoreError(f"the log store failed: {type(exc).__name__}")
