"""The leases this process holds on payments, and the fenced ledger moves made under them.

A payment this process works on is *held*: its id and the lease epoch it holds (see
``paygate.x402.ledger``). Every change goes through :meth:`HeldLeases.move`, which names that
epoch, so a process frozen past its lease cannot record or settle a second time; a hold ends
when the payment ends, is let go, or its lease turns out lost. Admission, settlement
(paygate.x402.settlements) and recovery (paygate.x402.recovery) make every ledger change of a
payment after its reservation through here: one place for a store to make them cheaper.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from paygate.x402.ledger import (
    TRANSITIONS,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    Meter,
    PaymentRecord,
    PaymentState,
    ReceiptUsage,
    SchemeWrite,
)
from paygate.x402.ledger_base import Ledger

log = logging.getLogger("paygate.x402")


def boot_clock(clocks: Any = time) -> Callable[[], float] | None:
    """The local side of a lease: a clock that never goes back and counts a stopped process's
    time and a suspended host's sleep too (Linux's boot time), so a process stopped or asleep
    past its lease finds it passed when it wakes; read in C (no Python frame: it runs on every
    hold). None where there is none: a monotonic clock that stops while the host sleeps (macOS's,
    Linux's own) would let a woken process count on a lease long gone, so then nothing is
    counted on locally (every confirmation asks the ledger)."""
    if not hasattr(clocks, "CLOCK_BOOTTIME"):
        return None
    return functools.partial(clocks.clock_gettime, clocks.CLOCK_BOOTTIME)


_LOCAL_CLOCK = boot_clock()
# The share of a lease this process counts on from its own clock, from when it last asked for
# it (taken, renewed, moved under): a local time read *before* the ledger call, so never later
# than the lease's start on the ledger's clock, however late the answer is read (a process
# stopped between the ledger's write and its answer wakes with a lease begun long before).
# The rest covers the clocks' drift.
_TRUSTED_SHARE = 0.8


class HeldLeases:
    """The payments this process works on right now: id → the lease epoch it holds."""

    def __init__(self, ledger: Ledger, *, clock: Callable[[], float] | None = _LOCAL_CLOCK) -> None:
        self._ledger = ledger
        # The local side of a lease (see :meth:`confirm`); None: none to count on (boot_clock).
        self._clock = clock if clock is not None else time.monotonic
        self._share = _TRUSTED_SHARE if clock is not None else 0.0
        self._held: dict[str, int] = {}
        # id -> the local clock's time until which the held lease is surely still ours (a process
        # stopped past it finds it passed when it wakes: see :meth:`confirm`).
        self._live_until: dict[str, float] = {}
        # id -> a SERVED stream's progress so far (what a disconnect now would be charged):
        # kept with each renewal, so a stall leaves at most one renewal's worth uncharged.
        self._progress: dict[str, Callable[[], Meter | None]] = {}

    @property
    def now(self) -> Callable[[], float]:
        """The local clock (read before asking the ledger for a lease: see :meth:`hold`); the
        clock itself, so a reader on every chunk of a stream pays no Python frame for it."""
        return self._clock

    def _counted_on(self, asked: float) -> float:
        """The local time until which a lease asked for at ``asked`` is surely ours."""
        return asked + self._ledger.lease_seconds * self._share

    def hold(self, record: PaymentRecord, *, asked: float | None = None) -> None:
        """Hold ``record``'s lease, counted on from ``asked`` (:meth:`now` read before the
        ledger call that took it; else now, for a hold no reply relies on)."""
        self._held[record.id] = record.lease
        # (inline: every paid request takes one)
        start = self._clock() if asked is None else asked
        self._live_until[record.id] = start + self._ledger.lease_seconds * self._share

    def live_until(self, record: PaymentRecord) -> float:
        """The local time until which the lease held on ``record`` is surely this process's
        (0: none held): before it, :meth:`confirm` makes no ledger call."""
        return self._live_until.get(record.id, 0.0)

    def holds(self, record: PaymentRecord) -> bool:
        return record.id in self._held

    def drop(self, payment_id: str) -> None:
        """Forget a hold without a word to the ledger (its lease is lost or runs out)."""
        self._held.pop(payment_id, None)
        self._live_until.pop(payment_id, None)
        self._progress.pop(payment_id, None)

    def report(self, record: PaymentRecord, progress: Callable[[], Meter | None]) -> None:
        """Keep ``record``'s progress (a SERVED stream's running meter) with every renewal of
        its lease, until its next move (its final meter) or the hold ends."""
        if record.id in self._held:
            self._progress[record.id] = progress

    def _meter(self, payment_id: str) -> Meter | None:
        progress = self._progress.get(payment_id)
        return None if progress is None else progress()

    async def move(self, record: PaymentRecord, to: PaymentState, **change: Any) -> PaymentRecord:
        """A fenced transition under the lease this process holds (``change``: the keywords of
        :meth:`Ledger.transition` but ``lease``); ends the hold when the payment ends, when the
        lease turns out lost, or with ``let_go`` (given up in the same transaction: nothing
        more happens to it here)."""
        asked = self._clock()
        self._progress.pop(record.id, None)  # the move records its own meter
        try:
            moved = await self._ledger.transition(record.id, to, lease=record.lease, **change)
        except LeaseLost:
            self.drop(record.id)
            log.warning("payment %s: lease lost to another replica; leaving it", record.id)
            raise
        # The payment id and its state only: never the payload, signature or payer's header.
        log.debug("payment %s: %s -> %s", moved.id, record.state, moved.state)
        if change.get("let_go") or not TRANSITIONS[moved.state]:
            self.drop(moved.id)
        elif moved.id in self._held:  # a fenced move into a live state renewed the lease
            self._live_until[moved.id] = self._counted_on(asked)
        return moved

    async def made(self, record: PaymentRecord, state: PaymentState) -> PaymentRecord | None:
        """After a move of ``record`` to ``state`` refused as the ledger unavailable: the record
        if the move was made nonetheless (its COMMIT went, its answer was lost: a connection
        cut), else None (not made, another replica's since, or the ledger unreadable too). A
        move keeps the lease epoch and a claim raises it, so the state with this process's
        epoch is this process's move."""
        try:
            found = await self._ledger.get(record.id)
        except LedgerError:
            return None
        if found is None or found.state is not state or found.lease != record.lease:
            return None
        if not TRANSITIONS[found.state]:
            self.drop(found.id)
        return found

    async def confirm(self, record: PaymentRecord) -> str | None:
        """None when the lease held on ``record`` is still this process's, else why not
        (``lease_lost``, ``ledger_unavailable``). Known from this process's clock while the
        lease it last took or renewed has time left (no ledger call: the usual case); past
        that (the process was stopped, or its renewals failed) a fenced renewal decides."""
        until = self._live_until.get(record.id)
        if until is not None and self._clock() < until:
            return None
        if record.id not in self._held:
            return LeaseLost.code  # dropped: found lost by a renewal or a fenced move
        try:
            await self.renew(record)
        except LeaseLost:
            self.drop(record.id)
            log.warning("payment %s: lease lost to another replica; leaving it", record.id)
            return LeaseLost.code
        except LedgerError as exc:
            log.warning("payment %s: cannot renew its lease: %s", record.id, exc.code)
            return LedgerUnavailable.code
        return None

    async def let_go(self, record: PaymentRecord) -> None:
        """Give the lease up: any replica's reconciler may take the payment."""
        self.drop(record.id)
        try:
            await self._ledger.let_go(record.id, record.lease)
        except LedgerError as exc:  # lost already, or unreachable: the lease runs out anyway
            log.warning("payment %s: cannot let its lease go: %s", record.id, exc.code)

    async def release(self, record: PaymentRecord, write: SchemeWrite | None = None) -> None:
        """RELEASED: the authorization may be retried (a failure before anything was earned);
        ``write``: the scheme's own hold given back in the same transaction."""
        try:
            await self.move(record, PaymentState.RELEASED, write=write)
        except LedgerError as exc:
            log.warning("payment %s: cannot release: %s", record.id, exc.code)

    async def served(
        self,
        record: PaymentRecord,
        *,
        let_go: bool = False,
        receipt: tuple[str, Mapping[str, Any] | None] | None = None,
    ) -> PaymentRecord:
        """Record that the reply went out, once; returns the record as the ledger now has it.

        A payment not yet SERVED moves (RESERVED →) VERIFIED → SERVED (which marks it served)
        in one transaction; with ``let_go`` (nothing settles here: verify-only) its lease goes
        in that transaction too, and so does the reply's signed ``receipt`` (its token and the
        usage it states), if given. A receipt that could not go with a move made (or with no move:
        SERVED already) is kept alone; one whose move to SERVED was not made is not kept at all:
        its reply is withheld.
        """
        token, usage = receipt if receipt is not None else (None, None)
        stated = None
        if token is not None:
            try:
                stated = receipt_usage(usage)
            except ValueError as exc:
                log.warning(
                    "payment %s: cannot keep its receipt: %s", record.id, type(exc).__name__
                )
                token = None
        moving = record.state in (PaymentState.RESERVED, PaymentState.VERIFIED)
        try:
            if moving:
                record = await self.move(
                    record,
                    PaymentState.SERVED,
                    let_go=let_go,
                    via=PaymentState.VERIFIED if record.state is PaymentState.RESERVED else None,
                    reply_receipt=token,
                    receipt_usage=stated,
                )
                token = None  # kept with the move
            elif not record.served:
                record = await self._ledger.mark_served(record.id)
        except LedgerError as exc:
            # Its COMMIT's answer lost? Then SERVED (owed) is recorded, its receipt with it.
            made = None
            if moving and not isinstance(exc, LeaseLost):
                made = await self.made(record, PaymentState.SERVED)
            if made is None:
                log.warning("payment %s: cannot mark served: %s", record.id, exc.code)
                if moving:
                    # Not SERVED: its reply is withheld (paygate.x402.settlements), so its
                    # receipt is not kept alone either, which the log's recovery would publish.
                    token = None
            else:
                record, token = made, None
                if let_go:
                    self.drop(record.id)
        if token is not None:
            await self.keep_receipt(record, token, usage)
        return record

    async def keep_receipt(
        self, record: PaymentRecord, token: str, usage: Mapping[str, Any] | None
    ) -> None:
        """Keep a paid reply's signed receipt in the ledger with the usage it states (every
        scheme). A failing ledger loses only this copy: the caller holds the receipt."""
        try:
            await self._ledger.add_receipt(
                record.id, "reply", token, usage=receipt_usage(usage), lease=record.lease
            )
        except (LedgerError, ValueError) as exc:
            log.warning("payment %s: cannot keep its receipt: %s", record.id, type(exc).__name__)

    async def claim_reply(self, record: PaymentRecord) -> PaymentRecord:
        """Claim the one reply a payment settled upfront buys (served, if no request marked it
        before): :class:`LeaseLost` when another request's reply took it (a replica frozen after
        settling wakes after the payer's retry was served elsewhere). Settled, it holds no lease
        to fence with: the served flag is the fence."""
        return await self._ledger.mark_served(record.id, first=True)

    async def renew(self, record: PaymentRecord) -> PaymentRecord:
        """Re-check (and extend) the lease held on ``record`` right before acting on it."""
        asked = self._clock()
        renewed = await self._ledger.renew(record.id, record.lease, meter=self._meter(record.id))
        if record.id in self._held:
            self._live_until[record.id] = self._counted_on(asked)
        return renewed

    async def renew_all(self) -> int:
        """Renew every held lease; a lease found lost is dropped (its next fenced change would
        fail anyway). Returns how many were renewed."""
        renewed = 0
        for payment_id, lease in list(self._held.items()):
            asked = self._clock()
            try:
                await self._ledger.renew(payment_id, lease, meter=self._meter(payment_id))
                renewed += 1
                if payment_id in self._held:
                    self._live_until[payment_id] = self._counted_on(asked)
            except LeaseLost:
                log.warning("payment %s: lease lost to another replica; leaving it", payment_id)
                self.drop(payment_id)
            except LedgerError as exc:
                log.warning("payment %s: cannot renew its lease: %s", payment_id, exc.code)
            except ValueError:  # a progress the ledger refused: renewed at the next pass
                log.warning("payment %s: cannot renew its lease: bad progress", payment_id)
        return renewed


def receipt_usage(usage: Mapping[str, Any] | None) -> ReceiptUsage | None:
    """The usage a receipt states, in the ledger's words (ValueError: not a usage)."""
    if usage is None:
        return None
    source = str(usage.get("source") or "reported")
    return ReceiptUsage(
        int(usage["prompt_tokens"]),
        int(usage["completion_tokens"]),
        "upstream" if source == "reported" else source,
    )
