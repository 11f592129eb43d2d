"""The payment ledger on one SQLite file (WAL, ``synchronous=FULL``).

Why these choices:

* ``synchronous=FULL``: each state change is on disk before the side effect that follows it
  (an upstream call, a settlement broadcast). That is the whole point of the ledger.
* One dedicated worker thread owns the connection: sqlite3 never blocks the event loop, and the
  calls of one process are serialised in submission order.
* Group commit (``paygate.x402.ledger_commit``): the calls queued while a COMMIT was under way
  share the next one (one fsync), each in a savepoint of its own; a caller is answered only
  after the COMMIT of its group, so ``synchronous=FULL`` still holds per call.
* ``BEGIN IMMEDIATE`` for every read-modify-write: the write lock is taken before the read, so
  two processes sharing the file cannot both claim one authorization.
* A submitted change runs to its end even if the awaiting task is cancelled (the future is
  shielded): a cancelled caller does not know the outcome, but the store is never half-done.
* Leases (see ``paygate.x402.ledger``) are read and written under that same write lock, so a
  claim is exclusive across every process on the host, like PostgreSQL's SKIP LOCKED. The
  clock is this host's: one SQLite file is never shared across hosts.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from paygate.x402 import ledger_rules as rules
from paygate.x402.ledger import (
    DEFAULT_LEASE_SECONDS,
    MAX_LIST_LIMIT,
    RESERVATION_STATES,
    UNFINISHED_STATES,
    Earnings,
    EventAction,
    LedgerConflict,
    LedgerError,
    LedgerNotFound,
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
from paygate.x402.ledger_commit import GroupCommit

T = TypeVar("T")

#: v1: the ledger as first released (payments, ledger_schema). v2: leases (owner, lease epoch,
#: expiry) and the payment_events history. v3: metering (scheme, model, usage, amounts owed and
#: moved) and the free quota's tables. v4: the economics controls and the console (token usage,
#: limit events, alert claims, one-time console logins; paygate.economics, paygate.console).
#: v5: the transparency log (paygate.tlog). v6: signed receipts, payments by nonce.
#: v7: budgets by when a payment counted, the sign-in key. v8: batch settlement's channels,
#: vouchers and claims.
SCHEMA_VERSION = 8
_STATES = ", ".join(f"'{state.value}'" for state in PaymentState)

# MIGRATIONS[n] takes a ledger from schema n-1 to n. Append, never edit a released step.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE payments (
            id TEXT PRIMARY KEY,
            network TEXT NOT NULL,
            asset TEXT NOT NULL,
            payer TEXT NOT NULL,
            nonce TEXT NOT NULL,
            pay_to TEXT NOT NULL,
            amount TEXT NOT NULL,  -- decimal: a uint256 does not fit SQLite's 64-bit INTEGER
            x402_version INTEGER NOT NULL,
            route TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_STATES})),
            served INTEGER NOT NULL DEFAULT 0 CHECK (served IN (0, 1)),
            payload TEXT NOT NULL,
            requirements TEXT NOT NULL,
            idempotency_key TEXT UNIQUE,
            tx_hash TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (network, asset, payer, nonce)
        )""",
        "CREATE INDEX payments_state ON payments (state, updated_at)",
        "CREATE INDEX payments_created ON payments (created_at)",
    ),
    2: (
        "ALTER TABLE payments ADD COLUMN owner TEXT",
        "ALTER TABLE payments ADD COLUMN lease INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE payments ADD COLUMN lease_until REAL",
        "CREATE INDEX payments_lease ON payments (state, lease_until)",
        """CREATE TABLE payment_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            payment_id TEXT NOT NULL REFERENCES payments (id),
            at REAL NOT NULL,
            replica TEXT NOT NULL,
            action TEXT NOT NULL,
            state TEXT NOT NULL,
            lease INTEGER NOT NULL,
            tx_hash TEXT,
            error TEXT,
            detail TEXT
        )""",
        "CREATE INDEX payment_events_payment ON payment_events (payment_id, seq)",
    ),
    # Metered payments (upto): the scheme, the model, usage and the amounts owed and moved;
    # the free quota (sign-in-with-x).
    3: (
        "ALTER TABLE payments ADD COLUMN scheme TEXT NOT NULL DEFAULT 'exact'",
        "ALTER TABLE payments ADD COLUMN model TEXT",
        "ALTER TABLE payments ADD COLUMN tokens_in INTEGER",
        "ALTER TABLE payments ADD COLUMN tokens_out INTEGER",
        "ALTER TABLE payments ADD COLUMN usage_source TEXT",
        "ALTER TABLE payments ADD COLUMN settle_amount TEXT",
        "ALTER TABLE payments ADD COLUMN settled_amount TEXT",
        # A payer's spend today (budgets) without scanning the table.
        "CREATE INDEX payments_payer ON payments (payer, created_at)",
        "CREATE TABLE free_quota (payer TEXT NOT NULL, day TEXT NOT NULL,"
        " used INTEGER NOT NULL, PRIMARY KEY (payer, day))",
        "CREATE TABLE signin_nonces (nonce TEXT PRIMARY KEY, payer TEXT NOT NULL,"
        " used_at REAL NOT NULL)",
    ),
    # Economics controls and the operator console: self-contained tables (paygate.economics).
    4: (
        "CREATE TABLE token_usage (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
        " payer TEXT NOT NULL, model TEXT NOT NULL, tokens_in INTEGER NOT NULL,"
        " tokens_out INTEGER NOT NULL)",
        "CREATE INDEX token_usage_payer ON token_usage (payer, at)",
        "CREATE INDEX token_usage_model ON token_usage (model, at)",
        "CREATE INDEX token_usage_at ON token_usage (at)",
        "CREATE TABLE limit_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
        " kind TEXT NOT NULL, rule TEXT NOT NULL, payer TEXT NOT NULL, model TEXT,"
        " enforced INTEGER NOT NULL, detail TEXT)",
        "CREATE INDEX limit_events_at ON limit_events (at)",
        "CREATE TABLE alert_claims (key TEXT PRIMARY KEY, at REAL NOT NULL)",
        "CREATE TABLE console_logins (token_hash TEXT PRIMARY KEY, expires_at REAL NOT NULL,"
        " used_at REAL)",
    ),
    # The transparency log (paygate.tlog.store): its entries, the hashes of its tiles, its
    # signed checkpoints and the leaf hashes of signed receipts waiting for a receipts entry.
    5: (
        "CREATE TABLE tlog_meta (id INTEGER PRIMARY KEY CHECK (id = 1), origin TEXT NOT NULL)",
        "CREATE TABLE tlog_entries (idx INTEGER PRIMARY KEY, data BLOB NOT NULL,"
        " replica TEXT NOT NULL, created_at REAL NOT NULL)",
        "CREATE TABLE tlog_hashes (level INTEGER NOT NULL, idx INTEGER NOT NULL,"
        " hash BLOB NOT NULL, PRIMARY KEY (level, idx))",
        "CREATE TABLE tlog_checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL,"
        " note TEXT NOT NULL, cosignatures TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL)",
        "CREATE TABLE tlog_receipts (seq INTEGER PRIMARY KEY AUTOINCREMENT, leaf BLOB NOT NULL,"
        " amount TEXT NOT NULL, replica TEXT NOT NULL, issued_at REAL NOT NULL,"
        " entry INTEGER, position INTEGER)",
        "CREATE INDEX tlog_receipts_open ON tlog_receipts (entry, seq)",
        "CREATE INDEX tlog_receipts_leaf ON tlog_receipts (leaf)",
    ),
    # Signed receipts (one per payment and kind), and payments found by their nonce.
    6: (
        """CREATE TABLE receipts (
            payment_id TEXT NOT NULL REFERENCES payments (id),
            kind TEXT NOT NULL CHECK (kind IN ('reply', 'settlement')),
            token TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (payment_id, kind)
        )""",
        "CREATE INDEX receipts_created ON receipts (created_at)",
        "CREATE INDEX payments_nonce ON payments (nonce)",
    ),
    # Budgets count a payment by when it last counted (admitted, re-admitted after a release,
    # settled), not by when its record was created; the key that proves a sign-in nonce was
    # issued here (shared by every process on the ledger).
    7: (
        "ALTER TABLE payments ADD COLUMN counted_at REAL",
        "UPDATE payments SET counted_at = updated_at",
        "CREATE INDEX payments_payer_counted ON payments (payer, counted_at)",
        "CREATE TABLE signin_key (id INTEGER PRIMARY KEY CHECK (id = 1), secret TEXT NOT NULL)",
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
            pending_until REAL,
            version INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE bs_vouchers (
            channel_id TEXT NOT NULL,
            max_claimable TEXT NOT NULL,
            signature TEXT NOT NULL,
            payment_id TEXT NOT NULL,
            charge TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (channel_id, max_claimable)
        )""",
        """CREATE TABLE bs_claims (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            entries TEXT NOT NULL,
            tx_hash TEXT,
            owner TEXT,
            lease_until REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ),
}

