"""The ledger's versioned migrations, written once for both databases: each step's SQL with the
few dialect differences (column types, PostgreSQL's insertion-order column, one ALTER a column
in SQLite) as substitutions from :data:`_WORDS`. ``ledger_sqlite_schema`` and
``ledger_postgres_schema`` run them.

A released step runs the same SQL forever, byte for byte
(tests/unit/paygate/x402/test_ledger_migration_texts.py pins each): append a step, never edit
one.

v1: the ledger as first released (payments, ledger_schema). v2: leases (owner, lease epoch,
expiry) and the payment_events history. v3: metering (scheme, model, usage, amounts owed and
moved) and the free quota's tables. v4: the economics controls and the console (token usage,
limit events, alert claims, one-time console logins; paygate.economics, paygate.console).
v5: the transparency log (paygate.tlog). v6: signed receipts, payments by nonce. v7: budgets by
when a payment counted, the sign-in key. v8: batch settlement's channels, vouchers and claims.
v9: the free requests of each client address per day (shared by every process on the ledger).
v10: two payment indexes fewer (pages every paid request writes; see the step). v11: each
batch-settlement voucher's charge marked in its own row (``bs_vouchers.charged``). v12: a
payment's history in its own row while it is the ordinary course's (ledger_rules.kept_history).
v13: batch-settlement vouchers by when they were recorded (retention's prune). v14: the chain
block each batch-settlement channel's balance was read at (a reading never undoes a newer one).
v15: a receipt's leaf recorded in the transparency log once (``tlog_receipts``: a unique key;
twins resolved), and the log's recovery scanned by one replica at a time (``tlog_recovery``).
v16: a batch-settlement payer's timed withdrawal, learnt from the contract's events
(``bs_channels.withdraw_requested_at``/``withdraw_amount``/``withdraw_due``; the scan's place
in ``bs_scan``). v17: the hash and time of the block each batch-settlement chain reading (and the
withdrawal scan's place) was read at, so a reading of a block reorganised away is told apart.
"""

from __future__ import annotations

from typing import Literal

from paygate.x402.ledger import PaymentState

SqlDialect = Literal["sqlite", "postgres"]
SCHEMA_VERSION = 17

# What differs between the dialects, by name: (SQLite, PostgreSQL).
_WORDS: dict[str, tuple[str, str]] = {
    "text": ("TEXT", "text"),
    "integer": ("INTEGER", "integer"),
    "bigint": ("INTEGER", "bigint"),  # SQLite's INTEGER is 64-bit
    "real": ("REAL", "double precision"),
    "blob": ("BLOB", "bytea"),
    # A uint256 does not fit SQLite's INTEGER: decimal text there.
    "amount": ("TEXT", "numeric(78, 0)"),
    "serial": ("INTEGER PRIMARY KEY AUTOINCREMENT", "bigserial PRIMARY KEY"),
    "boolean": ("INTEGER", "boolean"),
    "served": (
        "INTEGER NOT NULL DEFAULT 0 CHECK (served IN (0, 1))",
        "boolean NOT NULL DEFAULT false",
    ),
    "amount_note": ("decimal: a uint256 does not fit SQLite's 64-bit INTEGER", "a uint256"),
    # PostgreSQL has no rowid: insertion order (the tie-breaker) is a column of its own.
    "seq": ("", "seq bigserial NOT NULL"),
}


