"""The PostgreSQL ledger's pool and schema: connecting (fail fast on a refused connection or a
bad password, a bounded pool whose connections carry the lock timeout), the versioned
migrations (one migrator at a time) and the schema check. The statements on the data are
:mod:`paygate.x402.ledger_postgres`'s."""

from __future__ import annotations

from typing import Any

from paygate.postgres import Conn, PoolTimeout, connect_kwargs, psycopg
from paygate.postgres import open_pool as open_postgres_pool
from paygate.x402.ledger import (
    IdempotencyKeyReused,
    LedgerConflict,
    LedgerError,
    LedgerUnavailable,
    PaymentState,
)

#: Same numbering as the SQLite ledger: v1 the first ledger, v2 leases and history, v3 metering
#: and the free quota, v4 the economics controls and the console's tables, v5 the transparency log,
#: v6 signed receipts, v7 budgets by when a payment counted and the sign-in key, v8 batch
#: settlement's channels, vouchers and claims.
SCHEMA_VERSION = 8
_STATES = ", ".join(f"'{state.value}'" for state in PaymentState)
MIGRATION_LOCK = 0x70617967  # pg_advisory_xact_lock key: one migrator at a time ("payg")

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


async def open_pool(
    conninfo: str,
    *,
    password: str | None,
    read_only: bool,
    pool_size: int,
    timeout: float,
    lock_timeout: float,
) -> Any:
    """An open pool of at most ``pool_size`` connections (LedgerUnavailable if none comes up
    within ``timeout``)."""
    if psycopg is None:
        raise LedgerUnavailable(
            "the PostgreSQL ledger needs psycopg: pip install 'paygate[postgres]'"
        )
    kwargs = connect_kwargs(password, timeout)
    await _probe(conninfo, kwargs)  # fail fast (refused, bad password) rather than retry
    try:
        return await open_postgres_pool(
            conninfo,
            kwargs,
            name="paygate-ledger",
            pool_size=pool_size,
            timeout=timeout,
            lock_timeout=lock_timeout,
            read_only=read_only,
        )
    except PoolTimeout:
        raise LedgerUnavailable(
            "cannot connect to the PostgreSQL ledger (PAYGATE_LEDGER_URL) within "
            f"{timeout:g}s: check the host, port, user, password and database"
        ) from None


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


async def version(conn: Conn) -> int:
    """The database's ledger schema version (0: none)."""
    row = await (await conn.execute("SELECT to_regclass('ledger_schema') AS t")).fetchone()
    if row["t"] is None:
        return 0
    row = await (await conn.execute("SELECT version FROM ledger_schema WHERE id = 1")).fetchone()
    return int(row["version"]) if row else 0


async def migrate(conn: Conn, now: float) -> int:
    """Run the missing steps in the caller's transaction, one migrator at a time; the version
    found (a newer one than this paygate's is refused)."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS ledger_schema ("
        " id integer PRIMARY KEY CHECK (id = 1),"
        " version integer NOT NULL,"
        " migrated_at double precision NOT NULL)"
    )
    found = await version(conn)
    if found > SCHEMA_VERSION:
        raise LedgerUnavailable(
            f"the PostgreSQL ledger has schema v{found}, newer than this paygate's "
            f"v{SCHEMA_VERSION}"
        )
    for step in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step]:
            await conn.execute(statement)
    if found != SCHEMA_VERSION:
        await conn.execute(
            "INSERT INTO ledger_schema (id, version, migrated_at) VALUES (1, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET version = excluded.version,"
            " migrated_at = excluded.migrated_at",
            (SCHEMA_VERSION, now),
        )
    return found


def ledger_error(exc: Exception) -> LedgerError:
    """What a call that failed in the database tells its caller: the condition (class, SQLSTATE,
    constraint), never the server's message (it may quote the host, the user or data)."""
    if isinstance(exc, PoolTimeout):
        return LedgerUnavailable("no PostgreSQL ledger connection free in time")
    if isinstance(exc, psycopg.errors.IntegrityError):
        if exc.diag.constraint_name == "payments_idempotency_key_key":
            return IdempotencyKeyReused(
                "the payment identifier already names a different authorization"
            )
        return LedgerConflict(f"ledger constraint: {exc.diag.constraint_name}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return LedgerUnavailable("the ledger is open read-only")
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return LedgerUnavailable("the PostgreSQL ledger: row locked too long")
    state = f" ({exc.sqlstate})" if isinstance(exc, psycopg.Error) and exc.sqlstate else ""
    return LedgerUnavailable(f"the PostgreSQL ledger failed: {type(exc).__name__}{state}")
