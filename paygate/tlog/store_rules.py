"""The log store's rules, once for both databases (sans-IO): the statements (each the SQL and
its parameters, in the dialect's placeholder), the readers that turn rows (tuples in SELECT
order) into the store's values, :func:`append_flow`, what an append adds — the leaf hashes,
the tile hashes that became complete, the new root — asking for the tiles it reads, and each
call of the store as a plan (a generator of the requests it makes: a statement, answered with
its rows; many rows for one statement; a checkpoint to sign). :class:`QueryLogStore` answers
the store's protocol with them; ``store_sqlite`` and ``store_postgres`` only run the plans,
each in one transaction (a write under their write lock).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from enclave.tlog import merkle, tiles
from enclave.tlog.checkpoint import Checkpoint
from paygate.singleton_lease import SingletonLease
from paygate.statements import Query, Row
from paygate.tlog.errors import LogOriginMismatch, LogStoreError
from paygate.tlog.store import (
    APPEND_LOCK,
    Appended,
    KeptReceipt,
    MissingReceipt,
    NoteSigner,
    OpenReceipt,
    PeriodEntry,
    Position,
    ReceiptPeriod,
    RecoveryTurn,
    StoredCheckpoint,
    check_entries,
    completed_tiles,
    root_flow,
)

T = TypeVar("T")
RECOVERY_TURN = SingletonLease("tlog_recovery", holder="holder")  # the one row: id 1
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class HashRows:
    """Tile hashes to insert: ``(level, index, hash)``."""

    rows: list[tuple[int, int, bytes]]


def append_flow(
    old: int, entries: Sequence[bytes]
) -> Generator[HashRows | tiles.TileRef, bytes, bytes]:
    """Grow the stored tree of ``old`` entries by ``entries``: yields the :class:`HashRows` to
    insert (sent anything) and the tiles it reads (sent their bytes, b"" when not stored), in
    an order where every tile read is complete; returns the new root."""
    yield HashRows([(0, old + i, merkle.leaf_hash(data)) for i, data in enumerate(entries)])
    new = old + len(entries)
    level = 1
    while new >> (tiles.HEIGHT * level):
        for index in completed_tiles(old, new, level):
            below = yield tiles.TileRef(level - 1, index, tiles.WIDTH)
            if len(below) != tiles.WIDTH * merkle.HASH_SIZE:
                raise LogStoreError("a completed tile of the log is missing hashes")
            digest = tiles.hash_tile(tiles.split_hashes(below, tiles.WIDTH))
            yield HashRows([(level, index, digest)])
        level += 1
    return (yield from root_flow(new))


@dataclass(frozen=True, slots=True)
class ExecuteMany:
    """One statement run for each of ``rows`` (answered with nothing)."""

    sql: str
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class SignCheckpoint:
    """A checkpoint to sign (answered with the signed note): a key backend call, which blocks."""

    sign: NoteSigner
    checkpoint: Checkpoint

    def signed(self) -> str:
        return self.sign(self.checkpoint)


#: What a plan asks its store: a statement (answered with its rows, [] when it returns none),
#: many rows for one statement, a checkpoint signed.
Request = Query | ExecuteMany | SignCheckpoint
Plan = Generator[Request, Any, T]


def route(
    request: Request,
    *,
    rows: Callable[[Query], A],
    many: Callable[[str, list[tuple[Any, ...]]], A],
    sign: Callable[[SignCheckpoint], A],
) -> A:
    """Hand a plan's request to the store's way of answering it (``A``: the answer, or for an
    async store an awaitable of it)."""
    if isinstance(request, ExecuteMany):
        return many(request.sql, request.rows)
    if isinstance(request, SignCheckpoint):
        return sign(request)
    return rows(request)


class LogQueries:
    """The log's statements in one dialect (``mark``: the driver's placeholder; ``clock``: the
    database's time, else this host's; ``advisory_lock``: appends take PostgreSQL's
    transaction-scoped lock, where SQLite's write transaction already holds the file's)."""

    def __init__(
        self,
        mark: str,
        *,
        lock_rows: str = "",
        amounts_as_text: bool = False,
        clock: str | None = None,
        advisory_lock: bool = False,
        returning: bool = False,
    ) -> None:
        self.mark = mark
        # Whether an insert ignored at its conflict added a row: its RETURNING row where the
        # dialect has one (SQLite has it only from 3.35), else the connection's changes().
        self.returning = returning
        self.clock = clock
        self.append_lock: Query | None = (
            ("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,)) if advisory_lock else None
        )
        self.lock_rows = lock_rows  # appended to the open receipts' select (" FOR UPDATE")
        self.amounts_as_text = amounts_as_text  # SQLite keeps amounts beyond 64 bits as text
        self.size = "SELECT COALESCE(MAX(idx) + 1, 0) AS size FROM tlog_entries"
        self.insert_entry = self._sql(
            "INSERT INTO tlog_entries (idx, data, replica, created_at) VALUES (?, ?, ?, ?)"
        )
        self.insert_hash = self._sql("INSERT INTO tlog_hashes (level, idx, hash) VALUES (?, ?, ?)")
        self.origin = "SELECT origin FROM tlog_meta WHERE id = 1"
        self.close_receipts = self._sql(
            "UPDATE tlog_receipts SET entry = ?, position = ? WHERE seq = ?"
        )

    def _sql(self, text: str) -> str:
        return text.replace("?", self.mark)

    def entries(
        self, old: int, entries: Sequence[bytes], replica: str, now: float
    ) -> list[tuple[Any, ...]]:
        """The rows of :attr:`insert_entry`."""
        return [(old + i, data, replica, now) for i, data in enumerate(entries)]

    def tile(self, level: int, index: int, width: int) -> Query:
        start = index * tiles.WIDTH
        return self._sql(
            "SELECT hash FROM tlog_hashes WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx"
        ), (level, start, start + width)

    @staticmethod
    def tile_of(rows: Sequence[Row], width: int) -> bytes | None:
        return b"".join(bytes(r[0]) for r in rows) if len(rows) == width else None

    def bundle(self, index: int, width: int) -> Query:
        start = index * tiles.WIDTH
        return self._sql("SELECT data FROM tlog_entries WHERE idx >= ? AND idx < ? ORDER BY idx"), (
            start,
            start + width,
        )

    @staticmethod
    def bundle_of(rows: Sequence[Row], width: int) -> list[bytes] | None:
        return [bytes(r[0]) for r in rows] if len(rows) == width else None

    def claim_origin(self, row: Row | None, origin: str) -> Query | None:
        """The insert that claims an empty store for ``origin``; None when it is ours already."""
        if row is None:
            return self._sql("INSERT INTO tlog_meta (id, origin) VALUES (1, ?)"), (origin,)
        if row[0] != origin:
            raise LogOriginMismatch("the ledger store holds the log of another origin")
        return None

    @staticmethod
    def origin_of(row: Row | None) -> str:
        if row is None:
            raise LogStoreError("the log has no origin yet")
        return str(row[0])

    def insert_checkpoint(self, size: int, root: bytes, note: str, now: float) -> Query:
        return self._sql(
            "INSERT INTO tlog_checkpoints (size, root, note, created_at) VALUES (?, ?, ?, ?)"
        ), (size, root, note, now)

    def checkpoint(self, size: int | None) -> Query:
        """The checkpoint of ``size``, or the latest (None)."""
        query = "SELECT size, root, note, cosignatures FROM tlog_checkpoints"
        if size is None:
            return query + " ORDER BY size DESC LIMIT 1", ()
        return self._sql(query + " WHERE size = ?"), (size,)

    @staticmethod
    def checkpoint_of(row: Row | None) -> StoredCheckpoint | None:
        if row is None:
            return None
        return StoredCheckpoint(int(row[0]), bytes(row[1]), row[2], row[3])

    def set_cosignatures(self, size: int, lines: str) -> Query:
        return self._sql("UPDATE tlog_checkpoints SET cosignatures = ? WHERE size = ?"), (
            lines,
            size,
        )

    # --- receipts periods ------------------------------------------------------------------

    def record_receipt(self, leaf: bytes, amount: int, replica: str, issued_at: float) -> Query:
        """Record a receipt's leaf; nothing when the log has it (tlog_receipts_leaf_once: a
        process frozen past the recovery grace records one recovery recorded meanwhile)."""
        return self._sql(
            "INSERT INTO tlog_receipts (leaf, amount, replica, issued_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (leaf, twin) DO NOTHING"
        ), (leaf, str(amount) if self.amounts_as_text else amount, replica, issued_at)

    def recover_receipt(self, leaf: bytes, amount: int, replica: str, issued_at: float) -> Query:
        """:meth:`record_receipt`, answering a row when it added one (see :attr:`added`)."""
        text, params = self.record_receipt(leaf, amount, replica, issued_at)
        return (text + " RETURNING seq" if self.returning else text), params

    @property
    def added(self) -> str | None:
        """Where there is no RETURNING: how many rows the last insert added."""
        return None if self.returning else "SELECT changes()"

    def open_receipts(self, limit: int) -> Query:
        """The receipts no entry covers yet, oldest first (locked where the dialect can), but a
        twin of one the log holds at a lower seq (:attr:`drop_recorded_again`)."""
        return self._sql(
            "SELECT seq, leaf, amount, issued_at FROM tlog_receipts WHERE entry IS NULL"  # noqa: S608 - a constant clause
            " AND NOT EXISTS (SELECT 1 FROM tlog_receipts AS earlier"  # a twin committed mid-cut
            " WHERE earlier.leaf = tlog_receipts.leaf AND earlier.seq < tlog_receipts.seq)"
            " ORDER BY seq LIMIT ?" + self.lock_rows
        ), (limit,)

    @staticmethod
    def open_receipt_of(row: Row) -> OpenReceipt:
        return OpenReceipt(int(row[0]), bytes(row[1]), int(row[2]), float(row[3]))

    @staticmethod
    def closed(entry: int, period: Sequence[OpenReceipt]) -> list[tuple[int, int, int]]:
        """The rows of :attr:`close_receipts`: each receipt's entry and place in it."""
        return [(entry, position, r.seq) for position, r in enumerate(period)]

    #: Open receipts whose leaf the log already holds at a lower seq: a receipt recorded twice
    #: (its process froze past the recovery grace, recovery recorded it meanwhile). Since schema
    #: step 15 the unique key refuses such a twin at its insert; kept as a second guard at the
    #: cut, under the lock, so a period counts each leaf once and never one a published period
    #: counts (an index probe per open receipt).
    drop_recorded_again = (
        "DELETE FROM tlog_receipts WHERE entry IS NULL AND EXISTS (SELECT 1 FROM tlog_receipts"
        " AS earlier WHERE earlier.leaf = tlog_receipts.leaf AND earlier.seq < tlog_receipts.seq)"
    )

    def receipt_entry(self, leaf: bytes) -> Query:
        return self._sql(
            "SELECT entry, position FROM tlog_receipts WHERE leaf = ? AND entry IS NOT NULL"
            " ORDER BY seq LIMIT 1"
        ), (leaf,)

    def period_leaves(self, entry: int) -> Query:
        return self._sql("SELECT leaf FROM tlog_receipts WHERE entry = ? ORDER BY position"), (
            entry,
        )

    @staticmethod
    def period_of(row: Row, leaves: Sequence[Row]) -> ReceiptPeriod:
        return ReceiptPeriod(int(row[0]), int(row[1]), tuple(bytes(r[0]) for r in leaves))

    # --- recovery: the ledger's kept receipts the log lacks ----------------------------------

    #: When the ledger kept its newest receipt (receipts_created: the index's last entry).
    newest_kept = "SELECT MAX(created_at) AS newest FROM receipts"

    def kept_after(self, after: Position, until: float, limit: int) -> Query:
        """The ledger's receipts after ``after`` kept by ``until``, in (created_at, key) order
        (a range of receipts_created)."""
        at, payment_id, kind = after
        return self._sql(
            "SELECT created_at, payment_id, kind, token FROM receipts"
            " WHERE created_at >= ? AND created_at <= ?"
            " AND (created_at > ? OR payment_id > ? OR (payment_id = ? AND kind > ?))"
            " ORDER BY created_at, payment_id, kind LIMIT ?"
        ), (at, until, at, payment_id, payment_id, kind, limit)

    @staticmethod
    def kept_of(row: Row) -> KeptReceipt:
        return KeptReceipt(float(row[0]), str(row[1]), str(row[2]), str(row[3]))

    def known_leaves(self, leaves: Sequence[bytes]) -> Query:
        """Which of ``leaves`` the log has recorded (tlog_receipts_leaf_once)."""
        marks = ", ".join([self.mark] * len(leaves))
        return (
            f"SELECT leaf FROM tlog_receipts WHERE leaf IN ({marks})",  # noqa: S608 - placeholders only
            tuple(leaves),
        )

    # --- recovery's turn: one scan per ledger at a time ------------------------------------

    def seed_turn(self, holder: str) -> Query:
        """The turn's row, made once (held by nobody: its lease ended long ago)."""
        return self._sql(
            "INSERT INTO tlog_recovery (id, holder, lease_until) VALUES (1, ?, 0)"
            " ON CONFLICT (id) DO NOTHING"
        ), (holder,)

    def take_turn(self, holder: str, now: float, lease: float) -> Query:
        """Take the turn (nobody holds it) or renew it (``holder``'s already): SingletonLease."""
        text, params = RECOVERY_TURN.take(1, holder, now, lease)
        return self._sql(text), params

    turn = "SELECT holder, at, payment_id, kind, checked FROM tlog_recovery WHERE id = 1"

    @staticmethod
    def turn_of(row: Row, holder: str) -> RecoveryTurn:
        place = None if row[1] is None else (float(row[1]), str(row[2]), str(row[3]))
        checked = None if row[4] is None else float(row[4])
        return RecoveryTurn(row[0] == holder, str(row[0]), place, checked)

    def save_place(self, holder: str, place: Position | None, checked: float) -> Query:
        """Where the scan got to, kept only while ``holder`` holds the turn (a process frozen
        past its lease does not move its successor's place back)."""
        at, payment_id, kind = place if place is not None else (None, None, None)
        return self._sql(
            "UPDATE tlog_recovery SET at = ?, payment_id = ?, kind = ?, checked = ?"
            " WHERE id = 1 AND holder = ?"
        ), (at, payment_id, kind, checked, holder)

    def end_turn(self, holder: str) -> Query:
        text, params = RECOVERY_TURN.let_go(1, holder)
        return self._sql(text), params


