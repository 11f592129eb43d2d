"""x402 wire models, v1 and v2, as pydantic models with the protocol's camelCase names.

Parsing is strict where a seller relies on a field (the authorization's numbers and hex) and
lenient elsewhere (unknown fields are ignored), so that newer clients stay compatible. These
models are shared by the gateway and the client: nothing here does I/O.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

PAYMENT_IDENTIFIER = "payment-identifier"
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_NONCE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130,}$")
_UINT_MAX = 2**256 - 1
_MAX_SIGNATURE_HEX = 2 + 2 * 4096  # EIP-1271/6492 signatures are longer than 65 bytes; bounded


def _address(value: str) -> str:
    if not _ADDRESS.match(value):
        raise ValueError("not a 20-byte hex address")
    return value


def _uint256(value: str) -> str:
    if not value.isdigit() or len(value) > 78 or int(value) > _UINT_MAX:
        raise ValueError("not a uint256 decimal string")
    return value


def _nonce(value: str) -> str:
    if not _NONCE.match(value):
        raise ValueError("not a 32-byte hex nonce")
    return value.lower()


def _signature(value: str) -> str:
    if not _SIGNATURE.match(value) or len(value) > _MAX_SIGNATURE_HEX or len(value) % 2:
        raise ValueError("not a hex signature")
    return value


Address = Annotated[str, AfterValidator(_address)]
Uint256 = Annotated[str, AfterValidator(_uint256)]
Nonce = Annotated[str, AfterValidator(_nonce)]
Signature = Annotated[str, AfterValidator(_signature)]


class X402Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True, frozen=True
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict in wire names, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ResourceInfo(X402Model):
    url: str
    description: str | None = None
    mime_type: str | None = None


class PaymentRequirements(X402Model):
    """A v2 requirement: what the seller accepts, one per network and asset."""

    scheme: str
    network: str
    amount: str
    asset: str
    pay_to: str
    max_timeout_seconds: int
    extra: dict[str, Any] = Field(default_factory=dict)


class PaymentRequirementsV1(X402Model):
    """A v1 requirement: network by name, the resource inline, ``maxAmountRequired``."""

    scheme: str
    network: str
    max_amount_required: str
    resource: str
    description: str = ""
    mime_type: str = ""
    pay_to: str
    max_timeout_seconds: int
    asset: str
    output_schema: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None


class PaymentRequired(X402Model):
    """The v2 challenge, carried base64-encoded in the ``PAYMENT-REQUIRED`` header."""

    x402_version: Literal[2] = 2
    error: str | None = None
    resource: ResourceInfo
    accepts: list[PaymentRequirements]
    extensions: dict[str, Any] | None = None


class PaymentRequiredV1(X402Model):
    """The v1 challenge, the JSON body of the 402."""

    x402_version: Literal[1] = 1
    error: str | None = None
    accepts: list[PaymentRequirementsV1]


class Authorization(X402Model):
    """EIP-3009 ``TransferWithAuthorization`` fields, numbers as decimal strings."""

    from_: Address = Field(alias="from")
    to: Address
    value: Uint256
    valid_after: Uint256
    valid_before: Uint256
    nonce: Nonce


class ExactEvmPayload(X402Model):
    signature: Signature
    authorization: Authorization


class TokenPermissions(X402Model):
    """Permit2's ``TokenPermissions``: the token and the most that may be moved."""

    token: Address
    amount: Uint256


class UptoWitness(X402Model):
    """The `upto` witness the payer signs into the Permit2 transfer (x402 SDK 2.25's shape)."""

    to: Address
    facilitator: Address
    valid_after: Uint256


class UptoAuthorization(X402Model):
    """A Permit2 ``PermitWitnessTransferFrom`` for the x402UptoPermit2Proxy as spender."""

    from_: Address = Field(alias="from")
    permitted: TokenPermissions
    spender: Address
    nonce: Uint256  # Permit2's unordered nonce: a uint256 as a decimal string
    deadline: Uint256
    witness: UptoWitness


class UptoEvmPayload(X402Model):
    """The `upto` scheme's payload: ``{permit2Authorization, signature}``."""

    permit2_authorization: UptoAuthorization
    signature: Signature


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


#: What a v2 payment's ``payload`` may be; the scheme named in ``accepted`` says which it must be.
SchemePayload = ExactEvmPayload | UptoEvmPayload | BatchSettlementPayload


class PaymentPayload(X402Model):
    """The v2 payment (``PAYMENT-SIGNATURE``): the chosen requirement echoed as ``accepted``."""

    x402_version: Literal[2] = 2
    resource: ResourceInfo | None = None
    accepted: PaymentRequirements
    payload: SchemePayload
    extensions: dict[str, Any] | None = None

    @property
    def scheme(self) -> str:
        return self.accepted.scheme

    @property
    def network(self) -> str:
        return self.accepted.network

    @property
    def payment_identifier(self) -> str | None:
        return payment_identifier(self.extensions)


class PaymentPayloadV1(X402Model):
    """The v1 payment (``X-PAYMENT``): scheme and network at the top level."""

    x402_version: Literal[1] = 1
    scheme: str
    network: str
    payload: ExactEvmPayload

    @property
    def payment_identifier(self) -> str | None:
        return None


AnyPaymentPayload = PaymentPayload | PaymentPayloadV1


class VerifyResponse(X402Model):
    is_valid: bool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None


class SettleResponse(X402Model):
    """A settlement result; also the receipt in ``PAYMENT-RESPONSE``/``X-PAYMENT-RESPONSE``."""

    success: bool
    error_reason: str | None = None
    error_message: str | None = None
    payer: str | None = None
    transaction: str = ""
    network: str
    amount: str | None = None
    extensions: dict[str, Any] | None = None
    # The scheme's own answer (batch-settlement: ``chargedAmount`` and the channel's state).
    extra: dict[str, Any] | None = None


#: The receipt extension of a metered payment: the usage it was charged for.
USAGE_EXTENSION = "paygate-usage"


_PAYMENT_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


def payment_identifier(extensions: dict[str, Any] | None) -> str | None:
    """The payment-identifier extension's id, or None; ValueError if present but malformed."""
    if not extensions or PAYMENT_IDENTIFIER not in extensions:
        return None
    entry = extensions[PAYMENT_IDENTIFIER]
    info = entry.get("info") if isinstance(entry, dict) else None
    value = info.get("id") if isinstance(info, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not _PAYMENT_ID.match(value):
        raise ValueError("payment-identifier id must be 16-128 characters of [A-Za-z0-9_-]")
    return value


def payment_identifier_declaration(*, required: bool = False) -> dict[str, Any]:
    """The seller's declaration of the payment-identifier extension for ``extensions``."""
    return {
        "info": {"required": required},
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "required": {"type": "boolean"},
                "id": {
                    "type": "string",
                    "minLength": 16,
                    "maxLength": 128,
                    "pattern": "^[a-zA-Z0-9_-]+$",
                },
            },
            "required": ["required"],
        },
    }
