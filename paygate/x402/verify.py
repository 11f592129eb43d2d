"""Which offer a payment claims to pay, before any network call (sans-IO).

A forged or mismatched payment must never reach the facilitator or the chain: it costs them
a call and us a round trip, and a facilitator outage must not turn it into a 503 instead of
the refusal it deserves. The reasons are x402's own codes; each scheme's own checks are its
``verify`` role (``paygate.x402.schemes.<scheme>.verify``).
"""

from __future__ import annotations

from collections.abc import Sequence

from paygate.x402.models import AnyPaymentPayload, PaymentPayload
from paygate.x402.offers import Offer
from paygate.x402.schemes import by_name
from paygate.x402.schemes.base import PaymentRejected, same_address


def match_offer(payment: AnyPaymentPayload, offers: Sequence[Offer]) -> Offer:
    """The offer ``payment`` claims to pay, compared field by field."""
    if isinstance(payment, PaymentPayload):
        scheme, network = payment.accepted.scheme, payment.accepted.network
    else:
        scheme, network = payment.scheme, payment.network
    known = by_name(scheme)
    if (
        scheme not in {o.scheme for o in offers}
        or known is None
        or (not isinstance(payment, PaymentPayload) and not known.offer.v1)
    ):
        raise PaymentRejected("unsupported_scheme", f"scheme {scheme!r} is not offered")
    candidates = [
        o for o in offers if o.scheme == scheme and network in (o.network.caip2, o.network.name)
    ]
    if not candidates:
        raise PaymentRejected("invalid_network", f"network {network!r} is not offered")
    if not isinstance(payment, PaymentPayload):
        return candidates[0]
    accepted = payment.accepted
    for offer in candidates:
        if not same_address(accepted.asset, offer.asset.address):
            continue
        if not same_address(accepted.pay_to, offer.pay_to):
            raise PaymentRejected(
                "invalid_exact_evm_payload_recipient_mismatch", "payTo is not this seller"
            )
        if not known.offer.accepts_amount(accepted.amount, offer):
            raise PaymentRejected(
                "invalid_exact_evm_payload_authorization_value_mismatch",
                "the accepted amount is not the price of this request",
            )
        return offer
    raise PaymentRejected("invalid_payment_requirements", "the accepted asset is not offered")
