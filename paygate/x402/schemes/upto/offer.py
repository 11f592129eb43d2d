"""``upto``'s requirement: the most a request may cost, settled for what it did cost.

The requirement carries ``extra.assetTransferMethod = "permit2"`` and
``extra.facilitatorAddress`` (the only account the proxy lets settle). It is verified against
the signed maximum (the SDK's facilitator wants them equal); to settle ``amount`` the settler is
sent the requirement with ``amount`` in place of the maximum (the SDK's facilitator settles
``requirements.amount``, at most the signed maximum). Nothing is settled for an amount of 0:
the authorization simply expires at its deadline.
"""

from __future__ import annotations

from typing import Any

from eth_utils import to_checksum_address

from paygate.x402.models import AnyPaymentPayload, ResourceInfo, SettleResponse
from paygate.x402.offers import Offer
from paygate.x402.schemes.base import Authorized, payload_as, with_amount
from paygate.x402.schemes.upto.payload import UptoEvmPayload

# The SDK's constants (x402.mechanisms.evm.constants): the same on every EVM chain.
PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
ASSET_TRANSFER_METHOD = "permit2"
FACILITATOR_EXTRA = "facilitatorAddress"


def extra_for(facilitator: str) -> dict[str, str]:
    """The requirement fields naming ``facilitator`` as the one who may settle."""
    return {"assetTransferMethod": ASSET_TRANSFER_METHOD, FACILITATOR_EXTRA: facilitator}


def facilitator_of(offer: Offer) -> str | None:
    return dict(offer.extra).get(FACILITATOR_EXTRA)


def payload_of(payment: AnyPaymentPayload) -> UptoEvmPayload:
    return payload_as(payment, UptoEvmPayload)


class UptoOffer:
    v1 = False

    def accepts_amount(self, accepted: str, offer: Offer) -> bool:
        return True  # the signed maximum is compared in the local check (at least the offer's)

    def requirements(
        self, payment: AnyPaymentPayload, offer: Offer, resource: ResourceInfo
    ) -> dict[str, Any]:
        maximum = int(payload_of(payment).permit2_authorization.permitted.amount)
        return with_amount(offer.v2_wire(), maximum)

    def for_amount(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any], amount: int
    ) -> dict[str, Any] | SettleResponse:
        if amount == 0:
            return nothing_settled(payment, requirements)
        return with_amount(requirements, amount)

    def authorized_amount(self, authorized: Authorized, offer: Offer) -> int:
        return authorized.maximum


def nothing_settled(payment: AnyPaymentPayload, requirements: dict[str, Any]) -> SettleResponse:
    """The receipt of a metered request that cost nothing: success, no transaction."""
    return SettleResponse(
        success=True,
        payer=to_checksum_address(payload_of(payment).permit2_authorization.from_),
        transaction="",
        network=str(requirements["network"]),
        amount="0",
    )


ROLE = UptoOffer()
