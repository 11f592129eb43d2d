"""The ``upto`` scheme (EVM, Permit2): the payer authorizes a maximum, the seller settles what
the request actually cost — pinned to the official x402 Python SDK 2.25's wire format.

The payer signs Permit2's ``PermitWitnessTransferFrom`` (domain ``{name "Permit2", chainId,
verifyingContract: Permit2}``) naming the x402UptoPermit2Proxy as spender and the witness
``{to, facilitator, validAfter}``; the requirement carries ``extra.assetTransferMethod =
"permit2"`` and ``extra.facilitatorAddress`` (the only account the proxy lets settle). To settle
``amount`` the settler is sent the requirement with ``amount`` in place of the maximum (the SDK's
facilitator settles ``requirements.amount``, at most the signed maximum). Nothing is settled for
an amount of 0: the authorization simply expires at its deadline. The replay key is the Permit2
nonce (a uint256; as 0x + 64 hex in the ledger), which stays in the ledger after the deadline.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from paygate.x402 import smartwallet
from paygate.x402.models import (
    AnyPaymentPayload,
    PaymentPayload,
    ResourceInfo,
    SettleResponse,
    UptoAuthorization,
    UptoEvmPayload,
    VerifyResponse,
)
from paygate.x402.offers import UPTO, Offer
from paygate.x402.schemes.base import Authorized, with_amount
from paygate.x402.verify import MIN_REMAINING_SECONDS, PaymentRejected, same_address

if TYPE_CHECKING:
    from paygate.x402.settler import Settler

# The SDK's constants (x402.mechanisms.evm.constants): the same on every EVM chain.
PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
ASSET_TRANSFER_METHOD = "permit2"
FACILITATOR_EXTRA = "facilitatorAddress"

_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "PermitWitnessTransferFrom": [
        {"name": "permitted", "type": "TokenPermissions"},
        {"name": "spender", "type": "address"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
        {"name": "witness", "type": "Witness"},
    ],
    "TokenPermissions": [
        {"name": "token", "type": "address"},
        {"name": "amount", "type": "uint256"},
    ],
    "Witness": [
        {"name": "to", "type": "address"},
        {"name": "facilitator", "type": "address"},
        {"name": "validAfter", "type": "uint256"},
    ],
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
    raw = bytes.fromhex(signature[2:])
    if len(raw) != 65:
        return None
    message = encode_typed_data(full_message=typed_data(auth, chain_id=chain_id))
    try:
        return str(Account.recover_message(message, signature=raw))
    except Exception:  # eth-keys raises several types for malformed (r, s, v); all mean "no"
        return None


def nonce_key(nonce: str | int) -> str:
    """A Permit2 nonce as the ledger's replay-key nonce (0x + 64 hex)."""
    return "0x" + format(int(nonce), "064x")


def facilitator_of(offer: Offer) -> str | None:
    return dict(offer.extra).get(FACILITATOR_EXTRA)


class UptoScheme:
    name = UPTO
    metered = True
    # The SDK's upto codes are invalid_upto_evm_*; it has none for a replay (on chain a spent
    # Permit2 nonce reverts as permit2_invalid_nonce), so this one is named alike.
    replay_code = "invalid_upto_evm_nonce_already_used"
    payload_type = UptoEvmPayload

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        assert isinstance(payment.payload, UptoEvmPayload)
        return int(payment.payload.permit2_authorization.deadline)

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return authorized.maximum

    def check(
        self,
        payment: AnyPaymentPayload,
        offer: Offer,
        *,
        now: int,
        skew: int,
        min_remaining: float,
    ) -> Authorized:
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
        if int(auth.witness.valid_after) > now + skew:
            raise PaymentRejected("permit2_not_yet_valid", "the authorization is not valid yet")
        if int(auth.deadline) < now + max(min_remaining, MIN_REMAINING_SECONDS):
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

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        # Verified against the signed maximum (the SDK's facilitator wants them equal).
        assert isinstance(payment.payload, UptoEvmPayload)
        maximum = int(payment.payload.permit2_authorization.permitted.amount)
        return with_amount(offer.v2().wire(), maximum)

    async def verify(
        self, settler: Settler, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        return await settler.verify(payment, requirements)

    async def settle(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
    ) -> SettleResponse:
        if amount == 0:
            return nothing_settled(payment, requirements)
        return await settler.settle(payment, with_amount(requirements, amount))

    async def reconcile(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
        transaction: str | None,
    ) -> SettleResponse:
        if amount == 0:
            return nothing_settled(payment, requirements)
        return await settler.reconcile(payment, with_amount(requirements, amount), transaction)


def nothing_settled(payment: AnyPaymentPayload, requirements: dict[str, Any]) -> SettleResponse:
    """The receipt of a metered request that cost nothing: success, no transaction."""
    assert isinstance(payment.payload, UptoEvmPayload)
    return SettleResponse(
        success=True,
        payer=to_checksum_address(payment.payload.permit2_authorization.from_),
        transaction="",
        network=str(requirements["network"]),
        amount="0",
    )


def sign(
    account: LocalAccount,
    *,
    chain_id: int,
    token: str,
    pay_to: str,
    maximum: int,
    facilitator: str,
    valid_for: int,
    now: int | None = None,
) -> UptoEvmPayload:
    """The client side: a Permit2 witness transfer of at most ``maximum`` to ``pay_to``,
    settleable by ``facilitator`` only, signed (validAfter 0 and a random nonce, as the SDK)."""
    now = int(time.time()) if now is None else now
    auth = UptoAuthorization.model_validate(
        {
            "from": to_checksum_address(str(account.address)),
            "permitted": {"token": to_checksum_address(token), "amount": str(maximum)},
            "spender": UPTO_PROXY_ADDRESS,
            "nonce": str(int.from_bytes(secrets.token_bytes(32), "big")),
            "deadline": str(now + valid_for),
            "witness": {
                "to": to_checksum_address(pay_to),
                "facilitator": to_checksum_address(facilitator),
                "validAfter": "0",
            },
        }
    )
    message = encode_typed_data(full_message=typed_data(auth, chain_id=chain_id))
    signature = "0x" + account.sign_message(message).signature.hex().removeprefix("0x")
    return UptoEvmPayload(permit2_authorization=auth, signature=signature)
