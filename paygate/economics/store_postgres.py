"""The economics store on the PostgreSQL ledger's own pool (one transaction per call): it runs
the statements of :mod:`paygate.economics.queries` and nothing else. Times written come from
the database's clock, every replica's."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from paygate.economics.queries import POSTGRES, EconomicsQueries, Query
from paygate.economics.store import (
    EarningsRow,
    LimitEvent,
    PayerSpend,
    PayerTokens,
    PaymentFilter,
    Tokens,
)
from paygate.x402.ledger import PaymentRecord
from paygate.x402.ledger_postgres import PostgresLedger

Conn = Any


class PostgresEconomicsStore:
    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger
        self._queries = EconomicsQueries(POSTGRES)

    def now(self) -> float:
        # The database's clock is every replica's; this one is only for display windows.
        clock = self._ledger._clock
        return clock() if clock is not None else time.time()

    async def record_tokens(
        self, *, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        await self._write(
            lambda now: self._queries.record_tokens(now, payer, model, tokens_in, tokens_out)
        )

    async def tokens(
        self, *, since: float, payer: str | None = None, model: str | None = None
    ) -> Tokens:
        row = await self._one(self._queries.tokens(since, payer, model))
        return self._queries.tokens_of(row)

    async def top_token_payers(self, *, since: float, limit: int) -> list[PayerTokens]:
        rows = await self._all(self._queries.top_token_payers(since, limit))
        return [self._queries.payer_tokens_of(r) for r in rows]

    async def spent(self, *, payer: str, asset: str, since: float) -> int:
        return int((await self._one(self._queries.spent(payer, asset, since)))[0])

    async def top_spenders(self, *, since: float, limit: int) -> list[PayerSpend]:
        rows = await self._all(self._queries.top_spenders(since, limit))
        return [self._queries.payer_spend_of(r) for r in rows]

    async def record_limit_event(self, event: LimitEvent) -> None:
        await self._write(lambda now: [self._queries.record_limit_event(event)])

    async def limit_events(self, *, since: float, limit: int) -> list[LimitEvent]:
        rows = await self._all(self._queries.limit_events(since, limit))
        return [self._queries.limit_event_of(r) for r in rows]

    async def claim_alert(self, key: str) -> bool:
        return await self._took(lambda now: self._queries.claim_alert(key, now))

    async def put_login(self, token_hash: str, expires_at: float) -> None:
        await self._write(lambda now: self._queries.put_login(token_hash, expires_at, now))

    async def take_login(self, token_hash: str) -> bool:
        return await self._took(lambda now: self._queries.take_login(token_hash, now))

    async def search(self, where: PaymentFilter, *, limit: int) -> list[PaymentRecord]:
        tail, params = self._queries.search(where, limit)
        records = await self._ledger._run(self._ledger._many, tail, params)
        return self._queries.picked(records, where, limit)

    async def earnings(self, *, since: float, group: str) -> list[EarningsRow]:
        rows = await self._all(self._queries.earnings(since, group))
        return [self._queries.earnings_of(r) for r in rows]

    async def settle_latencies(self, *, since: float) -> list[float]:
        rows = await self._all(self._queries.settle_latencies(since))
        return [self._queries.latency_of(r) for r in rows]

    async def count_states(self, *, since: float) -> dict[str, int]:
        return self._queries.states_of(await self._all(self._queries.count_states(since)))

    # --- one transaction each; rows as tuples in SELECT order ----------------------------

    async def _one(self, query: Query) -> Any:
        async def run(conn: Conn) -> Any:
            row = await (await conn.execute(*query)).fetchone()
            return tuple(row.values())

        return await self._ledger._run(run)

    async def _all(self, query: Query) -> list[Any]:
        async def run(conn: Conn) -> list[Any]:
            return [tuple(r.values()) for r in await (await conn.execute(*query)).fetchall()]

        return await self._ledger._run(run)

    async def _write(self, queries: Callable[[float], list[Query]]) -> None:
        async def run(conn: Conn) -> None:
            for sql, params in queries(await self._ledger._now(conn)):
                await conn.execute(sql, params)

        await self._ledger._run(run)

    async def _took(self, query: Callable[[float], Query]) -> bool:
        """One write whose single row is the answer (an insert or update that took)."""

        async def run(conn: Conn) -> bool:
            cursor = await conn.execute(*query(await self._ledger._now(conn)))
            return bool(cursor.rowcount == 1)

        return await self._ledger._run(run)