_SELECT = f"SELECT {rules.RECORD_COLUMNS} FROM payments"  # noqa: S608 - constant column list
# `paygate payments summary --by`: the SQL expression of each grouping (constants only).
_GROUPS = {
    "model": "COALESCE(model, '-')",
    "day": "date(created_at, 'unixepoch')",
    "payer": "payer",
}
_INSERT_EVENT = f"INSERT INTO payment_events ({rules.EVENT_COLUMNS}) VALUES ({', '.join('?' * 9)})"  # noqa: S608 - constant
_COPY = f"INSERT INTO payments ({rules.RECORD_COLUMNS}) VALUES ({', '.join('?' * 29)})"  # noqa: S608 - constant
_RESERVE = (
    "INSERT INTO payments (id, network, asset, payer, nonce, pay_to, amount, x402_version, route,"  # noqa: S608 - constant columns
    " state, served, payload, requirements, idempotency_key, attempts, created_at, updated_at,"
    " owner, lease, lease_until, scheme, model, counted_at)"
    " VALUES (:id, :network, :asset, :payer, :nonce, :pay_to, :amount, :x402_version, :route,"
    " :reserved, 0, :payload, :requirements, :idempotency_key, 0, :now, :now,"
    " :owner, 1, :until, :scheme, :model, :now)"
    f" RETURNING {rules.RECORD_COLUMNS}"
)
# A retry of an authorization whose earlier request failed before settlement.
_RESERVE_AGAIN = (
    "UPDATE payments SET state = :reserved, served = 0, pay_to = :pay_to, amount = :amount,"  # noqa: S608 - constant columns
    " x402_version = :x402_version, route = :route, payload = :payload,"
    " requirements = :requirements,"
    " idempotency_key = COALESCE(:idempotency_key, idempotency_key), error = NULL,"
    " scheme = :scheme, model = :model, tokens_in = NULL, tokens_out = NULL,"
    " usage_source = NULL, settle_amount = NULL, counted_at = :now, updated_at = :now,"
    " owner = :owner, lease = lease + 1, lease_until = :until"
    " WHERE id = :id AND state = :released"
    f" RETURNING {rules.RECORD_COLUMNS}"
)
_MOVE = (
    "UPDATE payments SET state = :state, attempts = attempts + :attempt,"  # noqa: S608 - constant columns
    " served = MAX(served, :served), tx_hash = COALESCE(:tx_hash, tx_hash),"
    " error = COALESCE(:error, error), updated_at = :now, owner = :owner, lease_until = :until,"
    " tokens_in = COALESCE(:tokens_in, tokens_in), tokens_out = COALESCE(:tokens_out, tokens_out),"
    " usage_source = COALESCE(:usage_source, usage_source),"
    " settle_amount = COALESCE(:settle_amount, settle_amount),"
    " settled_amount = COALESCE(:settled_amount, settled_amount),"
    " counted_at = CASE WHEN :counted THEN :now ELSE counted_at END"
    " WHERE id = :id AND state = :from_state AND lease = :lease"
    f" RETURNING {rules.RECORD_COLUMNS}"  # the record as moved: no second read
)


