"""What the seller accepts (one requirement per configured network) and the 402 challenge.

The challenge is dual-stack on one response: the v2 ``PAYMENT-REQUIRED`` header and the v1
JSON body, listing the same offers, so a v1-only and a v2 client can each pay the same 402.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from eth_utils import to_checksum_address

from paygate.x402.models import (
    PAYMENT_IDENTIFIER,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceInfo,
    payment_identifier_declaration,
)
from paygate.x402.networks import Asset, Network, to_atomic

SCHEME = "exact"
# Keep the header well under common 8 KB header limits (x402.md).
MAX_CHALLENGE_HEADER = 8 * 1024


@dataclass(frozen=True, slots=True)
class Acceptance:
    """One way to pay: a token on a network."""

    network: Network
    asset: Asset


@dataclass(frozen=True, slots=True)
class Offer:
    """One priced requirement, the unit that a payment must match exactly."""

    network: Network
    asset: Asset
    pay_to: str
    amount: int
    max_timeout_seconds: int

    def v2(self) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=SCHEME,
            network=self.network.caip2,
            amount=str(self.amount),
            asset=self.asset.address,
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra={"name": self.asset.name, "version": self.asset.version},
        )

    def v1(self, resource: ResourceInfo) -> PaymentRequirementsV1:
        return PaymentRequirementsV1(
            scheme=SCHEME,
            network=self.network.name,
            max_amount_required=str(self.amount),
            resource=resource.url,
            description=resource.description or "",
            mime_type=resource.mime_type or "",
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            asset=self.asset.address,
            extra={"name": self.asset.name, "version": self.asset.version},
        )


@dataclass(frozen=True, slots=True)
class PaymentTerms:
    """The seller's fixed terms: who is paid, in what, on which networks."""

    pay_to: str
    accepted: tuple[Acceptance, ...]
    max_timeout_seconds: int = 300
    description: str = "paygate inference"
    require_payment_identifier: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "pay_to", to_checksum_address(self.pay_to))
        if not self.accepted:
            raise ValueError("at least one network must be accepted")

    def offers(self, price: Decimal) -> tuple[Offer, ...]:
        return tuple(
            Offer(
                network=a.network,
                asset=a.asset,
                pay_to=self.pay_to,
                amount=to_atomic(price, a.asset.decimals),
                max_timeout_seconds=self.max_timeout_seconds,
            )
            for a in self.accepted
        )


@dataclass(frozen=True, slots=True)
class Challenge:
    """A 402's two faces: the v2 header model and the v1 body model."""

    v2: PaymentRequired
    v1: PaymentRequiredV1

    def body(self) -> dict[str, Any]:
        return self.v1.wire()


def challenge(
    offers: Sequence[Offer],
    resource: ResourceInfo,
    *,
    error: str,
    require_payment_identifier: bool = False,
) -> Challenge:
    """The 402 for ``offers``; ``error`` is the reason shown to the caller."""
    return Challenge(
        v2=PaymentRequired(
            error=error,
            resource=resource,
            accepts=[offer.v2() for offer in offers],
            extensions={
                PAYMENT_IDENTIFIER: payment_identifier_declaration(
                    required=require_payment_identifier
                )
            },
        ),
        v1=PaymentRequiredV1(error=error, accepts=[offer.v1(resource) for offer in offers]),
    )
