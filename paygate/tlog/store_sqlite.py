"""The log on the ledger's SQLite file: one worker thread owns a connection of its own; every
append is one ``BEGIN IMMEDIATE`` transaction (the file's write lock across processes). The
calls are :class:`paygate.tlog.store_rules.QueryLogStore`'s plans, run here."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from enclave.tlog.tiles import drive
from paygate.tlog.errors import LogStoreError
from paygate.tlog.store_rules import LogQueries, Plan, QueryLogStore, SignCheckpoint, route
from paygate.x402.ledger_commit import GroupCommit
from paygate.x402.ledger_worker import worker_call

T = TypeVar("T")


class SqliteLogStore(QueryLogStore):
    SQL = LogQueries("?", amounts_as_text=True)

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

    # --- the plans of store_rules, on the worker thread ----------------------------------

    async def _read(self, plan: Plan[T]) -> T:
        return await self._run(lambda: _drive(self._conn, plan))

    async def _write(self, plan: Plan[T]) -> T:
        return await self._run(self._in_write, plan)

    def _in_write(self, plan: Plan[T]) -> T:
        """All or nothing, under the write lock (a savepoint in its group's transaction)."""
        with self._commits.transaction(self._conn) as db:
            return _drive(db, plan)


def _drive(db: sqlite3.Connection, plan: Plan[T]) -> T:
    """Run a plan on this thread (its checkpoint signed here too, under the write lock)."""
    answer = partial(
        route,
        rows=lambda query: db.execute(*query).fetchall(),
        many=db.executemany,
        sign=SignCheckpoint.signed,
    )
    return drive(plan, answer)


def _closed() -> LogStoreError:
    return LogStoreError("the log store is closed")


def _lost(exc: sqlite3.Error) -> LogStoreError:
    """The error of a call whose group's transaction did not commit."""
    return LogStoreError(f"the log store failed: {type(exc).__name__}")
