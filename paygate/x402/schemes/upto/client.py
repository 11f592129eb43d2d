"""``upto`` on the paying side: which metered offers it signs, and the Permit2 witness transfer
(eth-account only: client-safe)."""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address

from paygate.x402 import evm
from paygate.x402.pricing import offered_prices
from paygate.x402.schemes.base import OfferedTerms, Signed
from paygate.x402.schemes.upto.offer import (
    ASSET_TRANSFER_METHOD,
    FACILITATOR_EXTRA,
    UPTO_PROXY_ADDRESS,
)
from paygate.x402.schemes.upto.payload import UptoAuthorization, UptoEvmPayload
from paygate.x402.schemes.upto.verify import nonce_key, typed_data


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
    """A Permit2 witness transfer of at most ``maximum`` to ``pay_to``, settleable by
    ``facilitator`` only, signed (validAfter 0 and a random nonce, as the SDK)."""
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
    signature = evm.sign_typed(account, typed_data(auth, chain_id=chain_id))
    return UptoEvmPayload(permit2_authorization=auth, signature=signature)


class UptoClient:
    def decline(self, offer: OfferedTerms, *, max_price_per_million: Decimal | None) -> str | None:
        if offer.version != 2:
            return "upto needs x402 v2"
        if max_price_per_million is None:
            return "metered (upto) payments need max_price_per_million in the spend policy"
        if offer.extra.get("assetTransferMethod") != ASSET_TRANSFER_METHOD:
            return "upto without Permit2 is not supported"
        facilitator = offer.extra.get(FACILITATOR_EXTRA)
        if not isinstance(facilitator, str) or not is_address(facilitator):
            return "upto offer names no facilitator address"
        prices = offered_prices(offer.extra)
        if prices is None:
            return "upto offer states no token prices"
        if max(prices[0], prices[1]) > max_price_per_million:
            return f"token price above max price per million {max_price_per_million}"
        return None

    def cannot_sign(self, offer: OfferedTerms) -> str | None:
        return None  # Permit2's domain is the same on every chain

    def sign(
        self, account: LocalAccount, offer: OfferedTerms, *, decimals: int, valid_for: int
    ) -> Signed:
        if offer.chain_id is None:
            raise ValueError("the offer cannot be signed")  # declined before: no chain id
        payload = sign(
            account,
            chain_id=offer.chain_id,
            token=offer.asset,
            pay_to=offer.pay_to,
            maximum=offer.amount,
            facilitator=str(offer.extra[FACILITATOR_EXTRA]),
            valid_for=valid_for,
        )
        auth = payload.permit2_authorization
        return Signed(
            payload=payload,
            nonce=nonce_key(auth.nonce),
            valid_before=int(auth.deadline),
            asset=to_checksum_address(offer.asset),
            prices=offered_prices(offer.extra),
        )


ROLE = UptoClient()
