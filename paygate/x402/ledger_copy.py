"""``paygate ledger copy``: every table of the ledger's schema, row for row, from one store to
another (SQLite or PostgreSQL, either way).

One generic copy driven by :data:`TABLES` (each table's key and its other unique keys, in an
order that puts a referenced table before the tables that reference it). Rows are copied as
they are — the tlog's entries, tile hashes and checkpoints (so the tree keeps its roots), the
sign-in key, receipts, leases — with the columns both stores have (PostgreSQL's own ``seq``
ordering columns are its own). A test compares :data:`TABLES` with the migrated schema of both
stores, so a table added by a future migration without a line here fails it.

Two passes: the first only reads, and refuses (:class:`LedgerConflict`, naming the table, never
a key or a value) when the target holds a different row under a row's key or one of its unique
keys; the second writes what is missing, a page per transaction. A row already there, equal, is
counted and left alone: running the copy twice copies nothing the second time. Memory is
bounded by the page size. The gateways on both stores must be stopped meanwhile.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from paygate.x402.ledger import LedgerConflict, LedgerUnavailable

PAGE = 500


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    key: tuple[str, ...]
    unique: tuple[tuple[str, ...], ...] = ()  # other unique keys (a row must not collide)


#: Every table of the schema (v12), referenced tables first. ``ledger_schema`` is not copied:
#: the versions must already be equal.
TABLES: tuple[Table, ...] = (
    Table("payments", ("id",), (("idempotency_key",), ("network", "asset", "payer", "nonce"))),
    Table("payment_events", ("seq",)),
    Table("receipts", ("payment_id", "kind")),
    Table("free_quota", ("payer", "day")),
    Table("free_addresses", ("day", "address")),
    Table("signin_nonces", ("nonce",)),
    Table("signin_key", ("id",)),
    Table("token_usage", ("seq",)),
    Table("limit_events", ("seq",)),
    Table("alert_claims", ("key",)),
    Table("console_logins", ("token_hash",)),
    Table("tlog_meta", ("id",)),
    Table("tlog_entries", ("idx",)),
    Table("tlog_hashes", ("level", "idx")),
    Table("tlog_checkpoints", ("size",)),
    Table("tlog_receipts", ("seq",), (("leaf", "twin"),)),
    Table("tlog_recovery", ("id",)),
    Table("bs_channels", ("channel_id",)),
    Table("bs_vouchers", ("channel_id", "max_claimable")),
    Table("bs_claims", ("id",)),
    Table("bs_scan", ("id",)),
)
#: Tables of the schema that are the store's own, not data.
NOT_COPIED = frozenset({"ledger_schema", "sqlite_sequence"})
#: PostgreSQL's own insertion-order columns (SQLite's rowid stands for them): not copied.
STORE_OWN = frozenset({("payments", "seq"), ("receipts", "seq")})


@dataclass
class Counts:
    copied: int = 0
    present: int = 0


def _canon(value: Any) -> Any:
    """One spelling of a value in either store: booleans as 0/1, uint256 amounts as text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return str(int(value))
    if isinstance(value, memoryview):
        return bytes(value)
    return value


class Store:
    """A ledger's tables through its ``scheme_sql`` (``?`` placeholders, each call its own
    transaction)."""

    def __init__(self, ledger: Any, kind: str) -> None:
        self.ledger = ledger
        self.kind = kind

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        _, rows = await self.ledger.scheme_sql(sql, params)
        return [tuple(row) for row in rows]

    async def tables(self) -> set[str]:
        if self.kind == "sqlite":
            rows = await self.query("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            rows = await self.query(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        return {str(row[0]) for row in rows}

    async def columns(self, table: str) -> dict[str, str]:
        """Column name -> declared type (lower case), in the table's order."""
        if self.kind == "sqlite":
            rows = await self.query("SELECT name, type FROM pragma_table_info(?)", (table,))
        else:
            rows = await self.query(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?"
                " ORDER BY ordinal_position",
                (table,),
            )
        return {str(name): str(kind).lower() for name, kind in rows}

    async def serials(self, table: str) -> list[str]:
        """PostgreSQL columns filled from a sequence (advanced past copied values)."""
        if self.kind == "sqlite":  # AUTOINCREMENT follows explicit values by itself
            return []
        rows = await self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND table_name = ? AND column_default LIKE 'nextval(%%'",
            (table,),
        )
        return [str(row[0]) for row in rows]

    def value(self, kind: str, value: Any) -> Any:
        """``value`` as this store's column of type ``kind`` takes it."""
        if value is None:
            return None
        if self.kind == "postgresql":
            if kind == "boolean":
                return bool(value)
            if kind == "bytea":
                return bytes(value)
            return value
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, Decimal):
            return str(int(value))
        return value


@dataclass
class _Plan:
    table: Table
    columns: list[str]
    types: dict[str, str]  # the target's


