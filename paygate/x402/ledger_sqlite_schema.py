"""The SQLite ledger's file and schema: opening the file (WAL, ``synchronous=FULL``, a new file
0600 in a 0700 directory), running the versioned migrations (written once for both databases in
:mod:`paygate.x402.ledger_migrations`), and the schema check of a read-only or unmigrated open.
The statements on the data are :mod:`paygate.x402.ledger_sqlite`'s."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from paygate.x402.ledger import LedgerNotFound, LedgerUnavailable
from paygate.x402.ledger_migrations import SCHEMA_VERSION, migrations

MIGRATIONS = migrations("sqlite")


def connect(path: Path, *, read_only: bool, busy_timeout: float) -> sqlite3.Connection:
    """The ledger's connection, set up (nothing migrated yet)."""
    try:
        if read_only:
            if not path.is_file():
                raise LedgerNotFound(f"no ledger at {path}")
            uri = f"file:{quote(str(path.resolve()))}?mode=ro"
            # Used by the event loop's thread and the ledger's worker, one at a time.
            db = sqlite3.connect(
                uri, uri=True, isolation_level=None, timeout=0, check_same_thread=False
            )
        else:
            _prepare_file(path)
            db = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    except OSError as exc:
        raise LedgerUnavailable(f"cannot open ledger {path}: {exc.strerror}") from None
    try:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if read_only:
            db.execute("PRAGMA query_only = ON")
            return db
        mode = _wal(db, busy_timeout)
        if str(mode).lower() != "wal":
            raise LedgerUnavailable(f"ledger {path}: cannot use WAL (journal mode {mode})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db


def _wal(db: sqlite3.Connection, busy_timeout: float) -> str:
    """Switch to WAL. A new file's switch takes the database exclusively and SQLite answers
    a second process that switches at the same moment "locked" without calling the busy
    handler, so the switch is retried here for as long as the busy timeout allows."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _prepare_file(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # workers start together
    if path.is_dir():
        raise LedgerUnavailable(f"cannot open ledger {path}: it is a directory")
    # Create it 0600 ourselves: sqlite3 would use the umask (the payloads hold signatures).
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))


def version(db: sqlite3.Connection, path: Path, *, read_only: bool) -> int:
    """The file's schema version; refused if newer than this paygate's, or (``read_only``)
    anything but the current one."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ledger_schema'"
    ).fetchone()
    found = 0
    if exists:
        row = db.execute("SELECT version FROM ledger_schema WHERE id = 1").fetchone()
        found = int(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        raise LedgerUnavailable(
            f"ledger {path} has schema v{found}, newer than this paygate's v{SCHEMA_VERSION}"
        )
    if read_only and found != SCHEMA_VERSION:
        raise LedgerUnavailable(
            f"ledger {path} has schema v{found}, not v{SCHEMA_VERSION}: "
            "not a paygate ledger, or not migrated yet (run `paygate ledger migrate`)"
        )
    return found


def migrate(db: sqlite3.Connection, path: Path, now: float) -> int:
    """Run the missing steps (in the caller's write transaction); the version found."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS ledger_schema ("
        " id INTEGER PRIMARY KEY CHECK (id = 1),"
        " version INTEGER NOT NULL,"
        " migrated_at REAL NOT NULL)"
    )
    found = version(db, path, read_only=False)
    for step in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step]:
            db.execute(statement)
    if found != SCHEMA_VERSION:
        db.execute(
            "INSERT INTO ledger_schema (id, version, migrated_at) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
            " migrated_at = excluded.migrated_at",
            (SCHEMA_VERSION, now),
        )
    return found
