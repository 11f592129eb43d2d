"""``exact``'s local checks (sans-IO): an EIP-3009 ``TransferWithAuthorization`` under EIP-712.

The signature binds every field of the authorization and the token's domain (name, version,
chain id, token address), so a payment for one token, chain or amount cannot be replayed as
another. The reasons are x402's own codes (the official SDK facilitator's).
"""

from __future__ import annotations

from typing import Any

from eth_utils import to_checksum_address

from paygate.x402 import evm, smartwallet, typed_digest
from paygate.x402.models import AnyPaymentPayload
from paygate.x402.networks import Asset
from paygate.x402.offers import Offer
from paygate.x402.schemes.base import (
    MIN_REMAINING_SECONDS,
    Authorized,
    CheckTime,
    PaymentRejected,
    payload_as,
    same_address,
)
from paygate.x402.schemes.exact.payload import Authorization, ExactEvmPayload

# The SDK facilitator's code for a used EIP-3009 nonce: also the replay refusal here.
NONCE_USED = "invalid_exact_evm_nonce_already_used"

TYPES = {"EIP712Domain": evm.EIP712_DOMAIN, "TransferWithAuthorization": evm.EIP3009_AUTHORIZATION}


def typed_data(auth: Authorization, *, chain_id: int, asset: Asset) -> dict[str, Any]:
    """The EIP-712 message a payer signs for ``auth`` on ``asset`` at ``chain_id``."""
    return {
        "types": TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": asset.name,
            "version": asset.version,
            "chainId": chain_id,
            "verifyingContract": asset.address,
        },
        "message": {
            "from": to_checksum_address(auth.from_),
            "to": to_checksum_address(auth.to),
            "value": int(auth.value),
            "validAfter": int(auth.valid_after),
            "validBefore": int(auth.valid_before),
            "nonce": bytes.fromhex(auth.nonce[2:]),
        },
    }


def digest(auth: Authorization, *, chain_id: int, asset: Asset) -> bytes:
    """The EIP-712 digest of ``auth`` (what a payer signs), written out (typed_digest)."""
    return typed_digest.digest(
        typed_digest.domain_separator(asset.name, asset.version, chain_id, asset.address),
        typed_digest.struct_hash(
            typed_digest.TRANSFER_WITH_AUTHORIZATION,
            typed_digest.address_word(auth.from_),
            typed_digest.address_word(auth.to),
            typed_digest.uint_word(int(auth.value)),
            typed_digest.uint_word(int(auth.valid_after)),
            typed_digest.uint_word(int(auth.valid_before)),
            typed_digest.bytes32_word(auth.nonce),
        ),
    )


def recover(auth: Authorization, signature: str, *, chain_id: int, asset: Asset) -> str | None:
    """The checksummed address that signed ``auth``, or None (not a 65-byte ECDSA signature)."""
    raw = bytes.fromhex(signature[2:])
    if len(raw) == 65 and raw[64] in (27, 28):  # what wallets send: the fast path (tested)
        return typed_digest.recover(digest(auth, chain_id=chain_id, asset=asset), raw)
    return evm.recover_typed(typed_data(auth, chain_id=chain_id, asset=asset), signature)


def check_authorization(
    payment: AnyPaymentPayload,
    offer: Offer,
    *,
    now: int,
    skew: int,
    min_remaining: float = MIN_REMAINING_SECONDS,
) -> str:
    """Check the EIP-3009 authorization against ``offer``; the payer's address if it holds.

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
    signer = recover(
        auth, payment.payload.signature, chain_id=offer.network.chain_id, asset=offer.asset
    )
    payer = typed_digest.checksum(auth.from_)
    # A contract wallet's signature (ERC-1271/6492) is the settler's to judge (smartwallet).
    if signer != payer and not smartwallet.is_contract_signature(payment.payload.signature):
        raise PaymentRejected(
            "invalid_exact_evm_payload_signature", "the signature is not the payer's"
        )
    return payer


def payload_of(payment: AnyPaymentPayload) -> ExactEvmPayload:
    return payload_as(payment, ExactEvmPayload)


class ExactVerify:
    payload_type = ExactEvmPayload
    replay_code = NONCE_USED

    def check(self, payment: AnyPaymentPayload, offer: Offer, when: CheckTime) -> Authorized:
        payer = check_authorization(
            payment, offer, now=when.now, skew=when.skew, min_remaining=when.min_remaining
        )
        auth = payload_of(payment).authorization
        return Authorized(
            payer=payer,
            nonce=auth.nonce,
            maximum=int(auth.value),
            valid_before=int(auth.valid_before),
        )

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        return int(payload_of(payment).authorization.valid_before)


ROLE = ExactVerify()
