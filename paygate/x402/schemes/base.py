"""The payment scheme interface: one protocol, one module per scheme (``exact``, ``upto``).

A scheme says what a payment of its kind looks like and what it means: the requirement offered
for a price, the local checks of a payment against that offer (sans-IO: a forged payment never
costs a network call), the replay key, and how the settler is asked to verify, settle (with an
amount) and reconcile it. The client side's signing lives in the same module, so the two ends
of a scheme are read together. Nothing here decides *when* to settle (``x402.settlement``) or
*who* settles (``x402.settler``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from paygate.x402.models import (
    AnyPaymentPayload,
    ResourceInfo,
    SettleResponse,
    VerifyResponse,
)
from paygate.x402.offers import Offer, PaymentTerms

if TYPE_CHECKING:
    from paygate.x402.results import Refusal
    from paygate.x402.settler import Settler


@dataclass(frozen=True, slots=True)
class Authorized:
    """What a payment that passed its scheme's local checks authorizes."""

    payer: str  # checksummed
    nonce: str  # the replay key's nonce, 0x + 64 lowercase hex
    maximum: int  # atomic units the payer signed for (exact: the price; upto: the cap)
    valid_before: int  # unix seconds: the payment cannot settle after this


class Scheme(Protocol):
    """One x402 payment scheme on EVM."""

    name: str
    #: True when the settled amount is decided after the reply (metered), not at admission.
    metered: bool
    #: The refusal code of an authorization of this scheme that was already used here.
    replay_code: str
    #: The payload model of this scheme's payments: how the registry tells a payment's scheme.
    payload_type: type[Any]

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        """The authorization's expiry (unix seconds): it cannot settle after it."""
        ...

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        """What the payer authorized, as the ledger and the budgets count it (exact: the
        price; upto: the signed maximum)."""
        ...

    def check(
        self,
        payment: AnyPaymentPayload,
        offer: Offer,
        *,
        now: int,
        skew: int,
        min_remaining: float,
    ) -> Authorized:
        """Local checks of ``payment`` against the matched ``offer``; raises PaymentRejected."""
        ...

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        """The requirement (wire dict, in the payment's version) the settler verifies against."""
        ...

    async def verify(
        self, settler: Settler, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse: ...

    async def settle(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
    ) -> SettleResponse:
        """Settle ``amount`` atomic units (exact: always the price)."""
        ...

    async def reconcile(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
        transaction: str | None,
    ) -> SettleResponse:
        """The outcome of an earlier settlement of ``amount`` whose answer was lost."""
        ...


@runtime_checkable
class ChannelScheme(Protocol):
    """The roles of a scheme whose payments live in a channel (``batch-settlement``), on top of
    :class:`Scheme`: bound to one processor's ledger and chain, it makes its own offers (its
    terms name the gateway's receiver authorizer) and answers payment operations that are not
    paid requests (a cooperative refund) without serving the route."""

    def offers(
        self, terms: PaymentTerms, *, price: Decimal, maximum: Decimal | None
    ) -> tuple[Offer, ...]: ...

    async def operation(self, payment: AnyPaymentPayload, offer: Offer) -> SettleResponse | None:
        """The operation's answer (the PAYMENT-RESPONSE), None for a paid request; raises
        PaymentRejected when the operation is refused."""
        ...

    async def corrective(self, refusal: Refusal, payment: AnyPaymentPayload) -> Refusal:
        """``refusal`` of ``payment``, with what the payer needs to resynchronise with the
        channel (the corrective 402), or as it is."""
        ...


def with_amount(requirements: dict[str, Any], amount: int) -> dict[str, Any]:
    """``requirements`` asking for ``amount`` (the field is ``maxAmountRequired`` in v1)."""
    key = "amount" if "amount" in requirements else "maxAmountRequired"
    return {**requirements, key: str(amount)}
