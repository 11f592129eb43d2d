"""The log on the ledger's PostgreSQL database, shared by every replica.

Appends take ``pg_advisory_xact_lock`` (released with the transaction, so a replica that dies
mid-append holds nothing): replicas append one after another, never to the same index, never
leaving a gap. A small pool of its own, configured like the ledger's (libpq conninfo, lock
timeout); the connection string is never quoted in an error. The calls are
:class:`paygate.tlog.store_rules.QueryLogStore`'s plans, run here, one transaction each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from functools import partial
from typing import Any, TypeVar

from paygate.postgres import (
    Conn,
    PoolCalls,
    PoolTimeout,
    connect_kwargs,
    open_pool,
    psycopg,
    values,
)
from paygate.statements import Query
from paygate.tlog.errors import LogStoreError
from paygate.tlog.store import adrive
from paygate.tlog.store_rules import LogQueries, Plan, QueryLogStore, SignCheckpoint, route

T = TypeVar("T")


class PostgresLogStore(QueryLogStore):
    SQL = LogQueries(
        "%s",
        lock_rows=" FOR UPDATE",
        clock="SELECT extract(epoch FROM now()) AS t",
        advisory_lock=True,
        returning=True,
    )

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

    async def close(self) -> None:
        await self._calls.close()

    # --- the plans of store_rules, one transaction each ----------------------------------

    async def _read(self, plan: Plan[T]) -> T:
        return await self._calls.run(_drive, plan)

    _write = _read  # the advisory lock is the plans' own


async def _drive(conn: Conn, plan: Plan[T]) -> T:
    loop = asyncio.get_running_loop()

    async def rows(query: Query) -> list[tuple[Any, ...]]:
        cursor = await conn.execute(*query)
        return [values(row) for row in await cursor.fetchall()] if cursor.description else []

    async def many(sql: str, params: list[tuple[Any, ...]]) -> None:
        async with conn.cursor() as cursor:
            await cursor.executemany(sql, params)

    def sign(request: SignCheckpoint) -> Awaitable[str]:
        # A key backend call (a TPM or token round trip): off the event loop, under the lock.
        return loop.run_in_executor(None, request.signed)

    result: T = await adrive(plan, partial(route, rows=rows, many=many, sign=sign))
    return result


def _error(exc: Exception) -> LogStoreError:
    """What failed, never the server's message (it may quote the host, the user or data)."""
    if isinstance(exc, PoolTimeout):
        return LogStoreError("no PostgreSQL log store connection free in time")
    state = f" ({exc.sqlstate})" if isinstance(exc, psycopg.Error) and exc.sqlstate else ""
    return LogStoreError(f"the PostgreSQL log store failed: {type(exc).__name__}{state}")
