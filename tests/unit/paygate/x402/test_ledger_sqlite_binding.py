"""The SQLite ledger binds None and bools through registered adapters (no adaptation-protocol
look-up, whose miss costs an exception on each such parameter of every paid request), and
they bind as before: NULL, and the integer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from tests.fixtures.ledger_support import request

_PROTOCOL = sqlite3.PrepareProtocol


def test_none_and_bools_have_adapters_that_bind_what_was_bound() -> None:
    import paygate.x402.ledger_sqlite  # noqa: F401  (registers them)

    to_null = sqlite3.adapters[(type(None), _PROTOCOL)]
    to_int = sqlite3.adapters[(bool, _PROTOCOL)]
    assert to_null(None) is None
    assert (to_int(True), to_int(False)) == (1, 0)
    assert type(to_int(True)) is int
    db = sqlite3.connect(":memory:")
    row = db.execute("SELECT ? IS NULL, typeof(?), ?, typeof(?)", (None, None, True, False))
    assert row.fetchone() == (1, "null", 1, "integer")


async def test_a_served_payment_with_unset_columns_reads_back_as_written(tmp_path: Path) -> None:
    ledger = await open_ledger(LedgerLocation(kind="sqlite", path=tmp_path / "payments.db"))
    try:
        record = await ledger.reserve(**request(1))
        assert record.idempotency_key is None
        assert record.transaction is None
        moved = await ledger.transition(
            record.id, PaymentState.SERVED, via=PaymentState.VERIFIED, lease=record.lease
        )
        stored = await ledger.get(record.id)
        assert stored == moved
        assert stored is not None
        assert stored.served is True
        assert (stored.transaction, stored.error, stored.settle_amount) == (None, None, None)
    finally:
        await ledger.close()
