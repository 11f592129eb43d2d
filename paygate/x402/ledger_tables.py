"""The ledger's side tables as both stores query them (sans-IO): signed receipts and the usage
they state, the free quota and its sign-in nonces, the sign-in key, earnings, idempotency keys,
a payment's history.

Each statement is SQL text with ``?`` placeholders (a store spells them its way) and, where
needed, its parameters; rows are read back by column name (sqlite3.Row and psycopg's dict rows
both answer that). The stores' helpers (``ledger_sqlite_tables``, ``ledger_postgres_tables``)
only run them, each in the transaction of its call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from paygate.x402 import ledger_rules as rules
from paygate.x402.ledger import (
    MAX_LIST_LIMIT,
    Earnings,
    PaymentEvent,
    PaymentState,
    ReceiptUsage,
    StoredReceipt,
)

Row = Mapping[str, Any]

PAYMENT_EXISTS = "SELECT 1 AS one FROM payments WHERE id = ?"
ADD_RECEIPT = (
    "INSERT INTO receipts (payment_id, kind, token, created_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (payment_id, kind) DO NOTHING"
)
# The usage a reply's receipt states, kept once, and only under the lease that served it.
RECEIPT_USAGE = (
    "UPDATE payments SET tokens_in = ?, tokens_out = ?, usage_source = ?"
    " WHERE id = ? AND tokens_in IS NULL AND (CAST(? AS BIGINT) IS NULL OR lease = ?)"
)
RECEIPTS = "SELECT payment_id, kind, token, created_at FROM receipts "
FREE_USED = "SELECT used FROM free_quota WHERE payer = ? AND day = ?"
USE_SIGNIN_NONCE = (
    "INSERT INTO signin_nonces (nonce, payer, used_at) VALUES (?, ?, ?)"
    " ON CONFLICT (nonce) DO NOTHING"
)
COUNT_FREE = (
    "INSERT INTO free_quota (payer, day, used) VALUES (?, ?, 1)"
    " ON CONFLICT (payer, day) DO UPDATE SET used = free_quota.used + 1"
)
# One of an address key's free requests of the day, only while it has one left: a single
# statement, so two processes racing for the last one cannot both take it (the second waits
# for the first's row, then finds it full).
COUNT_FREE_ADDRESS = (
    "INSERT INTO free_addresses (day, address, used) VALUES (?, ?, 1)"
    " ON CONFLICT (day, address) DO UPDATE SET used = free_addresses.used + 1"
    " WHERE free_addresses.used < ?"
)
_NOT_FINISHED = ", ".join(f"'{s.value}'" for s in PaymentState if rules.TRANSITIONS[s])
# Retention (paygate.x402.retention): a bounded batch of a past day's rows, by the rows' own
# keys. ``{lock}``: PostgreSQL's FOR UPDATE SKIP LOCKED, so two pruners never wait on each other's
# rows (no lock order to deadlock on) and a pruner never waits on take_free (its advisory lock
# is never asked for here; today's rows are never selected).
_PRUNES = (
    "DELETE FROM free_quota WHERE (payer, day) IN"
    " (SELECT payer, day FROM free_quota WHERE day < ? LIMIT ?{lock})",
    "DELETE FROM free_addresses WHERE (day, address) IN"
    " (SELECT day, address FROM free_addresses WHERE day < ? LIMIT ?{lock})",
    "DELETE FROM signin_nonces WHERE nonce IN"
    " (SELECT nonce FROM signin_nonces WHERE used_at < ? LIMIT ?{lock})",
    # batch settlement's vouchers (one row per voucher accepted), recorded before that day,
    # except those whose payment may still be committed (not finished: the reconciler reads
    # the voucher's mark to tell a charge made from one lost). Claims read the channel's row,
    # not these. A voucher's payment id is the payment's nonce (payments_nonce).
    "DELETE FROM bs_vouchers WHERE (channel_id, max_claimable) IN"  # noqa: S608 - constants
    " (SELECT v.channel_id, v.max_claimable FROM bs_vouchers v WHERE v.created_at < ?"
    " AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.nonce = v.payment_id"
    f" AND p.state IN ({_NOT_FINISHED})) LIMIT ?{{lock}})",
)
ADD_SIGNIN_KEY = "INSERT INTO signin_key (id, secret) VALUES (1, ?) ON CONFLICT (id) DO NOTHING"
SIGNIN_KEY = "SELECT secret FROM signin_key WHERE id = 1"
HISTORY = (
    f"SELECT {rules.EVENT_COLUMNS} FROM payment_events WHERE payment_id = ?"  # noqa: S608 - constant
    " ORDER BY seq LIMIT ?"
)


def receipt_usage(payment_id: str, usage: ReceiptUsage, lease: int | None) -> tuple[Any, ...]:
    return (usage.tokens_in, usage.tokens_out, usage.source, payment_id, lease, lease)


def receipts_from(rows: Iterable[Row]) -> list[StoredReceipt]:
    return [
        StoredReceipt(r["payment_id"], r["kind"], r["token"], float(r["created_at"])) for r in rows
    ]


def free_used(row: Row | None) -> int:
    return int(row["used"]) if row else 0


#: A payment's history kept in its own row (schema v12; NULL: it is all in payment_events),
#: read, and set by a change that does not write the row's history itself.
HELD_HISTORY = "SELECT history FROM payments WHERE id = ?"
SET_HISTORY = "UPDATE payments SET history = ? WHERE id = ?"


def history(payment_id: str) -> tuple[str, tuple[Any, ...]]:
    return HISTORY, (payment_id, MAX_LIST_LIMIT)


def held_history(payment_id: str, row: Row | None) -> list[PaymentEvent] | None:
    """The history its row holds (``row``: :data:`HELD_HISTORY`'s), or None: read
    payment_events (:func:`history`)."""
    if row is None or row["history"] is None:
        return None
    return rules.inline_events(payment_id, row["history"])


def events_from(rows: Iterable[Row]) -> list[PaymentEvent]:
    return [rules.event_from_row(row) for row in rows]


def groups(*, day: str) -> dict[str, str]:
    """`paygate payments summary --by`: the SQL expression of each grouping (constants only),
    given the store's expression of a payment's UTC day."""
    return {"model": "COALESCE(model, '-')", "day": day, "payer": "payer"}


def earnings(group: str, amount: str, since: float) -> tuple[str, tuple[Any, ...]]:
    """Settled payments since ``since`` by ``group`` (a store's SQL expression of the grouping);
    ``amount``: the store's expression of the sum of what moved."""
    return (
        f"SELECT {group} AS key, COUNT(*) AS n, COALESCE(SUM(tokens_in), 0) AS i,"  # noqa: S608 - constants
        f" COALESCE(SUM(tokens_out), 0) AS o, COALESCE({amount}, 0) AS s"
        " FROM payments WHERE state = ? AND created_at >= ? GROUP BY 1 ORDER BY 1",
        (PaymentState.SETTLED.value, since),
    )


def earnings_from(rows: Iterable[Row]) -> list[Earnings]:
    return [
        Earnings(str(r["key"]), int(r["n"]), int(r["i"]), int(r["o"]), int(r["s"])) for r in rows
    ]


def forget_idempotency_key(
    key: str, payment_id: str, ended: tuple[PaymentState, ...], before: float, *, array: bool
) -> tuple[str, tuple[Any, ...]]:
    """Free a payment identifier: at once if its payment was RELEASED, else once it ended (in
    ``ended``) before ``before``. ``array``: the store takes a list as one parameter."""
    values = [state.value for state in ended]
    if array:
        test, listed = "= ANY(?)", (values,)
    else:
        test, listed = f"IN ({', '.join('?' * len(values)) or 'NULL'})", tuple(values)
    return (
        "UPDATE payments SET idempotency_key = NULL WHERE id = ? AND idempotency_key = ?"  # noqa: S608 - placeholders only
        f" AND (state = ? OR (state {test} AND updated_at < ?))",
        (payment_id, key, PaymentState.RELEASED.value, *listed, before),
    )


def prune(
    before_day: str, before_time: float, batch: int, *, skip_locked: bool
) -> list[tuple[str, tuple[Any, ...]]]:
    """The day-keyed tables' rows of days before ``before_day`` (sign-in nonces: used before
    ``before_time``, that day's start; channel vouchers: recorded before it, their payment
    finished), at most ``batch`` rows per statement."""
    lock = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
    keys = (before_day, before_day, before_time, before_time)
    return [(text.format(lock=lock), (key, batch)) for text, key in zip(_PRUNES, keys, strict=True)]
