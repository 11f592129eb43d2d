"""PostgreSQL for paygate's shared stores (the ledger, the transparency log): psycopg imported
once (an optional extra: ``paygate[postgres]``) and a bounded connection pool opened the same
way for each. The stores say what failed in their own words; the connection string (it may
carry a password) is never quoted.
"""

from __future__ import annotations

import logging
from typing import Any

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
