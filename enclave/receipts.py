"""Signed receipts: what the appliance says it did for one request, signed by its receipt key.

A receipt is a JSON object, serialised canonically (RFC 8785, the ``rfc8785`` package), signed
with ECDSA P-256 / SHA-256 by the key the attestation evidence certified, and carried as one
token: ``base64url(canonical JSON) "." base64url(r || s)`` (no padding; 64-byte signature).

Claims (docs/ATTESTATION.md): ``version`` 1; ``request_digest`` (SHA-256 of the request body as
received, sealed bytes for a sealed request); ``reply_digest`` (SHA-256 of the reply body the
caller's application receives, up to the receipt: a running hash for streams); ``model`` and
``model_digest``; ``usage`` (tokens, when the upstream reports them) or null; ``payment``
{``scheme``, ``network``, ``amount``, ``payer``, ``transaction`` (hash or "pending")} or null;
``issued_at`` (Unix seconds); ``receipt_key`` (hex fingerprint of the signing key).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from enclave import p256
from enclave.attestation.binding import BindingInvalid, canonical
from enclave.attestation.tpm import verify_signature
from enclave.errors import EnclaveError
from enclave.keys.base import ReceiptSigner

VERSION = 1
MAX_TOKEN = 8 * 1024  # a receipt is a few hundred bytes; bound what a verifier parses
CLAIMS = frozenset(
    {
        "version", "request_digest", "reply_digest", "model", "model_digest", "usage",
        "payment", "issued_at", "receipt_key",
    }
)  # fmt: skip


class ReceiptInvalid(EnclaveError):
    """the receipt is malformed or its signature does not verify"""

    code = "receipt_invalid"


class RunningHash:
    """SHA-256 over a body as it is sent or received, chunk by chunk."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def body_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ReceiptInvalid("the receipt is not base64url") from None


def sign(claims: Mapping[str, Any], signer: ReceiptSigner) -> str:
    """The token for ``claims`` (``receipt_key`` is filled in), signed by ``signer``."""
    document = {
        **claims,
        "version": VERSION,
        "receipt_key": p256.fingerprint(signer.receipt_public_key),
    }
    payload = canonical(document)
    signature = signer.sign_digest(hashlib.sha256(payload).digest())
    return f"{_b64(payload)}.{_b64(signature)}"


def verify(token: str, receipt_key: bytes) -> dict[str, Any]:
    """The claims of ``token`` once its signature verifies under ``receipt_key`` (the attested
    point) and its form is right; :class:`ReceiptInvalid` otherwise."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise ReceiptInvalid("the receipt is not a token of two base64url parts")
    encoded, signature = token.split(".")
    payload = _unb64(encoded)
    if not verify_signature(receipt_key, payload, _unb64(signature)):
        raise ReceiptInvalid("the receipt's signature does not verify under the attested key")
    try:
        claims = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ReceiptInvalid("the receipt is not JSON") from None
    if not isinstance(claims, dict) or set(claims) != CLAIMS or claims["version"] != VERSION:
        raise ReceiptInvalid("the receipt does not have the version 1 claims")
    try:
        if canonical(claims) != payload:
            raise ReceiptInvalid("the receipt is not canonical JSON")
    except BindingInvalid:
        raise ReceiptInvalid("the receipt is not canonical JSON") from None
    if claims["receipt_key"] != p256.fingerprint(receipt_key):
        raise ReceiptInvalid("the receipt names another key")
    return claims
