"""The appliance's public key: its document, pinning, and the attestation hook.

The key is fetched from ``GET /v1/enclave/pubkey`` at the request's origin, checked against an
optional pin (the 65-byte key or its SHA-256 fingerprint, as ``paygate keys show`` prints), then
handed to an optional attestation hook before anything is sealed to it. Only then is it cached.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from enclave import InvalidPublicKey, p256
from paygate import jsonsafe
from paygate.client.errors import PinMismatch, PubkeyUnavailable
from paygate.wire import PUBKEY_PATH

# The document is a few hundred bytes; this bounds what a hostile server can make us buffer.
MAX_PUBKEY_DOCUMENT = 64 * 1024


@dataclass(frozen=True, slots=True)
class EnclaveKey:
    """The appliance key requests are sealed to, as served at ``origin``."""

    origin: str
    public_key: bytes
    fingerprint: str
    document: Mapping[str, Any] = field(repr=False, compare=False)
    # Key epochs: the id requests name (sealed into a keyed v2 envelope and sent as
    # X-Paygate-Key-Id, which a load balancer routes on); None for a long-lived key.
    key_id: str | None = None


AttestationHook = Callable[[EnclaveKey], None]
"""Called once per key before first use; raising any exception refuses the key."""

AsyncAttestationHook = Callable[[EnclaveKey], Awaitable[None] | None]
"""The async transport's hook: a plain function or a coroutine function."""


class KeyPin:
    """An expected appliance key: the 65-byte point (bytes or 130 hex digits) or its fingerprint
    (64 hex digits, optionally prefixed ``sha256:``)."""

    def __init__(self, value: str | bytes) -> None:
        if isinstance(value, bytes):
            self._fingerprint = p256.fingerprint(_valid_point(value))
            return
        text = value.strip().lower().removeprefix("sha256:").removeprefix("0x")
        if len(text) == 2 * p256.POINT_LEN:
            self._fingerprint = p256.fingerprint(_valid_point(_unhex(text)))
        elif len(text) == 64:
            self._fingerprint = _unhex(text).hex()
        else:
            raise ValueError("a pin is a 65-byte P-256 public key or its 64-hex-digit fingerprint")

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def check(self, key: EnclaveKey) -> None:
        """Raise :class:`PinMismatch` unless ``key`` is the pinned key."""
        if not hmac.compare_digest(key.fingerprint, self._fingerprint):
            raise PinMismatch(
                f"the appliance at {key.origin} presented key {key.fingerprint[:16]}…, "
                f"pinned {self._fingerprint[:16]}…"
            )

    def __repr__(self) -> str:
        return f"KeyPin({self._fingerprint[:16]}…)"


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("a pin must be hexadecimal") from None


def _valid_point(raw: bytes) -> bytes:
    try:
        p256.load_public_key(raw)
    except InvalidPublicKey:
        raise ValueError("the pinned key is not a valid uncompressed P-256 point") from None
    return raw


def parse_pubkey_document(origin: str, status: int, body: bytes) -> EnclaveKey:
    """The key in a ``/v1/enclave/pubkey`` reply; :class:`PubkeyUnavailable` if it is not one.

    Our fingerprint is computed from the point, never taken from the document; a document that
    states a different one is refused as inconsistent.
    """
    if status != 200:
        raise PubkeyUnavailable(f"{origin}{PUBKEY_PATH} answered HTTP {status}")
    try:
        document = jsonsafe.loads(body, max_bytes=MAX_PUBKEY_DOCUMENT)
    except jsonsafe.UntrustedJSONError:
        raise PubkeyUnavailable(f"{origin}{PUBKEY_PATH} did not answer JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("pubkey"), str):
        raise PubkeyUnavailable(f"{origin}{PUBKEY_PATH} has no 'pubkey'")
    try:
        point = p256.parse_public_key_hex(document["pubkey"])
    except InvalidPublicKey:
        raise PubkeyUnavailable(f"{origin}{PUBKEY_PATH}: 'pubkey' is not a P-256 point") from None
    fingerprint = p256.fingerprint(point)
    stated = document.get("fingerprint")
    if stated is not None and stated != fingerprint:
        raise PubkeyUnavailable(f"{origin}{PUBKEY_PATH}: 'fingerprint' does not match 'pubkey'")
    key_id = document.get("key_id")
    if key_id is not None and not key_id_matches(key_id, point):
        raise PubkeyUnavailable(f"{origin}{PUBKEY_PATH}: 'key_id' does not name 'pubkey'")
    return EnclaveKey(
        origin=origin, public_key=point, fingerprint=fingerprint, document=document, key_id=key_id
    )


def key_id_matches(key_id: object, point: bytes) -> bool:
    """A key id is ``<16 hex of the key's fingerprint>@<replica>``: it must name this key."""
    if not isinstance(key_id, str) or not 0 < len(key_id) <= 255:
        return False
    if not key_id.isascii() or not key_id.isprintable():
        return False
    prefix, separator, replica = key_id.partition("@")
    return bool(separator and replica) and prefix == p256.fingerprint(point)[:16]
