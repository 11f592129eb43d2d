"""The PostgreSQL ledger's side tables (statements from :mod:`paygate.x402.ledger_tables`):
each runs in the transaction of its call, on the connection the ledger passes."""

from __future__ import annotations

import builtins
import secrets
from typing import Any, Protocol

from paygate.x402 import ledger_tables as sql
from paygate.x402.ledger import (
    Earnings,
    FreeAddressUsed,
    PaymentEvent,
    PaymentRecord,
    PaymentState,
    ReceiptUsage,
    SignInReused,
    StoredReceipt,
)
from paygate.x402.ledger_postgres_schema import Conn


class _PostgresStore(Protocol):
    """What the tables use of the PostgreSQL ledger (ledger_postgres.PostgresLedger)."""

    async def _now(self, conn: Conn) -> float: ...

    async def _must(self, conn: Conn, payment_id: str, *, lock: bool = False) -> PaymentRecord: ...


GROUPS = sql.groups(day="to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')")


def _pg(statement: str) -> str:
    return statement.replace("?", "%s")


class PostgresTables:
    def __init__(self, store: _PostgresStore) -> None:
        self._store = store

    async def _all(self, conn: Conn, statement: str, params: tuple[Any, ...]) -> list[Any]:
        return list(await (await conn.execute(_pg(statement), params)).fetchall())

    async def take_free(
        self,
        conn: Conn,
        payer: str,
        nonce: str,
        day: str,
        limit: int,
        address: str | None,
        per_address: int,
    ) -> int | None:
        # One payer's quota at a time (a row lock cannot cover a row not yet there).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (payer,))
        rows = await self._all(conn, sql.FREE_USED, (payer, day))
        count = sql.free_used(rows[0] if rows else None)
        if count >= limit:
            return None
        now = await self._store._now(conn)
        used = await conn.execute(_pg(sql.USE_SIGNIN_NONCE), (nonce, payer, now))
        if used.rowcount != 1:
            raise SignInReused("this sign-in was already used")
        await conn.execute(_pg(sql.COUNT_FREE), (payer, day))
        if address is not None:
            # Last, and no lock of its own: the row lock of one statement (no lock cycle).
            taken = await conn.execute(_pg(sql.COUNT_FREE_ADDRESS), (day, address, per_address))
            if taken.rowcount != 1:
                raise FreeAddressUsed  # the transaction is rolled back: nothing recorded
        return limit - count - 1

    async def prune_days(self, conn: Conn, before_day: str, before_time: float, batch: int) -> int:
        pruned = 0
        for statement, params in sql.prune(before_day, before_time, batch, skip_locked=True):
            pruned = max(pruned, (await conn.execute(_pg(statement), params)).rowcount)
        return pruned

    async def signin_key(self, conn: Conn) -> bytes:
        await conn.execute(_pg(sql.ADD_SIGNIN_KEY), (secrets.token_hex(32),))
        rows = await self._all(conn, sql.SIGNIN_KEY, ())
        return bytes.fromhex(str(rows[0]["secret"]))

    async def add_receipt(
        self,
        conn: Conn,
        payment_id: str,
        kind: str,
        token: str,
        usage: ReceiptUsage | None,
        lease: int | None,
    ) -> None:
        await self._store._must(conn, payment_id)
        now = await self._store._now(conn)
        await conn.execute(_pg(sql.ADD_RECEIPT), (payment_id, kind, token, now))
        if usage is not None and kind == "reply":
            await conn.execute(_pg(sql.RECEIPT_USAGE), sql.receipt_usage(payment_id, usage, lease))

    async def receipts(
        self, conn: Conn, tail: str, params: tuple[Any, ...]
    ) -> builtins.list[StoredReceipt]:
        return sql.receipts_from(await self._all(conn, sql.RECEIPTS + tail, params))

    async def history(self, conn: Conn, payment_id: str) -> builtins.list[PaymentEvent]:
        rows = await self._all(conn, sql.HELD_HISTORY, (payment_id,))
        held = sql.held_history(payment_id, rows[0] if rows else None)
        if held is not None:
            return held
        return sql.events_from(await self._all(conn, *sql.history(payment_id)))

    async def earnings(self, conn: Conn, since: float, by: str) -> builtins.list[Earnings]:
        statement = sql.earnings(GROUPS[by], "SUM(COALESCE(settled_amount, amount))", since)
        return sql.earnings_from(await self._all(conn, *statement))

    async def forget_idempotency_key(
        self,
        conn: Conn,
        key: str,
        payment_id: str,
        ended: tuple[PaymentState, ...],
        before: float,
    ) -> bool:
        statement, params = sql.forget_idempotency_key(key, payment_id, ended, before, array=True)
        return (await conn.execute(_pg(statement), params)).rowcount == 1
