"""Where the log lives: the ledger's store (SQLite or PostgreSQL, schema step 4).

One log per store, shared by every replica. An append runs in one transaction under the store's
write lock (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a transaction-scoped advisory lock), so
concurrent appenders are serialised: each reads the size, inserts its entries at the next
indices (a primary key: never a duplicate), adds the tile hashes that became complete, computes
the new root from the stored tiles and signs the checkpoint, all or nothing (never a gap).

Stored: ``tlog_entries`` (index, bytes), ``tlog_hashes`` (the hashes of each tile level: level
0 leaf hashes, level L the root of each full tile of level L-1), ``tlog_checkpoints`` (every
signed checkpoint and its witnesses' cosignatures), ``tlog_receipts`` (the leaf hash and amount
of every signed receipt; ``entry``/``position`` once a receipts entry covers it) and
``tlog_meta`` (the origin: one store never holds two logs).

Recovery (:mod:`paygate.tlog.recovery`) reads the ledger's own ``receipts`` table, in the same
database: a receipt kept there that ``tlog_receipts`` lacks is recorded, once, under the append
lock. Each leaf is recorded once (schema step 15: a unique key on ``(leaf, twin)``; a second
record is ignored at its insert; ``twin`` is other than 0 only for a twin recorded before that
step that a published period counts, kept for that period's root).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from enclave.tlog import merkle, tiles
from enclave.tlog.checkpoint import Checkpoint

T = TypeVar("T")
Q = TypeVar("Q")  # what a flow asks
A = TypeVar("A")  # what it is answered
#: pg_advisory_xact_lock key of the log's appends ("tlog").
APPEND_LOCK = 0x746C6F67
MAX_APPEND = 1024  # entries in one append: each is a row and a hash


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    size: int
    root: bytes
    note: str  # the signed note as the appending replica signed it
    cosignatures: str = ""  # witness signature lines, appended when served

    def served(self) -> str:
        return self.note + self.cosignatures


@dataclass(frozen=True, slots=True)
class Appended:
    first: int  # index of the first entry appended
    checkpoint: StoredCheckpoint


@dataclass(frozen=True, slots=True)
class OpenReceipt:
    seq: int
    leaf: bytes
    amount: int
    issued_at: float


#: Where a scan of the ledger's receipts stands: after this (created_at, payment_id, kind).
Position = tuple[float, str, str]


@dataclass(frozen=True, slots=True)
class KeptReceipt:
    """A signed receipt the ledger keeps (its ``receipts`` table), in the order recovery reads
    them: by when it was kept, then its key."""

    created_at: float
    payment_id: str
    kind: str
    token: str

    @property
    def position(self) -> Position:
        return (self.created_at, self.payment_id, self.kind)


@dataclass(frozen=True, slots=True)
class RecoveryTurn:
    """The ledger's recovery turn (``tlog_recovery``) as a process found it when it asked."""

    mine: bool  # the asking process holds it now (taken, or renewed)
    holder: str
    place: Position | None  # where the scan got to (the last kept receipt read), if anywhere
    checked: float | None  # every receipt kept before this was checked against the log


@dataclass(frozen=True, slots=True)
class MissingReceipt:
    """A receipt's leaf, amount and time, to record if the log does not have its leaf yet."""

    leaf: bytes
    amount: int
    issued_at: float


@dataclass(frozen=True, slots=True)
class ReceiptPeriod:
    entry: int  # the receipts entry's index in the log
    position: int  # the receipt's place among the period's receipts
    leaves: tuple[bytes, ...]  # every leaf hash of the period, in order


#: Signs a checkpoint: its note text in, the signed note out (blocking: a key backend call).
NoteSigner = Callable[[Checkpoint], str]
#: Builds the receipts entry from the receipts it covers.
PeriodEntry = Callable[[Sequence[OpenReceipt]], bytes]


class LogStore(Protocol):
    async def claim_origin(self, origin: str) -> None: ...

    async def append(
        self, entries: Sequence[bytes], sign: NoteSigner, replica: str
    ) -> Appended: ...

    async def append_receipts(
        self, build: PeriodEntry, sign: NoteSigner, replica: str, limit: int
    ) -> Appended | None: ...

    async def record_receipt(
        self, leaf: bytes, amount: int, replica: str, issued_at: float
    ) -> None: ...

    async def latest(self) -> StoredCheckpoint | None: ...

    async def checkpoint(self, size: int) -> StoredCheckpoint | None: ...

    async def set_cosignatures(self, size: int, lines: str) -> None: ...

    async def tile(self, level: int, index: int, width: int) -> bytes | None: ...

    async def bundle(self, index: int, width: int) -> list[bytes] | None: ...

    async def receipt_period(self, leaf: bytes) -> ReceiptPeriod | None: ...

    async def kept_receipts(
        self, after: Position | None, *, window: float, grace: float, limit: int
    ) -> tuple[Position | None, list[KeptReceipt], float]: ...

    async def known_leaves(self, leaves: Sequence[bytes]) -> set[bytes]: ...

    async def record_missing(self, missing: Sequence[MissingReceipt], replica: str) -> int: ...

    async def recovery_turn(self, holder: str, lease: float) -> RecoveryTurn: ...

    async def save_recovery(self, holder: str, place: Position | None, checked: float) -> None: ...

    async def end_recovery_turn(self, holder: str) -> None: ...

    async def close(self) -> None: ...


def check_entries(entries: Sequence[bytes]) -> None:
    if not entries or len(entries) > MAX_APPEND:
        raise ValueError(f"an append is 1 to {MAX_APPEND} entries")
    if any(len(e) > tiles.MAX_ENTRY for e in entries):
        raise ValueError("an entry is at most 65535 bytes")


def completed_tiles(old: int, new: int, level: int) -> range:
    """Indices at tile ``level`` (>= 1) whose hash became known growing ``old`` → ``new``."""
    shift = tiles.HEIGHT * level
    return range(old >> shift, new >> shift)


def root_flow(size: int) -> Generator[tiles.TileRef, bytes, bytes]:
    """The root of the stored tree of ``size``, asking for the tiles it needs."""
    nodes = tiles.TileNodes(size)
    return tiles.resolve(lambda: merkle.root(nodes, size), nodes)


def inclusion_flow(index: int, size: int) -> Generator[tiles.TileRef, bytes, list[bytes]]:
    nodes = tiles.TileNodes(size)
    return tiles.resolve(lambda: merkle.inclusion_proof(nodes, index, size), nodes)


def consistency_flow(old: int, new: int) -> Generator[tiles.TileRef, bytes, list[bytes]]:
    nodes = tiles.TileNodes(new)
    return tiles.resolve(lambda: merkle.consistency_proof(nodes, old, new), nodes)


async def adrive(flow: Generator[Q, A, T], fetch: Callable[[Q], Awaitable[A]]) -> T:
    """Run a tile flow (or any flow of requests) with an async fetcher (``fetch(ref)`` →
    awaitable of the tile bytes)."""
    try:
        ref = next(flow)
        while True:
            data = await fetch(ref)
            ref = flow.send(data)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
