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

import asyncio
import builtins
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from paygate.x402 import ledger_rules as rules
from paygate.x402.ledger import (
    DEFAULT_LEASE_SECONDS,
    MAX_LIST_LIMIT,
    RESERVATION_STATES,
    UNFINISHED_STATES,
    AlreadyReserved,
    Earnings,
    EventAction,
    IdempotencyKeyReused,
    LedgerConflict,
    LedgerError,
    LedgerUnavailable,
    Meter,
    PaymentEvent,
    PaymentRecord,
    PaymentState,
    ReceiptUsage,
    SignInReused,
    StoredReceipt,
)
from paygate.x402.ledger_base import BY_ID, BY_IDEMPOTENCY_KEY, BY_KEY, LedgerBase

try:
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - reported by open()
    psycopg = None  # type: ignore[assignment]

# The pool logs its failed connection attempts with the server's message, which names the host
# and user of the (secret) URL; our own errors say what failed without them.
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

T = TypeVar("T")
Conn = Any  # psycopg.AsyncConnection[dict[str, Any]]

#: Same numbering as the SQLite ledger: v1 the first ledger, v2 leases and history, v3 metering
#: and the free quota, v4 the economics controls and the console's tables, v5 the transparency log,
#: v6 signed receipts, v7 budgets by when a payment counted and the sign-in key.
SCHEMA_VERSION = 8
_STATES = ", ".join(f"'{state.value}'" for state in PaymentState)
_MIGRATION_LOCK = 0x70617967  # pg_advisory_xact_lock key: one migrator at a time ("payg")

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE payments (
            id text PRIMARY KEY,
            seq bigserial NOT NULL,  -- insertion order, the tie-breaker SQLite's rowid is
            network text NOT NULL,
            asset text NOT NULL,
            payer text NOT NULL,
            nonce text NOT NULL,
            pay_to text NOT NULL,
            amount numeric(78, 0) NOT NULL,  -- a uint256
            x402_version integer NOT NULL,
            route text NOT NULL,
            state text NOT NULL CHECK (state IN ({_STATES})),
            served boolean NOT NULL DEFAULT false,
            payload text NOT NULL,
            requirements text NOT NULL,
            idempotency_key text UNIQUE,
            tx_hash text,
            error text,
            attempts integer NOT NULL DEFAULT 0,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL,
            UNIQUE (network, asset, payer, nonce)
        )""",
        "CREATE INDEX payments_state ON payments (state, updated_at)",
        "CREATE INDEX payments_created ON payments (created_at)",
    ),
    2: (
        "ALTER TABLE payments ADD COLUMN owner text,"
        " ADD COLUMN lease bigint NOT NULL DEFAULT 0,"
        " ADD COLUMN lease_until double precision",
        "CREATE INDEX payments_lease ON payments (state, lease_until)",
        """CREATE TABLE payment_events (
            seq bigserial PRIMARY KEY,
            payment_id text NOT NULL REFERENCES payments (id),
            at double precision NOT NULL,
            replica text NOT NULL,
            action text NOT NULL,
            state text NOT NULL,
            lease bigint NOT NULL,
            tx_hash text,
            error text,
            detail text
        )""",
        "CREATE INDEX payment_events_payment ON payment_events (payment_id, seq)",
    ),
    3: (
        "ALTER TABLE payments ADD COLUMN scheme text NOT NULL DEFAULT 'exact',"
        " ADD COLUMN model text, ADD COLUMN tokens_in bigint, ADD COLUMN tokens_out bigint,"
        " ADD COLUMN usage_source text, ADD COLUMN settle_amount numeric(78, 0),"
        " ADD COLUMN settled_amount numeric(78, 0)",
        "CREATE INDEX payments_payer ON payments (payer, created_at)",
        "CREATE TABLE free_quota (payer text NOT NULL, day text NOT NULL,"
        " used integer NOT NULL, PRIMARY KEY (payer, day))",
        "CREATE TABLE signin_nonces (nonce text PRIMARY KEY, payer text NOT NULL,"
        " used_at double precision NOT NULL)",
    ),
    4: (
        "CREATE TABLE token_usage (seq bigserial PRIMARY KEY, at double precision NOT NULL,"
        " payer text NOT NULL, model text NOT NULL, tokens_in bigint NOT NULL,"
        " tokens_out bigint NOT NULL)",
        "CREATE INDEX token_usage_payer ON token_usage (payer, at)",
        "CREATE INDEX token_usage_model ON token_usage (model, at)",
        "CREATE INDEX token_usage_at ON token_usage (at)",
        "CREATE TABLE limit_events (seq bigserial PRIMARY KEY, at double precision NOT NULL,"
        " kind text NOT NULL, rule text NOT NULL, payer text NOT NULL, model text,"
        " enforced boolean NOT NULL, detail text)",
        "CREATE INDEX limit_events_at ON limit_events (at)",
        "CREATE TABLE alert_claims (key text PRIMARY KEY, at double precision NOT NULL)",
        "CREATE TABLE console_logins (token_hash text PRIMARY KEY,"
        " expires_at double precision NOT NULL, used_at double precision)",
    ),
    5: (
        "CREATE TABLE tlog_meta (id integer PRIMARY KEY CHECK (id = 1), origin text NOT NULL)",
        "CREATE TABLE tlog_entries (idx bigint PRIMARY KEY, data bytea NOT NULL,"
        " replica text NOT NULL, created_at double precision NOT NULL)",
        "CREATE TABLE tlog_hashes (level integer NOT NULL, idx bigint NOT NULL,"
        " hash bytea NOT NULL, PRIMARY KEY (level, idx))",
        "CREATE TABLE tlog_checkpoints (size bigint PRIMARY KEY, root bytea NOT NULL,"
        " note text NOT NULL, cosignatures text NOT NULL DEFAULT '',"
        " created_at double precision NOT NULL)",
        "CREATE TABLE tlog_receipts (seq bigserial PRIMARY KEY, leaf bytea NOT NULL,"
        " amount numeric(78, 0) NOT NULL, replica text NOT NULL,"
        " issued_at double precision NOT NULL, entry bigint, position bigint)",
        "CREATE INDEX tlog_receipts_open ON tlog_receipts (entry, seq)",
        "CREATE INDEX tlog_receipts_leaf ON tlog_receipts (leaf)",
    ),
    # Signed receipts (one per payment and kind), and payments found by their nonce.
    6: (
        """CREATE TABLE receipts (
            payment_id text NOT NULL REFERENCES payments (id),
            kind text NOT NULL CHECK (kind IN ('reply', 'settlement')),
            token text NOT NULL,
            created_at double precision NOT NULL,
            seq bigserial NOT NULL,
            PRIMARY KEY (payment_id, kind)
        )""",
        "CREATE INDEX receipts_created ON receipts (created_at)",
        "CREATE INDEX payments_nonce ON payments (nonce)",
    ),
    # Budgets by when a payment last counted (admitted, re-admitted, settled); the sign-in
    # nonce key. See ledger_sqlite's step 7.
    7: (
        "ALTER TABLE payments ADD COLUMN counted_at double precision",
        "UPDATE payments SET counted_at = updated_at",
        "CREATE INDEX payments_payer_counted ON payments (payer, counted_at)",
        "CREATE TABLE signin_key (id integer PRIMARY KEY CHECK (id = 1), secret text NOT NULL)",
    ),
    # batch settlement (paygate.x402.schemes.batch_settlement): payment channels, every voucher
    # accepted, and the claims that move the money (their tables are that package's).
    8: (
        """CREATE TABLE bs_channels (
            channel_id TEXT PRIMARY KEY,
            network TEXT NOT NULL,
            payer TEXT NOT NULL,
            config TEXT NOT NULL,
            balance TEXT NOT NULL,
            total_claimed TEXT NOT NULL,
            charged TEXT NOT NULL,
            signed_max TEXT NOT NULL,
            signature TEXT NOT NULL,
            pending_owner TEXT,
            pending_until double precision,
            version bigint NOT NULL,
            updated_at double precision NOT NULL
        )""",
        """CREATE TABLE bs_vouchers (
            channel_id TEXT NOT NULL,
            max_claimable TEXT NOT NULL,
            signature TEXT NOT NULL,
            payment_id TEXT NOT NULL,
            charge TEXT NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (channel_id, max_claimable)
        )""",
        """CREATE TABLE bs_claims (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            entries TEXT NOT NULL,
            tx_hash TEXT,
            owner TEXT,
            lease_until double precision,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL
        )""",
    ),
}

_COLUMNS = rules.RECORD_COLUMNS
_SELECT = f"SELECT {_COLUMNS} FROM payments"  # noqa: S608 - constant column list
# `paygate payments summary --by`: the SQL expression of each grouping (constants only).
_GROUPS = {
    "model": "COALESCE(model, '-')",
    "day": "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "payer": "payer",
}
_INSERT_EVENT = (
    f"INSERT INTO payment_events ({rules.EVENT_COLUMNS})"  # noqa: S608 - constant column list
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_NUMERIC = {"amount", "settle_amount", "settled_amount"}  # uint256 text, cast on the way in
_COPY = (
    f"INSERT INTO payments ({_COLUMNS}) VALUES ("  # noqa: S608 - constant column list
    + ", ".join("%s::numeric" if name.strip() in _NUMERIC else "%s" for name in _COLUMNS.split(","))
    + ")"
)
# The replay guard, in one statement: a new key is inserted; a RELEASED one is claimed again
# (same id and attempts); any other existing row returns nothing.
_RESERVE = (
    "INSERT INTO payments (id, network, asset, payer, nonce, pay_to, amount,"  # noqa: S608 - constant columns
    " x402_version, route, state, served, payload, requirements, idempotency_key,"
    " attempts, created_at, updated_at, owner, lease, lease_until, scheme, model,"
    " counted_at)"
    " VALUES (%(id)s, %(network)s, %(asset)s, %(payer)s, %(nonce)s, %(pay_to)s,"
    " %(amount)s::numeric, %(x402_version)s, %(route)s, %(reserved)s, false,"
    " %(payload)s, %(requirements)s, %(idempotency_key)s, 0, %(now)s, %(now)s, %(owner)s, 1,"
    " %(until)s, %(scheme)s, %(model)s, %(now)s)"
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
_MOVE = (
    "UPDATE payments SET state = %(state)s, attempts = attempts + %(attempt)s,"  # noqa: S608 - constant columns
    " served = served OR %(served)s, tx_hash = COALESCE(%(tx_hash)s, tx_hash),"
    " error = COALESCE(%(error)s, error), updated_at = %(now)s, owner = %(owner)s,"
    " lease_until = %(until)s, tokens_in = COALESCE(%(tokens_in)s, tokens_in),"
    " tokens_out = COALESCE(%(tokens_out)s, tokens_out),"
    " usage_source = COALESCE(%(usage_source)s, usage_source),"
    " settle_amount = COALESCE(%(settle_amount)s::numeric, settle_amount),"
    " settled_amount = COALESCE(%(settled_amount)s::numeric, settled_amount),"
    " counted_at = CASE WHEN %(counted)s THEN %(now)s ELSE counted_at END"
    " WHERE id = %(id)s AND state = %(from_state)s AND lease = %(lease)s"
    f" RETURNING {_COLUMNS}"
)


class PostgresLedger(LedgerBase):
    """:class:`paygate.x402.ledger.Ledger` on PostgreSQL. Build it with :meth:`open`."""

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
        self._pool = pool
        self._clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

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
        if psycopg is None:
            raise LedgerUnavailable(
                "the PostgreSQL ledger needs psycopg: pip install 'paygate[postgres]'"
            )
        settings = f"SET lock_timeout = {int(lock_timeout * 1000)}"

        async def configure(conn: Conn) -> None:
            await conn.execute(settings)
            await conn.commit()
            if read_only:
                await conn.set_read_only(True)

        kwargs: dict[str, Any] = {"row_factory": dict_row, "connect_timeout": max(1, int(timeout))}
        if password is not None:
            kwargs["password"] = password
        await _probe(conninfo, kwargs)  # fail fast (refused, bad password) rather than retry
        pool = AsyncConnectionPool(
            conninfo,
            kwargs=kwargs,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            timeout=timeout,
            configure=configure,
            check=AsyncConnectionPool.check_connection,
            name="paygate-ledger",
        )
        ledger = cls(
            pool,
            read_only=read_only,
            clock=clock,
            replica=replica,
            lease_seconds=lease_seconds,
        )
        try:
            try:
                await pool.open(wait=True, timeout=timeout)
            except PoolTimeout:
                raise LedgerUnavailable(
                    "cannot connect to the PostgreSQL ledger (PAYGATE_LEDGER_URL) within "
                    f"{timeout:g}s: check the host, port, user, password and database"
                ) from None
            if migrate and not read_only:
                await ledger._run(ledger._migrate)
            else:
                version = await ledger._run(ledger._schema_version)
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
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=30)
        await self._pool.close()

    # --- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Awaitable[T]], /, *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction on a pooled connection, shielded."""
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        task = asyncio.get_running_loop().create_task(self._transaction(fn, *args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await fn(conn, *args)
        except LedgerError:
            raise
        except PoolTimeout:
            raise LedgerUnavailable("no PostgreSQL ledger connection free in time") from None
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "payments_idempotency_key_key":
                raise IdempotencyKeyReused(
                    "the payment identifier already names a different authorization"
                ) from None
            raise LedgerConflict(f"ledger constraint: {exc.diag.constraint_name}") from None
        except psycopg.errors.IntegrityError as exc:
            raise LedgerConflict(f"ledger constraint: {exc.diag.constraint_name}") from None
        except psycopg.errors.ReadOnlySqlTransaction:
            raise LedgerUnavailable("the ledger is open read-only") from None
        except psycopg.errors.LockNotAvailable:
            raise LedgerUnavailable("the PostgreSQL ledger: row locked too long") from None
        except psycopg.Error as exc:
            # The class and SQLSTATE only: a server message may quote the host, user or data.
            state = f" ({exc.sqlstate})" if exc.sqlstate else ""
            raise LedgerUnavailable(
                f"the PostgreSQL ledger failed: {type(exc).__name__}{state}"
            ) from None

    async def scheme_sql(
        self, sql: str, params: tuple[Any, ...]
    ) -> tuple[int, builtins.list[tuple[Any, ...]]]:
        """One statement on a scheme package's own tables (batch settlement's ``bs_*``), in its
        own transaction: (rows changed, rows returned). ``?`` placeholders, as SQLite's."""

        async def run(conn: Conn) -> tuple[int, builtins.list[tuple[Any, ...]]]:
            cursor = await conn.execute(sql.replace("?", "%s"), params)
            rows = await cursor.fetchall() if cursor.description else []
            # Rows come as dicts (the pool's row factory): their values, in column order.
            return cursor.rowcount, [tuple(row.values()) for row in rows]

        return await self._run(run)

    async def _now(self, conn: Conn) -> float:
        if self._clock is not None:
            return self._clock()
        row = await (
            await conn.execute("SELECT extract(epoch FROM clock_timestamp()) AS t")
        ).fetchone()
        return float(row["t"])

    async def _schema_version(self, conn: Conn) -> int:
        row = await (await conn.execute("SELECT to_regclass('ledger_schema') AS t")).fetchone()
        if row["t"] is None:
            return 0
        row = await (
            await conn.execute("SELECT version FROM ledger_schema WHERE id = 1")
        ).fetchone()
        return int(row["version"]) if row else 0

    async def _migrate(self, conn: Conn) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS ledger_schema ("
            " id integer PRIMARY KEY CHECK (id = 1),"
            " version integer NOT NULL,"
            " migrated_at double precision NOT NULL)"
        )
        version = await self._schema_version(conn)
        self.found_version = version
        if version > SCHEMA_VERSION:
            raise LedgerUnavailable(
                f"the PostgreSQL ledger has schema v{version}, newer than this paygate's "
                f"v{SCHEMA_VERSION}"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step]:
                await conn.execute(statement)
        if version != SCHEMA_VERSION:
            await conn.execute(
                "INSERT INTO ledger_schema (id, version, migrated_at) VALUES (1, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
                " migrated_at = excluded.migrated_at",
                (SCHEMA_VERSION, await self._now(conn)),
            )

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
        """One history line; ``details``: ``transaction``, ``error``, ``detail``."""
        values = rules.event_values(record, action, at, self.replica, **details)
        await conn.execute(_INSERT_EVENT, values)

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
            payment_id=uuid.uuid4().hex,
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
        await self._event(conn, record, EventAction.RESERVED, now)
        return record

    async def _transition(
        self,
        conn: Conn,
        payment_id: str,
        to: PaymentState,
        transaction: str | None,
        error: str | None,
        lease: int | None,
        meter: Meter | None,
        settled_amount: int | None,
        let_go: bool = False,
        via: PaymentState | None = None,
    ) -> PaymentRecord:
        current = await self._must(conn, payment_id, lock=True)
        if via is not None:  # the first of two moves in this transaction
            first = rules.move_values(
                current,
                via,
                transaction=None,
                error=None,
                lease=lease,
                meter=None,
                settled_amount=None,
                now=await self._now(conn),
                replica=self.replica,
                lease_seconds=self.lease_seconds,
            )
            row = await (await conn.execute(_MOVE, first)).fetchone()
            if row is None:  # cannot happen under the row lock; never guess
                raise LedgerConflict(f"payment {current.id} changed concurrently")
            current = rules.record_from_row(row)
            await self._event(conn, current, EventAction.MOVED, first["now"])
        values = rules.move_values(
            current,
            to,
            transaction=transaction,
            error=error,
            lease=lease,
            meter=meter,
            settled_amount=settled_amount,
            now=await self._now(conn),
            replica=self.replica,
            lease_seconds=self.lease_seconds,
            let_go=let_go,
        )
        row = await (await conn.execute(_MOVE, values)).fetchone()
        if row is None:  # cannot happen under the row lock; never guess
            raise LedgerConflict(f"payment {current.id} changed concurrently")
        record = rules.record_from_row(row)
        await self._event(
            conn, record, EventAction.MOVED, values["now"], transaction=transaction, error=error
        )
        return record

    async def _take_free(
        self, conn: Conn, payer: str, nonce: str, day: str, limit: int
    ) -> int | None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (payer,))
        row = await (
            await conn.execute(
                "SELECT used FROM free_quota WHERE payer = %s AND day = %s", (payer, day)
            )
        ).fetchone()
        count = int(row["used"]) if row else 0
        if count >= limit:
            return None
        inserted = await conn.execute(
            "INSERT INTO signin_nonces (nonce, payer, used_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (nonce) DO NOTHING",
            (nonce, payer, await self._now(conn)),
        )
        if inserted.rowcount != 1:
            raise SignInReused("this sign-in was already used")
        await conn.execute(
            "INSERT INTO free_quota (payer, day, used) VALUES (%s, %s, 1)"
            " ON CONFLICT (payer, day) DO UPDATE SET used = free_quota.used + 1",
            (payer, day),
        )
        return limit - count - 1

    async def _earnings(self, conn: Conn, since: float, by: str) -> builtins.list[Earnings]:
        rows = await (
            await conn.execute(
                f"SELECT {_GROUPS[by]} AS key, COUNT(*) AS n, COALESCE(SUM(tokens_in), 0) AS i,"  # noqa: S608 - constant
                " COALESCE(SUM(tokens_out), 0) AS o,"
                " COALESCE(SUM(COALESCE(settled_amount, amount)), 0) AS s"
                " FROM payments WHERE state = 'settled' AND created_at >= %s"
                " GROUP BY 1 ORDER BY 1",
                (since,),
            )
        ).fetchall()
        return [
            Earnings(str(r["key"]), int(r["n"]), int(r["i"]), int(r["o"]), int(r["s"]))
            for r in rows
        ]

    async def _mark_served(self, conn: Conn, payment_id: str) -> PaymentRecord:
        current = await self._must(conn, payment_id, lock=True)
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

    async def _renew(self, conn: Conn, payment_id: str, lease: int) -> PaymentRecord:
        current = await self._must(conn, payment_id, lock=True)
        rules.check_renewal(current, lease, self.replica)
        row = await (
            await conn.execute(
                f"UPDATE payments SET lease_until = %s WHERE id = %s RETURNING {_COLUMNS}",  # noqa: S608 - constant columns
                (await self._now(conn) + self.lease_seconds, current.id),
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
        self, conn: Conn, own: bool, limit: int
    ) -> builtins.list[PaymentRecord]:
        return await self._take(conn, RESERVATION_STATES, 0.0, own, limit, True)

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

    async def _history(self, conn: Conn, payment_id: str) -> builtins.list[PaymentEvent]:
        rows = await (
            await conn.execute(
                f"SELECT {rules.EVENT_COLUMNS} FROM payment_events WHERE payment_id = %s"  # noqa: S608
                " ORDER BY seq LIMIT %s",
                (payment_id, MAX_LIST_LIMIT),
            )
        ).fetchall()
        return [rules.event_from_row(row) for row in rows]

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

    async def _forget_idempotency_key(
        self,
        conn: Conn,
        key: str,
        payment_id: str,
        ended: tuple[PaymentState, ...],
        before: float,
    ) -> bool:
        cursor = await conn.execute(
            "UPDATE payments SET idempotency_key = NULL WHERE id = %s AND idempotency_key = %s"
            " AND (state = %s OR (state = ANY(%s) AND updated_at < %s))",
            (
                payment_id,
                key,
                PaymentState.RELEASED.value,
                [state.value for state in ended],
                before,
            ),
        )
        return cursor.rowcount == 1

    async def _add_receipt(
        self,
        conn: Conn,
        payment_id: str,
        kind: str,
        token: str,
        usage: ReceiptUsage | None,
        lease: int | None,
    ) -> None:
        await self._must(conn, payment_id)
        await conn.execute(
            "INSERT INTO receipts (payment_id, kind, token, created_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (payment_id, kind) DO NOTHING",
            (payment_id, kind, token, await self._now(conn)),
        )
        if usage is not None and kind == "reply":
            await conn.execute(
                "UPDATE payments SET tokens_in = %s, tokens_out = %s, usage_source = %s"
                " WHERE id = %s AND tokens_in IS NULL AND (%s::bigint IS NULL OR lease = %s)",
                (usage.tokens_in, usage.tokens_out, usage.source, payment_id, lease, lease),
            )

    async def _receipts(
        self, conn: Conn, tail: str, params: tuple[Any, ...]
    ) -> builtins.list[StoredReceipt]:
        rows = await (
            await conn.execute(
                f"SELECT payment_id, kind, token, created_at FROM receipts {tail}",  # noqa: S608 - constant
                params,
            )
        ).fetchall()
        return [
            StoredReceipt(r["payment_id"], r["kind"], r["token"], float(r["created_at"]))
            for r in rows
        ]

    async def _signin_key(self, conn: Conn) -> bytes:
        await conn.execute(
            "INSERT INTO signin_key (id, secret) VALUES (1, %s) ON CONFLICT (id) DO NOTHING",
            (secrets.token_hex(32),),
        )
        row = await (await conn.execute("SELECT secret FROM signin_key WHERE id = 1")).fetchone()
        return bytes.fromhex(str(row["secret"]))

    async def _import(
        self, conn: Conn, record: PaymentRecord, events: builtins.list[PaymentEvent]
    ) -> bool:
        if await self._one(conn, self._tail(BY_ID), (record.id,)) is not None:
            return False
        await conn.execute(_COPY, rules.copied_values(record))
        for event in events:
            await conn.execute(_INSERT_EVENT, rules.copied_event_values(record.id, event))
        copied = await self._must(conn, record.id)
        await self._event(conn, copied, EventAction.COPIED, await self._now(conn))
        return True


async def _probe(conninfo: str, kwargs: dict[str, Any]) -> None:
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
    except psycopg.Error as exc:
        state = f" [{exc.sqlstate}]" if getattr(exc, "sqlstate", None) else ""
        raise LedgerUnavailable(
            f"cannot connect to the PostgreSQL ledger (PAYGATE_LEDGER_URL){state}: check the "
            "host, port, user, password and database"
        ) from None
    await conn.close()
