"""The `batch-settlement` entry of a 402's ``accepts`` (the x402 specification's requirement).

``amount`` is the most one request may cost (its flat price, or a metered route's maximum:
the charge is then what the request used, up to it). ``extra`` carries the channel terms a
payer builds its channel from: ``receiverAuthorizer`` (who signs claims and refunds),
``withdrawDelay``, the deposit method (EIP-3009) and ``minDeposit`` (ten requests' worth, as the
SDK's server announces by default; enforced: each deposit costs the gateway a transaction).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from paygate.x402.models import AnyPaymentPayload, ResourceInfo, SettleResponse
from paygate.x402.networks import to_atomic, to_atomic_ceiling
from paygate.x402.offers import Offer, PaymentTerms
from paygate.x402.schemes.base import Authorized, with_amount
from paygate.x402.schemes.batch_settlement.channel import NAME

MIN_DEPOSIT_REQUESTS = 10
DEPOSIT_METHOD = "eip3009"  # how a deposit is authorized (Permit2 deposits are refused)


def offers(
    terms: PaymentTerms,
    *,
    price: Decimal,
    maximum: Decimal | None,
    receiver_authorizer: str,
    withdraw_delay: int,
) -> tuple[Offer, ...]:
    """One offer per accepted asset; none when the request costs nothing."""
    found: list[Offer] = []
    for a in terms.accepted:
        if maximum is not None and maximum > 0:
            amount = to_atomic_ceiling(maximum, a.asset.decimals)
        else:
            amount = to_atomic(price, a.asset.decimals)
        if amount <= 0:
            continue
        extra = {
            "assetTransferMethod": DEPOSIT_METHOD,
            "minDeposit": str(amount * MIN_DEPOSIT_REQUESTS),
            "receiverAuthorizer": receiver_authorizer,
            "withdrawDelay": str(withdraw_delay),
        }
        found.append(
            Offer(
                network=a.network,
                asset=a.asset,
                pay_to=terms.pay_to,
                amount=amount,
                max_timeout_seconds=terms.max_timeout_seconds,
                scheme=NAME,
                extra=tuple(sorted(extra.items())),
            )
        )
    return tuple(found)


class BatchSettlementOffer:
    """The requirement a channel payment is checked against: the offer as sent (its terms are
    in ``extra``); the amount the ledger counts is the most one request may cost."""

    v1 = False  # x402 v1 knows `exact` only

    def accepts_amount(self, accepted: str, offer: Offer) -> bool:
        return True  # the voucher's cumulative amount is checked against the channel instead

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        return offer.v2_wire()  # built once per offer; the caller's own copy

    def for_amount(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any], amount: int
    ) -> dict[str, Any] | SettleResponse:
        return with_amount(requirements, amount)

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return offer.amount


ROLE = BatchSettlementOffer()
