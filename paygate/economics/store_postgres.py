"""The economics store on the PostgreSQL ledger's own pool (one transaction per call): it runs
the statements of :mod:`paygate.economics.queries` and nothing else. Times written come from
the database's clock, every replica's."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from paygate.economics.queries import POSTGRES, EconomicsQueries, QueryStore
from paygate.postgres import fetch_all, fetch_one
from paygate.statements import Query
from paygate.x402.ledger import PaymentRecord
from paygate.x402.ledger_postgres import PostgresLedger

Conn = Any


class PostgresEconomicsStore(QueryStore):
    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger
        self._queries = EconomicsQueries(POSTGRES)

    def now(self) -> float:
        # The database's clock is every replica's; this one is only for display windows.
        clock = self._ledger._clock
        return clock() if clock is not None else time.time()

    # --- one transaction each; rows as tuples in SELECT order ----------------------------

    async def _one(self, query: Query) -> Any:
        return await self._ledger._run(fetch_one, query)

    async def _all(self, query: Query) -> list[Any]:
        return await self._ledger._run(fetch_all, query)

    async def _write(self, queries: Callable[[float], list[Query]]) -> None:
        async def write(conn: Conn) -> None:
            for sql, params in queries(await self._ledger._now(conn)):
                await conn.execute(sql, params)

        await self._ledger._run(write)

    async def _took(self, query: Callable[[float], Query]) -> bool:
        async def took(conn: Conn) -> bool:
            cursor = await conn.execute(*query(await self._ledger._now(conn)))
            return bool(cursor.rowcount == 1)

        return await self._ledger._run(took)

    async def _payments(self, tail: str, params: tuple[Any, ...]) -> list[PaymentRecord]:
        return await self._ledger._run(self._ledger._many, tail, params)