def _where(columns: Sequence[str]) -> str:
    return " AND ".join(f"{c} = ?" for c in columns)


async def _plan(source: Store, target: Store, table: Table) -> _Plan:
    have, want = await source.columns(table.name), await target.columns(table.name)
    for needed in {*table.key, *(c for u in table.unique for c in u)}:
        if needed not in have or needed not in want:
            raise LedgerUnavailable(f"ledger copy: table {table.name} has no column {needed}")
    columns = [c for c in have if c in want]
    odd = {c for c in have.keys() ^ want.keys() if (table.name, c) not in STORE_OWN}
    if odd:
        raise LedgerUnavailable(
            f"ledger copy: table {table.name} differs between the stores: "
            "run `paygate ledger migrate` on both first"
        )
    return _Plan(table, columns, want)


async def _source_pages(
    store: Store, plan: _Plan, size: int
) -> AsyncIterator[builtins.list[tuple[Any, ...]]]:
    """The source's rows in key order, a page at a time (keyset pagination)."""
    key = plan.table.key
    cols = ", ".join(plan.columns)
    order = ", ".join(key)
    positions = [plan.columns.index(k) for k in key]
    after: tuple[Any, ...] | None = None
    while True:
        if after is None:
            where, params = "", ()
        else:
            marks = ", ".join("?" * len(key))
            where, params = f" WHERE ({order}) > ({marks})", after
        rows = await store.query(
            f"SELECT {cols} FROM {plan.table.name}{where} ORDER BY {order} LIMIT ?",  # noqa: S608 - names from TABLES and the schema
            (*params, size),
        )
        if not rows:
            return
        yield rows
        after = tuple(rows[-1][i] for i in positions)


async def _present(target: Store, plan: _Plan, row: tuple[Any, ...]) -> bool:
    """Whether ``row`` is in the target already (True), missing (False); LedgerConflict when
    the target holds another row under its key or one of its unique keys."""
    cols = ", ".join(plan.columns)
    name = plan.table.name
    for n, key in enumerate((plan.table.key, *plan.table.unique)):
        values = tuple(row[plan.columns.index(c)] for c in key)
        if any(v is None for v in values):  # NULLs never collide
            continue
        found = await target.query(
            f"SELECT {cols} FROM {name} WHERE {_where(key)}",  # noqa: S608 - names from TABLES
            tuple(target.value(plan.types[c], v) for c, v in zip(key, values, strict=True)),
        )
        if not found:
            continue
        if [_canon(v) for v in found[0]] == [_canon(v) for v in row]:
            return True
        which = "key" if n == 0 else "unique key"
        raise LedgerConflict(
            f"the target's table {name} holds a different row under the same {which}"
            f" ({', '.join(key)}): nothing copied; copy into an empty ledger, or find out"
            " why the two stores disagree"
        )
    return False


async def _walk(source: Store, target: Store, plan: _Plan, *, write: bool, page: int) -> Counts:
    counts = Counts()
    cols = ", ".join(plan.columns)
    marks = ", ".join("?" * len(plan.columns))
    insert = f"INSERT INTO {plan.table.name} ({cols}) VALUES ({marks})"  # noqa: S608 - names from TABLES
    async for rows in _source_pages(source, plan, page):
        missing = [row for row in rows if not await _present(target, plan, row)]
        counts.present += len(rows) - len(missing)
        counts.copied += len(missing)
        if write and missing:
            await target.ledger.scheme_sql_all(
                [
                    (
                        insert,
                        tuple(
                            target.value(plan.types[c], v)
                            for c, v in zip(plan.columns, row, strict=True)
                        ),
                    )
                    for row in missing
                ]
            )
    if write and counts.copied:
        for column in await target.serials(plan.table.name):
            await target.query(
                f"SELECT setval(pg_get_serial_sequence('{plan.table.name}', '{column}'),"  # noqa: S608 - names from TABLES and the schema
                f" COALESCE((SELECT MAX({column}) FROM {plan.table.name}), 0) + 1, false)"
            )
    return counts


async def copy_tables(
    source: Store, target: Store, *, page: int = PAGE
) -> builtins.list[tuple[str, Counts]]:
    """Copy every table of :data:`TABLES` from ``source`` to ``target``: per table, the rows
    copied and those already there. Nothing is written if any table conflicts."""
    for store in (source, target):
        unknown = await store.tables() - NOT_COPIED - {t.name for t in TABLES}
        if unknown:
            raise LedgerUnavailable(
                f"ledger copy: tables this paygate does not know ({', '.join(sorted(unknown))})"
            )
    plans = [await _plan(source, target, table) for table in TABLES]
    for plan in plans:  # read only: refuse before writing anything
        await _walk(source, target, plan, write=False, page=page)
    return [
        (plan.table.name, await _walk(source, target, plan, write=True, page=page))
        for plan in plans
    ]
