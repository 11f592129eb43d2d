"""The log on the ledger's SQLite file: one worker thread owns a connection of its own; every
append is one ``BEGIN IMMEDIATE`` transaction (the file's write lock across processes)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from enclave.tlog import merkle, tiles
from enclave.tlog.checkpoint import Checkpoint
from paygate.tlog.store import (
    Appended,
    LogOriginMismatch,
    LogStoreError,
    NoteSigner,
    OpenReceipt,
    PeriodEntry,
    ReceiptPeriod,
    StoredCheckpoint,
    check_entries,
    completed_tiles,
    root_flow,
)
from paygate.x402.ledger_commit import GroupCommit

T = TypeVar("T")


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
            raise LogStoreError("the log store is closed")
        try:
            future = self._commits.submit(self._guarded, fn, *args, alone=alone)
        except RuntimeError:  # the worker stopped
            raise LogStoreError("the log store is closed") from None
        result: T = await asyncio.shield(future)
        return result

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
            raise LogStoreError("the log store is closed")
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

    # --- the log ---------------------------------------------------------------------------

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
        await self._run(self._write, _record_receipt, leaf, str(amount), replica, issued_at)

    async def latest(self) -> StoredCheckpoint | None:
        return await self._run(self._checkpoint, None)

    async def checkpoint(self, size: int) -> StoredCheckpoint | None:
        return await self._run(self._checkpoint, size)

    def _checkpoint(self, size: int | None) -> StoredCheckpoint | None:
        query = "SELECT size, root, note, cosignatures FROM tlog_checkpoints"
        if size is None:
            row = self._conn.execute(query + " ORDER BY size DESC LIMIT 1").fetchone()
        else:
            row = self._conn.execute(query + " WHERE size = ?", (size,)).fetchone()
        return StoredCheckpoint(row[0], bytes(row[1]), row[2], row[3]) if row else None

    async def set_cosignatures(self, size: int, lines: str) -> None:
        await self._run(
            self._write,
            lambda db: db.execute(
                "UPDATE tlog_checkpoints SET cosignatures = ? WHERE size = ?", (lines, size)
            ),
        )

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        return await self._run(_tile, self._conn, level, index, width)

    async def bundle(self, index: int, width: int) -> list[bytes] | None:
        start = index * tiles.WIDTH
        rows = await self._run(
            lambda: self._conn.execute(
                "SELECT data FROM tlog_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, start + width),
            ).fetchall()
        )
        return [bytes(r[0]) for r in rows] if len(rows) == width else None

    async def receipt_period(self, leaf: bytes) -> ReceiptPeriod | None:
        return await self._run(_receipt_period, self._conn, leaf)


def _tile(db: sqlite3.Connection, level: int, index: int, width: int) -> bytes | None:
    start = index * tiles.WIDTH
    rows = db.execute(
        "SELECT hash FROM tlog_hashes WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx",
        (level, start, start + width),
    ).fetchall()
    return b"".join(bytes(r[0]) for r in rows) if len(rows) == width else None


def _claim_origin(db: sqlite3.Connection, origin: str) -> None:
    row = db.execute("SELECT origin FROM tlog_meta WHERE id = 1").fetchone()
    if row is None:
        db.execute("INSERT INTO tlog_meta (id, origin) VALUES (1, ?)", (origin,))
    elif row[0] != origin:
        raise LogOriginMismatch("the ledger store holds the log of another origin")


def _size(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM tlog_entries").fetchone()[0])


def _append(
    db: sqlite3.Connection, entries: list[bytes], sign: NoteSigner, replica: str
) -> Appended:
    old = _size(db)
    now = time.time()
    for offset, data in enumerate(entries):
        db.execute(
            "INSERT INTO tlog_entries (idx, data, replica, created_at) VALUES (?, ?, ?, ?)",
            (old + offset, data, replica, now),
        )
        db.execute(
            "INSERT INTO tlog_hashes (level, idx, hash) VALUES (0, ?, ?)",
            (old + offset, merkle.leaf_hash(data)),
        )
    new = old + len(entries)
    level = 1
    while new >> (tiles.HEIGHT * level):
        for index in completed_tiles(old, new, level):
            below = _tile(db, level - 1, index, tiles.WIDTH)
            assert below is not None
            db.execute(
                "INSERT INTO tlog_hashes (level, idx, hash) VALUES (?, ?, ?)",
                (level, index, tiles.hash_tile(tiles.split_hashes(below, tiles.WIDTH))),
            )
        level += 1
    root = tiles.drive(
        root_flow(new), lambda ref: _tile(db, ref.level or 0, ref.index, ref.width) or b""
    )
    origin = db.execute("SELECT origin FROM tlog_meta WHERE id = 1").fetchone()
    if origin is None:
        raise LogStoreError("the log has no origin yet")
    signed = sign(Checkpoint(origin[0], new, root))
    db.execute(
        "INSERT INTO tlog_checkpoints (size, root, note, created_at) VALUES (?, ?, ?, ?)",
        (new, root, signed, now),
    )
    return Appended(old, StoredCheckpoint(new, root, signed))


def _append_receipts(
    db: sqlite3.Connection, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
) -> Appended | None:
    rows = db.execute(
        "SELECT seq, leaf, amount, issued_at FROM tlog_receipts WHERE entry IS NULL"
        " ORDER BY seq LIMIT ?",
        (limit,),
    ).fetchall()
    if not rows:
        return None
    period = [OpenReceipt(r[0], bytes(r[1]), int(r[2]), r[3]) for r in rows]
    appended = _append(db, [build(period)], sign, replica)
    db.executemany(
        "UPDATE tlog_receipts SET entry = ?, position = ? WHERE seq = ?",
        [(appended.first, position, r.seq) for position, r in enumerate(period)],
    )
    return appended


def _record_receipt(
    db: sqlite3.Connection, leaf: bytes, amount: str, replica: str, issued_at: float
) -> None:
    db.execute(
        "INSERT INTO tlog_receipts (leaf, amount, replica, issued_at) VALUES (?, ?, ?, ?)",
        (leaf, amount, replica, issued_at),
    )


def _receipt_period(db: sqlite3.Connection, leaf: bytes) -> ReceiptPeriod | None:
    row = db.execute(
        "SELECT entry, position FROM tlog_receipts WHERE leaf = ? AND entry IS NOT NULL"
        " ORDER BY seq LIMIT 1",
        (leaf,),
    ).fetchone()
    if row is None:
        return None
    leaves = db.execute(
        "SELECT leaf FROM tlog_receipts WHERE entry = ? ORDER BY position", (row[0],)
    ).fetchall()
    return ReceiptPeriod(row[0], row[1], tuple(bytes(r[0]) for r in leaves))


def _lost(exc: sqlite3.Error) -> LogStoreError:
    """The error of a call whose group's transaction did not commit."""
    return LogStoreError(f"the log store failed: {type(exc).__name__}")
