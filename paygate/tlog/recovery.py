"""Receipts the ledger keeps but the log was never given: found and recorded, once.

A receipt is recorded in the log (``tlog_receipts``) by the process that signed it, and kept in
the ledger (``receipts``) by that request. Where the ledger keeps it first — a batch-settlement
voucher's whole-reply receipt goes in the one transaction of the channel's charge and SETTLED,
and is recorded only after that commits — a process that dies in between leaves a charge the
log's period totals never count; so does a log store that failed at the record (the error is
logged and the reply goes out). Recovery closes both: every pass reads the next ``batch``
receipts the ledger kept (in (created_at, payment id, kind) order, only those kept at least
``grace`` seconds ago: a live process may still be recording them), asks the log which of their
leaf hashes it has (one read), and records the others in one write under the append lock, which
re-checks them there: two replicas or workers recovering at once record each receipt once.

One process scans a ledger at a time (every worker and replica runs this loop; they take
turns): before each pass a process takes or renews the ledger's recovery turn (``tlog_recovery``,
one row in the same database, both stores) for ``lease`` (three ``interval``s); the others only
ask, once an ``interval``. The holder keeps its place there after every pass, so a process that
takes over — when the holder stopped (its turn ended at its close) or died or froze (its lease
ran out) — goes on from where that scan got to: nothing is skipped. A holder frozen past its
lease that wakes finishes its pass harmlessly (the record re-checks under the lock; each leaf is
recorded once) but cannot move its successor's place, and finds the turn gone.

With no place kept yet (the first scan of a ledger), a scan starts ``window`` seconds (at least
``grace`` + ``interval``) before the newest receipt the ledger kept. A pass that read a full
batch is followed by the next one at once (after a short pause), so a backlog is read ``batch``
receipts to a transaction, never in one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from paygate.tlog.store import LogStore, MissingReceipt, Position, RecoveryTurn

log = logging.getLogger("paygate.tlog")
CATCH_UP_PAUSE = 0.05  # seconds between two full batches: the store serves requests between
# Kept receipts hashed between two turns of the event loop (~40 us each): a batch of 1000 would
# otherwise hold this worker's requests for tens of milliseconds.
RUN = 50


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    batch: int = 500  # ledger receipts read per pass (and per transaction)
    grace: float = 120.0  # seconds a kept receipt is left to the process recording it
    window: float = 900.0  # seconds before the newest kept receipt a first pass starts
    interval: float = 30.0  # seconds between passes once caught up

    @property
    def lease(self) -> float:
        """How long a recovery turn lasts unless renewed: the holder renews it every pass (every
        ``interval`` at most), so two missed passes hand it over."""
        return 3 * self.interval

    @property
    def reach(self) -> float:
        """How far before the newest kept receipt a first pass starts: ``window``, and at least
        as far back as a process that died had scanned (``grace`` plus one ``interval``)."""
        return max(self.window, self.grace + self.interval)


class RecoveryEvents(Protocol):
    """What recovery reports as it works (metrics: paygate.server.metrics); each call must be
    cheap and never raise."""

    def recovery_pass(self, seconds: float, recorded: int) -> None:
        """A pass ended: how long it took, how many kept receipts it recorded in the log."""
        ...

    def recovery_failed(self) -> None:
        """A pass failed (it is retried from the same place)."""
        ...

    def recovery_checked(self, until: float, grace: float) -> None:
        """Every receipt kept before ``until`` (epoch seconds) has been checked against the log
        (receipts younger than ``grace`` are left to their process): the scan's lag is the
        time since ``until`` + ``grace``. Reported by the holder of the turn after each pass,
        and by every other process from the ledger's turn row (the ledger's scan, not its own)."""
        ...

    def recovery_turn(self, holding: bool) -> None:
        """Whether this process holds the ledger's recovery turn (asked every ``interval``)."""
        ...


class NoRecoveryEvents:
    """Reports nowhere."""

    def recovery_pass(self, seconds: float, recorded: int) -> None:
        return None

    def recovery_failed(self) -> None:
        return None

    def recovery_checked(self, until: float, grace: float) -> None:
        return None

    def recovery_turn(self, holding: bool) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Pass:
    read: int  # ledger receipts read
    recorded: int  # of them, recorded in the log now (the log did not have them)


