"""One holder at a time among every process on a ledger: a lease kept in one row of a table.

Two jobs run in one process of all the workers and replicas sharing a ledger: the
batch-settlement claimer (the ``bs_claims`` row ``claimer``) and the transparency log's receipts
recovery (the ``tlog_recovery`` row). Both follow this rule, written here once:

* a process takes the lease when nobody holds it (never taken, let go, or its lease ran out) or
  it is its own already (a renewal; and a restart under the same replica name takes it back at
  once, without waiting for its dead run's lease);
* the lease lasts ``seconds`` from ``now`` (the caller's clock: the same one for every process
  on the ledger, or skew shortens or stretches it);
* its holder lets it go by ending it: the next to ask takes it, and the row still names who held
  it last;
* nothing fences a holder frozen past its lease: it finds the lease gone at its next take, and
  each job keeps what it writes meanwhile harmless on its own (claims are compare-and-set on
  their channels; recovered receipts are re-checked under the log's append lock).

The row is the caller's to make (its table's other columns); :meth:`SingletonLease.take` is one
UPDATE whose changed-row count (or a read of the holder after it) says whether it was taken.
Statements use ``?`` placeholders, as both the ledger's scheme statements and the log's
dialects take them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paygate.statements import Query


@dataclass(frozen=True, slots=True)
class SingletonLease:
    """Where a lease is kept: ``table``'s row whose ``key`` column is the row key given to each
    statement, with the ``holder`` and ``until`` (epoch seconds) columns; ``touched``: a column
    set to ``now`` at each take, where the table keeps one."""

    table: str
    holder: str
    until: str = "lease_until"
    key: str = "id"
    touched: str | None = None

    def take(self, row: Any, holder: str, now: float, seconds: float) -> Query:
        """Take or renew ``holder``'s lease (one row changed: taken; none: another holds it)."""
        sets = f"{self.holder} = ?, {self.until} = ?"
        params: tuple[Any, ...] = (holder, now + seconds)
        if self.touched is not None:
            sets += f", {self.touched} = ?"
            params += (now,)
        return (
            f"UPDATE {self.table} SET {sets} WHERE {self.key} = ?"  # noqa: S608 - names only
            f" AND ({self.holder} IS NULL OR {self.holder} = ?"
            f" OR {self.until} IS NULL OR {self.until} < ?)",
            (*params, row, holder, now),
        )

    def let_go(self, row: Any, holder: str) -> Query:
        """End ``holder``'s lease now (a lease taken over meanwhile is another's: untouched)."""
        return (
            f"UPDATE {self.table} SET {self.until} = 0"  # noqa: S608 - names only
            f" WHERE {self.key} = ? AND {self.holder} = ?",
            (row, holder),
        )
