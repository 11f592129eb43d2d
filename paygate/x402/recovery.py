"""Recovery after a crash, across replicas: release reservations nobody serves any more, claim
the settlements nobody holds (a lease ran out, or was let go) and finish them, keep this
process's leases alive.

The ledger's leases say who works on a payment: this process holds the lease of every payment
it is serving or settling (:meth:`Recovery.renew_leases`, called by the app's keeper, keeps them
alive) and lets go of a pending settlement so that any replica's reconciler may finish it. The
claim is exclusive, so one dead replica's work is finished once; every step re-checks the lease
first (fencing), as settling does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from paygate.x402 import codec
from paygate.x402.leases import HeldLeases
from paygate.x402.ledger import LedgerError, PaymentRecord, PaymentState, SchemeWrite
from paygate.x402.ledger_base import Ledger
from paygate.x402.results import PaymentAdmission
from paygate.x402.schemes import SCHEMES, Scheme
from paygate.x402.settlement import Settlement
from paygate.x402.settlements import Settlements

log = logging.getLogger("paygate.x402")


@dataclass(slots=True, kw_only=True, eq=False)
class Recovery:
    """Reconciliation, abandoned reservations and lease renewal for one process."""

    ledger: Ledger
    leases: HeldLeases
    settlement: Settlement
    settlements: Settlements
    schemes: Callable[[str], Scheme] = SCHEMES.__getitem__  # a record's scheme, by its name

    async def release_abandoned(self, *, own: bool = False) -> int:
        """Release reservations whose owner is gone (its lease ran out; with ``own``, also
        this replica name's, left by its previous run), so their callers can retry — each
        with what its scheme took for it (a channel's hold: the payer's next voucher is not
        refused busy until the hold runs out), in the same transaction."""
        released = await self.ledger.release_abandoned(own=own, writes=self._release_write)
        return len(released)

    def _release_write(self, record: PaymentRecord) -> SchemeWrite | None:
        """The scheme's ``release_write`` for a released record, from its stored payment.
        Called inside the ledger's transaction: it only builds the write (guarded by the
        scheme: a channel's hold goes only while it is still this voucher's) and never
        raises — a write that cannot be built leaves the hold to run out, as it would."""
        try:
            scheme = self.schemes(record.scheme)
            if type(scheme).release_write is Scheme.release_write:
                return None  # the scheme takes nothing with a reservation
            payment = codec.parse_payment(json.loads(record.payload), header="ledger")
            return scheme.release_write(payment, json.loads(record.requirements))
        except Exception as exc:  # inside the ledger's transaction: never raise
            log.warning("payment %s: hold left to run out: %s", record.id, type(exc).__name__)
            return None

    async def adopt_own(self) -> list[PaymentRecord]:
        """At start, before serving: claim the settlements this replica name left unfinished
        (its previous run died); :meth:`reconcile_once` finishes them."""
        if not self.settlement.settles_owed:
            return []
        return await self.ledger.claim_unfinished(min_age=0.0, own=True)

    async def reconcile_once(
        self, *, min_age: float, adopted: list[PaymentRecord] | None = None
    ) -> int:
        """One pass: release abandoned reservations, then claim and finish the settlements
        nobody holds (lease ran out, or let go ``min_age`` seconds ago), plus ``adopted``."""
        await self.release_abandoned()
        if not self.settlement.settles_owed:
            return 0
        claimed = [*(adopted or ()), *await self.ledger.claim_unfinished(min_age=min_age)]
        for record in claimed:
            self.leases.hold(record)
            try:
                await self._reconcile(record)
            finally:
                if self.leases.holds(record):  # still owed or in doubt: for a later pass
                    await self.leases.let_go(record)
        return len(claimed)

    async def renew_leases(self) -> int:
        """Renew the lease of every payment this process works on (see ``HeldLeases``)."""
        return await self.leases.renew_all()

    async def _reconcile(self, record: PaymentRecord) -> None:
        try:
            payment = codec.parse_payment(json.loads(record.payload), header="ledger")
        except (codec.PaymentHeaderError, ValueError):
            log.error("payment %s: stored payload unreadable", record.id)
            return
        admission = PaymentAdmission(
            price=Decimal(0),
            record=record,
            payment=payment,
            requirements=json.loads(record.requirements),
            scheme=self.schemes(record.scheme),
        )
        if record.state is PaymentState.SERVED:
            await self.settlements.settle_now(admission)
            return
        try:
            # Re-check the lease right before asking again (fencing, as in settle_now).
            record = admission.record = await self.leases.renew(record)
        except LedgerError as exc:
            log.warning("payment %s: not reconciled: %s", record.id, exc.code)
            self.leases.drop(record.id)
            return
        await self.settlements.reconcile_now(admission)