class ReceiptRecovery:
    """One process's scan of the ledger's receipts into the log (see the module docstring)."""

    def __init__(
        self,
        store: LogStore,
        replica: str,
        facts: Callable[[str], MissingReceipt],
        config: RecoveryConfig,
        events: RecoveryEvents | None = None,
    ) -> None:
        self._store = store
        self.events: RecoveryEvents = events or NoRecoveryEvents()  # where it reports
        self._replica = replica
        self._facts = facts  # a token → its leaf hash, amount and time (ValueError: unreadable)
        self.config = config
        self.after: Position | None = None
        self.checked: float | None = None  # kept time before which this scan checked all
        self.holding = False  # this process holds the ledger's recovery turn
        self.behind = False  # said to be behind, not caught up since
        self._caught_up = Pass(0, 0)  # read and recorded since it fell behind

    async def pass_once(self) -> Pass:
        """Read the next batch and record what the log lacks; the place moves on only when
        that is done (a failure is retried from the same place)."""
        started = time.monotonic()
        try:
            done, checked = await self._scan()
        except Exception:
            self.events.recovery_failed()
            raise
        self.checked = checked
        self.events.recovery_pass(time.monotonic() - started, done.recorded)
        self.events.recovery_checked(checked, self.config.grace)
        return done

    async def take_turn(self) -> bool:
        """Take or renew the ledger's recovery turn; True: this process scans now. Taking it
        over, the scan goes on from the place its last holder kept."""
        turn: RecoveryTurn = await self._store.recovery_turn(self._replica, self.config.lease)
        if turn.mine and not self.holding and turn.place is not None:
            self.after = turn.place
            log.info("receipts recovery goes on from the receipts kept at %s", _utc(turn.place[0]))
        elif not turn.mine and self.holding:
            log.warning("receipts recovery: the turn went to %s", turn.holder)
        self.holding = turn.mine
        self.events.recovery_turn(turn.mine)
        if turn.checked is not None and not turn.mine:  # the ledger's scan, as its holder kept it
            self.events.recovery_checked(turn.checked, self.config.grace)
        return turn.mine

    async def keep_place(self) -> None:
        """Keep where this scan got to in the ledger (only while holding the turn)."""
        if self.checked is not None:
            await self._store.save_recovery(self._replica, self.after, self.checked)

    async def end_turn(self) -> None:
        """Hand the turn over now (a clean stop): the next process to ask takes it."""
        if self.holding:
            self.holding = False
            await self._store.end_recovery_turn(self._replica)

    async def _scan(self) -> tuple[Pass, float]:
        """One pass; with the kept time before which every receipt has now been checked."""
        start, kept, until = await self._store.kept_receipts(
            self.after,
            window=self.config.reach,
            grace=self.config.grace,
            limit=self.config.batch,
        )
        candidates: list[MissingReceipt] = []
        for n, receipt in enumerate(kept):
            if n and not n % RUN:
                await asyncio.sleep(0)
            try:
                candidates.append(self._facts(receipt.token))
            except ValueError:
                log.error("a kept receipt of payment %s is unreadable", receipt.payment_id)
        known = await self._store.known_leaves([c.leaf for c in candidates])
        missing = [c for c in candidates if c.leaf not in known]
        recorded = await self._store.record_missing(missing, self._replica) if missing else 0
        if recorded:
            log.warning("recorded %d kept receipts the log did not have", recorded)
        if self.after is None and start is not None:  # what is older is never looked at
            log.info("receipts recovery starts at the receipts kept from %s", _utc(start[0]))
        self.after = kept[-1].position if kept else start
        done = Pass(len(kept), recorded)
        self._tell(done)
        # A full batch: checked up to its last receipt's time; else all kept before ``until``.
        full = len(kept) >= self.config.batch
        return done, kept[-1].created_at if full else until

    def _tell(self, done: Pass) -> None:
        """Say when recovery is behind (a full batch whose last receipt was kept longer ago than
        ``grace`` and two ``interval``s: a busy ledger fills batches without being behind;
        said once, not per batch) and when it has caught up, with what it read and recorded."""
        full = done.read >= self.config.batch
        lag = time.time() - self.after[0] if self.after is not None else 0.0
        late = full and lag > self.config.grace + 2 * self.config.interval
        if late and not self.behind:
            log.warning("receipts recovery is behind: reading receipts kept %d s ago, %d a pass",
                        lag, self.config.batch)  # fmt: skip
            self.behind = True
        if self.behind:
            seen = self._caught_up
            self._caught_up = Pass(seen.read + done.read, seen.recorded + done.recorded)
            if not full:
                log.info("receipts recovery caught up: read %d kept receipts, recorded %d",
                         self._caught_up.read, self._caught_up.recorded)  # fmt: skip
                self._caught_up = Pass(0, 0)
                self.behind = False

    async def run(self) -> None:
        """Passes for as long as the log runs, while this process holds the ledger's turn: at
        once at start, then every ``interval`` (each time asking for the turn)."""
        while True:
            full = False
            try:
                if await self._ask():
                    full = (await self.pass_once()).read >= self.config.batch
                    await self.keep_place()
            except Exception as exc:  # keep recovering: one failed pass must not end it
                log.error("the receipts recovery pass failed: %s", type(exc).__name__)
            await asyncio.sleep(CATCH_UP_PAUSE if full else self.config.interval)

    async def _ask(self) -> bool:
        """:meth:`take_turn`; a failed ask is a failure too (a store down at the turn's write
        fails no pass, and would otherwise go uncounted), and no longer claims the turn: its
        lease may run out meanwhile, and on taking it again the scan goes on from the kept
        place."""
        try:
            return await self.take_turn()
        except Exception:
            self.holding = False
            self.events.recovery_turn(False)
            self.events.recovery_failed()
            raise


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