def migrations(dialect: SqlDialect) -> dict[int, tuple[str, ...]]:
    """``[n]``: the statements that take a ledger from schema n-1 to n, in ``dialect``."""
    w = {name: pair[dialect == "postgres"] for name, pair in _WORDS.items()}
    text, integer, bigint, real, blob = w["text"], w["integer"], w["bigint"], w["real"], w["blob"]
    amount, serial, seq = w["amount"], w["serial"], w["seq"]
    states = ", ".join(f"'{state.value}'" for state in PaymentState)

    def add_columns(*columns: str) -> tuple[str, ...]:
        # SQLite adds one column an ALTER; PostgreSQL all of them in one.
        if dialect == "sqlite":
            return tuple(f"ALTER TABLE payments ADD COLUMN {c}" for c in columns)
        return ("ALTER TABLE payments ADD COLUMN " + ", ADD COLUMN ".join(columns),)

    return {
        1: (
            _table(
                "payments",
                f"id {text} PRIMARY KEY",
                seq and f"{seq}  -- insertion order, the tie-breaker SQLite's rowid is",
                f"network {text} NOT NULL",
                f"asset {text} NOT NULL",
                f"payer {text} NOT NULL",
                f"nonce {text} NOT NULL",
                f"pay_to {text} NOT NULL",
                f"amount {amount} NOT NULL  -- {w['amount_note']}",
                f"x402_version {integer} NOT NULL",
                f"route {text} NOT NULL",
                f"state {text} NOT NULL CHECK (state IN ({states}))",
                f"served {w['served']}",
                f"payload {text} NOT NULL",
                f"requirements {text} NOT NULL",
                f"idempotency_key {text} UNIQUE",
                f"tx_hash {text}",
                f"error {text}",
                f"attempts {integer} NOT NULL DEFAULT 0",
                f"created_at {real} NOT NULL",
                f"updated_at {real} NOT NULL",
                "UNIQUE (network, asset, payer, nonce)",
            ),
            "CREATE INDEX payments_state ON payments (state, updated_at)",
            "CREATE INDEX payments_created ON payments (created_at)",
        ),
        2: (
            *add_columns(
                f"owner {text}", f"lease {bigint} NOT NULL DEFAULT 0", f"lease_until {real}"
            ),
            "CREATE INDEX payments_lease ON payments (state, lease_until)",
            _table(
                "payment_events",
                f"seq {serial}",
                f"payment_id {text} NOT NULL REFERENCES payments (id)",
                f"at {real} NOT NULL",
                f"replica {text} NOT NULL",
                f"action {text} NOT NULL",
                f"state {text} NOT NULL",
                f"lease {bigint} NOT NULL",
                f"tx_hash {text}",
                f"error {text}",
                f"detail {text}",
            ),
            "CREATE INDEX payment_events_payment ON payment_events (payment_id, seq)",
        ),
        # Metered payments (upto): the scheme, the model, usage and the amounts owed and moved;
        # the free quota (sign-in-with-x).
        3: (
            *add_columns(
                f"scheme {text} NOT NULL DEFAULT 'exact'",
                f"model {text}",
                f"tokens_in {bigint}",
                f"tokens_out {bigint}",
                f"usage_source {text}",
                f"settle_amount {amount}",
                f"settled_amount {amount}",
            ),
            # A payer's spend today (budgets) without scanning the table.
            "CREATE INDEX payments_payer ON payments (payer, created_at)",
            f"CREATE TABLE free_quota (payer {text} NOT NULL, day {text} NOT NULL,"
            f" used {integer} NOT NULL, PRIMARY KEY (payer, day))",
            f"CREATE TABLE signin_nonces (nonce {text} PRIMARY KEY, payer {text} NOT NULL,"
            f" used_at {real} NOT NULL)",
        ),
        # Economics controls and the operator console: self-contained tables (paygate.economics).
        4: (
            f"CREATE TABLE token_usage (seq {serial}, at {real} NOT NULL,"
            f" payer {text} NOT NULL, model {text} NOT NULL, tokens_in {bigint} NOT NULL,"
            f" tokens_out {bigint} NOT NULL)",
            "CREATE INDEX token_usage_payer ON token_usage (payer, at)",
            "CREATE INDEX token_usage_model ON token_usage (model, at)",
            "CREATE INDEX token_usage_at ON token_usage (at)",
            f"CREATE TABLE limit_events (seq {serial}, at {real} NOT NULL,"
            f" kind {text} NOT NULL, rule {text} NOT NULL, payer {text} NOT NULL, model {text},"
            f" enforced {w['boolean']} NOT NULL, detail {text})",
            "CREATE INDEX limit_events_at ON limit_events (at)",
            f"CREATE TABLE alert_claims (key {text} PRIMARY KEY, at {real} NOT NULL)",
            f"CREATE TABLE console_logins (token_hash {text} PRIMARY KEY,"
            f" expires_at {real} NOT NULL, used_at {real})",
        ),
        # The transparency log (paygate.tlog.store): its entries, the hashes of its tiles, its
        # signed checkpoints and the leaf hashes of signed receipts waiting for a receipts entry.
        5: (
            f"CREATE TABLE tlog_meta (id {integer} PRIMARY KEY CHECK (id = 1),"
            f" origin {text} NOT NULL)",
            f"CREATE TABLE tlog_entries (idx {bigint} PRIMARY KEY, data {blob} NOT NULL,"
            f" replica {text} NOT NULL, created_at {real} NOT NULL)",
            f"CREATE TABLE tlog_hashes (level {integer} NOT NULL, idx {bigint} NOT NULL,"
            f" hash {blob} NOT NULL, PRIMARY KEY (level, idx))",
            f"CREATE TABLE tlog_checkpoints (size {bigint} PRIMARY KEY, root {blob} NOT NULL,"
            f" note {text} NOT NULL, cosignatures {text} NOT NULL DEFAULT '',"
            f" created_at {real} NOT NULL)",
            f"CREATE TABLE tlog_receipts (seq {serial}, leaf {blob} NOT NULL,"
            f" amount {amount} NOT NULL, replica {text} NOT NULL,"
            f" issued_at {real} NOT NULL, entry {bigint}, position {bigint})",
            "CREATE INDEX tlog_receipts_open ON tlog_receipts (entry, seq)",
            "CREATE INDEX tlog_receipts_leaf ON tlog_receipts (leaf)",
        ),
        # Signed receipts (one per payment and kind), and payments found by their nonce.
        6: (
            _table(
                "receipts",
                f"payment_id {text} NOT NULL REFERENCES payments (id)",
                f"kind {text} NOT NULL CHECK (kind IN ('reply', 'settlement'))",
                f"token {text} NOT NULL",
                f"created_at {real} NOT NULL",
                seq,
                "PRIMARY KEY (payment_id, kind)",
            ),
            "CREATE INDEX receipts_created ON receipts (created_at)",
            "CREATE INDEX payments_nonce ON payments (nonce)",
        ),
        # Budgets count a payment by when it last counted (admitted, re-admitted after a
        # release, settled), not by when its record was created; the key that proves a sign-in
        # nonce was issued here (shared by every process on the ledger).
        7: (
            *add_columns(f"counted_at {real}"),
            "UPDATE payments SET counted_at = updated_at",
            "CREATE INDEX payments_payer_counted ON payments (payer, counted_at)",
            f"CREATE TABLE signin_key (id {integer} PRIMARY KEY CHECK (id = 1),"
            f" secret {text} NOT NULL)",
        ),
        # batch settlement (paygate.x402.schemes.batch_settlement): payment channels, every
        # voucher accepted, and the claims that move the money (their tables are that
        # package's). Their text columns are spelled TEXT in both dialects.
        8: (
            _table(
                "bs_channels",
                "channel_id TEXT PRIMARY KEY",
                "network TEXT NOT NULL",
                "payer TEXT NOT NULL",
                "config TEXT NOT NULL",
                "balance TEXT NOT NULL",
                "total_claimed TEXT NOT NULL",
                "charged TEXT NOT NULL",
                "signed_max TEXT NOT NULL",
                "signature TEXT NOT NULL",
                "pending_owner TEXT",
                f"pending_until {real}",
                f"version {bigint} NOT NULL",
                f"updated_at {real} NOT NULL",
            ),
            _table(
                "bs_vouchers",
                "channel_id TEXT NOT NULL",
                "max_claimable TEXT NOT NULL",
                "signature TEXT NOT NULL",
                "payment_id TEXT NOT NULL",
                "charge TEXT NOT NULL",
                f"created_at {real} NOT NULL",
                "PRIMARY KEY (channel_id, max_claimable)",
            ),
            _table(
                "bs_claims",
                "id TEXT PRIMARY KEY",
                "state TEXT NOT NULL",
                "entries TEXT NOT NULL",
                "tx_hash TEXT",
                "owner TEXT",
                f"lease_until {real}",
                f"created_at {real} NOT NULL",
                f"updated_at {real} NOT NULL",
            ),
        ),
        # The free requests of a client address key (paygate.x402.free: a keyed digest, not
        # the address) per UTC day: counted here so every worker and replica on the ledger
        # shares one allowance. The day first: a day's rows are one range of the key.
        9: (
            _table(
                "free_addresses",
                f"day {text} NOT NULL",
                f"address {text} NOT NULL",
                f"used {integer} NOT NULL",
                "PRIMARY KEY (day, address)",
            ),
        ),
        # Every index of payments is written by every paid request (the insert, and each move
        # for those on the state): two that no query needs any more go. Their queries (plans
        # checked with EXPLAIN QUERY PLAN and EXPLAIN on both stores):
        # * payments_payer (payer, created_at), for budgets until v7: a payer's spend is summed
        #   by counted_at since (payments_payer_counted). What is left of it, the console's
        #   search by payer (newest first, operators only), takes payments_payer_counted's
        #   payer prefix and sorts that payer's rows.
        # * payments_lease (state, lease_until): the lease test is inside an OR (lease ran out,
        #   or no owner and idle, or ours), which no index range serves; only its state prefix
        #   was ever used, and payments_state (state, updated_at) has the same prefix and the
        #   order the reconciler's claims and the stale-reservation sweep read in.
        # Kept: the primary key and both UNIQUEs (lookups by id, the replay guard, payment
        # identifiers), payments_state (recovery, leases, the sweeps, earnings), payments_created
        # (newest first: console, CLI; appended to, cheap), payments_nonce (the public receipts
        # endpoint finds a payment by its nonce: never a scan), payments_payer_counted
        # (budgets: a payer's spend today).
        10: (
            "DROP INDEX IF EXISTS payments_payer",
            "DROP INDEX IF EXISTS payments_lease",
        ),
        # A voucher is committed when its charge is in its channel's ``charged`` total, not
        # when the channel's ceiling passed it (a charge lost before a later voucher was
        # committed was taken as made): 1 = charged, in the charge's own transaction; 0 =
        # recorded, not charged. Rows from before this step: charged when the channel's last
        # committed voucher is theirs (that commit made their charge); the others stay NULL,
        # unknown (batch_settlement.store: flagged for review if ever committed again).
        11: (
            f"ALTER TABLE bs_vouchers ADD COLUMN charged {integer}",
            "UPDATE bs_vouchers SET charged = 1 WHERE EXISTS (SELECT 1 FROM bs_channels c"
            " WHERE c.channel_id = bs_vouchers.channel_id"
            " AND c.signed_max = bs_vouchers.max_claimable"
            " AND c.signature = bs_vouchers.signature)",
        ),
        # The history lines of a paid request's ordinary course (reserved; moved to VERIFIED,
        # to SERVED) in the payment's own row, a JSON list, instead of a payment_events row and
        # its index entry per move: ledger_rules.kept_history. NULL (every row written before
        # this step): the history is all in payment_events, as it was.
        12: add_columns(f"history {text}"),
        # Retention prunes bs_vouchers by ``created_at`` (a past day's, in bounded batches):
        # without an index each batch scanned every voucher ever accepted (one row a paid
        # request on a channel). Kept small: only the prune reads it; a voucher's commit
        # finds its row by the primary key.
        13: ("CREATE INDEX IF NOT EXISTS bs_vouchers_created ON bs_vouchers (created_at)",),
        # A channel's balance is mirrored from chain readings that reach the ledger out of
        # order (a top-up's, taken before a payer's timed withdrawal that the claim loop's
        # later reading mirrored first): each is written with the block it was read at, and
        # one older than the row's changes nothing (batch_settlement.store). 0: no reading
        # known (rows from before this step), so the next one counts.
        14: (f"ALTER TABLE bs_channels ADD COLUMN read_block {bigint} NOT NULL DEFAULT 0",),
        # A receipt's leaf is recorded in the log once: a unique key on (leaf, twin), which
        # every record meets (``twin`` 0; the insert ignores a second record). A log may already
        # hold twins (a process frozen past the recovery grace recorded a receipt recovery had
        # recorded), resolved first, never touching what a published period counts:
        # - an open twin (no receipts entry covers it) goes when the leaf has a record a period
        #   covers or an earlier one: never published, and the charge stays counted once (what
        #   every cut has done since, ``drop_recorded_again``);
        # - twins a period already covers stay (that entry's root and count were computed over
        #   them and are published: deleting one would break the period's inclusion proofs),
        #   each but the leaf's first marked ``twin`` = its own seq, outside the key.
        # The key's prefix serves every lookup by leaf (the old index goes).
        15: (
            f"ALTER TABLE tlog_receipts ADD COLUMN twin {bigint} NOT NULL DEFAULT 0",
            "DELETE FROM tlog_receipts WHERE entry IS NULL AND EXISTS (SELECT 1"
            " FROM tlog_receipts AS kept WHERE kept.leaf = tlog_receipts.leaf"
            " AND (kept.entry IS NOT NULL OR kept.seq < tlog_receipts.seq))",
            "UPDATE tlog_receipts SET twin = seq WHERE EXISTS (SELECT 1"
            " FROM tlog_receipts AS earlier WHERE earlier.leaf = tlog_receipts.leaf"
            " AND earlier.seq < tlog_receipts.seq)",
            "DROP INDEX IF EXISTS tlog_receipts_leaf",
            "CREATE UNIQUE INDEX tlog_receipts_leaf_once ON tlog_receipts (leaf, twin)",
            # The recovery of kept receipts, one scan per ledger at a time (paygate.tlog.
            # recovery): who holds the turn until when, and where the scan got to, so a
            # process that takes over goes on from there.
            _table(
                "tlog_recovery",
                f"id {integer} PRIMARY KEY CHECK (id = 1)",
                f"holder {text} NOT NULL  -- the replica scanning",
                f"lease_until {real} NOT NULL  -- its turn ends then unless renewed",
                f"at {real}  -- the place: the last kept receipt read (created_at, payment_id,"
                " kind)",
                f"payment_id {text}",
                f"kind {text}",
                f"checked {real}  -- every receipt kept before this was checked against the log",
            ),
        ),
        # A payer's timed withdrawal, learnt by the claimer's scan of the settlement contract's
        # withdrawal events (batch_settlement.withdrawals): when it was requested (the chain's
        # clock, 0: none pending), its amount, and when it can finish by this ledger's clock
        # (NULL: none), so vouchers that could not be claimed before it are refused; and where
        # the scan got to (one row), so the next claimer goes on from there.
        16: (
            f"ALTER TABLE bs_channels ADD COLUMN withdraw_requested_at {bigint} NOT NULL DEFAULT 0",
            "ALTER TABLE bs_channels ADD COLUMN withdraw_amount TEXT NOT NULL DEFAULT '0'",
            f"ALTER TABLE bs_channels ADD COLUMN withdraw_due {real}",
            _table(
                "bs_scan",
                f"id {integer} PRIMARY KEY CHECK (id = 1)",
                f"scanned_block {bigint} NOT NULL  -- every block up to this one was scanned",
                f"checked_after {text}  -- the first scan's check of the channels there were:"
                " the last channel read (NULL: done)",
            ),
        ),
        # A chain reading's block by number alone cannot tell a newer reading from one of a
        # chain that fell back (a reorganisation to a shorter chain, a test chain reset): each
        # reading is stamped with its block's hash and timestamp too, so that one of an older
        # block replaces a row whose block the chain no longer holds (batch_settlement.readings)
        # and the withdrawal scan goes back over a place reorganised away. NULL/0: not known
        # (rows from before this step), taken as still on the chain.
        17: (
            "ALTER TABLE bs_channels ADD COLUMN read_hash TEXT",
            f"ALTER TABLE bs_channels ADD COLUMN read_time {bigint} NOT NULL DEFAULT 0",
            "ALTER TABLE bs_scan ADD COLUMN scanned_hash TEXT",
            f"ALTER TABLE bs_scan ADD COLUMN scanned_time {bigint} NOT NULL DEFAULT 0",
        ),
    }


def _table(name: str, *columns: str) -> str:
    """A CREATE TABLE in the layout the released steps have: one column a line (a trailing
    ``  -- note`` after its comma); empty columns (the other dialect's) are left out."""
    kept = [c for c in columns if c]
    lines = []
    for i, column in enumerate(kept):
        definition, _, note = column.partition("  -- ")
        comma = "," if i < len(kept) - 1 else ""
        lines.append(f"            {definition}{comma}" + (f"  -- {note}" if note else ""))
    body = "\n".join(lines)
    return f"CREATE TABLE {name} (\n{body}\n        )"
