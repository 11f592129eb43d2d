"""Local checks of a payment, before any network call (sans-IO).

A forged or mismatched payment must never reach the facilitator or the chain: it costs them
a call and us a round trip, and a facilitator outage must not turn it into a 503 instead of
the refusal it deserves. The reasons are x402's own codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from paygate.errors import PaygateError
from paygate.x402 import eip3009, smartwallet, typed_digest
from paygate.x402.models import AnyPaymentPayload, ExactEvmPayload, PaymentPayload
from paygate.x402.offers import EXACT, Offer

# The facilitator needs time to get the transfer mined before validBefore (x402.md).
MIN_REMAINING_SECONDS = 6


class PaymentRejected(PaygateError):
    """A payment that does not pay what was asked; ``reason`` is x402's code for why."""

    code = "payment_rejected"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def match_offer(payment: AnyPaymentPayload, offers: Sequence[Offer]) -> Offer:
    """The offer ``payment`` claims to pay, compared field by field."""
    if isinstance(payment, PaymentPayload):
        scheme, network = payment.accepted.scheme, payment.accepted.network
    else:
        scheme, network = payment.scheme, payment.network
    if scheme not in {o.scheme for o in offers} or (
        not isinstance(payment, PaymentPayload) and scheme != EXACT
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
        if offer.scheme == EXACT and accepted.amount != str(offer.amount):
            # `upto` compares its signed maximum in its own check (at least the offer's).
            raise PaymentRejected(
                "invalid_exact_evm_payload_authorization_value_mismatch",
                "the accepted amount is not the price of this request",
            )
        return offer
    raise PaymentRejected("invalid_payment_requirements", "the accepted asset is not offered")


def check_authorization(
    payment: AnyPaymentPayload,
    offer: Offer,
    *,
    now: int,
    skew: int,
    min_remaining: float = MIN_REMAINING_SECONDS,
) -> str:
    """Check the ``exact`` scheme's EIP-3009 authorization against ``offer``; the payer's
    address if it holds.

    ``min_remaining``: seconds the authorization must still be valid for, so that what it buys
    can be served and settled before it expires (never less than MIN_REMAINING_SECONDS).
    """
    if not isinstance(payment.payload, ExactEvmPayload):
        raise PaymentRejected("invalid_payload", "the payload is not an EIP-3009 authorization")
    auth = payment.payload.authorization
    if not same_address(auth.to, offer.pay_to):
        raise PaymentRejected(
            "invalid_exact_evm_payload_recipient_mismatch", "the authorization pays someone else"
        )
    if int(auth.value) != offer.amount:
        raise PaymentRejected(
            "invalid_exact_evm_payload_authorization_value_mismatch",
            "the authorized value is not the price of this request",
        )
    if int(auth.valid_after) > now + skew:
        raise PaymentRejected(
            "invalid_exact_evm_payload_authorization_valid_after",
            "the authorization is not valid yet",
        )
    if int(auth.valid_before) < now + max(min_remaining, MIN_REMAINING_SECONDS):
        raise PaymentRejected(
            "invalid_exact_evm_payload_authorization_valid_before",
            "the authorization expires too soon",
        )
    signer = eip3009.recover(
        auth, payment.payload.signature, chain_id=offer.network.chain_id, asset=offer.asset
    )
    payer = typed_digest.checksum(auth.from_)
    # A contract wallet's signature (ERC-1271/6492) is the settler's to judge (smartwallet).
    if signer != payer and not smartwallet.is_contract_signature(payment.payload.signature):
        raise PaymentRejected(
            "invalid_exact_evm_payload_signature", "the signature is not the payer's"
        )
    return payer


def same_address(a: str, b: str) -> bool:
    return a.lower() == b.lower()
