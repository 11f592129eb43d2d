"""The payment ledger on one SQLite file (WAL, ``synchronous=FULL``).

Why these choices:

* ``synchronous=FULL``: each state change is on disk before the side effect that follows it
  (an upstream call, a settlement broadcast). That is the whole point of the ledger.
* Group commit (``paygate.x402.ledger_commit``): the calls queued while a COMMIT was under way
  share the next one (one fsync), each in a savepoint of its own; a caller is answered only
  after the COMMIT of its group, so ``synchronous=FULL`` still holds per call. A payment's
  indexed statements run on the event loop's thread and only the COMMIT (the fsync) on the
  worker thread; the loop never waits for the write lock (busy: the worker takes the call) and
  scans run on the worker. The calls of one process are serialised in submission order.
* ``BEGIN IMMEDIATE`` for every read-modify-write: the write lock is taken before the read, so
  two processes sharing the file cannot both claim one authorization.
* A submitted change runs to its end even if the awaiting task is cancelled (the group commit
  runs every submitted call, and answers only the callers still waiting): a cancelled caller
  does not know the outcome, but the store is never half-done.
* Leases (see ``paygate.x402.ledger``) are read and written under that same write lock, so a
  claim is exclusive across every process on the host, like PostgreSQL's SKIP LOCKED. The
  clock is this host's: one SQLite file is never shared across hosts.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from paygate.x402 import ledger_rules as rules
from paygate.x402 import ledger_sqlite_schema as schema
from paygate.x402.ledger import (
    DEFAULT_LEASE_SECONDS,
    RESERVATION_STATES,
    UNFINISHED_STATES,
    EventAction,
    LedgerConflict,
    LedgerError,
    LedgerUnavailable,
    Meter,
    PaymentRecord,
    PaymentState,
    SchemeWrite,
)
from paygate.x402.ledger_base import BY_ID, BY_IDEMPOTENCY_KEY, BY_KEY, Ledger
from paygate.x402.ledger_commit import GroupCommit
from paygate.x402.ledger_sqlite_schema import SCHEMA_VERSION
from paygate.x402.ledger_sqlite_tables import SqliteTables
from paygate.x402.ledger_tables import ADD_RECEIPT, HELD_HISTORY, SET_HISTORY
from paygate.x402.ledger_worker import worker_call

T = TypeVar("T")

# sqlite3 binds a parameter that is not exactly an int, float, str or bytearray (None, a bool)
# through its adaptation protocol: no adapter registered, it looks ``__adapt__`` up on a type,
# and that miss formats an AttributeError and drops it (~2,000 instructions a parameter, ten on
# every paid request). Registered adapters answer first, with what was bound anyway: NULL for
# None (``{}.get``: a C callable that answers None) and the integer for a bool. Process-wide,
# and the same binding for every sqlite3 user.
sqlite3.register_adapter(type(None), {}.get)
sqlite3.register_adapter(bool, int)

_SELECT = f"SELECT {rules.RECORD_COLUMNS} FROM payments"  # noqa: S608 - constant column list
_INSERT_EVENT = f"INSERT INTO payment_events ({rules.EVENT_COLUMNS}) VALUES ({', '.join('?' * 9)})"  # noqa: S608 - constant
_RESERVE = (
    "INSERT INTO payments (id, network, asset, payer, nonce, pay_to, amount, x402_version, route,"
    " state, served, payload, requirements, idempotency_key, attempts, created_at, updated_at,"
    " owner, lease, lease_until, scheme, model, counted_at, history)"
    " VALUES (:id, :network, :asset, :payer, :nonce, :pay_to, :amount, :x402_version, :route,"
    " :reserved, 0, :payload, :requirements, :idempotency_key, 0, :now, :now,"
    " :owner, 1, :until, :scheme, :model, :now, :history)"
    " ON CONFLICT (network, asset, payer, nonce) DO NOTHING"  # taken: no row inserted
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
    "UPDATE payments SET state = :state, attempts = :attempts, served = :served,"
    " tx_hash = :tx_hash, error = :error, updated_at = :now, owner = :owner,"
    " lease_until = :until, tokens_in = :tokens_in, tokens_out = :tokens_out,"
    " usage_source = :usage_source, settle_amount = :settle_amount,"
    " settled_amount = :settled_amount, history = :history{counted}"
    " WHERE id = :id AND state = :from_state AND lease = :lease"  # as read, under the lock
)
_SELECT_HELD = f"SELECT {rules.RECORD_COLUMNS}, history FROM payments WHERE id = ?"  # noqa: S608 - constant column list
# counted_at is set only when it changes: an index holds it (a payer's spend), and SQLite
# rewrites an index entry whenever the SET names one of its columns, changed or not.
_MOVES = {False: _MOVE.format(counted=""), True: _MOVE.format(counted=", counted_at = :now")}


def _closed() -> LedgerUnavailable:
    return LedgerUnavailable("the ledger is closed")


class SqliteLedger(Ledger):
    """:class:`paygate.x402.ledger_base.Ledger` on a SQLite file. Build it with :meth:`open`."""

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
        self._commits = GroupCommit(
            "paygate-ledger", self._lost, connection=lambda: self._db, busy_timeout=busy_timeout
        )
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._db: sqlite3.Connection | None = None  # used by whoever GroupCommit lends it to
        self._closed = False
        self.found_version = SCHEMA_VERSION  # the schema it had when opened (before migrating)
        self._use_tables(SqliteTables(self))  # the side tables' statements, on this thread
        # Indexed statements, microseconds each: they may run on the event loop's thread.
        self._quick = frozenset(
            (
                *(self._one, self._reserve, self._transition, self._mark_served, self._renew),
                *(self._let_go, self._add_receipt, self._take_free, self._forget_idempotency_key),
                self._clock_now,
            )
        )

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
        quick = fn in self._quick
        if fn == self._reserve and args[0].budgets:  # sums the payer's window: may be long
            quick = False
        if self._closed:  # as _submit, inline: this is every ledger call's path
            raise _closed()
        return await worker_call(self._commits, _closed, self._guarded, fn, *args, quick=quick)

    async def _run_alone(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Opening and closing the connection: never inside another call's transaction."""
        return await self._submit(True, False, fn, *args)

    async def _submit(self, alone: bool, quick: bool, fn: Callable[..., T], /, *args: Any) -> T:
        if self._closed:
            raise _closed()
        return await worker_call(
            self._commits, _closed, self._guarded, fn, *args, alone=alone, quick=quick
        )

    def _lost(self, exc: sqlite3.Error) -> LedgerError:
        """The error of a call whose group's transaction did not commit."""
        return LedgerUnavailable(f"ledger {self.path}: {exc}")

    @property
    def group_commit(self) -> GroupCommit:
        """The group commit (its ``after_commit`` hook counts COMMITs, i.e. fsyncs)."""
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
        self._db = schema.connect(
            self.path, read_only=self.read_only, busy_timeout=self._busy_timeout
        )
        if migrate and not self.read_only:
            with self._write() as db:
                self.found_version = schema.migrate(db, self.path, self._clock())
        elif schema.version(self._db, self.path, read_only=self.read_only) != SCHEMA_VERSION:
            raise LedgerUnavailable(
                f"ledger {self.path} is not at schema v{SCHEMA_VERSION}: "
                "run `paygate ledger migrate`"
            )

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One read-modify-write, all or nothing: a savepoint in its group's transaction,
        which holds the write lock (BEGIN IMMEDIATE) from the group's first write."""
        return self._commits.transaction(self._conn)

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

        # A write names its row; a read may scan (the claim loop's): that stays on the worker.
        return await self._submit(False, not sql.lstrip().upper().startswith("SELECT"), run)

    async def scheme_sql_all(
        self, statements: builtins.list[tuple[str, tuple[Any, ...]]]
    ) -> builtins.list[tuple[int, builtins.list[tuple[Any, ...]]]]:
        """Several statements in one write transaction (all or nothing): each one's (rows
        changed, rows returned)."""

        def run() -> builtins.list[tuple[int, builtins.list[tuple[Any, ...]]]]:
            out = []
            with self._write() as db:
                for sql, params in statements:
                    cursor = db.execute(sql, params)
                    out.append((cursor.rowcount, cursor.fetchall()))
            return out

        return await self._submit(False, True, run)  # a voucher's record and charge

    def _clock_now(self) -> float:
        return self._clock()

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
        """One history line (a change off the ordinary course: payment_events, after the lines
        the row kept, if any); ``details``: ``transaction``, ``error``, ``detail``."""
        line = rules.event_values(record, action, at, self.replica, **details)
        held = self._conn.execute(HELD_HISTORY, (record.id,)).fetchone()
        self._keep_lines(record.id, held[0] if held else None, [line])

    def _keep_lines(self, payment_id: str, held: str | None, lines: list[tuple[Any, ...]]) -> None:
        """History ``lines`` of a change whose row was read with its own ``held`` history, and
        that did not write the row's history itself (see ``rules.kept_history``)."""
        history, rows = rules.kept_history(payment_id, held, lines)
        if history != held:
            self._conn.execute(SET_HISTORY, (history, payment_id))
        if rows:
            self._conn.executemany(_INSERT_EVENT, rows)

    # --- the statements (on the worker thread) ----------------------------------------------

    def _reserve(self, checked: rules.Reservation) -> PaymentRecord:
        with self._write() as db:
            existing = None
            if checked.idempotency_key is not None:
                existing = self._one(BY_IDEMPOTENCY_KEY, (checked.idempotency_key,))
                checked.check_identifier(existing)  # so the holder has this key, if any
            if existing is None and checked.budgets:
                # A replay is refused as one before any budget is summed.
                existing = self._one(BY_KEY, checked.key)
            checked.check_existing(existing)
            now = self._clock()
            for budget in checked.budgets:
                checked.check_budget(budget, self._spent(checked, budget.since))
            if existing is None:  # most likely a new key: no read first, the insert tells
                values = self._values(checked, None, now)
                if db.execute(_RESERVE, values).rowcount == 1:
                    # As written, its history line too (in the row): no read-back.
                    record = rules.reserved_record(values, checked)
                    if checked.write is not None:
                        self._make(db, checked.write)
                    return record
                # The key is taken: a replay, or a RELEASED record to claim again.
                existing = self._one(BY_KEY, checked.key)
                checked.check_existing(existing)
            if existing is None:  # the key was taken and is gone: impossible under the lock
                raise LedgerConflict("the authorization changed concurrently")
            rows = db.execute(_RESERVE_AGAIN, self._values(checked, existing, now)).fetchall()
            if len(rows) != 1:  # impossible under the lock: never guess
                raise LedgerConflict("the authorization changed concurrently")
            record = rules.record_from_row(rows[0])
            self._event(record, EventAction.RESERVED, now)
            if checked.write is not None:
                self._make(db, checked.write)
            return record

    def _values(
        self, checked: rules.Reservation, existing: PaymentRecord | None, now: float
    ) -> dict[str, Any]:
        return checked.values(
            payment_id=existing.id if existing else rules.new_payment_id(),
            now=now,
            replica=self.replica,
            lease_seconds=self.lease_seconds,
        )

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

    def _transition(self, payment_id: str, move: rules.Move) -> PaymentRecord:
        with self._write() as db:
            row = db.execute(_SELECT_HELD, (payment_id,)).fetchone()
            if row is None:
                raise rules.not_found(payment_id)
            current = rules.record_from_row(row)
            now = self._clock()
            values, record, steps = move.change(
                current, now=now, replica=self.replica, lease_seconds=self.lease_seconds
            )
            lines = move.events(record, steps, now, self.replica)
            values["history"], lines = rules.kept_history(current.id, row["history"], lines)
            if (
                db.execute(_MOVES[values["counted"]], values).rowcount != 1
            ):  # impossible under the lock
                raise LedgerConflict(f"payment {current.id} changed concurrently")
            if lines:
                db.executemany(_INSERT_EVENT, lines)
            if move.reply_receipt is not None:
                db.execute(ADD_RECEIPT, (record.id, "reply", move.reply_receipt, now))
            if move.write is not None:
                self._make(db, move.write)
            return record

    @staticmethod
    def _make(db: sqlite3.Connection, write: SchemeWrite) -> None:
        """A scheme's write in the current savepoint (rolled back with it if not made)."""
        write.results.clear()
        for sql, params in write.statements:
            cursor = db.execute(sql, params)
            write.results.append((cursor.rowcount, cursor.fetchall()))
        rules.check_write(write)

    def _mark_served(self, payment_id: str, first: bool) -> PaymentRecord:
        with self._write() as db:
            current = self._must(payment_id)
            rules.check_first_served(current, first)
            now = self._clock()
            record = self._changed(
                db.execute(
                    "UPDATE payments SET served = 1, updated_at = ? WHERE id = ?"  # noqa: S608 - constant columns
                    f" RETURNING {rules.RECORD_COLUMNS}",
                    (now, current.id),
                )
            )
            self._event(record, EventAction.SERVED, now)
            return record

    def _renew(self, payment_id: str, lease: int, meter: Meter | None) -> PaymentRecord:
        with self._write() as db:
            current = self._must(payment_id)
            rules.check_renewal(current, lease, self.replica)
            until = self._clock() + self.lease_seconds
            progress = rules.renewed_meter(current, meter)
            if progress is not None:  # a SERVED stream's progress, with its renewal
                return self._changed(
                    db.execute(
                        "UPDATE payments SET lease_until = ?, tokens_in = ?, tokens_out = ?,"  # noqa: S608 - constant columns
                        " usage_source = ?, settle_amount = ? WHERE id = ? AND lease = ?"
                        f" AND state = 'served' RETURNING {rules.RECORD_COLUMNS}",
                        (
                            until,
                            progress.tokens_in,
                            progress.tokens_out,
                            progress.source,
                            str(progress.settle_amount),
                            current.id,
                            lease,
                        ),
                    )
                )
            return self._changed(
                db.execute(
                    "UPDATE payments SET lease_until = ? WHERE id = ? AND lease = ?"  # noqa: S608 - constant columns
                    f" RETURNING {rules.RECORD_COLUMNS}",
                    (until, current.id, lease),
                )
            )

    def _let_go(self, payment_id: str, lease: int) -> PaymentRecord:
        with self._write() as db:
            current = self._must(payment_id)
            rules.check_let_go(current, lease)
            record = self._changed(
                db.execute(
                    "UPDATE payments SET owner = NULL, lease_until = NULL WHERE id = ?"  # noqa: S608 - constant columns
                    f" AND lease = ? RETURNING {rules.RECORD_COLUMNS}",
                    (current.id, lease),
                )
            )
            self._event(record, EventAction.LET_GO, self._clock())
            return record

    @staticmethod
    def _changed(cursor: sqlite3.Cursor) -> PaymentRecord:
        """The one record an update under the lock returned (its read-back, no second read)."""
        rows = cursor.fetchall()
        if len(rows) != 1:  # impossible under the lock: never guess
            raise LedgerConflict("a payment changed concurrently")
        return rules.record_from_row(rows[0])

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

    def _release_abandoned(
        self,
        own: bool,
        limit: int,
        writes: Callable[[PaymentRecord], SchemeWrite | None] | None,
    ) -> builtins.list[PaymentRecord]:
        released = []
        with self._write() as db:
            now = self._clock()
            for record in self._abandoned(RESERVATION_STATES, now, 0.0, own, limit):
                db.execute(
                    "UPDATE payments SET state = ?, owner = NULL, lease_until = NULL,"
                    " lease = lease + 1, updated_at = ? WHERE id = ? AND lease = ?",
                    (PaymentState.RELEASED.value, now, record.id, record.lease),
                )
                gone = self._must(record.id)
                self._event(gone, EventAction.RELEASED, now, detail=record.owner or "nobody")
                write = writes(gone) if writes is not None else None
                if write is not None:  # what the reservation held, given back with it
                    self._make(db, write)
                released.append(gone)
        return released

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
