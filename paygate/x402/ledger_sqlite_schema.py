"""The SQLite ledger's file and schema: opening the file (WAL, ``synchronous=FULL``, a new file
0600 in a 0700 directory), the versioned migrations, and the schema check of a read-only or
unmigrated open. The statements on the data are :mod:`paygate.x402.ledger_sqlite`'s."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from paygate.x402.ledger import LedgerNotFound, LedgerUnavailable, PaymentState

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
