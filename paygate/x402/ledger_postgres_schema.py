"""The PostgreSQL ledger's pool and schema: connecting (fail fast on a refused connection or a
bad password, a bounded pool whose connections carry the lock timeout), running the versioned
migrations of :mod:`paygate.x402.ledger_migrations` (one migrator at a time) and the schema
check. The statements on the data are :mod:`paygate.x402.ledger_postgres`'s."""

from __future__ import annotations

from typing import Any

from paygate.postgres import Conn, PoolTimeout, connect_kwargs, psycopg
from paygate.postgres import open_pool as open_postgres_pool
from paygate.x402.ledger import (
    IdempotencyKeyReused,
    LedgerConflict,
    LedgerError,
    LedgerUnavailable,
)
from paygate.x402.ledger_migrations import SCHEMA_VERSION, migrations

MIGRATION_LOCK = 0x70617967  # pg_advisory_xact_lock key: one migrator at a time ("payg")
MIGRATIONS = migrations("postgres")


async def open_pool(
    conninfo: str,
    *,
    password: str | None,
    read_only: bool,
    pool_size: int,
    timeout: float,
    lock_timeout: float,
) -> Any:
    """An open pool of at most ``pool_size`` connections (LedgerUnavailable if none comes up
    within ``timeout``)."""
    if psycopg is None:
        raise LedgerUnavailable(
            "the PostgreSQL ledger needs psycopg: pip install 'paygate[postgres]'"
        )
    kwargs = connect_kwargs(password, timeout)
    await _probe(conninfo, kwargs)  # fail fast (refused, bad password) rather than retry
    try:
        return await open_postgres_pool(
            conninfo,
            kwargs,
            name="paygate-ledger",
            pool_size=pool_size,
            timeout=timeout,
            lock_timeout=lock_timeout,
            read_only=read_only,
        )
    except PoolTimeout:
        raise LedgerUnavailable(
            "cannot connect to the PostgreSQL ledger (PAYGATE_LEDGER_URL) within "
            f"{timeout:g}s: check the host, port, user, password and database"
        ) from None


async def _probe(conninfo: str, kwargs: dict[str, Any]) -> None:
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
    except psycopg.Error as exc:
        state = f" [{exc.sqlstate}]" if getattr(exc, "sqlstate", None) else ""
        raise LedgerUnavailable(
            f"cannot connect to the PostgreSQL ledger (PAYGATE_LEDGER_URL){state}: check the "
            "host, port, user, password and database"
        ) from None
    await conn.close()


async def version(conn: Conn) -> int:
    """The database's ledger schema version (0: none)."""
    row = await (await conn.execute("SELECT to_regclass('ledger_schema') AS t")).fetchone()
    if row["t"] is None:
        return 0
    row = await (await conn.execute("SELECT version FROM ledger_schema WHERE id = 1")).fetchone()
    return int(row["version"]) if row else 0


async def migrate(conn: Conn, now: float) -> int:
    """Run the missing steps in the caller's transaction, one migrator at a time; the version
    found (a newer one than this paygate's is refused)."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS ledger_schema ("
        " id integer PRIMARY KEY CHECK (id = 1),"
        " version integer NOT NULL,"
        " migrated_at double precision NOT NULL)"
    )
    found = await version(conn)
    if found > SCHEMA_VERSION:
        raise LedgerUnavailable(
            f"the PostgreSQL ledger has schema v{found}, newer than this paygate's "
            f"v{SCHEMA_VERSION}"
        )
    for step in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step]:
            await conn.execute(statement)
    if found != SCHEMA_VERSION:
        await conn.execute(
            "INSERT INTO ledger_schema (id, version, migrated_at) VALUES (1, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
            " migrated_at = excluded.migrated_at",
            (SCHEMA_VERSION, now),
        )
    return found


def ledger_error(exc: Exception) -> LedgerError:
    """What a call that failed in the database tells its caller: the condition (class, SQLSTATE,
    constraint), never the server's message (it may quote the host, the user or data)."""
    if isinstance(exc, PoolTimeout):
        return LedgerUnavailable("no PostgreSQL ledger connection free in time")
    if isinstance(exc, psycopg.errors.IntegrityError):
        if exc.diag.constraint_name == "payments_idempotency_key_key":
            return IdempotencyKeyReused(
                "the payment identifier already names a different authorization"
            )
        return LedgerConflict(f"ledger constraint: {exc.diag.constraint_name}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return LedgerUnavailable("the ledger is open read-only")
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return LedgerUnavailable("the PostgreSQL ledger: row locked too long")
    state = f" ({exc.sqlstate})" if isinstance(exc, psycopg.Error) and exc.sqlstate else ""
    return LedgerUnavailable(f"the PostgreSQL ledger failed: {type(exc).__name__}{state}")
