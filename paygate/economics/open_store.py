"""The economics store on a ledger's own connection (SQLite or PostgreSQL).

Apart from ``store`` so that the protocol module imports neither implementation (each of them
imports it).
"""

from __future__ import annotations

from paygate.economics.store import EconomicsStore
from paygate.x402.ledger_base import Ledger


def economics_store(ledger: Ledger) -> EconomicsStore:
    """The store on ``ledger``'s own connection (SQLite or PostgreSQL)."""
    from paygate.x402.ledger_sqlite import SqliteLedger

    if isinstance(ledger, SqliteLedger):
        from paygate.economics.store_sqlite import SqliteEconomicsStore

        return SqliteEconomicsStore(ledger)
    from paygate.economics.store_postgres import PostgresEconomicsStore
    from paygate.x402.ledger_postgres import PostgresLedger

    if not isinstance(ledger, PostgresLedger):
        raise TypeError(f"no economics store for {type(ledger).__name__}")
    return PostgresEconomicsStore(ledger)
