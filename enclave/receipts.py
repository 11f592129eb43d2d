"""Signed receipts: what the appliance says it did for one request, signed by its receipt key.

A receipt is a JSON object, serialised canonically (RFC 8785, the ``rfc8785`` package), signed
with ECDSA P-256 / SHA-256 by the key the attestation evidence certified, and carried as one
token: ``base64url(canonical JSON) "." base64url(r || s)`` (no padding; 64-byte signature).
:func:`signed_bytes` gives a token's exact signed bytes (what a transparency log hashes).

Three kinds (claims in docs/ATTESTATION.md), all ``version`` 2 with ``issued_at`` (Unix
seconds) and ``receipt_key`` (hex fingerprint of the signing key):

- ``reply``: ``request_digest`` (:func:`request_digest`: the request as received, with the
  caller's fresh nonce), ``reply_digest`` (SHA-256 of the reply plaintext up to the receipt),
  ``model``, ``model_digest``, ``usage`` or null, ``payment`` or null;
- ``settlement``: ``request_digest`` (of the paid request, or null when unknown) and
  ``payment``, once its settlement is known;
- ``refusal``: a reply's claims, signed at the end of a stream whose settlement was refused for
  good (its content already went out): ``payment`` (never null) is ``charged`` "0" with
  ``transaction`` "none", and ``reason`` is the refusal's code. It binds the request and what
  was delivered as a ``reply`` receipt does, so a client tells it from a refusal forged on the
  path (an unsigned x402 receipt says anything).

``payment`` names the payment whole: ``id`` (the authorization nonce), ``scheme``,
``network``, ``asset``, ``pay_to``, ``payer``, ``authorized`` and ``charged`` (atomic units,
decimal strings), ``prices`` (metered: per million tokens and the minimum, whole tokens) or
null, ``transaction`` (hash, or "pending").
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from enclave import p256
from enclave.attestation.binding import BindingInvalid, canonical
from enclave.attestation.tpm import verify_signature
from enclave.errors import EnclaveError
from enclave.keys.base import ReceiptSigner

VERSION = 2
REQUEST_DIGEST_VERSION = 1
MAX_TOKEN = 8 * 1024  # a receipt is about a kilobyte; bound what a verifier parses
NONCE_LEN = 32
# The kinds of receipt (each with its claims): a reply's charge, a settlement completed after
# its reply, a stream's settlement refused for good. Signers and verifiers name them from here.
REPLY = "reply"
SETTLEMENT = "settlement"
REFUSAL = "refusal"
KINDS: Mapping[str, frozenset[str]] = {
    REPLY: frozenset(
        {
            "version", "kind", "request_digest", "reply_digest", "model", "model_digest",
            "usage", "payment", "issued_at", "receipt_key",
        }
    ),
    SETTLEMENT: frozenset(
        {"version", "kind", "request_digest", "payment", "issued_at", "receipt_key"}
    ),
    REFUSAL: frozenset(
        {
            "version", "kind", "request_digest", "reply_digest", "model", "model_digest",
            "payment", "reason", "issued_at", "receipt_key",
        }
    ),
}  # fmt: skip
REFUSAL_TRANSACTION = "none"  # a refused settlement moved nothing
MAX_REASON = 128  # a refusal's code (x402's errorReason, ours): short words
PAYMENT_CLAIMS = frozenset(
    {
        "id", "scheme", "network", "asset", "pay_to", "payer", "authorized", "charged",
        "prices", "transaction",
    }
)  # fmt: skip
USAGE_CLAIMS = frozenset(
    {"prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens", "source"}
)
_ATOMIC = re.compile(r"^(0|[1-9][0-9]{0,77})$")


class ReceiptTokenInvalid(EnclaveError):
    message = "the receipt is malformed or its signature does not verify"

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


def request_digest(
    *,
    method: str,
    path: str,
    body: bytes,
    nonce: bytes | None,
    reply_key: bytes | None = None,
) -> str:
    """The digest a receipt names its request by: SHA-256 of the canonical JSON
    ``{"version": 1, "method", "path", "body": body_digest(body as received), "nonce": hex or
    null, "reply_key": hex or null}``. ``nonce`` is the caller's fresh per-request nonce (v2:
    derived from the reply secret inside the seal), so no two requests share a digest even
    with the same body; ``reply_key`` is envelope v1's clear reply key, bound so that a
    swapped one shows."""
    if nonce is not None and len(nonce) != NONCE_LEN:
        raise ValueError("the request nonce must be 32 bytes")
    document = {
        "version": REQUEST_DIGEST_VERSION,
        "method": method.upper(),
        "path": path,
        "body": body_digest(body),
        "nonce": nonce.hex() if nonce is not None else None,
        "reply_key": reply_key.hex() if reply_key is not None else None,
    }
    return "sha256:" + hashlib.sha256(canonical(document)).hexdigest()


@functools.lru_cache(maxsize=64)
def _fingerprint(point: bytes) -> str:
    """p256.fingerprint of a receipt key: the same few keys sign every receipt."""
    return p256.fingerprint(point)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ReceiptTokenInvalid("the receipt is not base64url") from None


def sign(claims: Mapping[str, Any], signer: ReceiptSigner) -> str:
    """The token for ``claims`` (a ``kind`` and its claims; ``version`` and ``receipt_key``
    are filled in), signed by ``signer``."""
    document = {
        **claims,
        "version": VERSION,
        "receipt_key": _fingerprint(signer.receipt_public_key),
    }
    _check_form(document)
    payload = canonical(document)
    signature = signer.sign_digest(hashlib.sha256(payload).digest())
    return f"{_b64(payload)}.{_b64(signature)}"


def _split(token: str) -> tuple[bytes, bytes]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise ReceiptTokenInvalid("the receipt is not a token of two base64url parts")
    encoded, signature = token.split(".")
    return _unb64(encoded), _unb64(signature)


def signed_bytes(token: str) -> bytes:
    """The exact bytes a token's signature covers (its canonical JSON), unverified: what a
    log hashes. The one definition of a receipt's identity: the signature part is not read, so
    a token whose signature was swapped names the same receipt."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise ReceiptTokenInvalid("the receipt is not a token of two base64url parts")
    return _unb64(token.partition(".")[0])


