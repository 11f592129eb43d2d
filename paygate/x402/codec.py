"""The x402 header codec: base64 JSON in both directions, bounded and with reasons.

Every decode failure is a :class:`PaymentHeaderError` whose message is the reason a caller
gets back (400). The reason never quotes the header: it may carry a signature.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import orjson
from pydantic import ValidationError

from enclave import jcs
from paygate import jsonsafe
from paygate.errors import PaygateError
from paygate.wire import PAYMENT_REQUIRED, PAYMENT_RESPONSE

# The scheme registry: importing it registers every scheme's payload model, so that a payment
# read here is validated by the model of the scheme it names, whoever imported the codec first.
from paygate.x402 import schemes as _schemes  # noqa: F401
from paygate.x402.models import (
    AnyPaymentPayload,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    SettleResponse,
    X402Model,
)

# A payment header is a few hundred bytes; anything past this is not a payment.
MAX_HEADER_CHARS = 16 * 1024


class PaymentHeaderError(PaygateError):
    """A payment header that cannot be read; the message is safe to return to the caller."""

    message = "a payment header that cannot be read"

    code = "invalid_payment_header"


def encode(model: X402Model) -> str:
    """A model as header value: standard base64 of compact JSON in wire names."""
    return base64.b64encode(compact_json(model.wire())).decode("ascii")


def compact_json(document: Any) -> bytes:
    """``json.dumps(document, separators=(",", ":"), sort_keys=True)``'s bytes (non-ASCII
    escaped), written by orjson when that gives the same bytes: a plain document (enclave.jcs:
    no floats, no big integers, ASCII keys) whose output is printable ASCII (a payment
    receipt's JSON then costs a tenth of what the standard library's encoder takes)."""
    if jcs.plain(document):
        try:
            raw = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate: json.dumps escapes it
            pass
        else:
            if raw.isascii() and b"\x7f" not in raw:  # json.dumps escapes DEL too
                return raw
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def decode_json(value: str, *, header: str) -> dict[str, Any]:
    """Base64 (standard or URL-safe, padding optional) JSON object, bounded."""
    value = value.strip()
    if not value:
        raise PaymentHeaderError(f"{header} is empty")
    if len(value) > MAX_HEADER_CHARS:
        raise PaymentHeaderError(f"{header} is longer than {MAX_HEADER_CHARS} characters")
    padded = value + "=" * (-len(value) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise PaymentHeaderError(f"{header} is not base64") from None
    try:
        data = jsonsafe.loads(raw, max_bytes=MAX_HEADER_CHARS)
    except jsonsafe.UntrustedJSONError:
        raise PaymentHeaderError(f"{header} is not base64-encoded JSON") from None
    if not isinstance(data, dict):
        raise PaymentHeaderError(f"{header} must encode a JSON object")
    return data


def _reason(exc: ValidationError, header: str) -> str:
    # Field locations and messages only: pydantic's default text would echo the input.
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "payload"
    return f"{header}: {where}: {first.get('msg', 'invalid')}"


def decode_payment(value: str, *, header: str) -> AnyPaymentPayload:
    """A payment header (``PAYMENT-SIGNATURE`` or ``X-PAYMENT``) as a typed payload.

    The version inside decides the model; a v2 payload in ``X-PAYMENT`` or the reverse is
    accepted (clients in the wild mix them), but the version must be 1 or 2.
    """
    return parse_payment(decode_json(value, header=header), header=header)


def parse_payment(data: dict[str, Any], *, header: str) -> AnyPaymentPayload:
    """A decoded payment object (a header's JSON, or one stored in the ledger) as a payload."""
    version = data.get("x402Version")
    model: type[PaymentPayload] | type[PaymentPayloadV1]
    if version == 2:
        model = PaymentPayload
    elif version == 1:
        model = PaymentPayloadV1
    else:
        raise PaymentHeaderError(f"{header}: x402Version must be 1 or 2")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PaymentHeaderError(_reason(exc, header)) from None


def decode_payment_required(value: str) -> PaymentRequired:
    """A v2 ``PAYMENT-REQUIRED`` header (client side)."""
    data = decode_json(value, header=PAYMENT_REQUIRED)
    try:
        return PaymentRequired.model_validate(data)
    except ValidationError as exc:
        raise PaymentHeaderError(_reason(exc, PAYMENT_REQUIRED)) from None


def decode_settle_response(value: str, *, header: str = PAYMENT_RESPONSE) -> SettleResponse:
    """A receipt header (``PAYMENT-RESPONSE`` or ``X-PAYMENT-RESPONSE``) (client side)."""
    data = decode_json(value, header=header)
    try:
        return SettleResponse.model_validate(data)
    except ValidationError as exc:
        raise PaymentHeaderError(_reason(exc, header)) from None
