"""When a payment settles: one strategy per policy, chosen once at start (never a string at
request time).

- :class:`SettleAfterReply` (default): verify, serve, then settle; a reply whose settlement is
  refused for good is withheld, a stream's receipt goes in-band.
- :class:`SettleUpfront`: settle right after verify, before anything is forwarded; a pending
  outcome is a 503 and the same authorization is served once it is reconciled.
- :class:`VerifyOnly`: verify and serve, never settle (the operator settles out of band).

Each gets the settlement steps (:class:`paygate.x402.settlements.Settlements`: settle_now,
mark_served, release ...), which own the fenced ledger moves and the settler.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from paygate.x402.ledger import PaymentRecord, PaymentState, SchemeWrite
from paygate.x402.models import ResourceInfo
from paygate.x402.offers import Offer
from paygate.x402.refusal import Refusal
from paygate.x402.results import PaymentAdmission, Receipt


class SettlementSteps(Protocol):
    """The steps a strategy calls (paygate.x402.settlements.Settlements implements them)."""

    async def settle_upfront(
        self, admission: PaymentAdmission, offers: tuple[Offer, ...], resource: ResourceInfo
    ) -> PaymentAdmission | Refusal: ...

    def settle_in_background(self, admission: PaymentAdmission) -> asyncio.Task[Receipt | None]: ...

    async def mark_served(self, admission: PaymentAdmission) -> None: ...

    async def release(self, record: PaymentRecord, write: SchemeWrite | None = None) -> None: ...


class Settlement:
    """The moments where settlement policies differ; a policy overrides only where it does.
    By default a verified payment is admitted as it is (settled first with
    ``settles_upfront``), a replayed authorization is refused as used, and the reconciler
    settles what was served and not settled (after a crash, say)."""

    #: The reconciler settles what was served and not settled.
    settles_owed: bool = True
    #: VERIFIED is recorded with SERVED, in one ledger transaction, not on its own: nothing
    #: between the two needs it durable (a crash there releases either state alike). Not where
    #: settlement starts from VERIFIED before serving (upfront).
    verified_when_served: bool = False
    #: A verified payment is settled before anything is forwarded (the settle outcome admits
    #: it or refuses it), not admitted as it is.
    settles_upfront: bool = False

    async def verified(
        self,
        processor: SettlementSteps,
        admission: PaymentAdmission,
        offers: tuple[Offer, ...],
        resource: ResourceInfo,
    ) -> PaymentAdmission | Refusal:
        """The payment is verified (and recorded VERIFIED): admit it, or refuse."""
        if self.settles_upfront:
            return await processor.settle_upfront(admission, offers, resource)
        return admission

    async def reply_ready(
        self, processor: SettlementSteps, admission: PaymentAdmission
    ) -> Receipt | None:
        """The reply is good and its end not sent yet: the receipt to send with it, if any."""
        raise NotImplementedError

    async def finished(
        self, processor: SettlementSteps, admission: PaymentAdmission, *, earned: bool
    ) -> None:
        """The request is over (once): settle what is owed, release what was not earned."""
        raise NotImplementedError

    def serves_again(self, record: PaymentRecord) -> bool:
        """A replayed authorization in ``record``'s state is served (once more) instead of
        refused as used."""
        return False


class Releases(Protocol):
    async def release(self, record: PaymentRecord, write: SchemeWrite | None = None) -> None: ...


async def release_unearned(
    releases: Releases, admission: PaymentAdmission, record: PaymentRecord | None = None
) -> None:
    """RELEASED (``record``, else the admission's), with what the scheme took for the request
    (a channel's hold) given back in the same transaction: the payer's next payment need not
    wait for it to run out."""
    record = record if record is not None else admission.record
    assert record is not None
    assert admission.payment is not None
    admission.released = True
    write = admission.scheme.release_write(admission.payment, admission.requirements)
    await releases.release(record, write)


class SettleAfterReply(Settlement):
    """Settle after the reply is produced: nothing is charged for a failed request."""

    verified_when_served = True  # SERVED (with VERIFIED before it) opens the settlement

    async def reply_ready(
        self, processor: SettlementSteps, admission: PaymentAdmission
    ) -> Receipt | None:
        return await asyncio.shield(processor.settle_in_background(admission))

    async def finished(
        self, processor: SettlementSteps, admission: PaymentAdmission, *, earned: bool
    ) -> None:
        if admission.receipt is not None or admission.settle_task is not None:
            return  # settled (or settling) with the reply already
        if earned:
            processor.settle_in_background(admission)
        else:
            await release_unearned(processor, admission)


class SettleUpfront(Settlement):
    """Settle before forwarding: the operator never serves on credit."""

    settles_upfront = True

    async def reply_ready(
        self, processor: SettlementSteps, admission: PaymentAdmission
    ) -> Receipt | None:
        return admission.receipt

    async def finished(
        self, processor: SettlementSteps, admission: PaymentAdmission, *, earned: bool
    ) -> None:
        # Paid already, whatever happened: record that the authorization bought its reply.
        await processor.mark_served(admission)

    def serves_again(self, record: PaymentRecord) -> bool:
        # Settled, but its answer came too late for its own request: the caller paid, so the
        # same authorization sent again is served (once: finished marks it served).
        return record.state is PaymentState.SETTLED and not record.served


class VerifyOnly(Settlement):
    """Verify and serve; settlement is the operator's business (e.g. batched off-line)."""

    # What was served stays SERVED: paygate never settles it, not even after a restart.
    settles_owed = False
    verified_when_served = True

    async def reply_ready(
        self, processor: SettlementSteps, admission: PaymentAdmission
    ) -> Receipt | None:
        await processor.mark_served(admission)
        return None

    async def finished(
        self, processor: SettlementSteps, admission: PaymentAdmission, *, earned: bool
    ) -> None:
        if earned:
            await processor.mark_served(admission)
        else:
            await release_unearned(processor, admission)
