"""The economics store on the SQLite ledger's own worker thread and connection: it runs the
statements of :mod:`paygate.economics.queries` and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paygate.economics.queries import SQLITE, EconomicsQueries, QueryStore
from paygate.statements import Query
from paygate.x402.ledger import PaymentRecord
from paygate.x402.ledger_sqlite import SqliteLedger


class SqliteEconomicsStore(QueryStore):
    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        self._queries = EconomicsQueries(SQLITE)

    def now(self) -> float:
        return self._ledger._clock()

    # --- on the ledger's worker thread ---------------------------------------------------

    async def _one(self, query: Query) -> Any:
        return await self._ledger._run(lambda: self._ledger._conn.execute(*query).fetchone())

    async def _all(self, query: Query) -> list[Any]:
        return await self._ledger._run(lambda: self._ledger._conn.execute(*query).fetchall())

    async def _write(self, queries: Callable[[float], list[Query]]) -> None:
        def write() -> None:
            with self._ledger._write() as db:
                for sql, params in queries(self.now()):
                    db.execute(sql, params)

        await self._ledger._run(write)

    async def _took(self, query: Callable[[float], Query]) -> bool:
        def took() -> bool:
            with self._ledger._write() as db:
                return bool(db.execute(*query(self.now())).rowcount == 1)

        return await self._ledger._run(took)

    async def _payments(self, tail: str, params: tuple[Any, ...]) -> list[PaymentRecord]:
        return await self._ledger._run(self._ledger._many, tail, params)
