"""PostgreSQL for paygate's shared stores (the ledger, the transparency log): psycopg imported
once (an optional extra: ``paygate[postgres]``) and a bounded connection pool opened the same
way for each. The stores say what failed in their own words; the connection string (it may
carry a password) is never quoted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from paygate.statements import Query

try:
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - each store reports it when it opens
    psycopg = None  # type: ignore[assignment]
    PoolTimeout = None  # type: ignore[assignment,misc]

# The pool logs its failed connection attempts with the server's message, which names the host
# and user of the (secret) URL; the stores' own errors say what failed without them.
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

Conn = Any  # psycopg.AsyncConnection[dict[str, Any]]
T = TypeVar("T")


def values(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A dict row (the pools' row factory) as the statement builders read rows: its values in
    SELECT order."""
    return tuple(row.values())


async def fetch_one(conn: Conn, query: Query) -> tuple[Any, ...] | None:
    row = await (await conn.execute(*query)).fetchone()
    return values(row) if row is not None else None


async def fetch_all(conn: Conn, query: Query) -> list[tuple[Any, ...]]:
    return [values(row) for row in await (await conn.execute(*query)).fetchall()]


def connect_kwargs(password: str | None, timeout: float) -> dict[str, Any]:
    """libpq connection options beside the conninfo: dict rows, a connect time-out, and the
    password when it is kept apart from the URL."""
    kwargs: dict[str, Any] = {"row_factory": dict_row, "connect_timeout": max(1, int(timeout))}
    if password is not None:
        kwargs["password"] = password
    return kwargs


async def open_pool(
    conninfo: str,
    kwargs: dict[str, Any],
    *,
    name: str,
    pool_size: int,
    timeout: float,
    lock_timeout: float,
    read_only: bool = False,
) -> Any:
    """An open pool of at most ``pool_size`` connections, each with ``lock_timeout`` (and
    read-only when asked). Raises psycopg_pool's PoolTimeout, the pool closed, when no
    connection comes up within ``timeout``."""
    settings = f"SET lock_timeout = {int(lock_timeout * 1000)}"

    async def configure(conn: Conn) -> None:
        await conn.execute(settings)
        await conn.commit()
        if read_only:
            await conn.set_read_only(True)

    pool = AsyncConnectionPool(
        conninfo,
        kwargs=kwargs,
        min_size=1,
        max_size=max(1, pool_size),
        open=False,
        timeout=timeout,
        configure=configure,
        check=AsyncConnectionPool.check_connection,
        name=name,
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except BaseException:
        await pool.close()
        raise
    return pool


class PoolCalls:
    """A store's calls on its pool: each ``fn(conn, *args)`` in one transaction on a pooled
    connection, run to its end even if the awaiting task is cancelled (a cancelled caller does
    not know the outcome, but the store is never half-done). A database failure or no free
    connection in time is ``error(exc)``, in the store's own words; a call after :meth:`close`
    is ``closed()``."""

    def __init__(
        self,
        pool: Any,
        *,
        error: Callable[[Exception], Exception],
        closed: Callable[[], Exception],
    ) -> None:
        self._pool = pool
        self._error = error
        self._closed_error = closed
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    async def run(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        if self.closed:
            raise self._closed_error()
        task = asyncio.get_running_loop().create_task(self._transaction(fn, *args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await fn(conn, *args)
        except (PoolTimeout, psycopg.Error) as exc:
            raise self._error(exc) from None

    async def close(self, *, wait: float = 30.0) -> None:
        """Let the submitted calls finish (``wait`` seconds at most), then close the pool.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait)
        await self._pool.close()
