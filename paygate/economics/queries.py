"""The economics store's rules, once for both databases (sans-IO): each method returns the SQL
and its parameters, and the readers turn rows (tuples in SELECT order; every column is named, as
PostgreSQL's dict rows need) into the store's values. :class:`QueryStore` answers the store's
protocol with them; ``store_sqlite`` and ``store_postgres`` only run statements on the ledger's
connection. What differs between the two dialects is the :class:`Dialect`'s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from paygate.economics.store import (
    USAGE_RETENTION_SECONDS,
    EarningsRow,
    LimitEvent,
    PayerSpend,
    PayerTokens,
    PaymentFilter,
    Tokens,
    check_group,
    check_rows,
)
from paygate.statements import Query, Row
from paygate.x402.ledger import PaymentRecord, PaymentState

# The scheme whose charge is made in the ledger (paygate.x402.schemes.batch_settlement; its name
# as the ledger records it, not imported: that package brings the chain clients).
BATCH_SETTLEMENT = "batch-settlement"

PRUNE_EVERY = 256  # token usage writes between two prunes of expired rows
LOGIN_RETENTION_SECONDS = 86_400  # expired one-time logins kept a day (then pruned)
_REVIEW_OVERFETCH = 4  # review rows are SETTLING rows that need review: fetch more, then pick
_GROUPS = {
    "scheme": "scheme",
    "model": "COALESCE(model, '-')",
    "scheme_model": "scheme || ' / ' || COALESCE(model, '-')",
}
# Released and failed payments commit nothing (as the ledger's own budget check counts).
_NOT_COMMITTED = (PaymentState.RELEASED.value, PaymentState.FAILED.value)


@dataclass(frozen=True, slots=True)
class Dialect:
    mark: str  # the driver's parameter placeholder
    committed: str  # a payment's committed amount, as an integer
    settled: str  # a settled payment's amount, as an integer
    newest: str  # the column that orders payments created at the same time


SQLITE = Dialect(
    mark="?",
    committed="CAST(COALESCE(settled_amount, settle_amount, amount) AS INTEGER)",
    settled="CAST(COALESCE(settled_amount, amount) AS INTEGER)",
    newest="rowid",
)
POSTGRES = Dialect(
    mark="%s",
    committed="COALESCE(settled_amount, settle_amount, amount)",
    settled="COALESCE(settled_amount, amount)",
    newest="seq",
)


class EconomicsQueries:
    """The statements of :class:`~paygate.economics.store.EconomicsStore` in one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._writes = 0

    def _sql(self, text: str) -> str:
        return text.replace("?", self.dialect.mark)

    # --- token usage ---------------------------------------------------------------------

    def record_tokens(
        self, now: float, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> list[Query]:
        """The insert, and every PRUNE_EVERY writes (the first included) the expired rows'
        delete."""
        self._writes += 1
        queries = [
            (
                self._sql(
                    "INSERT INTO token_usage (at, payer, model, tokens_in, tokens_out)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                (now, payer, model, tokens_in, tokens_out),
            )
        ]
        if self._writes % PRUNE_EVERY == 1:
            queries.append(
                (
                    self._sql("DELETE FROM token_usage WHERE at < ?"),
                    (now - USAGE_RETENTION_SECONDS,),
                )
            )
        return queries

    def tokens(self, since: float, payer: str | None, model: str | None) -> Query:
        where, params = ["at >= ?"], [since]
        for column, value in (("payer", payer), ("model", model)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = (
            "SELECT COALESCE(SUM(tokens_in), 0) AS i, COALESCE(SUM(tokens_out), 0) AS o,"  # noqa: S608 - constant columns
            f" COUNT(*) AS n FROM token_usage WHERE {' AND '.join(where)}"
        )
        return self._sql(sql), tuple(params)

    @staticmethod
    def tokens_of(row: Row) -> Tokens:
        return Tokens(int(row[0]), int(row[1]), int(row[2]))

    def top_token_payers(self, since: float, limit: int) -> Query:
        return self._sql(
            "SELECT payer, SUM(tokens_in) AS i, SUM(tokens_out) AS o, COUNT(*) AS n"
            " FROM token_usage WHERE at >= ? GROUP BY payer"
            " ORDER BY SUM(tokens_in) + SUM(tokens_out) DESC, payer LIMIT ?"
        ), (since, check_rows(limit))

    @staticmethod
    def payer_tokens_of(row: Row) -> PayerTokens:
        return PayerTokens(row[0], Tokens(int(row[1]), int(row[2]), int(row[3])))

    # --- spending --------------------------------------------------------------------------

    def spent(self, payer: str, asset: str, since: float) -> Query:
        return self._sql(
            f"SELECT COALESCE(SUM({self.dialect.committed}), 0) AS spent FROM payments"  # noqa: S608 - constant
            " WHERE asset = ? AND payer = ? AND counted_at >= ? AND state NOT IN (?, ?)"
        ), (asset, payer, since, *_NOT_COMMITTED)

    def top_spenders(self, since: float, limit: int) -> Query:
        return self._sql(
            f"SELECT payer, SUM({self.dialect.committed}) AS spent, COUNT(*) AS n FROM payments"  # noqa: S608
            " WHERE counted_at >= ? AND state NOT IN (?, ?)"
            " GROUP BY payer ORDER BY spent DESC, payer LIMIT ?"
        ), (since, *_NOT_COMMITTED, check_rows(limit))

    @staticmethod
    def payer_spend_of(row: Row) -> PayerSpend:
        return PayerSpend(row[0], int(row[1]), int(row[2]))

    # --- limit events, alert claims, console logins --------------------------------------

    def record_limit_event(self, event: LimitEvent) -> Query:
        return self._sql(
            "INSERT INTO limit_events (at, kind, rule, payer, model, enforced, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
        ), (
            event.at,
            event.kind,
            event.rule,
            event.payer,
            event.model,
            event.enforced,
            event.detail,
        )

    def limit_events(self, since: float, limit: int) -> Query:
        return self._sql(
            "SELECT at, kind, rule, payer, model, enforced, detail FROM limit_events"
            " WHERE at >= ? ORDER BY seq DESC LIMIT ?"
        ), (since, check_rows(limit))

    @staticmethod
    def limit_event_of(row: Row) -> LimitEvent:
        return LimitEvent(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6])

    def claim_alert(self, key: str, now: float) -> Query:
        """One row per key: the caller whose insert took (rowcount 1) holds the claim."""
        return self._sql(
            "INSERT INTO alert_claims (key, at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
        ), (key, now)

    def put_login(self, token_hash: str, expires_at: float, now: float) -> list[Query]:
        return [
            (
                self._sql("DELETE FROM console_logins WHERE expires_at < ?"),
                (now - LOGIN_RETENTION_SECONDS,),
            ),
            (
                self._sql("INSERT INTO console_logins (token_hash, expires_at) VALUES (?, ?)"),
                (token_hash, expires_at),
            ),
        ]

    def take_login(self, token_hash: str, now: float) -> Query:
        """Used once, unexpired: the update that marks it used takes (rowcount 1) or not."""
        return self._sql(
            "UPDATE console_logins SET used_at = ? WHERE token_hash = ?"
            " AND used_at IS NULL AND expires_at > ?"
        ), (now, token_hash, now)

    # --- the console's payment views -----------------------------------------------------

    def search(self, where: PaymentFilter, limit: int) -> Query:
        """The WHERE/ORDER/LIMIT tail of the ledger's own payment select."""
        clauses: list[str] = []
        params: list[Any] = []
        state = PaymentState.SETTLING if where.review else where.state
        for column, value in (
            ("state", state.value if state is not None else None),
            ("payer", where.payer),
            ("scheme", where.scheme),
            ("model", where.model),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where.since is not None:
            clauses.append("created_at >= ?")
            params.append(where.since)
        if where.until is not None:
            clauses.append("created_at < ?")
            params.append(where.until)
        head = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = check_rows(limit) * (_REVIEW_OVERFETCH if where.review else 1)
        tail = f"{head} ORDER BY created_at DESC, {self.dialect.newest} DESC LIMIT ?"
        return self._sql(tail), (*params, rows)

    @staticmethod
    def picked(
        records: list[PaymentRecord], where: PaymentFilter, limit: int
    ) -> list[PaymentRecord]:
        if where.review:
            records = [r for r in records if r.needs_review]
        return records[: check_rows(limit)]

    def earnings(self, since: float, group: str) -> Query:
        expression = _GROUPS[check_group(group)]
        return self._sql(
            f"SELECT {expression} AS key, COUNT(*) AS n,"  # noqa: S608 - constant expressions
            f" COALESCE(SUM({self.dialect.settled}), 0) AS settled FROM payments"
            " WHERE state = ? AND created_at >= ? GROUP BY key ORDER BY key"
        ), (PaymentState.SETTLED.value, since)

    @staticmethod
    def earnings_of(row: Row) -> EarningsRow:
        return EarningsRow(str(row[0]), int(row[1]), int(row[2]))

    def settle_latencies(self, since: float) -> Query:
        # Not a batch-settlement voucher's: its charge is made in the ledger, no settlement
        # with a latency (its lines are mostly in its row, but in payment_events when its row
        # was reserved again after a release; ledger_rules.kept_history).
        return self._sql(
            "SELECT done.at - MIN(start.at) AS seconds FROM payment_events AS done"
            " JOIN payment_events AS start ON start.payment_id = done.payment_id"
            " AND start.state = ? AND start.seq < done.seq"
            " WHERE done.state = ? AND done.at >= ? AND NOT EXISTS (SELECT 1 FROM payments"
            " WHERE payments.id = done.payment_id AND payments.scheme = ?)"
            " GROUP BY done.seq ORDER BY done.seq DESC LIMIT 1000"
        ), (
            PaymentState.SETTLING.value,
            PaymentState.SETTLED.value,
            since,
            BATCH_SETTLEMENT,
        )

    @staticmethod
    def latency_of(row: Row) -> float:
        return max(0.0, float(row[0]))

    def count_states(self, since: float) -> Query:
        return self._sql(
            "SELECT state, COUNT(*) AS n FROM payments WHERE created_at >= ? GROUP BY state"
        ), (since,)

    @staticmethod
    def states_of(rows: Sequence[Row]) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in rows}


class QueryStore(ABC):
    """:class:`~paygate.economics.store.EconomicsStore` over four ways to run a statement;
    a database store implements those (and ``now``) only."""

    _queries: EconomicsQueries

    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    async def _one(self, query: Query) -> Row:
        """The first row (a tuple in SELECT order)."""

    @abstractmethod
    async def _all(self, query: Query) -> list[Row]: ...

    @abstractmethod
    async def _write(self, queries: Callable[[float], list[Query]]) -> None:
        """One transaction: ``queries(now)``, now by the store's clock."""

    @abstractmethod
    async def _took(self, query: Callable[[float], Query]) -> bool:
        """One write whose single row is the answer (an insert or update that took)."""

    @abstractmethod
    async def _payments(self, tail: str, params: tuple[Any, ...]) -> list[PaymentRecord]:
        """The ledger's own payment select with this WHERE/ORDER/LIMIT tail."""

    async def record_tokens(
        self, *, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        q = self._queries
        await self._write(lambda now: q.record_tokens(now, payer, model, tokens_in, tokens_out))

    async def tokens(
        self, *, since: float, payer: str | None = None, model: str | None = None
    ) -> Tokens:
        return self._queries.tokens_of(await self._one(self._queries.tokens(since, payer, model)))

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
        records = await self._payments(*self._queries.search(where, limit))
        return self._queries.picked(records, where, limit)

    async def earnings(self, *, since: float, group: str) -> list[EarningsRow]:
        rows = await self._all(self._queries.earnings(since, group))
        return [self._queries.earnings_of(r) for r in rows]

    async def settle_latencies(self, *, since: float) -> list[float]:
        rows = await self._all(self._queries.settle_latencies(since))
        return [self._queries.latency_of(r) for r in rows]

    async def count_states(self, *, since: float) -> dict[str, int]:
        return self._queries.states_of(await self._all(self._queries.count_states(since)))
