"""What the sans-IO statement builders (:mod:`paygate.economics.queries`,
:mod:`paygate.tlog.store_rules`) hand the stores that run them, and what they read back, the same
on SQLite and PostgreSQL: a statement with its parameters, and a row as a sequence in SELECT
order (``paygate.postgres.values`` turns PostgreSQL's dict rows into one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Query = tuple[str, tuple[Any, ...]]
Row = Sequence[Any]