# --- the store's calls, as plans ------------------------------------------------------------


def _rows(query: Query) -> Plan[list[Row]]:
    rows: list[Row] = yield query
    return rows


def _first(rows: Sequence[Row]) -> Row | None:
    return rows[0] if rows else None


def _locked(sql: LogQueries) -> Plan[None]:
    if sql.append_lock is not None:
        yield sql.append_lock


def claim_origin_plan(sql: LogQueries, origin: str) -> Plan[None]:
    yield from _locked(sql)
    claim = sql.claim_origin(_first((yield (sql.origin, ()))), origin)
    if claim is not None:
        yield claim


def append_plan(
    sql: LogQueries, entries: list[bytes], sign: NoteSigner, replica: str
) -> Plan[Appended]:
    """Append ``entries`` under the write lock: their rows, the tile hashes that became
    complete, the checkpoint of the new root, signed."""
    yield from _locked(sql)
    old = int((yield (sql.size, ()))[0][0])
    now = float((yield (sql.clock, ()))[0][0]) if sql.clock else time.time()
    yield ExecuteMany(sql.insert_entry, sql.entries(old, entries, replica, now))
    flow = append_flow(old, entries)
    try:
        step = next(flow)
        while True:
            if isinstance(step, HashRows):
                yield ExecuteMany(sql.insert_hash, step.rows)
                step = flow.send(b"")
            else:
                rows = yield sql.tile(step.level or 0, step.index, step.width)
                step = flow.send(sql.tile_of(rows, step.width) or b"")
    except StopIteration as done:
        root: bytes = done.value
    new = old + len(entries)
    origin = sql.origin_of(_first((yield (sql.origin, ()))))
    signed: str = yield SignCheckpoint(sign, Checkpoint(origin, new, root))
    yield sql.insert_checkpoint(new, root, signed, now)
    return Appended(old, StoredCheckpoint(new, root, signed))


