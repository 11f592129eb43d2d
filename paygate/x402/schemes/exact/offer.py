"""``exact``'s requirement: the price, in both x402 versions; it settles the price or nothing."""

from __future__ import annotations

from typing import Any

from paygate.x402.models import (
    AnyPaymentPayload,
    PaymentPayloadV1,
    ResourceInfo,
    SettleResponse,
)
from paygate.x402.offers import Offer
from paygate.x402.schemes.base import Authorized


class ExactOffer:
    v1 = True

    def accepts_amount(self, accepted: str, offer: Offer) -> bool:
        return accepted == str(offer.amount)

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        if isinstance(payment, PaymentPayloadV1):
            return offer.v1(resource).wire()
        return offer.v2_wire()

    def for_amount(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any], amount: int
    ) -> dict[str, Any] | SettleResponse:
        # EIP-3009 moves the signed value or nothing: ``amount`` is always the price.
        return requirements

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return offer.amount


ROLE = ExactOffer()
