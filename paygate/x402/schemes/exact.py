"""The ``exact`` scheme (EIP-3009 ``transferWithAuthorization``): the payer signs the price.

Settles exactly the amount signed, once; both x402 versions. The local checks and the
EIP-712 work are ``paygate.x402.verify`` and ``paygate.x402.eip3009``; this module puts them
behind the scheme interface, with the client's signing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eth_account.signers.local import LocalAccount

from paygate.x402 import eip3009
from paygate.x402.models import (
    AnyPaymentPayload,
    ExactEvmPayload,
    PaymentPayloadV1,
    ResourceInfo,
    SettleResponse,
    VerifyResponse,
)
from paygate.x402.networks import Asset
from paygate.x402.offers import EXACT, Offer
from paygate.x402.schemes.base import Authorized
from paygate.x402.verify import check_authorization

if TYPE_CHECKING:
    from paygate.x402.settler import Settler


class ExactScheme:
    name = EXACT
    metered = False
    replay_code = "invalid_exact_evm_nonce_already_used"  # the SDK facilitator's own code
    payload_type = ExactEvmPayload

    def valid_before(self, payment: AnyPaymentPayload) -> int:
        assert isinstance(payment.payload, ExactEvmPayload)
        return int(payment.payload.authorization.valid_before)

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return offer.amount

    def check(
        self,
        payment: AnyPaymentPayload,
        offer: Offer,
        *,
        now: int,
        skew: int,
        min_remaining: float,
    ) -> Authorized:
        payer = check_authorization(payment, offer, now=now, skew=skew, min_remaining=min_remaining)
        auth = payment.payload.authorization  # type: ignore[union-attr]  # checked above
        return Authorized(
            payer=payer,
            nonce=auth.nonce,
            maximum=int(auth.value),
            valid_before=int(auth.valid_before),
        )

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        if isinstance(payment, PaymentPayloadV1):
            return offer.v1(resource).wire()
        return offer.v2().wire()

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
        # EIP-3009 moves the signed value or nothing: ``amount`` is always the price.
        return await settler.settle(payment, requirements)

    async def reconcile(
        self,
        settler: Settler,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        amount: int,
        transaction: str | None,
    ) -> SettleResponse:
        return await settler.reconcile(payment, requirements, transaction)


def sign(
    account: LocalAccount,
    *,
    chain_id: int,
    asset: Asset,
    pay_to: str,
    amount: int,
    valid_for: int,
) -> ExactEvmPayload:
    """The client side: a fresh EIP-3009 authorization of ``amount`` to ``pay_to``, signed."""
    auth = eip3009.new_authorization(
        payer=str(account.address), pay_to=pay_to, value=amount, valid_for=valid_for
    )
    signature = eip3009.sign(account, auth, chain_id=chain_id, asset=asset)
    return ExactEvmPayload(signature=signature, authorization=auth)