def append_receipts_plan(
    sql: LogQueries, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
) -> Plan[Appended | None]:
    """One receipts entry for the receipts no entry covers yet (at most ``limit``)."""
    yield from _locked(sql)
    yield sql.drop_recorded_again, ()
    period = [sql.open_receipt_of(r) for r in (yield sql.open_receipts(limit))]
    if not period:
        return None
    appended = yield from append_plan(sql, [build(period)], sign, replica)  # a re-entrant lock
    yield ExecuteMany(sql.close_receipts, sql.closed(appended.first, period))
    return appended


def kept_receipts_plan(
    sql: LogQueries, after: Position | None, window: float, grace: float, limit: int
) -> Plan[tuple[Position | None, list[KeptReceipt], float]]:
    """Up to ``limit`` receipts the ledger kept after ``after`` and at least ``grace`` seconds
    ago (by the database's clock where it has one); with no ``after``, from ``window`` seconds
    before the newest kept receipt. Returns where the scan started, what it read and the kept
    time it read up to (now - ``grace``)."""
    now = float((yield (sql.clock, ()))[0][0]) if sql.clock else time.time()
    until = now - grace
    if after is None:
        newest = _first((yield (sql.newest_kept, ())))
        if newest is None or newest[0] is None:
            return None, [], until
        after = (float(newest[0]) - window, "", "")
    rows = yield sql.kept_after(after, until, limit)
    return after, [sql.kept_of(r) for r in rows], until


