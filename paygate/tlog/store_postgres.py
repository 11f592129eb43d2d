"""The log on the ledger's PostgreSQL database, shared by every replica.

Appends take ``pg_advisory_xact_lock`` (released with the transaction, so a replica that dies
mid-append holds nothing): replicas append one after another, never to the same index, never
leaving a gap. A small pool of its own, configured like the ledger's (libpq conninfo, lock
timeout); the connection string is never quoted in an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from enclave.tlog.checkpoint import Checkpoint
from paygate.postgres import (
    Conn,
    PoolCalls,
    PoolTimeout,
    connect_kwargs,
    fetch_all,
    fetch_one,
    open_pool,
    psycopg,
)
from paygate.statements import Query
from paygate.tlog.store import (
    APPEND_LOCK,
    Appended,
    LogStoreError,
    NoteSigner,
    PeriodEntry,
    ReceiptPeriod,
    StoredCheckpoint,
    check_entries,
)
from paygate.tlog.store_rules import HashRows, LogQueries, append_flow

T = TypeVar("T")
SQL = LogQueries("%s", lock_rows=" FOR UPDATE")


class PostgresLogStore:
    def __init__(self, pool: Any) -> None:
        self._calls = PoolCalls(
            pool, error=_error, closed=lambda: LogStoreError("the log store is closed")
        )

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        password: str | None = None,
        pool_size: int = 2,
        timeout: float = 10.0,
        lock_timeout: float = 30.0,
    ) -> PostgresLogStore:
        if psycopg is None:
            raise LogStoreError("the PostgreSQL log needs psycopg: pip install 'paygate[postgres]'")
        try:
            pool = await open_pool(
                conninfo,
                connect_kwargs(password, timeout),
                name="paygate-tlog",
                pool_size=pool_size,
                timeout=timeout,
                # Appends wait for each other on the advisory lock: longer than a row lock.
                lock_timeout=lock_timeout,
            )
        except PoolTimeout:
            raise LogStoreError("cannot connect to the PostgreSQL log store in time") from None
        return cls(pool)

    async def _run(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        return await self._calls.run(fn, *args)

    async def close(self) -> None:
        await self._calls.close()

    # --- the log: the statements of store_rules, one transaction each (rows as tuples) -----

    async def claim_origin(self, origin: str) -> None:
        await self._run(_claim_origin, origin)

    async def append(self, entries: Sequence[bytes], sign: NoteSigner, replica: str) -> Appended:
        check_entries(entries)
        return await self._run(_append, list(entries), sign, replica)

    async def append_receipts(
        self, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
    ) -> Appended | None:
        return await self._run(_append_receipts, build, sign, replica, limit)

    async def record_receipt(
        self, leaf: bytes, amount: int, replica: str, issued_at: float
    ) -> None:
        await self._run(_execute, SQL.record_receipt(leaf, amount, replica, issued_at))

    async def latest(self) -> StoredCheckpoint | None:
        return SQL.checkpoint_of(await self._run(fetch_one, SQL.checkpoint(None)))

    async def checkpoint(self, size: int) -> StoredCheckpoint | None:
        return SQL.checkpoint_of(await self._run(fetch_one, SQL.checkpoint(size)))

    async def set_cosignatures(self, size: int, lines: str) -> None:
        await self._run(_execute, SQL.set_cosignatures(size, lines))

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        return await self._run(_tile, level, index, width)

    async def bundle(self, index: int, width: int) -> list[bytes] | None:
        return SQL.bundle_of(await self._run(fetch_all, SQL.bundle(index, width)), width)

    async def receipt_period(self, leaf: bytes) -> ReceiptPeriod | None:
        return await self._run(_receipt_period, leaf)


def _error(exc: Exception) -> LogStoreError:
    """What failed, never the server's message (it may quote the host, the user or data)."""
    if isinstance(exc, PoolTimeout):
        return LogStoreError("no PostgreSQL log store connection free in time")
    state = f" ({exc.sqlstate})" if isinstance(exc, psycopg.Error) and exc.sqlstate else ""
    return LogStoreError(f"the PostgreSQL log store failed: {type(exc).__name__}{state}")


async def _execute(conn: Conn, query: Query) -> None:
    await conn.execute(*query)


async def _tile(conn: Conn, level: int, index: int, width: int) -> bytes | None:
    return SQL.tile_of(await fetch_all(conn, SQL.tile(level, index, width)), width)


async def _claim_origin(conn: Conn, origin: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    claim = SQL.claim_origin(await fetch_one(conn, (SQL.origin, ())), origin)
    if claim is not None:
        await conn.execute(*claim)


async def _append(conn: Conn, entries: list[bytes], sign: NoteSigner, replica: str) -> Appended:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    size = await fetch_one(conn, (SQL.size, ()))
    old = int(size[0]) if size is not None else 0
    clock = await fetch_one(conn, ("SELECT extract(epoch FROM now()) AS t", ()))
    now = float(clock[0]) if clock is not None else 0.0
    async with conn.cursor() as cursor:
        await cursor.executemany(SQL.insert_entry, SQL.entries(old, entries, replica, now))
    flow = append_flow(old, entries)
    try:
        step = next(flow)
        while True:
            if isinstance(step, HashRows):
                async with conn.cursor() as cursor:
                    await cursor.executemany(SQL.insert_hash, step.rows)
                step = flow.send(b"")
            else:
                tile = await _tile(conn, step.level or 0, step.index, step.width)
                step = flow.send(tile or b"")
    except StopIteration as done:
        root: bytes = done.value
    new = old + len(entries)
    origin = SQL.origin_of(await fetch_one(conn, (SQL.origin, ())))
    # A key backend call (a TPM or token round trip): off the event loop, still under the lock.
    loop = asyncio.get_running_loop()
    signed = await loop.run_in_executor(None, sign, Checkpoint(origin, new, root))
    await conn.execute(*SQL.insert_checkpoint(new, root, signed, now))
    return Appended(old, StoredCheckpoint(new, root, signed))


async def _append_receipts(
    conn: Conn, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
) -> Appended | None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    period = [SQL.open_receipt_of(r) for r in await fetch_all(conn, SQL.open_receipts(limit))]
    if not period:
        return None
    appended = await _append(conn, [build(period)], sign, replica)  # the lock is re-entrant
    async with conn.cursor() as cursor:
        await cursor.executemany(SQL.close_receipts, SQL.closed(appended.first, period))
    return appended


async def _receipt_period(conn: Conn, leaf: bytes) -> ReceiptPeriod | None:
    row = await fetch_one(conn, SQL.receipt_entry(leaf))
    if row is None:
        return None
    return SQL.period_of(row, await fetch_all(conn, SQL.period_leaves(row[0])))
