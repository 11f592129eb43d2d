"""``exact`` on the paying side: which offers it signs, and the EIP-3009 signature (eth-account
only: client-safe)."""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from paygate.x402 import evm
from paygate.x402.networks import Asset, UnknownNetwork, resolve_network
from paygate.x402.schemes.base import OfferedTerms, Signed
from paygate.x402.schemes.exact.payload import Authorization, ExactEvmPayload
from paygate.x402.schemes.exact.verify import typed_data

# The transfer methods of an exact offer this client pays (absent: EIP-3009).
_METHODS = (None, "eip3009")


def new_authorization(
    *, payer: str, pay_to: str, value: int, valid_for: int, now: int | None = None
) -> Authorization:
    """A fresh authorization with a random 32-byte nonce, valid from a little in the past.

    ``validAfter`` sits 10 minutes back so a payer's clock running behind the seller's does not
    make a fresh payment "not yet valid"; ``validBefore`` is ``now + valid_for``.
    """
    now = int(time.time()) if now is None else now
    return Authorization.model_validate(
        {
            "from": to_checksum_address(payer),
            "to": to_checksum_address(pay_to),
            "value": str(value),
            "validAfter": str(max(now - 600, 0)),
            "validBefore": str(now + valid_for),
            "nonce": "0x" + secrets.token_hex(32),
        }
    )


def sign_authorization(
    account: LocalAccount, auth: Authorization, *, chain_id: int, asset: Asset
) -> str:
    """The 65-byte signature over ``auth`` as 0x-hex."""
    return evm.sign_typed(account, typed_data(auth, chain_id=chain_id, asset=asset))


def sign(
    account: LocalAccount,
    *,
    chain_id: int,
    asset: Asset,
    pay_to: str,
    amount: int,
    valid_for: int,
) -> ExactEvmPayload:
    """A fresh EIP-3009 authorization of ``amount`` to ``pay_to``, signed."""
    auth = new_authorization(
        payer=str(account.address), pay_to=pay_to, value=amount, valid_for=valid_for
    )
    signature = sign_authorization(account, auth, chain_id=chain_id, asset=asset)
    return ExactEvmPayload(signature=signature, authorization=auth)


def eip712_domain(offer: OfferedTerms) -> tuple[str, str] | None:
    """The token's EIP-712 (name, version): the offer's ``extra``, else the known USDC's."""
    name, version = offer.extra.get("name"), offer.extra.get("version")
    if isinstance(name, str) and isinstance(version, str):
        return name, version
    try:
        usdc = resolve_network(f"eip155:{offer.chain_id or 0}").usdc
    except UnknownNetwork:
        return None
    if usdc is not None and usdc.address == to_checksum_address(offer.asset):
        return usdc.name, usdc.version
    return None


class ExactClient:
    def decline(self, offer: OfferedTerms, *, max_price_per_million: Decimal | None) -> str | None:
        method = offer.extra.get("assetTransferMethod")
        if method not in _METHODS:
            return f"asset transfer method {method!r} is not supported"
        return None

    def cannot_sign(self, offer: OfferedTerms) -> str | None:
        return None if eip712_domain(offer) is not None else "token's EIP-712 name/version unknown"

    def sign(
        self, account: LocalAccount, offer: OfferedTerms, *, decimals: int, valid_for: int
    ) -> Signed:
        domain = eip712_domain(offer)
        if domain is None or offer.chain_id is None:
            raise ValueError("the offer cannot be signed")  # declined before: cannot_sign
        asset = Asset(address=offer.asset, name=domain[0], version=domain[1], decimals=decimals)
        payload = sign(
            account,
            chain_id=offer.chain_id,
            asset=asset,
            pay_to=offer.pay_to,
            amount=offer.amount,
            valid_for=valid_for,
        )
        auth = payload.authorization
        return Signed(
            payload=payload,
            nonce=auth.nonce,
            valid_before=int(auth.valid_before),
            asset=asset.address,
        )


ROLE = ExactClient()
