"""Settling admitted payments: SERVED → SETTLING → SETTLED | FAILED | still SETTLING (reconciled
later), exactly once per payment, each step a fenced ledger move (paygate.x402.leases).

*When* a payment settles is the :class:`paygate.x402.settlement.Settlement` strategy chosen at
start; this module holds the steps every strategy calls (:class:`SettlementSteps`). A settlement
runs as its own task, so that a caller who disconnects (which cancels the handler) cannot cut it
between its durable record and its side effect. An unknown outcome keeps the transaction hash
and lets the lease go: any replica's reconciler (paygate.x402.recovery) finishes it — never
re-signed, never re-charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from paygate.x402.hooks import PaymentEvents
from paygate.x402.leases import HeldLeases, receipt_usage
from paygate.x402.ledger import (
    RESERVATION_STATES,
    LeaseLost,
    LedgerError,
    LedgerUnavailable,
    Meter,
    PaymentRecord,
    PaymentState,
    SchemeWrite,
    review_error,
)
from paygate.x402.models import ResourceInfo, SettleResponse
from paygate.x402.offers import Offer
from paygate.x402.refusal import Refusal
from paygate.x402.refusals import Refusals
from paygate.x402.responses import moved, reason_text, wire_network, with_usage
from paygate.x402.results import PaymentAdmission, Receipt
from paygate.x402.settlement import Settlement, release_unearned
from paygate.x402.settler import (
    ReviewRequired,
    SettlementSubject,
    SettlementUnknown,
    Settler,
    SettlerUnavailable,
)

# Why a reply settled upfront is withheld: the one reply its payment bought went to another
# request (not ``lease_lost``, which says nothing was charged and invites the same payment again).
REPLY_SERVED = "payment_already_served"  # the payment-identifier retry's code (idempotency)
log = logging.getLogger("paygate.x402")

PENDING = "settlement_pending"


@dataclass(slots=True, kw_only=True, eq=False)
class Settlements:
    """This process's settlements over one settler; implements
    :class:`~paygate.x402.settlement.SettlementSteps` for the strategy."""

    leases: HeldLeases
    settler: Settler
    settlement: Settlement  # the strategy: when and how a payment settles
    refusals: Refusals
    events: PaymentEvents
    settle_on_disconnect: bool = True
    _background: set[asyncio.Task[Any]] = field(default_factory=set, init=False)

    # --- what a request's session calls ---

    async def settle(self, admission: PaymentAdmission) -> Receipt | None:
        """Settle an admitted request whose reply succeeded; its receipt (None if free)."""
        if not admission.paid:
            return None
        if admission.receipt is not None:
            if self.settlement.settles_upfront:
                await self.claim_reply(admission)  # else withheld (``unrecorded``)
            return admission.receipt
        return await self.settlement.reply_ready(self, admission)

    async def finish(
        self, admission: PaymentAdmission, *, succeeded: bool, caller_gone: bool
    ) -> None:
        """The request is over: release an unearned reservation, or settle what is owed.

        ``succeeded``: the upstream answered below 400 and the reply was produced.
        ``caller_gone``: the caller disconnected before the end of the reply.
        """
        if admission.finished or not admission.paid:
            return
        admission.finished = True
        earned = succeeded and (not caller_gone or self.settle_on_disconnect)
        await self.settlement.finished(self, admission, earned=earned)
        record = admission.record
        if admission.settle_task is None and record is not None and self.leases.holds(record):
            # Nothing more happens to it in this request (e.g. verify-only leaves it SERVED):
            # give the lease up so that a reconciler, anywhere, owns what is left.
            await self.leases.let_go(record)

    async def confirm_lease(self, admission: PaymentAdmission) -> str | None:
        """Before a reply starts to leave whose charge is recorded only after it (a stream
        settled after its reply): None while this process still holds the payment's lease,
        else why not (``lease_lost``, ``ledger_unavailable``; kept as ``unrecorded``): the
        reply must not go out, since its charge could not be recorded. No ledger call while the
        lease is known live from this process's clock (paygate.x402.leases)."""
        record = admission.record
        if record is None or admission.finished:
            return None
        if admission.receipt is not None:  # settled already: upfront's reply is claimed instead
            return await self.claim_reply(admission) if self.settlement.settles_upfront else None
        code = await self.leases.confirm(record)
        if code is not None:
            admission.unrecorded = code
        return code

    def lease_window(self, admission: PaymentAdmission) -> float | None:
        """The local time until which a stream's lease is known live without a ledger call
        (see :meth:`stream_progress`); None: nothing to check (not paid, settled upfront)."""
        record = admission.record
        if record is None or admission.receipt is not None:
            return None
        return self.leases.live_until(record)

    def records_progress(self, admission: PaymentAdmission) -> bool:
        """Whether a stream's first content starts the move that records its progress (see
        :meth:`stream_progress`): still reserved, and its progress charged when it stalls."""
        record = admission.record
        return (
            record is not None
            and not admission.finished
            and record.state in RESERVATION_STATES
            and self._charges_progress(admission)
        )

    async def stream_progress(
        self,
        admission: PaymentAdmission,
        progress: Callable[[], Meter | None],
        *,
        first: bool = False,
    ) -> str | None:
        """A stream's progress: None while the stream is still this process's to send, else
        why not (kept as ``unrecorded``: the stream is cut). Settled after its reply (every
        scheme whose charge is a settle call), the move that records the progress delivered
        (``progress``: what a disconnect now would be charged; None: the amount) as SERVED starts
        right after its first content went out (``first``: in the background, awaited before
        the next write past the lease window and before the end), so a replica frozen at any
        point after that commit leaves a payment owed that any replica's reconciler settles for
        that progress, never releases; and the end's SETTLING is the only write left (the same
        number of writes as without it). The move renews the lease, and every renewal after it
        keeps the progress then (a metered stream's: see ``HeldLeases.report``), so a stall
        leaves at most what went out since the last renewal uncharged. ``first`` and the ledger
        unreachable: not cut (the next write past the window tries again). Otherwise (its lease
        window passed, checked from the local clock before each write) a fenced renewal, or
        the same move when the first was not made."""
        record = admission.record
        if record is None or admission.finished:
            return None
        if record.state not in RESERVATION_STATES or not self._charges_progress(admission):
            return None if first else await self.confirm_lease(admission)
        via = PaymentState.VERIFIED if record.state is PaymentState.RESERVED else None
        meter = progress()
        try:
            admission.record = await self.leases.move(
                record, PaymentState.SERVED, via=via, meter=meter
            )
            if meter is not None:
                self.leases.report(admission.record, progress)
            return None
        except LeaseLost:
            code = LeaseLost.code
        except LedgerError:
            made = await self.leases.made(record, PaymentState.SERVED)
            if made is not None:
                admission.record = made
                if meter is not None:
                    self.leases.report(made, progress)
                return None
            if first:
                log.warning("payment %s: progress not recorded yet: ledger unavailable", record.id)
                return None
            code = LedgerUnavailable.code
        log.warning("payment %s: stream cut: %s", record.id, code)
        admission.unrecorded = code
        return code

    def _charges_progress(self, admission: PaymentAdmission) -> bool:
        """Whether a stream's delivered progress is recorded as owed: settled after its reply
        with a settle call (not verify-only, not upfront, not a channel's charge in this
        ledger), and a disconnect settles (else a cut stream is released, so is a stalled one)."""
        settlement = self.settlement
        return (
            self.settle_on_disconnect
            and settlement.settles_owed
            and not settlement.settles_upfront
            and not admission.scheme.settles_in_ledger
        )

    async def claim_reply(self, admission: PaymentAdmission) -> str | None:
        """Before the reply of a payment settled upfront leaves: None when it is this request's
        to send, else ``payment_already_served`` (kept as ``unrecorded``: withheld) — another
        request served the one reply the payment bought (the payer's retry of a settled
        authorization, served once while this replica was frozen). The served mark, written at
        the request's end before, is written here instead: no ledger call more. A ledger
        unreachable leaves the reply to go (it is paid); the request's end marks it served."""
        record = admission.record
        if record is None or record.served:
            return None
        try:
            admission.record = await self.leases.claim_reply(record)
        except LeaseLost:
            log.warning("payment %s: its reply was served by another request", record.id)
            admission.unrecorded = REPLY_SERVED
        except LedgerError as exc:
            log.warning("payment %s: cannot claim its reply: %s", record.id, exc.code)
        return admission.unrecorded

    async def keep_receipt(
        self, admission: PaymentAdmission, token: str, usage: Mapping[str, Any] | None
    ) -> None:
        """Keep a paid reply's signed receipt, and the usage it states, in the ledger: with
        SERVED, in one transaction, when that waited for it (:meth:`mark_served`)."""
        record = admission.record
        assert record is not None
        if admission.receipt_kept and not admission.served_deferred:
            return  # kept with the payment's settlement (:meth:`_settle_in_ledger`)
        if admission.served_deferred:
            admission.served_deferred = False
            admission.record = await self.leases.served(
                record, let_go=not self.settlement.settles_owed, receipt=(token, usage)
            )
            if not admission.record.served:
                self._not_served(admission, record)
            return
        await self.leases.keep_receipt(record, token, usage)

    # --- the steps a settlement strategy calls ---

    async def settle_upfront(
        self, admission: PaymentAdmission, offers: tuple[Offer, ...], resource: ResourceInfo
    ) -> PaymentAdmission | Refusal:
        receipt = await self.settle_now(admission)
        if receipt is None or receipt.withhold:
            reason = receipt.response.error_reason if receipt else "unexpected_settle_error"
            reason = reason or "unexpected_settle_error"
            return self.refusals.challenge(402, reason, reason_text(reason), offers, resource)
        if not receipt.response.success:
            # Outcome unknown: do not serve on a maybe. The same authorization, sent again
            # once reconciled, is served then (the processor's replay check).
            return self.refusals.unavailable(PENDING, "the settlement is pending; retry shortly")
        admission.receipt = receipt
        return admission

    def settle_in_background(self, admission: PaymentAdmission) -> asyncio.Task[Receipt | None]:
        """The admission's settlement task, started once (SERVED → SETTLING → outcome)."""
        if admission.settle_task is None:
            admission.settle_task = self._spawn(self._settle_after(admission))
        return admission.settle_task

    async def mark_served(self, admission: PaymentAdmission) -> None:
        """Record that the reply went out (a payment never settled here stays SERVED, and its
        lease goes in the same transaction: nothing more happens to it here).

        At the reply, when its signed receipt follows before the reply's end leaves
        (``receipt_follows``), SERVED waits for it and is recorded with it in one transaction
        (:meth:`keep_receipt`), still before the end leaves; at the request's end
        (``finished``) it is recorded whatever came of that."""
        assert admission.record is not None
        if admission.receipt_follows and not admission.finished:
            admission.served_deferred = True
            return
        admission.served_deferred = False
        before = admission.record
        admission.record = await self.leases.served(before, let_go=not self.settlement.settles_owed)
        if not admission.record.served:
            self._not_served(admission, before)

    def _not_served(self, admission: PaymentAdmission, before: PaymentRecord) -> None:
        """SERVED is not recorded: a payment not yet SERVED whose move was refused (its lease
        lost) or not made has nothing that records what its reply is owed for (verify-only's
        operator settles what is SERVED), so no reply may claim it (``unrecorded``)."""
        if before.state in (PaymentState.RESERVED, PaymentState.VERIFIED):
            lost = not self.leases.holds(before)
            admission.unrecorded = LeaseLost.code if lost else LedgerUnavailable.code

    async def release(self, record: PaymentRecord, write: SchemeWrite | None = None) -> None:
        await self.leases.release(record, write)

    async def _settle_after(self, admission: PaymentAdmission) -> Receipt | None:
        record = admission.record
        assert record is not None
        # SERVED (the reply is produced) and SETTLING (the last word before the settle call) in
        # one transaction, with VERIFIED before them when the strategy did not record it alone
        # (verified_when_served); a metered request's usage and charge go with them, so a
        # restart settles the same amount.
        served: tuple[PaymentState, ...] = (PaymentState.SERVED,)
        if record.state is PaymentState.RESERVED:
            served = (PaymentState.VERIFIED, *served)
        elif record.state is PaymentState.SERVED:  # its stream's progress was recorded
            served = ()
        return await self.settle_now(admission, via=served)

    async def settle_now(
        self, admission: PaymentAdmission, *, via: tuple[PaymentState, ...] = ()
    ) -> Receipt | None:
        """SETTLING (durable; through ``via`` first, in the same transaction) → settle →
        SETTLED | FAILED | still SETTLING (reconcile later)."""
        try:
            return await self._settle_now(admission, via)
        finally:
            record = admission.record
            if record is not None and self.leases.holds(record) and not record.terminal:
                await self.leases.let_go(record)  # not finished here: whoever reconciles takes it

    async def _settle_now(
        self, admission: PaymentAdmission, via: tuple[PaymentState, ...]
    ) -> Receipt | None:
        record = admission.record
        payment = admission.payment
        assert record is not None
        assert payment is not None
        if via and admission.scheme.settles_in_ledger:
            settled = await self._settle_in_ledger(admission, via)
            if settled is not None:
                return settled
        try:
            # Fenced, and the last word before the settle call: a process that lost its lease
            # (frozen past it, another replica claimed the payment) stops here. A payment
            # already SERVED whose settle is a charge in this ledger (a channel's) skips it: a
            # crash after the charge leaves the record SERVED, owed, and charging again adds
            # nothing; SETTLING then goes in the outcome's transaction (record_answer). With
            # ``via`` (SERVED not yet written) SETTLING rides in the same one transaction.
            if via or not (
                admission.scheme.settles_in_ledger and record.state is PaymentState.SERVED
            ):
                # (The meter: with SERVED, or over a stream's progress recorded SERVED.)
                record = await self.leases.move(
                    record, PaymentState.SETTLING, via=via, meter=admission.meter
                )
        except LedgerError as exc:
            lost = isinstance(exc, LeaseLost)
            # A COMMIT whose answer was lost recorded the charge: the ledger is asked. (Else the
            # reply, withheld as "nothing charged", would be charged by whoever settles it.)
            made = None if lost else await self.leases.made(record, PaymentState.SETTLING)
            if made is None:
                log.error("payment %s: cannot record SETTLING: %s", record.id, exc.code)
                # Nothing records the charge: no reply may claim it (it is withheld).
                admission.unrecorded = LeaseLost.code if lost else LedgerUnavailable.code
                if via and not lost:
                    # The reply's charge, not made (another replica released it when lost):
                    # released now with what the scheme took, so the retry the withheld reply
                    # invites is served, not refused in progress until the lease runs out.
                    await release_unearned(self.leases, admission, record)
                return None
            record = made
        admission.record = record
        started = time.monotonic()
        self.events.settling(1)
        try:
            subject = SettlementSubject(payment, admission.requirements)
            answer = await admission.scheme.settle(self.settler, subject, admission.owed)
        except ReviewRequired as exc:
            return await self.pending(
                admission, exc.transaction, review=str(exc), withhold=exc.withhold
            )
        except SettlementUnknown as exc:
            self.events.settlement("pending", time.monotonic() - started)
            return await self.pending(admission, exc.transaction)
        except SettlerUnavailable:
            self.events.settlement("unavailable", time.monotonic() - started)
            return await self.pending(admission, None)
        finally:
            self.events.settling(-1)
        outcome = "settled" if answer.success else "refused"
        self.events.settlement(outcome, time.monotonic() - started)
        receipt = await self.record_answer(admission, answer)
        admission.receipt = receipt
        return receipt

    async def _settle_in_ledger(
        self, admission: PaymentAdmission, via: tuple[PaymentState, ...]
    ) -> Receipt | None:
        """A settle that is only a write to this ledger (a channel's charge), made in the one
        transaction that records the payment SERVED, SETTLING and SETTLED: nothing moves outside
        the ledger, so there is nothing between the charge and its record to lose, and SETTLED
        is written only with the charge it records. None when the scheme cannot make it so or
        the write was not made (nothing recorded): the usual steps follow."""
        record = admission.record
        assert record is not None
        assert admission.payment is not None
        subject = SettlementSubject(admission.payment, admission.requirements)
        settlement = admission.scheme.ledger_settlement(subject, admission.owed)
        if settlement is None:
            return None
        # The reply's receipt, when signed already, goes in the same transaction (kept only
        # if the charge is made: a reply withheld after a refused charge leaves no receipt).
        token, stated = None, None
        if admission.reply_receipt is not None:
            token, usage = admission.reply_receipt
            try:
                stated = receipt_usage(usage)
            except ValueError:
                token = None  # not a usage the ledger keeps: kept alone, as it reports then
        started = time.monotonic()
        try:
            admission.record = await self.leases.move(
                record,
                PaymentState.SETTLED,
                via=(*via, PaymentState.SETTLING),
                meter=admission.meter,
                settled_amount=settlement.amount,
                write=settlement.write,
                reply_receipt=token,
                receipt_usage=stated,
            )
        except LedgerError as exc:  # not made (rolled back), or not known: the usual steps decide
            made = None
            if not isinstance(exc, LeaseLost):  # its answer lost? the ledger says what it holds
                made = await self.leases.made(record, PaymentState.SETTLED)
            if made is None:
                return None
            admission.record = made
        admission.receipt_kept = token is not None
        answer = settlement.answer()
        self.events.settlement("settled", time.monotonic() - started)
        self.events.earned(record.network, record.asset, settlement.amount)
        # A charge to the channel, not money moved (that is the claim's, logged at INFO once
        # per transaction); at INFO, a line per voucher request (~1.3 % of its CPU, profiled).
        log.debug("payment %s charged to its channel", record.id)
        admission.receipt = Receipt(record.x402_version, with_usage(answer, admission.record))
        if token is not None and admission.publish_receipt is not None:
            # In this (shielded) task, not the request's: a caller gone now leaves no kept
            # receipt unlogged; the reply cannot be withheld any more.
            await admission.publish_receipt(token)
        return admission.receipt

    async def reconcile_now(self, admission: PaymentAdmission) -> None:
        """A SETTLING payment whose answer was lost (recovery's, under its lease): the settler
        asked for its outcome, never a second payment → SETTLED | FAILED | for review | still
        SETTLING."""
        record, payment = admission.record, admission.payment
        assert record is not None
        assert payment is not None
        try:
            subject = SettlementSubject(payment, admission.requirements, record.transaction)
            answer = await admission.scheme.reconcile(self.settler, subject, record.owed)
        except ReviewRequired as exc:
            if not record.needs_review:
                await self.pending(admission, exc.transaction, review=str(exc))
            return
        except (SettlementUnknown, SettlerUnavailable) as exc:
            log.warning("payment %s still pending: %s", record.id, exc.code)
            return
        await self.record_answer(admission, answer)

    # --- outcomes ---

    async def record_answer(self, admission: PaymentAdmission, answer: SettleResponse) -> Receipt:
        """The settler's answer, recorded: SETTLED (what moved) or FAILED; the receipt."""
        record = admission.record
        assert record is not None
        state = PaymentState.SETTLED if answer.success else PaymentState.FAILED
        if answer.success and answer.amount is not None and answer.amount != str(admission.owed):
            # Money moved, but not what we asked: record what moved and say so.
            log.error(
                "payment %s settled %s, not the %s asked", record.id, answer.amount, admission.owed
            )
        try:
            admission.record = await self.leases.move(
                record,
                state,
                transaction=answer.transaction or None,
                error=None if answer.success else answer.refusal_reason,
                settled_amount=moved(answer, admission.owed) if answer.success else None,
                via=PaymentState.SETTLING if record.state is PaymentState.SERVED else None,
            )
        except LedgerError as exc:
            log.error("payment %s: cannot record %s: %s", record.id, state, exc.code)
        if answer.success:
            self.events.earned(record.network, record.asset, moved(answer, admission.owed))
            if admission.scheme.settles_in_ledger:  # a channel's charge: see _settle_in_ledger
                log.debug("payment %s charged to its channel", record.id)
            else:
                log.info("payment %s settled", record.id)
        else:
            log.warning("payment %s settlement refused: %s", record.id, answer.error_reason)
        return Receipt(record.x402_version, with_usage(answer, record), withhold=not answer.success)

    async def pending(
        self,
        admission: PaymentAdmission,
        transaction: str | None,
        *,
        review: str | None = None,
        withhold: bool = False,
    ) -> Receipt:
        """Still owed, outcome unknown: SETTLING again, the hash kept; ``review`` flags it for
        an operator (an outcome nobody here can prove), never as paid."""
        record = admission.record
        assert record is not None
        with contextlib.suppress(LedgerError):
            # SETTLING → SETTLING keeps the record owed and stores the hash if we have one;
            # then the lease goes: any replica's reconciler finishes it.
            admission.record = await self.leases.move(
                record,
                PaymentState.SETTLING,
                transaction=transaction,
                error=review_error(review) if review else PENDING,
            )
            await self.leases.let_go(admission.record)
        if review:
            log.warning("payment %s needs review: %s", record.id, review)
        else:
            log.warning("payment %s settlement pending; will reconcile", record.id)
        return Receipt(
            record.x402_version,
            SettleResponse(
                success=False,
                error_reason=PENDING,
                payer=record.payer,
                transaction=transaction or "",
                network=wire_network(record),
            ),
            withhold=withhold,
        )

    # --- background tasks ---

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for settlements still running; what is left is reconciled at start."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
