"""The log store's rules, once for both databases (sans-IO): the statements (each the SQL and
its parameters, in the dialect's placeholder), the readers that turn rows (tuples in SELECT
order) into the store's values, and :func:`append_flow`, what an append adds — the leaf hashes,
the tile hashes that became complete, the new root — asking for the tiles it reads.
``store_sqlite`` and ``store_postgres`` only run them, under their own write lock.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from enclave.tlog import merkle, tiles
from paygate.statements import Query, Row
from paygate.tlog.store import (
    LogOriginMismatch,
    LogStoreError,
    OpenReceipt,
    ReceiptPeriod,
    StoredCheckpoint,
    completed_tiles,
    root_flow,
)


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


class LogQueries:
    """The log's statements in one dialect (``mark``: the driver's placeholder)."""

    def __init__(self, mark: str, *, lock_rows: str = "", amounts_as_text: bool = False) -> None:
        self.mark = mark
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
        return self._sql(
            "INSERT INTO tlog_receipts (leaf, amount, replica, issued_at) VALUES (?, ?, ?, ?)"
        ), (leaf, str(amount) if self.amounts_as_text else amount, replica, issued_at)

    def open_receipts(self, limit: int) -> Query:
        """The receipts no entry covers yet, oldest first (locked where the dialect can)."""
        return self._sql(
            "SELECT seq, leaf, amount, issued_at FROM tlog_receipts WHERE entry IS NULL"  # noqa: S608 - a constant clause
            " ORDER BY seq LIMIT ?" + self.lock_rows
        ), (limit,)

    @staticmethod
    def open_receipt_of(row: Row) -> OpenReceipt:
        return OpenReceipt(int(row[0]), bytes(row[1]), int(row[2]), float(row[3]))

    @staticmethod
    def closed(entry: int, period: Sequence[OpenReceipt]) -> list[tuple[int, int, int]]:
        """The rows of :attr:`close_receipts`: each receipt's entry and place in it."""
        return [(entry, position, r.seq) for position, r in enumerate(period)]

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
