"""``upto``'s local checks (sans-IO): a Permit2 ``PermitWitnessTransferFrom`` under EIP-712.

The payer signs Permit2's witness transfer (domain ``{name "Permit2", chainId,
verifyingContract: Permit2}``) naming the x402UptoPermit2Proxy as spender and the witness
``{to, facilitator, validAfter}`` — the official x402 Python SDK 2.25's wire format. The replay
key is the Permit2 nonce (a uint256; as 0x + 64 hex in the ledger), which stays in the ledger
after the deadline.
"""

from __future__ import annotations

from typing import Any

from eth_utils import to_checksum_address

from paygate.x402 import evm, smartwallet
from paygate.x402.models import AnyPaymentPayload, PaymentPayload
from paygate.x402.offers import Offer
from paygate.x402.schemes.base import (
    MIN_REMAINING_SECONDS,
    Authorized,
    CheckTime,
    PaymentRejected,
    same_address,
)
from paygate.x402.schemes.upto.offer import (
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    facilitator_of,
    payload_of,
)
from paygate.x402.schemes.upto.payload import UptoAuthorization, UptoEvmPayload

_TYPES = {
    "EIP712Domain": evm.members("string name, uint256 chainId, address verifyingContract"),
    "PermitWitnessTransferFrom": evm.members(
        "TokenPermissions permitted, address spender, uint256 nonce, uint256 deadline,"
        " Witness witness"
    ),
    "TokenPermissions": evm.members("address token, uint256 amount"),
    "Witness": evm.members("address to, address facilitator, uint256 validAfter"),
}


def typed_data(auth: UptoAuthorization, *, chain_id: int) -> dict[str, Any]:
    """The EIP-712 message an upto payer signs."""
    return {
        "types": _TYPES,
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2_ADDRESS},
        "message": {
            "permitted": {
                "token": to_checksum_address(auth.permitted.token),
                "amount": int(auth.permitted.amount),
            },
            "spender": to_checksum_address(auth.spender),
            "nonce": int(auth.nonce),
            "deadline": int(auth.deadline),
            "witness": {
                "to": to_checksum_address(auth.witness.to),
                "facilitator": to_checksum_address(auth.witness.facilitator),
                "validAfter": int(auth.witness.valid_after),
            },
        },
    }


def recover(auth: UptoAuthorization, signature: str, *, chain_id: int) -> str | None:
    """The checksummed signer of ``auth``, or None (not a 65-byte ECDSA signature)."""
    return evm.recover_typed(typed_data(auth, chain_id=chain_id), signature)


def nonce_key(nonce: str | int) -> str:
    """A Permit2 nonce as the ledger's replay-key nonce (0x + 64 hex)."""
    return "0x" + format(int(nonce), "064x")


class UptoVerify:
    payload_type = UptoEvmPayload
    # The SDK's upto codes are invalid_upto_evm_*; it has none for a replay (on chain a spent
    # Permit2 nonce reverts as permit2_invalid_nonce), so this one is named alike.
    replay_code = "invalid_upto_evm_nonce_already_used"

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        return int(payload_of(payment).permit2_authorization.deadline)

    def check(self, payment: AnyPaymentPayload, offer: Offer, when: CheckTime) -> Authorized:
        if not isinstance(payment, PaymentPayload) or not isinstance(
            payment.payload, UptoEvmPayload
        ):
            raise PaymentRejected("invalid_payload", "the payload is not a Permit2 authorization")
        auth = payment.payload.permit2_authorization
        if not same_address(auth.spender, UPTO_PROXY_ADDRESS):
            raise PaymentRejected(
                "invalid_permit2_spender", "the spender is not the x402UptoPermit2Proxy"
            )
        if not same_address(auth.witness.to, offer.pay_to):
            raise PaymentRejected(
                "invalid_permit2_recipient_mismatch", "the authorization pays someone else"
            )
        if not same_address(auth.permitted.token, offer.asset.address):
            raise PaymentRejected("permit2_token_mismatch", "the permitted token is not offered")
        facilitator = facilitator_of(offer)
        if facilitator is None or not same_address(auth.witness.facilitator, facilitator):
            raise PaymentRejected(
                "upto_facilitator_mismatch", "the witness names another facilitator"
            )
        if int(auth.permitted.amount) < offer.amount:
            raise PaymentRejected(
                "permit2_amount_mismatch",
                "the authorized maximum is below what this request may cost",
            )
        if int(auth.witness.valid_after) > when.now + when.skew:
            raise PaymentRejected("permit2_not_yet_valid", "the authorization is not valid yet")
        if int(auth.deadline) < when.now + max(when.min_remaining, MIN_REMAINING_SECONDS):
            raise PaymentRejected("permit2_deadline_expired", "the authorization expires too soon")
        payer = to_checksum_address(auth.from_)
        signature = payment.payload.signature
        if recover(
            auth, signature, chain_id=offer.network.chain_id
        ) != payer and not smartwallet.is_contract_signature(signature):
            raise PaymentRejected("invalid_permit2_signature", "the signature is not the payer's")
        return Authorized(
            payer=payer,
            nonce=nonce_key(auth.nonce),
            maximum=int(auth.permitted.amount),
            valid_before=int(auth.deadline),
        )


ROLE = UptoVerify()
