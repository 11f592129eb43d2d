"""The ``batch-settlement`` scheme's payload: a channel's identity and a voucher, with a
deposit on the first payment (sans-IO, client-safe)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from paygate.x402.models import Address, Nonce, Signature, Uint256, X402Model, register_payload

NAME = "batch-settlement"


class ChannelConfig(X402Model):
    """A `batch-settlement` channel's immutable identity (its EIP-712 hash is the channel id)."""

    payer: Address
    payer_authorizer: Address
    receiver: Address
    receiver_authorizer: Address
    token: Address
    withdraw_delay: int = Field(ge=0, lt=2**40)
    salt: Nonce  # bytes32


class ChannelVoucher(X402Model):
    """A cumulative voucher: the most the receiver may ever claim from the channel."""

    channel_id: Nonce  # bytes32
    max_claimable_amount: Uint256
    signature: Signature


class DepositErc3009(X402Model):
    """A deposit's EIP-3009 ``receiveWithAuthorization`` to the deposit collector."""

    valid_after: Uint256
    valid_before: Uint256
    salt: Nonce
    signature: Signature


class DepositAuthorization(X402Model):
    erc3009_authorization: DepositErc3009 | None = None
    permit2_authorization: dict[str, Any] | None = None


class ChannelDeposit(X402Model):
    amount: Uint256
    authorization: DepositAuthorization


class BatchSettlementPayload(X402Model):
    """The `batch-settlement` scheme's payload: a deposit (with its first voucher), a voucher,
    or a cooperative refund request (a zero-charge voucher); see
    ``paygate.x402.schemes.batch_settlement``."""

    type: Literal["deposit", "voucher", "refund"]
    channel_config: ChannelConfig
    voucher: ChannelVoucher
    deposit: ChannelDeposit | None = None
    amount: Uint256 | None = None  # refund: part of the remainder (omitted: all of it)


register_payload(NAME, BatchSettlementPayload)