def known_leaves_plan(sql: LogQueries, leaves: Sequence[bytes]) -> Plan[set[bytes]]:
    if not leaves:
        return set()
    return {bytes(r[0]) for r in (yield sql.known_leaves(leaves))}


def record_missing_plan(
    sql: LogQueries, missing: Sequence[MissingReceipt], replica: str
) -> Plan[int]:
    """Record the receipts whose leaf the log does not have, under the append lock (SQLite's
    write transaction, PostgreSQL's advisory lock): two recoveries at once record each once.
    Counts only the rows added: on PostgreSQL the request path's own record (not under the lock:
    its process froze past the grace) may land between the check and the insert, which then
    adds nothing, and that receipt was not recovered."""
    yield from _locked(sql)
    known = yield from known_leaves_plan(sql, [m.leaf for m in missing])
    recorded = 0
    for receipt in missing:
        if receipt.leaf in known:
            continue
        known.add(receipt.leaf)
        rows = yield sql.recover_receipt(receipt.leaf, receipt.amount, replica, receipt.issued_at)
        if sql.added is not None:
            rows = yield (sql.added, ())
        recorded += 1 if rows and rows[0][0] else 0
    return recorded


def recovery_turn_plan(sql: LogQueries, holder: str, lease: float) -> Plan[RecoveryTurn]:
    now = float((yield (sql.clock, ()))[0][0]) if sql.clock else time.time()
    yield sql.seed_turn(holder)
    yield sql.take_turn(holder, now, lease)
    return sql.turn_of((yield (sql.turn, ()))[0], holder)


