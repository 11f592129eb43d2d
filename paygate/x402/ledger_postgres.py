"""The payment ledger on PostgreSQL: one store shared by every worker and replica.

Why these choices:

* psycopg 3 with psycopg_pool: libpq underneath, so a ``postgresql://`` URL means exactly what
  it means to ``psql`` (unix-socket hosts, ``sslmode``, service and password files); one
  maintained driver with a real async API and a separate, maintained pool (health checks,
  bounded waits). asyncpg is faster per query, but speaks its own protocol implementation and
  conninfo subset; a payment ledger spends its time waiting on fsync, not on the driver.
* The replay guard is one statement: ``INSERT … ON CONFLICT (network, asset, payer, nonce) DO
  UPDATE … WHERE state = 'released'``; a conflicting row that is not RELEASED returns nothing
  and is a replay. No read-then-write window, across any number of hosts.
* Every read-modify-write takes the row with ``SELECT … FOR UPDATE``; claims take rows with
  ``FOR UPDATE SKIP LOCKED``, so concurrent reconcilers split the work and never wait on, or
  double-take, each other's rows.
* Time (``created_at``, leases) is the database's clock by default: the only clock all replicas
  share. A clock may be injected (tests).
* A submitted call runs to its end even if the awaiting task is cancelled (shielded), like the
  SQLite ledger: a cancelled caller does not know the outcome, the store is never half-done.
* The connection string is a secret: no message here quotes it; errors name the failure only.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from paygate.postgres import PoolCalls, values
from paygate.x402 import ledger_postgres_schema as schema
from paygate.x402 import ledger_rules as rules
from paygate.x402.ledger import (
    DEFAULT_LEASE_SECONDS,
    RESERVATION_STATES,
    UNFINISHED_STATES,
    AlreadyReserved,
    EventAction,
    LedgerConflict,
    LedgerUnavailable,
    Meter,
    PaymentRecord,
    PaymentState,
    SchemeWrite,
)
from paygate.x402.ledger_base import BY_IDEMPOTENCY_KEY, BY_KEY, Ledger
from paygate.x402.ledger_postgres_schema import SCHEMA_VERSION, Conn
from paygate.x402.ledger_postgres_tables import PostgresTables
from paygate.x402.ledger_tables import ADD_RECEIPT, HELD_HISTORY, SET_HISTORY

T = TypeVar("T")

_COLUMNS = rules.RECORD_COLUMNS
_SELECT = f"SELECT {_COLUMNS} FROM payments"  # noqa: S608 - constant column list
_INSERT_EVENT = (
    f"INSERT INTO payment_events ({rules.EVENT_COLUMNS})"  # noqa: S608 - constant column list
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
# The replay guard, in one statement: a new key is inserted; a RELEASED one is claimed again
# (same id and attempts); any other existing row returns nothing.
_RESERVE = (
    "INSERT INTO payments (id, network, asset, payer, nonce, pay_to, amount,"  # noqa: S608 - constant columns
    " x402_version, route, state, served, payload, requirements, idempotency_key,"
    " attempts, created_at, updated_at, owner, lease, lease_until, scheme, model,"
    " counted_at, history)"
    " VALUES (%(id)s, %(network)s, %(asset)s, %(payer)s, %(nonce)s, %(pay_to)s,"
    " %(amount)s::numeric, %(x402_version)s, %(route)s, %(reserved)s, false,"
    " %(payload)s, %(requirements)s, %(idempotency_key)s, 0, %(now)s, %(now)s, %(owner)s, 1,"
    " %(until)s, %(scheme)s, %(model)s, %(now)s, %(history)s)"
    " ON CONFLICT (network, asset, payer, nonce) DO UPDATE SET"
    " state = excluded.state, served = false, pay_to = excluded.pay_to,"
    " amount = excluded.amount, x402_version = excluded.x402_version,"
    " route = excluded.route, payload = excluded.payload,"
    " requirements = excluded.requirements,"
    " idempotency_key = COALESCE(excluded.idempotency_key, payments.idempotency_key),"
    " error = NULL, updated_at = excluded.updated_at, owner = excluded.owner,"
    " scheme = excluded.scheme, model = excluded.model, tokens_in = NULL,"
    " tokens_out = NULL, usage_source = NULL, settle_amount = NULL,"
    " counted_at = excluded.counted_at,"
    " lease = payments.lease + 1, lease_until = excluded.lease_until"
    " WHERE payments.state = %(released)s"
    f" RETURNING {_COLUMNS}"
)
_ADD_RECEIPT = ADD_RECEIPT.replace("?", "%s")
_MOVE = (
    "UPDATE payments SET state = %(state)s, attempts = %(attempts)s, served = %(served)s,"
    " tx_hash = %(tx_hash)s, error = %(error)s, updated_at = %(now)s, owner = %(owner)s,"
    " lease_until = %(until)s, tokens_in = %(tokens_in)s, tokens_out = %(tokens_out)s,"
    " usage_source = %(usage_source)s, settle_amount = %(settle_amount)s::numeric,"
    " settled_amount = %(settled_amount)s::numeric, history = %(history)s{counted}"
    " WHERE id = %(id)s AND state = %(from_state)s AND lease = %(lease)s"  # as read, locked
)
_HISTORY_OF = HELD_HISTORY.replace("?", "%s")
_SET_HISTORY = SET_HISTORY.replace("?", "%s")
_SELECT_HELD = f"SELECT {_COLUMNS}, history FROM payments WHERE id = %s FOR UPDATE"  # noqa: S608 - constant column list
# counted_at is set only when the move counts the payment (as the SQLite store does).
_MOVES = {False: _MOVE.format(counted=""), True: _MOVE.format(counted=", counted_at = %(now)s")}


class PostgresLedger(Ledger):
    """:class:`paygate.x402.ledger_base.Ledger` on PostgreSQL. Build it with :meth:`open`."""

    def __init__(
        self,
        pool: Any,
        *,
        read_only: bool,
        clock: Callable[[], float] | None,
        replica: str | None,
        lease_seconds: float,
    ) -> None:
        self.read_only = read_only
        super().__init__(replica, lease_seconds)
        self.found_version = SCHEMA_VERSION
        self._calls = PoolCalls(
            pool,
            error=schema.ledger_error,
            closed=lambda: LedgerUnavailable("the ledger is closed"),
        )
        self._clock = clock
        # The side tables' statements, in each call's transaction.
        self._use_tables(PostgresTables(self))

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        password: str | None = None,
        read_only: bool = False,
        clock: Callable[[], float] | None = None,
        replica: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        migrate: bool = True,
        pool_size: int = 10,
        timeout: float = 10.0,
        lock_timeout: float = 5.0,
    ) -> PostgresLedger:
        """Connect (a pool of at most ``pool_size``), then migrate the schema unless
        ``migrate`` is false or ``read_only`` (then anything but the current schema is refused).

        ``timeout`` bounds connecting and waiting for a pooled connection; ``lock_timeout``
        how long a statement waits for another transaction's row lock. Either running out is
        :class:`LedgerUnavailable`.
        """
        pool = await schema.open_pool(
            conninfo,
            password=password,
            read_only=read_only,
            pool_size=pool_size,
            timeout=timeout,
            lock_timeout=lock_timeout,
        )
        ledger = cls(
            pool,
            read_only=read_only,
            clock=clock,
            replica=replica,
            lease_seconds=lease_seconds,
        )
        try:
            if migrate and not read_only:
                await ledger._run(ledger._migrate)
            else:
                version = await ledger._run(schema.version)
                if version != SCHEMA_VERSION:
                    raise LedgerUnavailable(
                        f"the PostgreSQL ledger has schema v{version}, not v{SCHEMA_VERSION}: "
                        "run `paygate ledger migrate`"
                    )
        except BaseException:
            await ledger.close()
            raise
        return ledger

    async def close(self) -> None:
        """Let submitted calls finish, then close the pool. Idempotent."""
        await self._calls.close()

    # --- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction on a pooled connection, shielded."""
        return await self._calls.run(fn, *args)

    async def scheme_sql(
        self, sql: str, params: tuple[Any, ...]
    ) -> tuple[int, builtins.list[tuple[Any, ...]]]:
        """One statement on a scheme package's own tables (batch settlement's ``bs_*``), in its
        own transaction: (rows changed, rows returned). ``?`` placeholders, as SQLite's."""

        async def run(conn: Conn) -> tuple[int, builtins.list[tuple[Any, ...]]]:
            cursor = await conn.execute(sql.replace("?", "%s"), params)
            rows = await cursor.fetchall() if cursor.description else []
            return cursor.rowcount, [values(row) for row in rows]

        return await self._run(run)

    async def scheme_sql_all(
        self, statements: builtins.list[tuple[str, tuple[Any, ...]]]
    ) -> builtins.list[tuple[int, builtins.list[tuple[Any, ...]]]]:
        """Several statements in one transaction (all or nothing): each one's (rows changed,
        rows returned)."""

        async def run(conn: Conn) -> builtins.list[tuple[int, builtins.list[tuple[Any, ...]]]]:
            out = []
            for sql, params in statements:
                cursor = await conn.execute(sql.replace("?", "%s"), params)
                rows = await cursor.fetchall() if cursor.description else []
                out.append((cursor.rowcount, [values(row) for row in rows]))
            return out

        return await self._run(run)

    async def _now(self, conn: Conn) -> float:
        if self._clock is not None:
            return self._clock()
        row = await (
            await conn.execute("SELECT extract(epoch FROM clock_timestamp()) AS t")
        ).fetchone()
        return float(row["t"])

    async def _migrate(self, conn: Conn) -> None:
        self.found_version = await schema.migrate(conn, await self._now(conn))

    async def _clock_now(self, conn: Conn) -> float:
        return await self._now(conn)

    async def _one(self, conn: Conn, where: str, params: tuple[Any, ...]) -> PaymentRecord | None:
        row = await (await conn.execute(f"{_SELECT} {where}", params)).fetchone()
        return rules.record_from_row(row) if row else None

    async def _many(
        self, conn: Conn, tail: str, params: tuple[Any, ...]
    ) -> builtins.list[PaymentRecord]:
        rows = await (await conn.execute(f"{_SELECT} {tail}", params)).fetchall()
        return [rules.record_from_row(row) for row in rows]

    async def _must(self, conn: Conn, payment_id: str, *, lock: bool = False) -> PaymentRecord:
        record = await self._one(
            conn, "WHERE id = %s" + (" FOR UPDATE" if lock else ""), (payment_id,)
        )
        if record is None:
            raise rules.not_found(payment_id)
        return record

    def _tail(self, clause: str) -> str:
        return clause.format(seq="seq").replace("?", "%s")

    async def _event(
        self,
        conn: Conn,
        record: PaymentRecord,
        action: EventAction,
        at: float,
        **details: str | None,
    ) -> None:
        """One history line (a change off the ordinary course: payment_events, after the lines
        the row kept, if any); ``details``: ``transaction``, ``error``, ``detail``. The row is
        locked by the change."""
        line = rules.event_values(record, action, at, self.replica, **details)
        held = await (await conn.execute(_HISTORY_OF, (record.id,))).fetchone()
        await self._keep_lines(conn, record.id, held["history"] if held else None, [line])

    async def _keep_lines(
        self, conn: Conn, payment_id: str, held: str | None, lines: builtins.list[tuple[Any, ...]]
    ) -> None:
        """History ``lines`` of a change whose row was read with its own ``held`` history, and
        that did not write the row's history itself (see ``rules.kept_history``)."""
        history, rows = rules.kept_history(payment_id, held, lines)
        if history != held:
            await conn.execute(_SET_HISTORY, (history, payment_id))
        if rows:
            async with conn.cursor() as cursor:  # in one batch
                await cursor.executemany(_INSERT_EVENT, rows)

    # --- the statements (each in one transaction) -------------------------------------------

    async def _reserve(self, conn: Conn, checked: rules.Reservation) -> PaymentRecord:
        if checked.idempotency_key is not None:
            holder = await self._one(
                conn, self._tail(BY_IDEMPOTENCY_KEY), (checked.idempotency_key,)
            )
            checked.check_identifier(holder)
        now = await self._now(conn)
        if checked.budgets:
            # One payer's reservations in turn (the transaction's advisory lock), so that
            # concurrent requests cannot both fit the same remainder of the budget.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (checked.payer,))
        for budget in checked.budgets:
            network, asset, payer, nonce = checked.key
            row = await (
                await conn.execute(
                    "SELECT COALESCE(SUM(COALESCE(settled_amount, settle_amount, amount)), 0)"
                    " AS spent FROM payments WHERE asset = %s AND payer = %s AND counted_at >= %s"
                    " AND state <> ALL(%s) AND NOT (network = %s AND nonce = %s)",
                    (asset, payer, budget.since, ["released", "failed"], network, nonce),
                )
            ).fetchone()
            checked.check_budget(budget, int(row["spent"]))
        values = checked.values(
            payment_id=rules.new_payment_id(),
            now=now,
            replica=self.replica,
            lease_seconds=self.lease_seconds,
        )
        row = await (await conn.execute(_RESERVE, values)).fetchone()
        if row is None:
            existing = await self._one(conn, self._tail(BY_KEY), checked.key)
            if existing is None:  # cannot happen: the conflicting row is committed
                raise LedgerConflict("the authorization changed concurrently")
            raise AlreadyReserved(existing)
        record = rules.record_from_row(row)
        if record.id != values["id"]:  # a RELEASED one claimed again: a line of its own
            await self._event(conn, record, EventAction.RESERVED, now)
        # (a new row holds its reservation's line: ``history`` in ``values``)
        if checked.write is not None:
            await self._make(conn, checked.write)
        return record

    async def _transition(self, conn: Conn, payment_id: str, move: rules.Move) -> PaymentRecord:
        row = await (await conn.execute(_SELECT_HELD, (payment_id,))).fetchone()
        if row is None:
            raise rules.not_found(payment_id)
        current = rules.record_from_row(row)
        now = await self._now(conn)
        values, record, steps = move.change(
            current, now=now, replica=self.replica, lease_seconds=self.lease_seconds
        )
        lines = move.events(record, steps, now, self.replica)
        values["history"], lines = rules.kept_history(current.id, row["history"], lines)
        if (
            await conn.execute(_MOVES[values["counted"]], values)
        ).rowcount != 1:  # cannot happen under the lock
            raise LedgerConflict(f"payment {current.id} changed concurrently")
        if lines:
            async with conn.cursor() as cursor:  # the history lines in one batch
                await cursor.executemany(_INSERT_EVENT, lines)
        if move.reply_receipt is not None:
            await conn.execute(_ADD_RECEIPT, (record.id, "reply", move.reply_receipt, now))
        if move.write is not None:
            await self._make(conn, move.write)
        return record

    @staticmethod
    async def _make(conn: Conn, write: SchemeWrite) -> None:
        """A scheme's write in the current transaction (rolled back with it if not made)."""
        write.results.clear()
        for sql, params in write.statements:
            cursor = await conn.execute(sql.replace("?", "%s"), params)
            rows = await cursor.fetchall() if cursor.description else []
            write.results.append((cursor.rowcount, [values(row) for row in rows]))
        rules.check_write(write)

    async def _mark_served(self, conn: Conn, payment_id: str, first: bool) -> PaymentRecord:
        current = await self._must(conn, payment_id, lock=True)
        rules.check_first_served(current, first)
        now = await self._now(conn)
        row = await (
            await conn.execute(
                "UPDATE payments SET served = true, updated_at = %s WHERE id = %s"  # noqa: S608 - constant columns
                f" RETURNING {_COLUMNS}",
                (now, current.id),
            )
        ).fetchone()
        record = rules.record_from_row(row)
        await self._event(conn, record, EventAction.SERVED, now)
        return record

    async def _renew(
        self, conn: Conn, payment_id: str, lease: int, meter: Meter | None
    ) -> PaymentRecord:
        current = await self._must(conn, payment_id, lock=True)
        rules.check_renewal(current, lease, self.replica)
        until = await self._now(conn) + self.lease_seconds
        progress = rules.renewed_meter(current, meter)
        if progress is not None:  # a SERVED stream's progress, with its renewal (locked)
            row = await (
                await conn.execute(
                    "UPDATE payments SET lease_until = %s, tokens_in = %s, tokens_out = %s,"  # noqa: S608 - constant columns
                    " usage_source = %s, settle_amount = %s::numeric WHERE id = %s"
                    f" RETURNING {_COLUMNS}",
                    (
                        until,
                        progress.tokens_in,
                        progress.tokens_out,
                        progress.source,
                        str(progress.settle_amount),
                        current.id,
                    ),
                )
            ).fetchone()
            return rules.record_from_row(row)
        row = await (
            await conn.execute(
                f"UPDATE payments SET lease_until = %s WHERE id = %s RETURNING {_COLUMNS}",  # noqa: S608 - constant columns
                (until, current.id),
            )
        ).fetchone()
        return rules.record_from_row(row)

    async def _let_go(self, conn: Conn, payment_id: str, lease: int) -> PaymentRecord:
        current = await self._must(conn, payment_id, lock=True)
        rules.check_let_go(current, lease)
        row = await (
            await conn.execute(
                "UPDATE payments SET owner = NULL, lease_until = NULL WHERE id = %s"  # noqa: S608 - constant columns
                f" RETURNING {_COLUMNS}",
                (current.id,),
            )
        ).fetchone()
        record = rules.record_from_row(row)
        await self._event(conn, record, EventAction.LET_GO, await self._now(conn))
        return record

    async def _claim_unfinished(
        self, conn: Conn, min_age: float, own: bool, limit: int
    ) -> builtins.list[PaymentRecord]:
        return await self._take(conn, UNFINISHED_STATES, min_age, own, limit, False)

    async def _release_abandoned(
        self,
        conn: Conn,
        own: bool,
        limit: int,
        writes: Callable[[PaymentRecord], SchemeWrite | None] | None,
    ) -> builtins.list[PaymentRecord]:
        released = await self._take(conn, RESERVATION_STATES, 0.0, own, limit, True)
        if writes is not None:
            made = [w for w in map(writes, released) if w is not None]
            # In one order (a hold's write names its channel first): two replicas releasing
            # at once take the rows they share in the same order, never each other's first.
            for write in sorted(made, key=lambda w: repr(w.statements)):
                await self._make(conn, write)
        return released

    async def _take(
        self,
        conn: Conn,
        states: tuple[PaymentState, ...],
        min_age: float,
        own: bool,
        limit: int,
        release: bool,
    ) -> builtins.list[PaymentRecord]:
        """Claim (or, with ``release``, release) records whose owner is gone; SKIP LOCKED makes
        concurrent callers take disjoint rows."""
        now = await self._now(conn)
        if release:
            change = (
                "state = 'released', owner = NULL, lease_until = NULL, lease = p.lease + 1,"
                " updated_at = %(now)s"
            )
        else:
            change = "owner = %(me)s, lease = p.lease + 1, lease_until = %(until)s"
        rows = await (
            await conn.execute(
                "WITH picked AS (SELECT id, owner AS former FROM payments"  # noqa: S608 - constant columns
                " WHERE state = ANY(%(states)s) AND ((owner IS NOT NULL AND lease_until < %(now)s)"
                " OR (owner IS NULL AND updated_at <= %(cutoff)s)"
                " OR (%(own)s AND owner = %(me)s))"
                " ORDER BY updated_at, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                f" UPDATE payments p SET {change} FROM picked WHERE p.id = picked.id"
                " RETURNING "
                + ", ".join(f"p.{c.strip()}" for c in _COLUMNS.split(","))
                + ", picked.former, p.seq",
                {
                    "states": [s.value for s in states],
                    "now": now,
                    "cutoff": now - min_age,
                    "own": own,
                    "me": self.replica,
                    "limit": limit,
                    "until": now + self.lease_seconds,
                },
            )
        ).fetchall()
        rows.sort(key=lambda row: (row["updated_at"], row["seq"]))
        taken = []
        action = EventAction.RELEASED if release else EventAction.CLAIMED
        for row in rows:
            record = rules.record_from_row(row)
            await self._event(conn, record, action, now, detail=row["former"] or "nobody")
            taken.append(record)
        return taken

    async def _in_states(
        self, conn: Conn, states: tuple[PaymentState, ...], older_than: float | None, limit: int
    ) -> builtins.list[PaymentRecord]:
        """Records in ``states`` (not changed for ``older_than`` seconds), oldest first."""
        if older_than is None:
            where, params = "WHERE state = ANY(%s)", ()
        else:
            where, params = (
                "WHERE state = ANY(%s) AND updated_at <= %s",
                (await self._now(conn) - older_than,),
            )
        return await self._many(
            conn,
            f"{where} ORDER BY updated_at, seq LIMIT %s",
            ([s.value for s in states], *params, limit),
        )
