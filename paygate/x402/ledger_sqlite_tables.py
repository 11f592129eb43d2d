"""The SQLite ledger's side tables (statements from :mod:`paygate.x402.ledger_tables`): run on
the ledger's worker thread, each write in its own savepoint of the group's transaction."""

from __future__ import annotations

import builtins
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from paygate.x402 import ledger_rules as rules
from paygate.x402 import ledger_tables as sql
from paygate.x402.ledger import (
    Earnings,
    FreeAddressUsed,
    PaymentEvent,
    PaymentState,
    ReceiptUsage,
    SignInReused,
    StoredReceipt,
)


class _SqliteStore(Protocol):
    """What the tables use of the SQLite ledger (ledger_sqlite.SqliteLedger)."""

    _clock: Callable[[], float]

    @property
    def _conn(self) -> sqlite3.Connection: ...

    def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...


GROUPS = sql.groups(day="date(created_at, 'unixepoch')")
# Amounts are decimal text (a uint256 does not fit SQLite's INTEGER); a day's sum does.
_MOVED = "SUM(CAST(COALESCE(settled_amount, amount) AS INTEGER))"


class SqliteTables:
    def __init__(self, store: _SqliteStore) -> None:
        self._store = store

    def take_free(
        self, payer: str, nonce: str, day: str, limit: int, address: str | None, per_address: int
    ) -> int | None:
        with self._store._write() as db:
            count = sql.free_used(db.execute(sql.FREE_USED, (payer, day)).fetchone())
            if count >= limit:
                return None
            used = db.execute(sql.USE_SIGNIN_NONCE, (nonce, payer, self._store._clock()))
            if used.rowcount != 1:
                raise SignInReused("this sign-in was already used")
            db.execute(sql.COUNT_FREE, (payer, day))
            if address is not None:
                taken = db.execute(sql.COUNT_FREE_ADDRESS, (day, address, per_address))
                if taken.rowcount != 1:
                    raise FreeAddressUsed  # the savepoint is rolled back: nothing recorded
            return limit - count - 1

    def prune_days(self, before_day: str, before_time: float, batch: int) -> int:
        with self._store._write() as db:
            statements = sql.prune(before_day, before_time, batch, skip_locked=False)
            return max(db.execute(*statement).rowcount for statement in statements)

    def signin_key(self) -> bytes:
        with self._store._write() as db:
            db.execute(sql.ADD_SIGNIN_KEY, (secrets.token_hex(32),))
            return bytes.fromhex(str(db.execute(sql.SIGNIN_KEY).fetchone()["secret"]))

    def add_receipt(
        self,
        payment_id: str,
        kind: str,
        token: str,
        usage: ReceiptUsage | None,
        lease: int | None,
    ) -> None:
        with self._store._write() as db:
            if db.execute(sql.PAYMENT_EXISTS, (payment_id,)).fetchone() is None:
                raise rules.not_found(payment_id)
            db.execute(sql.ADD_RECEIPT, (payment_id, kind, token, self._store._clock()))
            if usage is not None and kind == "reply":
                db.execute(sql.RECEIPT_USAGE, sql.receipt_usage(payment_id, usage, lease))

    def receipts(self, tail: str, params: tuple[Any, ...]) -> builtins.list[StoredReceipt]:
        return sql.receipts_from(self._store._conn.execute(sql.RECEIPTS + tail, params))

    def history(self, payment_id: str) -> builtins.list[PaymentEvent]:
        conn = self._store._conn
        held = sql.held_history(
            payment_id, conn.execute(sql.HELD_HISTORY, (payment_id,)).fetchone()
        )
        return held if held is not None else sql.events_from(conn.execute(*sql.history(payment_id)))

    def earnings(self, since: float, by: str) -> builtins.list[Earnings]:
        return sql.earnings_from(
            self._store._conn.execute(*sql.earnings(GROUPS[by], _MOVED, since))
        )

    def forget_idempotency_key(
        self, key: str, payment_id: str, ended: tuple[PaymentState, ...], before: float
    ) -> bool:
        with self._store._write() as db:
            statement = sql.forget_idempotency_key(key, payment_id, ended, before, array=False)
            return db.execute(*statement).rowcount == 1
