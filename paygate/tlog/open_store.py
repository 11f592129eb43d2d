"""Opening the transparency log's store in the ledger's database (SQLite or PostgreSQL).

Apart from ``store`` so that the protocol module imports neither implementation (each of them
imports it).
"""

from __future__ import annotations

from paygate.tlog.store import LogStore
from paygate.x402.ledger_store import LedgerLocation


async def open_log_store(location: LedgerLocation, *, pool_size: int = 2) -> LogStore:
    """The log in the ledger store at ``location``, migrated (the ledger's own migrations)."""
    from paygate.x402.ledger_store import open_ledger

    ledger = await open_ledger(location, migrate=True, pool_size=1)
    await ledger.close()
    if location.kind == "sqlite":
        from paygate.tlog.store_sqlite import SqliteLogStore

        assert location.path is not None
        return await SqliteLogStore.open(location.path)
    from paygate.tlog.store_postgres import PostgresLogStore

    assert location.conninfo is not None
    return await PostgresLogStore.open(
        location.conninfo, password=location.password, pool_size=pool_size
    )
