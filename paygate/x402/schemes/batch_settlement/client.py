"""The payer side of `batch-settlement` (client-safe: eth_account only).

A payer opens a channel with a deposit and then signs, per request, a voucher for everything
charged so far plus this request's price (``charged + amount``); the seller answers with what it
charged (``extra.chargedAmount``: at most the price on a metered route), which the payer adds
to its own count. The official SDK's client does the same; this is paygate's own, for tests
and the paygate client.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from paygate.x402.evm import EIP712_DOMAIN, EIP3009_AUTHORIZATION
from paygate.x402.schemes.base import OfferedTerms, Signed
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig

_RECEIVE = {"EIP712Domain": EIP712_DOMAIN, "ReceiveWithAuthorization": EIP3009_AUTHORIZATION}


@dataclass
class PayerChannel:
    """A payer's view of its channel with one seller."""

    account: LocalAccount
    config: ChannelConfig
    chain_id: int
    charged: int = 0
    balance: int = 0

    @classmethod
    def open(
        cls,
        account: LocalAccount,
        requirement: dict[str, Any],
        chain_id: int,
        salt: str | None = None,
    ) -> PayerChannel:
        extra = requirement["extra"]
        config = ChannelConfig(
            payer=account.address,
            payer_authorizer=account.address,
            receiver=to_checksum_address(requirement["payTo"]),
            receiver_authorizer=to_checksum_address(extra["receiverAuthorizer"]),
            token=to_checksum_address(requirement["asset"]),
            withdraw_delay=int(extra["withdrawDelay"]),
            salt=salt or "0x" + "00" * 32,
        )
        return cls(account, config, chain_id)

    @property
    def channel_id(self) -> str:
        return ch.channel_id(self.config, self.chain_id)

    def voucher(self, maximum: int) -> dict[str, Any]:
        return {
            "channelId": self.channel_id,
            "maxClaimableAmount": str(maximum),
            "signature": ch.sign_voucher(self.account, self.channel_id, maximum, self.chain_id),
        }

    def pay(self, requirement: dict[str, Any], *, deposit: int = 0) -> dict[str, Any]:
        """The payload for one request of ``requirement['amount']`` (with a deposit first when
        ``deposit`` > 0)."""
        maximum = self.charged + int(requirement["amount"])
        payload: dict[str, Any] = {
            "type": "voucher",
            "channelConfig": self.config.wire(),
            "voucher": self.voucher(maximum),
        }
        if deposit > 0:
            payload["type"] = "deposit"
            payload["deposit"] = {
                "amount": str(deposit),
                "authorization": {"erc3009Authorization": self._receive(requirement, deposit)},
            }
        return payload

    def refund(self, amount: int | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "type": "refund",
            "channelConfig": self.config.wire(),
            "voucher": self.voucher(self.charged),
        }
        if amount is not None:
            payload["amount"] = str(amount)
        return payload

    def charged_by(self, settle: dict[str, Any], requirement: dict[str, Any]) -> None:
        """Count the seller's charge from its PAYMENT-RESPONSE (never more than the price)."""
        charged = int((settle.get("extra") or {}).get("chargedAmount", "0"))
        if charged > int(requirement["amount"]):
            raise ValueError("the seller charged more than the price")
        self.charged += charged

    def _receive(self, requirement: dict[str, Any], amount: int) -> dict[str, str]:
        salt = "0x" + secrets.token_bytes(32).hex()
        nonce = keccak(bytes.fromhex(self.channel_id[2:]) + bytes.fromhex(salt[2:]))
        valid_before = int(time.time()) + int(requirement["maxTimeoutSeconds"])
        extra = requirement["extra"]
        message = {
            "types": _RECEIVE,
            "primaryType": "ReceiveWithAuthorization",
            "domain": {
                "name": extra["name"],
                "version": extra["version"],
                "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(requirement["asset"]),
            },
            "message": {
                "from": self.account.address,
                "to": ch.ERC3009_COLLECTOR_ADDRESS,
                "value": amount,
                "validAfter": 0,
                "validBefore": valid_before,
                "nonce": nonce,
            },
        }
        signed = self.account.sign_message(encode_typed_data(full_message=message))
        return {
            "validAfter": "0",
            "validBefore": str(valid_before),
            "salt": salt,
            "signature": "0x" + bytes(signed.signature).hex(),
        }


_NO_CHANNELS = "batch-settlement needs a channel kept across requests: not paid by this client"


class BatchSettlementClient:
    """The paygate client's payer signs one request at a time and keeps no channel: it
    declines batch-settlement offers (pay them with :class:`PayerChannel` or the x402 SDK)."""

    def decline(self, offer: OfferedTerms, *, max_price_per_million: Decimal | None) -> str | None:
        return _NO_CHANNELS

    def cannot_sign(self, offer: OfferedTerms) -> str | None:
        return _NO_CHANNELS

    def sign(
        self, account: LocalAccount, offer: OfferedTerms, *, decimals: int, valid_for: int
    ) -> Signed:
        raise ValueError(_NO_CHANNELS)


ROLE = BatchSettlementClient()
