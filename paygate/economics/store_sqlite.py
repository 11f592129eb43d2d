"""The economics store on the SQLite ledger's own worker thread and connection: it runs the
statements of :mod:`paygate.economics.queries` and nothing else."""

from __future__ import annotations

from typing import Any

from paygate.economics.queries import SQLITE, EconomicsQueries, Query
from paygate.economics.store import (
    EarningsRow,
    LimitEvent,
    PayerSpend,
    PayerTokens,
    PaymentFilter,
    Tokens,
)
from paygate.x402.ledger import PaymentRecord
from paygate.x402.ledger_sqlite import SqliteLedger


class SqliteEconomicsStore:
    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        self._queries = EconomicsQueries(SQLITE)

    def now(self) -> float:
        return self._ledger._clock()

    async def record_tokens(
        self, *, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        queries = self._queries.record_tokens(self.now(), payer, model, tokens_in, tokens_out)
        await self._ledger._run(self._write, queries)

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
        await self._ledger._run(self._write, [self._queries.record_limit_event(event)])

    async def limit_events(self, *, since: float, limit: int) -> list[LimitEvent]:
        rows = await self._all(self._queries.limit_events(since, limit))
        return [self._queries.limit_event_of(r) for r in rows]

    async def claim_alert(self, key: str) -> bool:
        return await self._ledger._run(self._took, self._queries.claim_alert(key, self.now()))

    async def put_login(self, token_hash: str, expires_at: float) -> None:
        queries = self._queries.put_login(token_hash, expires_at, self.now())
        await self._ledger._run(self._write, queries)

    async def take_login(self, token_hash: str) -> bool:
        return await self._ledger._run(self._took, self._queries.take_login(token_hash, self.now()))

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

    # --- on the ledger's worker thread ---------------------------------------------------

    async def _one(self, query: Query) -> Any:
        return await self._ledger._run(lambda: self._ledger._conn.execute(*query).fetchone())

    async def _all(self, query: Query) -> list[Any]:
        return await self._ledger._run(lambda: self._ledger._conn.execute(*query).fetchall())

    def _write(self, queries: list[Query]) -> None:
        with self._ledger._write() as db:
            for sql, params in queries:
                db.execute(sql, params)

    def _took(self, query: Query) -> bool:
        """One write whose single row is the answer (an insert or update that took)."""
        with self._ledger._write() as db:
            return db.execute(*query).rowcount == 1
