"""The economics store on the SQLite ledger's own worker thread and connection."""

from __future__ import annotations

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
from paygate.x402.ledger import PaymentRecord, PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger

_AMOUNT = "CAST(COALESCE(settled_amount, settle_amount, amount) AS INTEGER)"
_GROUPS = {
    "scheme": "scheme",
    "model": "COALESCE(model, '-')",
    "scheme_model": "scheme || ' / ' || COALESCE(model, '-')",
}
_PRUNE_EVERY = 256  # token usage writes between two prunes of expired rows


class SqliteEconomicsStore:
    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        self._writes = 0

    def now(self) -> float:
        return self._ledger._clock()

    async def record_tokens(
        self, *, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        self._writes += 1
        prune = self._writes % _PRUNE_EVERY == 1
        await self._ledger._run(self._record_tokens, payer, model, tokens_in, tokens_out, prune)

    def _record_tokens(
        self, payer: str, model: str, tokens_in: int, tokens_out: int, prune: bool
    ) -> None:
        now = self.now()
        with self._ledger._write() as db:
            db.execute(
                "INSERT INTO token_usage (at, payer, model, tokens_in, tokens_out)"
                " VALUES (?, ?, ?, ?, ?)",
                (now, payer, model, tokens_in, tokens_out),
            )
            if prune:
                db.execute("DELETE FROM token_usage WHERE at < ?", (now - USAGE_RETENTION_SECONDS,))

    async def tokens(
        self, *, since: float, payer: str | None = None, model: str | None = None
    ) -> Tokens:
        where, params = ["at >= ?"], [since]
        if payer is not None:
            where.append("payer = ?")
            params.append(payer)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        sql = (
            "SELECT COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0), COUNT(*)"  # noqa: S608
            f" FROM token_usage WHERE {' AND '.join(where)}"
        )
        row = await self._ledger._run(self._fetchone, sql, tuple(params))
        return Tokens(int(row[0]), int(row[1]), int(row[2]))

    async def top_token_payers(self, *, since: float, limit: int) -> list[PayerTokens]:
        rows = await self._ledger._run(
            self._fetchall,
            "SELECT payer, SUM(tokens_in), SUM(tokens_out), COUNT(*) FROM token_usage"
            " WHERE at >= ? GROUP BY payer ORDER BY SUM(tokens_in) + SUM(tokens_out) DESC,"
            " payer LIMIT ?",
            (since, check_rows(limit)),
        )
        return [PayerTokens(r[0], Tokens(int(r[1]), int(r[2]), int(r[3]))) for r in rows]

    async def spent(self, *, payer: str, asset: str, since: float) -> int:
        row = await self._ledger._run(
            self._fetchone,
            f"SELECT COALESCE(SUM({_AMOUNT}), 0) FROM payments"  # noqa: S608 - constant
            " WHERE asset = ? AND payer = ? AND counted_at >= ? AND state NOT IN (?, ?)",
            (asset, payer, since, PaymentState.RELEASED.value, PaymentState.FAILED.value),
        )
        return int(row[0])

    async def top_spenders(self, *, since: float, limit: int) -> list[PayerSpend]:
        rows = await self._ledger._run(
            self._fetchall,
            f"SELECT payer, SUM({_AMOUNT}) AS spent, COUNT(*) FROM payments"  # noqa: S608
            " WHERE counted_at >= ? AND state NOT IN (?, ?)"
            " GROUP BY payer ORDER BY spent DESC, payer LIMIT ?",
            (since, PaymentState.RELEASED.value, PaymentState.FAILED.value, check_rows(limit)),
        )
        return [PayerSpend(r[0], int(r[1]), int(r[2])) for r in rows]

    async def record_limit_event(self, event: LimitEvent) -> None:
        await self._ledger._run(self._insert_event, event)

    def _insert_event(self, event: LimitEvent) -> None:
        with self._ledger._write() as db:
            db.execute(
                "INSERT INTO limit_events (at, kind, rule, payer, model, enforced, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    event.at,
                    event.kind,
                    event.rule,
                    event.payer,
                    event.model,
                    1 if event.enforced else 0,
                    event.detail,
                ),
            )

    async def limit_events(self, *, since: float, limit: int) -> list[LimitEvent]:
        rows = await self._ledger._run(
            self._fetchall,
            "SELECT at, kind, rule, payer, model, enforced, detail FROM limit_events"
            " WHERE at >= ? ORDER BY seq DESC LIMIT ?",
            (since, check_rows(limit)),
        )
        return [LimitEvent(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    async def claim_alert(self, key: str) -> bool:
        return await self._ledger._run(self._claim, key)

    def _claim(self, key: str) -> bool:
        with self._ledger._write() as db:
            cursor = db.execute(
                "INSERT INTO alert_claims (key, at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (key, self.now()),
            )
            return cursor.rowcount == 1

    async def put_login(self, token_hash: str, expires_at: float) -> None:
        await self._ledger._run(self._put_login, token_hash, expires_at)

    def _put_login(self, token_hash: str, expires_at: float) -> None:
        with self._ledger._write() as db:
            db.execute("DELETE FROM console_logins WHERE expires_at < ?", (self.now() - 86_400,))
            db.execute(
                "INSERT INTO console_logins (token_hash, expires_at) VALUES (?, ?)",
                (token_hash, expires_at),
            )

    async def take_login(self, token_hash: str) -> bool:
        return await self._ledger._run(self._take_login, token_hash)

    def _take_login(self, token_hash: str) -> bool:
        with self._ledger._write() as db:
            cursor = db.execute(
                "UPDATE console_logins SET used_at = ? WHERE token_hash = ?"
                " AND used_at IS NULL AND expires_at > ?",
                (self.now(), token_hash, self.now()),
            )
            return cursor.rowcount == 1

    async def search(self, where: PaymentFilter, *, limit: int) -> list[PaymentRecord]:
        clauses, params = _filter(where)
        tail = f"{clauses} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        records = await self._ledger._run(
            self._ledger._many, tail, (*params, check_rows(limit) * (4 if where.review else 1))
        )
        if where.review:
            records = [r for r in records if r.needs_review]
        return records[: check_rows(limit)]

    async def earnings(self, *, since: float, group: str) -> list[EarningsRow]:
        expression = _GROUPS[check_group(group)]
        rows = await self._ledger._run(
            self._fetchall,
            f"SELECT {expression} AS key, COUNT(*),"  # noqa: S608 - constant expressions
            " COALESCE(SUM(CAST(COALESCE(settled_amount, amount) AS INTEGER)), 0)"
            " FROM payments WHERE state = ? AND created_at >= ? GROUP BY key ORDER BY key",
            (PaymentState.SETTLED.value, since),
        )
        return [EarningsRow(str(r[0]), int(r[1]), int(r[2])) for r in rows]

    async def settle_latencies(self, *, since: float) -> list[float]:
        rows = await self._ledger._run(
            self._fetchall,
            "SELECT done.at - MIN(start.at) FROM payment_events AS done"
            " JOIN payment_events AS start ON start.payment_id = done.payment_id"
            " AND start.state = ? AND start.seq < done.seq"
            " WHERE done.state = ? AND done.at >= ? GROUP BY done.seq ORDER BY done.seq DESC"
            " LIMIT 1000",
            (PaymentState.SETTLING.value, PaymentState.SETTLED.value, since),
        )
        return [max(0.0, float(r[0])) for r in rows]

    async def count_states(self, *, since: float) -> dict[str, int]:
        rows = await self._ledger._run(
            self._fetchall,
            "SELECT state, COUNT(*) FROM payments WHERE created_at >= ? GROUP BY state",
            (since,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self._ledger._conn.execute(sql, params).fetchone()

    def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self._ledger._conn.execute(sql, params).fetchall()


def _filter(where: PaymentFilter) -> tuple[str, list[Any]]:
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
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params