class SqliteLedger(LedgerBase):
    """:class:`paygate.x402.ledger.Ledger` on a SQLite file. Build it with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        *,
        read_only: bool,
        busy_timeout: float,
        clock: Callable[[], float],
        replica: str | None,
        lease_seconds: float,
    ) -> None:
        self.path = path
        self.read_only = read_only
        super().__init__(replica, lease_seconds)
        self._commits = GroupCommit("paygate-ledger", self._lost)
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._db: sqlite3.Connection | None = None  # used only on the worker thread
        self._closed = False
        self.found_version = SCHEMA_VERSION  # the schema it had when opened (before migrating)

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        read_only: bool = False,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        replica: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        migrate: bool = True,
    ) -> SqliteLedger:
        """Open (and create, unless ``read_only``) the ledger at ``path``, migrating its schema
        (unless ``migrate`` is false: then an older schema is refused).

        ``replica`` names this process in leases and history (default ``<hostname>:<pid>``).

        A new parent directory is made 0700 and a new file 0600. ``read_only`` never creates
        anything and raises :class:`LedgerNotFound` if there is no file. ``busy_timeout`` is
        how long a call waits for another process's write lock before
        :class:`LedgerUnavailable`.
        """
        ledger = cls(
            Path(path),
            read_only=read_only,
            busy_timeout=busy_timeout,
            clock=clock,
            replica=replica,
            lease_seconds=lease_seconds,
        )
        try:
            await ledger._run_alone(ledger._connect, migrate)
        except BaseException:
            await ledger.close()
            raise
        return ledger

    async def close(self) -> None:
        """Finish queued calls, close the connection and the worker thread. Idempotent."""
        if self._closed:
            return
        try:
            await self._run_alone(self._disconnect)
        finally:
            self._closed = True
            self._commits.stop()  # the queue is empty: the thread just exits

    # --- the worker thread ------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await self._submit(False, fn, *args)

    async def _run_alone(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Opening and closing the connection: never inside another call's transaction."""
        return await self._submit(True, fn, *args)

    async def _submit(self, alone: bool, fn: Callable[..., T], /, *args: Any) -> T:
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        try:
            future = self._commits.submit(self._guarded, fn, *args, alone=alone)
        except RuntimeError:  # the worker stopped
            raise LedgerUnavailable("the ledger is closed") from None
        return await asyncio.shield(future)

    def _lost(self, exc: sqlite3.Error) -> LedgerError:
        """The error of a call whose group's transaction did not commit."""
        return LedgerUnavailable(f"ledger {self.path}: {exc}")

    @property
    def group_commit(self) -> GroupCommit:
        """The worker (its ``after_commit`` hook counts COMMITs, i.e. fsyncs)."""
        return self._commits

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        # sqlite3 messages name a condition or a constraint, never row data: safe to pass on.
        try:
            return fn(*args)
        except LedgerError:
            raise
        except sqlite3.IntegrityError as exc:
            raise LedgerConflict(f"ledger constraint: {exc}") from None
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"ledger {self.path}: {exc}") from None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerUnavailable("the ledger is closed")
        return self._db

    def _connect(self, migrate: bool = True) -> None:
        try:
            if self.read_only:
                if not self.path.is_file():
                    raise LedgerNotFound(f"no ledger at {self.path}")
                uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
                db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0)
            else:
                self._prepare_file()
                db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        except OSError as exc:
            raise LedgerUnavailable(f"cannot open ledger {self.path}: {exc.strerror}") from None
        self._db = db
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        if self.read_only:
            db.execute("PRAGMA query_only = ON")
            self._check_schema()
            return
        mode = self._wal(db)
        if str(mode).lower() != "wal":
            raise LedgerUnavailable(f"ledger {self.path}: cannot use WAL (journal mode {mode})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        if migrate:
            self._migrate()
        elif self._check_schema() != SCHEMA_VERSION:
            raise LedgerUnavailable(
                f"ledger {self.path} is not at schema v{SCHEMA_VERSION}: "
                "run `paygate ledger migrate`"
            )

    def _wal(self, db: sqlite3.Connection) -> str:
        """Switch to WAL. A new file's switch takes the database exclusively and SQLite answers
        a second process that switches at the same moment "locked" without calling the busy
        handler, so the switch is retried here for as long as the busy timeout allows."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _prepare_file(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # workers start together
        if self.path.is_dir():
            raise LedgerUnavailable(f"cannot open ledger {self.path}: it is a directory")
        # Create it 0600 ourselves: sqlite3 would use the umask (the payloads hold signatures).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _check_schema(self) -> int:
        db = self._conn
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger_schema'"
        ).fetchone()
        version = 0
        if exists:
            row = db.execute("SELECT version FROM ledger_schema WHERE id = 1").fetchone()
            version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise LedgerUnavailable(
                f"ledger {self.path} has schema v{version}, newer than this paygate's "
                f"v{SCHEMA_VERSION}"
            )
        if self.read_only and version != SCHEMA_VERSION:
            raise LedgerUnavailable(
                f"ledger {self.path} has schema v{version}, not v{SCHEMA_VERSION}: "
                "not a paygate ledger, or not migrated yet (run `paygate ledger migrate`)"
            )
        return version

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS ledger_schema ("
                " id INTEGER PRIMARY KEY CHECK (id = 1),"
                " version INTEGER NOT NULL,"
                " migrated_at REAL NOT NULL)"
            )
            version = self._check_schema()
            self.found_version = version
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(
                    "INSERT INTO ledger_schema (id, version, migrated_at) VALUES (1, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
                    " migrated_at = excluded.migrated_at",
                    (SCHEMA_VERSION, self._clock()),
                )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One read-modify-write, all or nothing: a savepoint in its group's transaction,
        which holds the write lock (BEGIN IMMEDIATE) from the group's first write."""
        with self._commits.transaction(self._conn) as db:
            yield db

    async def scheme_sql(
        self, sql: str, params: tuple[Any, ...]
    ) -> tuple[int, builtins.list[tuple[Any, ...]]]:
        """One statement on a scheme package's own tables (batch settlement's ``bs_*``), in its
        own write transaction: (rows changed, rows returned). ``?`` placeholders."""

        def run() -> tuple[int, builtins.list[tuple[Any, ...]]]:
            with self._write() as db:
                cursor = db.execute(sql, params)
                rows = cursor.fetchall()
                return cursor.rowcount, rows

        return await self._run(run)

    def _one(self, where: str, params: tuple[Any, ...]) -> PaymentRecord | None:
        row = self._conn.execute(f"{_SELECT} {where}", params).fetchone()
        return rules.record_from_row(row) if row else None

    def _many(self, tail: str, params: tuple[Any, ...]) -> builtins.list[PaymentRecord]:
        return [
            rules.record_from_row(row) for row in self._conn.execute(f"{_SELECT} {tail}", params)
        ]

    def _tail(self, clause: str) -> str:
        return clause.format(seq="rowid")

    def _must(self, payment_id: str) -> PaymentRecord:
        record = self._one(BY_ID, (payment_id,))
        if record is None:
            raise rules.not_found(payment_id)
        return record

    def _event(
        self, record: PaymentRecord, action: EventAction, at: float, **details: str | None
    ) -> None:
        """One history line; ``details``: ``transaction``, ``error``, ``detail``."""
        values = rules.event_values(record, action, at, self.replica, **details)
        self._conn.execute(_INSERT_EVENT, values)

    # --- the statements (on the worker thread) ----------------------------------------------

    def _reserve(self, checked: rules.Reservation) -> PaymentRecord:
        with self._write() as db:
            if checked.idempotency_key is not None:
                holder = self._one(BY_IDEMPOTENCY_KEY, (checked.idempotency_key,))
                checked.check_identifier(holder)
            existing = self._one(BY_KEY, checked.key)
            checked.check_existing(existing)
            now = self._clock()
            for budget in checked.budgets:
                checked.check_budget(budget, self._spent(checked, budget.since))
            values = checked.values(
                payment_id=existing.id if existing else uuid.uuid4().hex,
                now=now,
                replica=self.replica,
                lease_seconds=self.lease_seconds,
            )
            rows = db.execute(_RESERVE if existing is None else _RESERVE_AGAIN, values).fetchall()
            if len(rows) != 1:  # impossible under the lock: never guess
                raise LedgerConflict(f"payment {values['id']} changed concurrently")
            record = rules.record_from_row(rows[0])
            self._event(record, EventAction.RESERVED, now)
            return record

    def _spent(self, checked: rules.Reservation, since: float) -> int:
        """What the payer has committed on the asset since ``since``, by when each payment last
        counted (admitted or settled; see ``reserve``)."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(CAST(COALESCE(settled_amount, settle_amount, amount) AS INTEGER)),"
            " 0) FROM payments WHERE asset = ? AND payer = ? AND counted_at >= ?"
            " AND state NOT IN (?, ?)",
            (
                checked.asset,
                checked.payer,
                since,
                PaymentState.RELEASED.value,
                PaymentState.FAILED.value,
            ),
        ).fetchone()
        return int(row[0])

    def _transition(
        self,
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
        with self._write() as db:
            current = self._must(payment_id)
            if via is not None:  # the first of two moves in this transaction
                first = rules.move_values(
                    current,
                    via,
                    transaction=None,
                    error=None,
                    lease=lease,
                    meter=None,
                    settled_amount=None,
                    now=self._clock(),
                    replica=self.replica,
                    lease_seconds=self.lease_seconds,
                )
                rows = db.execute(_MOVE, first).fetchall()
                if len(rows) != 1:  # impossible under the lock: never guess
                    raise LedgerConflict(f"payment {current.id} changed concurrently")
                current = rules.record_from_row(rows[0])
                self._event(current, EventAction.MOVED, first["now"])
            values = rules.move_values(
                current,
                to,
                transaction=transaction,
                error=error,
                lease=lease,
                meter=meter,
                settled_amount=settled_amount,
                now=self._clock(),
                replica=self.replica,
                lease_seconds=self.lease_seconds,
                let_go=let_go,
            )
            rows = db.execute(_MOVE, values).fetchall()
            if len(rows) != 1:  # impossible under the lock: never guess
                raise LedgerConflict(f"payment {current.id} changed concurrently")
            record = rules.record_from_row(rows[0])
            self._event(
                record, EventAction.MOVED, values["now"], transaction=transaction, error=error
            )
            return record

    def _mark_served(self, payment_id: str) -> PaymentRecord:
        with self._write() as db:
            record = self._must(payment_id)
            now = self._clock()
            db.execute(
                "UPDATE payments SET served = 1, updated_at = ? WHERE id = ?", (now, record.id)
            )
            record = self._must(record.id)
            self._event(record, EventAction.SERVED, now)
            return record

    def _renew(self, payment_id: str, lease: int) -> PaymentRecord:
        with self._write() as db:
            current = self._must(payment_id)
            rules.check_renewal(current, lease, self.replica)
            db.execute(
                "UPDATE payments SET lease_until = ? WHERE id = ? AND lease = ?",
                (self._clock() + self.lease_seconds, current.id, lease),
            )
            return self._must(current.id)

    def _let_go(self, payment_id: str, lease: int) -> PaymentRecord:
        with self._write() as db:
            current = self._must(payment_id)
            rules.check_let_go(current, lease)
            db.execute(
                "UPDATE payments SET owner = NULL, lease_until = NULL WHERE id = ? AND lease = ?",
                (current.id, lease),
            )
            record = self._must(current.id)
            self._event(record, EventAction.LET_GO, self._clock())
            return record

    def _abandoned(
        self, states: tuple[PaymentState, ...], now: float, min_age: float, own: bool, limit: int
    ) -> builtins.list[PaymentRecord]:
        marks = ", ".join("?" for _ in states)
        return self._many(
            f"WHERE state IN ({marks}) AND ((owner IS NOT NULL AND lease_until < ?)"
            " OR (owner IS NULL AND updated_at <= ?) OR (? AND owner = ?))"
            " ORDER BY updated_at, rowid LIMIT ?",
            (*states, now, now - min_age, 1 if own else 0, self.replica, limit),
        )

    def _claim_unfinished(
        self, min_age: float, own: bool, limit: int
    ) -> builtins.list[PaymentRecord]:
        claimed = []
        with self._write():  # the write lock makes the pick-and-claim exclusive
            now = self._clock()
            for record in self._abandoned(UNFINISHED_STATES, now, min_age, own, limit):
                self._conn.execute(
                    "UPDATE payments SET owner = ?, lease = lease + 1, lease_until = ?"
                    " WHERE id = ? AND lease = ?",
                    (self.replica, now + self.lease_seconds, record.id, record.lease),
                )
                mine = self._must(record.id)
                self._event(mine, EventAction.CLAIMED, now, detail=record.owner or "nobody")
                claimed.append(mine)
        return claimed

    def _release_abandoned(self, own: bool, limit: int) -> builtins.list[PaymentRecord]:
        released = []
        with self._write():
            now = self._clock()
            for record in self._abandoned(RESERVATION_STATES, now, 0.0, own, limit):
                self._conn.execute(
                    "UPDATE payments SET state = ?, owner = NULL, lease_until = NULL,"
                    " lease = lease + 1, updated_at = ? WHERE id = ? AND lease = ?",
                    (PaymentState.RELEASED.value, now, record.id, record.lease),
                )
                gone = self._must(record.id)
                self._event(gone, EventAction.RELEASED, now, detail=record.owner or "nobody")
                released.append(gone)
        return released

    def _history(self, payment_id: str) -> builtins.list[PaymentEvent]:
        rows = self._conn.execute(
            f"SELECT {rules.EVENT_COLUMNS} FROM payment_events WHERE payment_id = ?"  # noqa: S608
            " ORDER BY seq LIMIT ?",
            (payment_id, MAX_LIST_LIMIT),
        )
        return [rules.event_from_row(row) for row in rows]

    def _in_states(
        self, states: tuple[PaymentState, ...], older_than: float | None, limit: int
    ) -> builtins.list[PaymentRecord]:
        """Records in ``states`` (not changed for ``older_than`` seconds), oldest first."""
        marks = ", ".join("?" for _ in states)
        cutoff = "" if older_than is None else " AND updated_at <= ?"
        ages = () if older_than is None else (self._clock() - older_than,)
        return self._many(
            f"WHERE state IN ({marks}){cutoff} ORDER BY updated_at, rowid LIMIT ?",
            (*states, *ages, limit),
        )

    def _forget_idempotency_key(
        self, key: str, payment_id: str, ended: tuple[PaymentState, ...], before: float
    ) -> bool:
        states = ",".join("?" * len(ended)) or "NULL"
        with self._write():
            cursor = self._conn.execute(
                "UPDATE payments SET idempotency_key = NULL WHERE id = ? AND idempotency_key = ?"  # noqa: S608 - placeholders only
                f" AND (state = ? OR (state IN ({states}) AND updated_at < ?))",
                (
                    payment_id,
                    key,
                    PaymentState.RELEASED.value,
                    *(state.value for state in ended),
                    before,
                ),
            )
            return cursor.rowcount == 1

    def _take_free(self, payer: str, nonce: str, day: str, limit: int) -> int | None:
        with self._write() as db:
            used = db.execute(
                "SELECT used FROM free_quota WHERE payer = ? AND day = ?", (payer, day)
            ).fetchone()
            count = int(used[0]) if used else 0
            if count >= limit:
                return None
            if db.execute("SELECT 1 FROM signin_nonces WHERE nonce = ?", (nonce,)).fetchone():
                raise SignInReused("this sign-in was already used")
            db.execute(
                "INSERT INTO signin_nonces (nonce, payer, used_at) VALUES (?, ?, ?)",
                (nonce, payer, self._clock()),
            )
            db.execute(
                "INSERT INTO free_quota (payer, day, used) VALUES (?, ?, 1)"
                " ON CONFLICT (payer, day) DO UPDATE SET used = used + 1",
                (payer, day),
            )
            return limit - count - 1

    def _add_receipt(
        self,
        payment_id: str,
        kind: str,
        token: str,
        usage: ReceiptUsage | None,
        lease: int | None,
    ) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM payments WHERE id = ?", (payment_id,)).fetchone() is None:
                raise rules.not_found(payment_id)
            db.execute(
                "INSERT INTO receipts (payment_id, kind, token, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (payment_id, kind) DO NOTHING",
                (payment_id, kind, token, self._clock()),
            )
            if usage is not None and kind == "reply":
                db.execute(
                    "UPDATE payments SET tokens_in = ?, tokens_out = ?, usage_source = ?"
                    " WHERE id = ? AND tokens_in IS NULL AND (? IS NULL OR lease = ?)",
                    (usage.tokens_in, usage.tokens_out, usage.source, payment_id, lease, lease),
                )

    def _receipts(self, tail: str, params: tuple[Any, ...]) -> builtins.list[StoredReceipt]:
        rows = self._conn.execute(
            f"SELECT payment_id, kind, token, created_at FROM receipts {tail}",  # noqa: S608 - constant
            params,
        ).fetchall()
        return [StoredReceipt(r[0], r[1], r[2], float(r[3])) for r in rows]

    def _signin_key(self) -> bytes:
        with self._write() as db:
            row = db.execute("SELECT secret FROM signin_key WHERE id = 1").fetchone()
            if row is None:
                secret = secrets.token_hex(32)
                db.execute("INSERT INTO signin_key (id, secret) VALUES (1, ?)", (secret,))
            else:
                secret = str(row[0])
        return bytes.fromhex(secret)

    def _earnings(self, since: float, by: str) -> builtins.list[Earnings]:
        rows = self._conn.execute(
            f"SELECT {_GROUPS[by]} AS key, COUNT(*), COALESCE(SUM(tokens_in), 0),"  # noqa: S608 - constant
            " COALESCE(SUM(tokens_out), 0),"
            " COALESCE(SUM(CAST(COALESCE(settled_amount, amount) AS INTEGER)), 0)"
            " FROM payments WHERE state = ? AND created_at >= ? GROUP BY key ORDER BY key",
            (PaymentState.SETTLED.value, since),
        ).fetchall()
        return [Earnings(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]

    def _import(self, record: PaymentRecord, events: builtins.list[PaymentEvent]) -> bool:
        with self._write() as db:
            if self._one(BY_ID, (record.id,)) is not None:
                return False
            db.execute(_COPY, rules.copied_values(record))
            for event in events:
                db.execute(_INSERT_EVENT, rules.copied_event_values(record.id, event))
            self._event(self._must(record.id), EventAction.COPIED, self._clock())
            return True