def unverified_claims(token: str) -> dict[str, Any]:
    """A token's claims without checking the signature (for display and for callers with no
    attested key to check against): never a basis for trust."""
    try:
        claims = json.loads(signed_bytes(token))
    except (ValueError, RecursionError):  # ValueError: not UTF-8 or JSON, or a huge integer
        raise ReceiptTokenInvalid("the receipt is not JSON") from None
    if not isinstance(claims, dict):
        raise ReceiptTokenInvalid("the receipt is not a JSON object")
    _check_form(claims)
    return claims


def verify(token: str, receipt_key: bytes) -> dict[str, Any]:
    """The claims of ``token`` once its signature verifies under ``receipt_key`` (the attested
    point) and its form is right; :class:`ReceiptTokenInvalid` otherwise."""
    payload, signature = _split(token)
    if not verify_signature(receipt_key, payload, signature):
        raise ReceiptTokenInvalid("the receipt's signature does not verify under the attested key")
    claims = unverified_claims(token)
    try:
        if canonical(claims) != payload:
            raise ReceiptTokenInvalid("the receipt is not canonical JSON")
    except BindingInvalid:
        raise ReceiptTokenInvalid("the receipt is not canonical JSON") from None
    if claims["receipt_key"] != p256.fingerprint(receipt_key):
        raise ReceiptTokenInvalid("the receipt names another key")
    return claims


def _check_form(claims: Mapping[str, Any]) -> None:
    """The claims of a version 2 receipt of a known kind, with well-formed payment and usage."""
    kind = claims.get("kind")
    if claims.get("version") != VERSION or kind not in KINDS or set(claims) != KINDS[kind]:
        raise ReceiptTokenInvalid("the receipt does not have the version 2 claims of its kind")
    payment = claims["payment"]
    if kind in (SETTLEMENT, REFUSAL) and payment is None:
        raise ReceiptTokenInvalid(f"a {kind} receipt names no payment")
    if payment is not None:
        if not isinstance(payment, dict) or set(payment) != PAYMENT_CLAIMS:
            raise ReceiptTokenInvalid("the receipt's payment does not have the payment claims")
        for name in ("authorized", "charged"):
            value = payment[name]
            if not isinstance(value, str) or not _ATOMIC.match(value):
                raise ReceiptTokenInvalid(f"the receipt's {name} amount is not atomic units")
        if int(payment["charged"]) > int(payment["authorized"]):
            raise ReceiptTokenInvalid("the receipt charges more than was authorized")
    if kind == REFUSAL:
        reason = claims["reason"]
        if not isinstance(reason, str) or not reason or len(reason) > MAX_REASON:
            raise ReceiptTokenInvalid("the refusal's reason is not a short code")
        if payment.get("charged") != "0" or payment.get("transaction") != REFUSAL_TRANSACTION:
            raise ReceiptTokenInvalid("a refusal receipt states a charge")
    usage = claims.get("usage")
    if usage is not None:
        if not isinstance(usage, dict) or set(usage) != USAGE_CLAIMS:
            raise ReceiptTokenInvalid("the receipt's usage does not have the usage claims")
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if not _count(usage[name]):
                raise ReceiptTokenInvalid(f"the receipt's {name} is not a count")
        if usage["cached_tokens"] is not None and not _count(usage["cached_tokens"]):
            raise ReceiptTokenInvalid("the receipt's cached_tokens is not a count")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
