"""The log on the ledger's PostgreSQL database, shared by every replica.

Appends take ``pg_advisory_xact_lock`` (released with the transaction, so a replica that dies
mid-append holds nothing): replicas append one after another, never to the same index, never
leaving a gap. A small pool of its own, configured like the ledger's (libpq conninfo, lock
timeout); the connection string is never quoted in an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from enclave.tlog import merkle, tiles
from enclave.tlog.checkpoint import Checkpoint
from paygate.tlog.store import (
    APPEND_LOCK,
    Appended,
    LogOriginMismatch,
    LogStoreError,
    NoteSigner,
    OpenReceipt,
    PeriodEntry,
    ReceiptPeriod,
    StoredCheckpoint,
    adrive,
    check_entries,
    completed_tiles,
    root_flow,
)

try:
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - reported by open()
    psycopg = None  # type: ignore[assignment]

logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
T = TypeVar("T")
Conn = Any


class PostgresLogStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._closed = False

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
        # Appends wait for each other on the advisory lock: allow them longer than a row lock.
        settings = f"SET lock_timeout = {int(lock_timeout * 1000)}"

        async def configure(conn: Conn) -> None:
            await conn.execute(settings)
            await conn.commit()

        kwargs: dict[str, Any] = {"row_factory": dict_row, "connect_timeout": max(1, int(timeout))}
        if password is not None:
            kwargs["password"] = password
        pool = AsyncConnectionPool(
            conninfo,
            kwargs=kwargs,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            timeout=timeout,
            configure=configure,
            check=AsyncConnectionPool.check_connection,
            name="paygate-tlog",
        )
        try:
            await pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            await pool.close()
            raise LogStoreError("cannot connect to the PostgreSQL log store in time") from None
        return cls(pool)

    async def _run(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        if self._closed:
            raise LogStoreError("the log store is closed")
        task = asyncio.get_running_loop().create_task(self._transaction(fn, *args))
        return await asyncio.shield(task)

    async def _transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await fn(conn, *args)
        except PoolTimeout:
            raise LogStoreError("no PostgreSQL log store connection free in time") from None
        except psycopg.Error as exc:
            state = f" ({exc.sqlstate})" if exc.sqlstate else ""
            raise LogStoreError(
                f"the PostgreSQL log store failed: {type(exc).__name__}{state}"
            ) from None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close()

    # --- the log ---------------------------------------------------------------------------

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
        async def insert(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO tlog_receipts (leaf, amount, replica, issued_at)"
                " VALUES (%s, %s, %s, %s)",
                (leaf, amount, replica, issued_at),
            )

        await self._run(insert)

    async def latest(self) -> StoredCheckpoint | None:
        return await self._run(_checkpoint, None)

    async def checkpoint(self, size: int) -> StoredCheckpoint | None:
        return await self._run(_checkpoint, size)

    async def set_cosignatures(self, size: int, lines: str) -> None:
        async def update(conn: Conn) -> None:
            await conn.execute(
                "UPDATE tlog_checkpoints SET cosignatures = %s WHERE size = %s", (lines, size)
            )

        await self._run(update)

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        return await self._run(_tile, level, index, width)

    async def bundle(self, index: int, width: int) -> list[bytes] | None:
        async def read(conn: Conn) -> list[bytes] | None:
            start = index * tiles.WIDTH
            rows = await (
                await conn.execute(
                    "SELECT data FROM tlog_entries WHERE idx >= %s AND idx < %s ORDER BY idx",
                    (start, start + width),
                )
            ).fetchall()
            return [bytes(r["data"]) for r in rows] if len(rows) == width else None

        return await self._run(read)

    async def receipt_period(self, leaf: bytes) -> ReceiptPeriod | None:
        async def read(conn: Conn) -> ReceiptPeriod | None:
            row = await (
                await conn.execute(
                    "SELECT entry, position FROM tlog_receipts"
                    " WHERE leaf = %s AND entry IS NOT NULL ORDER BY seq LIMIT 1",
                    (leaf,),
                )
            ).fetchone()
            if row is None:
                return None
            leaves = await (
                await conn.execute(
                    "SELECT leaf FROM tlog_receipts WHERE entry = %s ORDER BY position",
                    (row["entry"],),
                )
            ).fetchall()
            return ReceiptPeriod(
                int(row["entry"]), int(row["position"]), tuple(bytes(r["leaf"]) for r in leaves)
            )

        return await self._run(read)


async def _checkpoint(conn: Conn, size: int | None) -> StoredCheckpoint | None:
    query = "SELECT size, root, note, cosignatures FROM tlog_checkpoints"
    if size is None:
        cursor = await conn.execute(query + " ORDER BY size DESC LIMIT 1")
    else:
        cursor = await conn.execute(query + " WHERE size = %s", (size,))
    row = await cursor.fetchone()
    if row is None:
        return None
    return StoredCheckpoint(int(row["size"]), bytes(row["root"]), row["note"], row["cosignatures"])


async def _tile(conn: Conn, level: int, index: int, width: int) -> bytes | None:
    start = index * tiles.WIDTH
    rows = await (
        await conn.execute(
            "SELECT hash FROM tlog_hashes WHERE level = %s AND idx >= %s AND idx < %s ORDER BY idx",
            (level, start, start + width),
        )
    ).fetchall()
    return b"".join(bytes(r["hash"]) for r in rows) if len(rows) == width else None


async def _claim_origin(conn: Conn, origin: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    row = await (await conn.execute("SELECT origin FROM tlog_meta WHERE id = 1")).fetchone()
    if row is None:
        await conn.execute("INSERT INTO tlog_meta (id, origin) VALUES (1, %s)", (origin,))
    elif row["origin"] != origin:
        raise LogOriginMismatch("the ledger store holds the log of another origin")


async def _append(conn: Conn, entries: list[bytes], sign: NoteSigner, replica: str) -> Appended:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    row = await (
        await conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) AS size FROM tlog_entries")
    ).fetchone()
    old = int(row["size"])
    now = await (await conn.execute("SELECT extract(epoch FROM now()) AS t")).fetchone()
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO tlog_entries (idx, data, replica, created_at) VALUES (%s, %s, %s, %s)",
            [(old + i, data, replica, float(now["t"])) for i, data in enumerate(entries)],
        )
        await cursor.executemany(
            "INSERT INTO tlog_hashes (level, idx, hash) VALUES (0, %s, %s)",
            [(old + i, merkle.leaf_hash(data)) for i, data in enumerate(entries)],
        )
    new = old + len(entries)
    level = 1
    while new >> (tiles.HEIGHT * level):
        for index in completed_tiles(old, new, level):
            below = await _tile(conn, level - 1, index, tiles.WIDTH)
            assert below is not None
            await conn.execute(
                "INSERT INTO tlog_hashes (level, idx, hash) VALUES (%s, %s, %s)",
                (level, index, tiles.hash_tile(tiles.split_hashes(below, tiles.WIDTH))),
            )
        level += 1

    async def fetch(ref: tiles.TileRef) -> bytes:
        return await _tile(conn, ref.level or 0, ref.index, ref.width) or b""

    root = await adrive(root_flow(new), fetch)
    origin = await (await conn.execute("SELECT origin FROM tlog_meta WHERE id = 1")).fetchone()
    if origin is None:
        raise LogStoreError("the log has no origin yet")
    # A key backend call (a TPM or token round trip): off the event loop, still under the lock.
    loop = asyncio.get_running_loop()
    signed = await loop.run_in_executor(None, sign, Checkpoint(origin["origin"], new, root))
    await conn.execute(
        "INSERT INTO tlog_checkpoints (size, root, note, created_at) VALUES (%s, %s, %s, %s)",
        (new, root, signed, float(now["t"])),
    )
    return Appended(old, StoredCheckpoint(new, root, signed))


async def _append_receipts(
    conn: Conn, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
) -> Appended | None:
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    rows = await (
        await conn.execute(
            "SELECT seq, leaf, amount, issued_at FROM tlog_receipts WHERE entry IS NULL"
            " ORDER BY seq LIMIT %s FOR UPDATE",
            (limit,),
        )
    ).fetchall()
    if not rows:
        return None
    period = [
        OpenReceipt(int(r["seq"]), bytes(r["leaf"]), int(r["amount"]), float(r["issued_at"]))
        for r in rows
    ]
    appended = await _append(conn, [build(period)], sign, replica)  # the lock is re-entrant
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "UPDATE tlog_receipts SET entry = %s, position = %s WHERE seq = %s",
            [(appended.first, position, r.seq) for position, r in enumerate(period)],
        )
    return appended
