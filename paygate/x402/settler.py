"""The settler interface: who verifies and settles a payment (a facilitator, or the chain).

Both implementations answer with x402's own ``VerifyResponse``/``SettleResponse`` and raise
only the two exceptions below, so the gate's policy does not depend on who settles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from paygate.errors import PaygateError
from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse


@dataclass(frozen=True, slots=True)
class SettlementSubject:
    """What a settlement is about: the payment, the requirement (wire dict) it settles
    against, and the transaction already sent for it, when one is known."""

    payment: AnyPaymentPayload
    requirements: dict[str, Any]
    transaction: str | None = None


# A settle answer that means "broadcast, not yet confirmed": keep the hash, reconcile later.
SETTLEMENT_PENDING = "settlement_pending"


class SettlerUnavailable(PaygateError):
    """The facilitator or chain could not be asked; nothing was done (safe to retry later)."""

    message = "the facilitator or chain could not be asked"

    code = "settler_unavailable"


class SettlementUnknown(PaygateError):
    """A settlement was (maybe) sent and its outcome is not known yet: reconcile, never re-sign."""

    message = "a settlement was (maybe) sent and its outcome is not known yet"

    code = "settlement_unknown"

    def __init__(self, message: str, *, transaction: str | None = None) -> None:
        super().__init__(message)
        self.transaction = transaction


class ReviewRequired(SettlementUnknown):
    """An unknown outcome nobody here can prove (no chain to read, or the nonce's event is out
    of reach): the payment stays owed, never SETTLED, and is flagged for an operator."""

    message = "the settlement's outcome cannot be proven here: an operator must review it"

    code = "review_required"

    def __init__(
        self, message: str, *, transaction: str | None = None, withhold: bool = False
    ) -> None:
        super().__init__(message, transaction=transaction)
        # True when the doubt is the payer's doing (the nonce was used before our settlement):
        # a reply not yet delivered is withheld rather than given away on a maybe.
        self.withhold = withhold


class Settler(Protocol):
    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        """Is ``payment`` good for ``requirements`` (wire dict of the matched requirement)?"""
        ...

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """Execute the transfer; a definitive answer, or SettlementUnknown/SettlerUnavailable."""
        ...

    async def reconcile(self, subject: SettlementSubject) -> SettleResponse:
        """The outcome of an earlier settlement (``subject.transaction``, when one was sent)
        whose answer was lost or pending.

        Must never execute a second, different payment: re-sending the same authorization is
        safe because EIP-3009 nonces execute once.
        """
        ...

    async def close(self) -> None: ...
