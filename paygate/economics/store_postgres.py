"""The economics store on the PostgreSQL ledger's own pool (one transaction per call)."""

from __future__ import annotations

import time
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
from paygate.x402.ledger_postgres import PostgresLedger

Conn = Any
_AMOUNT = "COALESCE(settled_amount, settle_amount, amount)"
_GROUPS = {
    "scheme": "scheme",
    "model": "COALESCE(model, '-')",
    "scheme_model": "scheme || ' / ' || COALESCE(model, '-')",
}
_PRUNE_EVERY = 256
_EXCLUDED = ["released", "failed"]


class PostgresEconomicsStore:
    def __init__(self, ledger: PostgresLedger) -> None:
        self._ledger = ledger
        self._writes = 0

    def now(self) -> float:
        # The database's clock is every replica's; this one is only for display windows.
        clock = self._ledger._clock
        return clock() if clock is not None else time.time()

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        async def run(conn: Conn) -> Any:
            return await (await conn.execute(sql, params)).fetchone()

        return await self._ledger._run(run)

    async def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        async def run(conn: Conn) -> list[Any]:
            return await (await conn.execute(sql, params)).fetchall()

        return await self._ledger._run(run)

    async def record_tokens(
        self, *, payer: str, model: str, tokens_in: int, tokens_out: int
    ) -> None:
        self._writes += 1
        prune = self._writes % _PRUNE_EVERY == 1

        async def run(conn: Conn) -> None:
            now = await self._ledger._now(conn)
            await conn.execute(
                "INSERT INTO token_usage (at, payer, model, tokens_in, tokens_out)"
                " VALUES (%s, %s, %s, %s, %s)",
                (now, payer, model, tokens_in, tokens_out),
            )
            if prune:
                await conn.execute(
                    "DELETE FROM token_usage WHERE at < %s", (now - USAGE_RETENTION_SECONDS,)
                )

        await self._ledger._run(run)

    async def tokens(
        self, *, since: float, payer: str | None = None, model: str | None = None
    ) -> Tokens:
        where, params = ["at >= %s"], [since]
        if payer is not None:
            where.append("payer = %s")
            params.append(payer)
        if model is not None:
            where.append("model = %s")
            params.append(model)
        row = await self._fetchone(
            "SELECT COALESCE(SUM(tokens_in), 0) AS i, COALESCE(SUM(tokens_out), 0) AS o,"  # noqa: S608
            f" COUNT(*) AS n FROM token_usage WHERE {' AND '.join(where)}",
            tuple(params),
        )
        return Tokens(int(row["i"]), int(row["o"]), int(row["n"]))

    async def top_token_payers(self, *, since: float, limit: int) -> list[PayerTokens]:
        rows = await self._fetchall(
            "SELECT payer, SUM(tokens_in) AS i, SUM(tokens_out) AS o, COUNT(*) AS n"
            " FROM token_usage WHERE at >= %s GROUP BY payer"
            " ORDER BY SUM(tokens_in) + SUM(tokens_out) DESC, payer LIMIT %s",
            (since, check_rows(limit)),
        )
        return [
            PayerTokens(r["payer"], Tokens(int(r["i"]), int(r["o"]), int(r["n"]))) for r in rows
        ]

    async def spent(self, *, payer: str, asset: str, since: float) -> int:
        row = await self._fetchone(
            f"SELECT COALESCE(SUM({_AMOUNT}), 0) AS spent FROM payments"  # noqa: S608
            " WHERE asset = %s AND payer = %s AND counted_at >= %s AND state <> ALL(%s)",
            (asset, payer, since, _EXCLUDED),
        )
        return int(row["spent"])

    async def top_spenders(self, *, since: float, limit: int) -> list[PayerSpend]:
        rows = await self._fetchall(
            f"SELECT payer, SUM({_AMOUNT}) AS spent, COUNT(*) AS n FROM payments"  # noqa: S608
            " WHERE counted_at >= %s AND state <> ALL(%s)"
            " GROUP BY payer ORDER BY spent DESC, payer LIMIT %s",
            (since, _EXCLUDED, check_rows(limit)),
        )
        return [PayerSpend(r["payer"], int(r["spent"]), int(r["n"])) for r in rows]

    async def record_limit_event(self, event: LimitEvent) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO limit_events (at, kind, rule, payer, model, enforced, detail)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    event.at,
                    event.kind,
                    event.rule,
                    event.payer,
                    event.model,
                    event.enforced,
                    event.detail,
                ),
            )

        await self._ledger._run(run)

    async def limit_events(self, *, since: float, limit: int) -> list[LimitEvent]:
        rows = await self._fetchall(
            "SELECT at, kind, rule, payer, model, enforced, detail FROM limit_events"
            " WHERE at >= %s ORDER BY seq DESC LIMIT %s",
            (since, check_rows(limit)),
        )
        return [
            LimitEvent(
                r["at"], r["kind"], r["rule"], r["payer"], r["model"], r["enforced"], r["detail"]
            )
            for r in rows
        ]

    async def claim_alert(self, key: str) -> bool:
        async def run(conn: Conn) -> bool:
            now = await self._ledger._now(conn)
            cursor = await conn.execute(
                "INSERT INTO alert_claims (key, at) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                (key, now),
            )
            return cursor.rowcount == 1

        return await self._ledger._run(run)

    async def put_login(self, token_hash: str, expires_at: float) -> None:
        async def run(conn: Conn) -> None:
            now = await self._ledger._now(conn)
            await conn.execute("DELETE FROM console_logins WHERE expires_at < %s", (now - 86_400,))
            await conn.execute(
                "INSERT INTO console_logins (token_hash, expires_at) VALUES (%s, %s)",
                (token_hash, expires_at),
            )

        await self._ledger._run(run)

    async def take_login(self, token_hash: str) -> bool:
        async def run(conn: Conn) -> bool:
            now = await self._ledger._now(conn)
            cursor = await conn.execute(
                "UPDATE console_logins SET used_at = %s WHERE token_hash = %s"
                " AND used_at IS NULL AND expires_at > %s",
                (now, token_hash, now),
            )
            return cursor.rowcount == 1

        return await self._ledger._run(run)

    async def search(self, where: PaymentFilter, *, limit: int) -> list[PaymentRecord]:
        clauses, params = _filter(where)
        tail = f"{clauses} ORDER BY created_at DESC, seq DESC LIMIT %s"
        records = await self._ledger._run(
            self._ledger._many, tail, (*params, check_rows(limit) * (4 if where.review else 1))
        )
        if where.review:
            records = [r for r in records if r.needs_review]
        return records[: check_rows(limit)]

    async def earnings(self, *, since: float, group: str) -> list[EarningsRow]:
        expression = _GROUPS[check_group(group)]
        rows = await self._fetchall(
            f"SELECT {expression} AS key, COUNT(*) AS n,"  # noqa: S608 - constant expressions
            " COALESCE(SUM(COALESCE(settled_amount, amount)), 0) AS settled"
            " FROM payments WHERE state = %s AND created_at >= %s GROUP BY key ORDER BY key",
            (PaymentState.SETTLED.value, since),
        )
        return [EarningsRow(str(r["key"]), int(r["n"]), int(r["settled"])) for r in rows]

    async def settle_latencies(self, *, since: float) -> list[float]:
        rows = await self._fetchall(
            "SELECT done.at - MIN(start.at) AS seconds FROM payment_events AS done"
            " JOIN payment_events AS start ON start.payment_id = done.payment_id"
            " AND start.state = %s AND start.seq < done.seq"
            " WHERE done.state = %s AND done.at >= %s GROUP BY done.seq ORDER BY done.seq DESC"
            " LIMIT 1000",
            (PaymentState.SETTLING.value, PaymentState.SETTLED.value, since),
        )
        return [max(0.0, float(r["seconds"])) for r in rows]

    async def count_states(self, *, since: float) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT state, COUNT(*) AS n FROM payments WHERE created_at >= %s GROUP BY state",
            (since,),
        )
        return {str(r["state"]): int(r["n"]) for r in rows}


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
            clauses.append(f"{column} = %s")
            params.append(value)
    if where.since is not None:
        clauses.append("created_at >= %s")
        params.append(where.since)
    if where.until is not None:
        clauses.append("created_at < %s")
        params.append(where.until)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params
