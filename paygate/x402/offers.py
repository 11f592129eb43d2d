"""What the seller accepts (one requirement per configured network) and the 402 challenge.

The challenge is dual-stack on one response: the v2 ``PAYMENT-REQUIRED`` header and the v1
JSON body, listing the same offers, so a v1-only and a v2 client can each pay the same 402.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from paygate.x402.networks import Asset, Network, to_atomic, to_atomic_ceiling

EXACT = "exact"  # the default scheme (EIP-3009; paygate.x402.schemes.exact)
UPTO = "upto"
# Keep the header well under common 8 KB header limits (x402.md).
MAX_CHALLENGE_HEADER = 8 * 1024


@dataclass(frozen=True, slots=True)
class Acceptance:
    """One way to pay: a token on a network."""

    network: Network
    asset: Asset


@dataclass(frozen=True, slots=True)
class Offer:
    """One priced requirement, the unit that a payment must match.

    ``amount`` is the price (``exact``) or the most this request may cost (``upto``);
    ``extra`` holds the scheme's own requirement fields (``upto``: the asset-transfer method
    and the facilitator address the payer's witness must name).
    """

    network: Network
    asset: Asset
    pay_to: str
    amount: int
    max_timeout_seconds: int
    scheme: str = EXACT
    extra: tuple[tuple[str, str], ...] = ()

    def v2(self) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=self.scheme,
            network=self.network.caip2,
            amount=str(self.amount),
            asset=self.asset.address,
            pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra={"name": self.asset.name, "version": self.asset.version, **dict(self.extra)},
        )

    def v2_wire(self) -> dict[str, Any]:
        """``v2().wire()``, built once per offer (a bounded cache: the same few offers come on
        every request); a copy, which the caller may change."""
        made = _v2_wire(self)
        return {**made, "extra": dict(made["extra"])}

    def v1(self, resource: ResourceInfo) -> PaymentRequirementsV1:
        return PaymentRequirementsV1(
            scheme=self.scheme,
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


@functools.lru_cache(maxsize=256)
def _v2_wire(offer: Offer) -> dict[str, Any]:
    # Keyed by the whole offer (frozen: network, asset, payee, amount, timeout, scheme, extra).
    return offer.v2().wire()


@dataclass(frozen=True, slots=True)
class PaymentTerms:
    """The seller's fixed terms: who is paid, in what, on which networks."""

    pay_to: str
    accepted: tuple[Acceptance, ...]
    max_timeout_seconds: int = 300
    description: str = "paygate inference"
    require_payment_identifier: bool = False
    # `upto` requirement fields per CAIP-2 network (facilitatorAddress ...), read at start.
    upto_extra: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pay_to", to_checksum_address(self.pay_to))
        if not self.accepted:
            raise ValueError("at least one network must be accepted")

    def decimals(self, network: str) -> int:
        """The decimals of the asset accepted on ``network`` (CAIP-2)."""
        for acceptance in self.accepted:
            if acceptance.network.caip2 == network:
                return acceptance.asset.decimals
        raise ValueError(f"network {network!r} is not accepted")

    def offers(self, price: Decimal) -> tuple[Offer, ...]:
        return tuple(self._offer(a, to_atomic(price, a.asset.decimals)) for a in self.accepted)

    def upto_offers(
        self, maximum: Decimal, extra: tuple[tuple[str, str], ...] = ()
    ) -> tuple[Offer, ...]:
        """`upto` offers authorizing at most ``maximum`` (rounded up to whole atomic units);
        ``extra``: more requirement fields (the token prices)."""
        return tuple(
            self._offer(
                a,
                to_atomic_ceiling(maximum, a.asset.decimals),
                scheme=UPTO,
                extra=tuple(sorted(self.upto_extra.get(a.network.caip2, {}).items())) + extra,
            )
            for a in self.accepted
        )

    def _offer(self, accepted: Acceptance, amount: int, **scheme_fields: Any) -> Offer:
        """An offer of ``amount`` in ``accepted``'s asset to our wallet."""
        return Offer(
            network=accepted.network,
            asset=accepted.asset,
            pay_to=self.pay_to,
            amount=amount,
            max_timeout_seconds=self.max_timeout_seconds,
            **scheme_fields,
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
    extensions: Mapping[str, Any] | None = None,
) -> Challenge:
    """The 402 for ``offers``; ``error`` is the reason shown to the caller; ``extensions``
    are declared beside payment-identifier (sign-in-with-x for the free quota)."""
    return Challenge(
        v2=PaymentRequired(
            error=error,
            resource=resource,
            accepts=[offer.v2() for offer in offers],
            extensions={
                PAYMENT_IDENTIFIER: payment_identifier_declaration(
                    required=require_payment_identifier
                ),
                **(extensions or {}),
            },
        ),
        # x402 v1 knows `exact` only: other schemes are offered in the v2 header alone.
        v1=PaymentRequiredV1(
            error=error, accepts=[o.v1(resource) for o in offers if o.scheme == EXACT]
        ),
    )
