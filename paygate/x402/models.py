"""x402 wire models, v1 and v2, as pydantic models with the protocol's camelCase names.

Parsing is strict where a seller relies on a field (the authorization's numbers and hex) and
lenient elsewhere (unknown fields are ignored), so that newer clients stay compatible. These
models are shared by the gateway and the client: nothing here does I/O.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)
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


# --- scheme payloads ---
# A payment's ``payload`` is its scheme's: each scheme package registers its payload model
# (``schemes/<name>/payload.py``, imported by the scheme registry), and a payment's payload is
# validated by the model of the scheme it names. This module names no scheme.

_PAYLOADS: dict[str, tuple[type[X402Model], bool]] = {}


def register_payload(scheme: str, model: type[X402Model], *, v1: bool = False) -> None:
    """``model`` is what a payment naming ``scheme`` carries as ``payload`` (``v1``: in x402
    v1's ``X-PAYMENT`` too). Called once per scheme, by its ``payload`` module."""
    known = _PAYLOADS.get(scheme)
    if known is not None and known != (model, v1):
        raise ValueError(f"scheme {scheme!r} already has a payload model")
    _PAYLOADS[scheme] = (model, v1)
    _any_payload.cache_clear()


def payload_model(scheme: str, *, version: int = 2) -> type[X402Model] | None:
    """The payload model registered for ``scheme`` in x402 ``version``, or None."""
    known = _PAYLOADS.get(scheme)
    return known[0] if known is not None and (version == 2 or known[1]) else None


@functools.cache
def _any_payload(version: int) -> TypeAdapter[Any] | None:
    models = tuple(m for m, v1 in _PAYLOADS.values() if version == 2 or v1)
    return TypeAdapter(Union[models]) if models else None  # noqa: UP007 (a runtime tuple)


def _scheme_payload(value: Any, scheme: Any, version: int) -> X402Model:
    model = payload_model(scheme, version=version) if isinstance(scheme, str) else None
    if model is not None:
        return model.model_validate(value)
    # A scheme with no payload model for this version (or an unreadable name): any registered
    # scheme's payload is read, so that the offer match refuses the payment for its scheme
    # (unsupported_scheme); a payload that fits no scheme is an unreadable header.
    adapter = _any_payload(version)
    if adapter is None:
        raise ValueError("no payment scheme is registered")
    return adapter.validate_python(value)  # type: ignore[no-any-return]


class _Payment(X402Model):
    """A payment of either version: a received, signed fact, read once and never changed."""

    # Not a field nor a private attribute: a plain slot, so it is neither compared, dumped nor
    # carried by ``model_copy`` (a copy, maybe changed, makes its own).
    __slots__ = ("_wire_json",)

    def wire_json(self) -> bytes:
        """``wire()`` as compact JSON (the bytes ``jsonsafe.dumps_compact(wire())`` gives),
        made once per payment: the ledger stores it and the facilitator's /verify and /settle
        bodies embed it. Serialised by pydantic's own JSON writer, not through a dict."""
        try:
            # The slot read straight from its descriptor: a miss is an AttributeError here,
            # not a detour through pydantic's ``__getattr__``.
            return _WIRE_JSON.__get__(self)  # type: ignore[no-any-return]
        except AttributeError:
            made = self.model_dump_json(by_alias=True, exclude_none=True).encode()
            object.__setattr__(self, "_wire_json", made)
            return made


_WIRE_JSON = _Payment.__dict__["_wire_json"]


class PaymentPayload(_Payment):
    """The v2 payment (``PAYMENT-SIGNATURE``): the chosen requirement echoed as ``accepted``."""

    x402_version: Literal[2] = 2
    resource: ResourceInfo | None = None
    accepted: PaymentRequirements
    payload: SerializeAsAny[X402Model]  # the model ``accepted.scheme`` registered
    extensions: dict[str, Any] | None = None

    @field_validator("payload", mode="plain")
    @classmethod
    def _payload(cls, value: Any, info: ValidationInfo) -> X402Model:
        accepted = info.data.get("accepted")
        return _scheme_payload(value, getattr(accepted, "scheme", None), 2)

    @property
    def scheme(self) -> str:
        return self.accepted.scheme

    @property
    def network(self) -> str:
        return self.accepted.network

    @property
    def payment_identifier(self) -> str | None:
        return payment_identifier(self.extensions)


class PaymentPayloadV1(_Payment):
    """The v1 payment (``X-PAYMENT``): scheme and network at the top level."""

    x402_version: Literal[1] = 1
    scheme: str
    network: str
    payload: SerializeAsAny[X402Model]  # the model ``scheme`` registered for v1

    @field_validator("payload", mode="plain")
    @classmethod
    def _payload(cls, value: Any, info: ValidationInfo) -> X402Model:
        return _scheme_payload(value, info.data.get("scheme"), 1)

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
    # The scheme's own answer (a channel's ``chargedAmount`` and state).
    extra: dict[str, Any] | None = None

    @property
    def refusal_reason(self) -> str:
        """Why the settlement failed: the reason it states, else ``settle_failed``."""
        return self.error_reason or SETTLE_FAILED


#: A failed settlement's reason when its answer states none.
SETTLE_FAILED = "settle_failed"


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