def receipt_period_plan(sql: LogQueries, leaf: bytes) -> Plan[ReceiptPeriod | None]:
    row = _first((yield sql.receipt_entry(leaf)))
    if row is None:
        return None
    return sql.period_of(row, (yield sql.period_leaves(row[0])))


class QueryLogStore(ABC):
    """:class:`paygate.tlog.store.LogStore` from the plans above: a store runs each plan in one
    transaction, a write under its write lock."""

    SQL: LogQueries

    @abstractmethod
    async def _read(self, plan: Plan[T]) -> T: ...

    @abstractmethod
    async def _write(self, plan: Plan[T]) -> T: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def claim_origin(self, origin: str) -> None:
        await self._write(claim_origin_plan(self.SQL, origin))

    async def append(self, entries: Sequence[bytes], sign: NoteSigner, replica: str) -> Appended:
        check_entries(entries)
        return await self._write(append_plan(self.SQL, list(entries), sign, replica))

    async def append_receipts(
        self, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
    ) -> Appended | None:
        return await self._write(append_receipts_plan(self.SQL, build, sign, replica, limit))

    async def record_receipt(
        self, leaf: bytes, amount: int, replica: str, issued_at: float
    ) -> None:
        await self._write(_rows(self.SQL.record_receipt(leaf, amount, replica, issued_at)))

    async def latest(self) -> StoredCheckpoint | None:
        return await self.checkpoint(None)

    async def checkpoint(self, size: int | None) -> StoredCheckpoint | None:
        """The checkpoint of ``size``, or the latest (None)."""
        return self.SQL.checkpoint_of(_first(await self._read(_rows(self.SQL.checkpoint(size)))))

    async def set_cosignatures(self, size: int, lines: str) -> None:
        await self._write(_rows(self.SQL.set_cosignatures(size, lines)))

    async def tile(self, level: int, index: int, width: int) -> bytes | None:
        rows = await self._read(_rows(self.SQL.tile(level, index, width)))
        return self.SQL.tile_of(rows, width)

    async def bundle(self, index: int, width: int) -> list[bytes] | None:
        return self.SQL.bundle_of(await self._read(_rows(self.SQL.bundle(index, width))), width)

    async def receipt_period(self, leaf: bytes) -> ReceiptPeriod | None:
        return await self._read(receipt_period_plan(self.SQL, leaf))

    async def kept_receipts(
        self, after: Position | None, *, window: float, grace: float, limit: int
    ) -> tuple[Position | None, list[KeptReceipt], float]:
        return await self._read(kept_receipts_plan(self.SQL, after, window, grace, limit))

    async def known_leaves(self, leaves: Sequence[bytes]) -> set[bytes]:
        return await self._read(known_leaves_plan(self.SQL, leaves))

    async def record_missing(self, missing: Sequence[MissingReceipt], replica: str) -> int:
        if not missing:
            return 0
        return await self._write(record_missing_plan(self.SQL, missing, replica))

    async def recovery_turn(self, holder: str, lease: float) -> RecoveryTurn:
        return await self._write(recovery_turn_plan(self.SQL, holder, lease))

    async def save_recovery(self, holder: str, place: Position | None, checked: float) -> None:
        await self._write(_rows(self.SQL.save_place(holder, place, checked)))

    async def end_recovery_turn(self, holder: str) -> None:
        await self._write(_rows(self.SQL.end_turn(holder)))
