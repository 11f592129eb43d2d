"""How the gateway authenticates to a hosted facilitator, on every call: a small protocol and
one class per way.

- :class:`StaticHeaders`: the operator's ``Name: value`` lines (an API key), the same on
  every call.
- :class:`CdpJwt`: a short-lived JWT per call, Coinbase Developer Platform style — the
  token format the CDP facilitator documents, signed here with ``cryptography`` (the
  ``cdp-sdk`` package would drag a second web3 major version and Solana into the gateway):

  header ``{"alg": "ES256" | "EdDSA", "kid": <key id>, "typ": "JWT", "nonce": <16 digits>}``;
  claims ``{"sub": <key id>, "iss": "cdp", "aud": null, "iat": now, "nbf": now,
  "exp": now + lifetime, "uris": ["<METHOD> <host[:port]><path>"]}``; sent as
  ``Authorization: Bearer <token>``. The key is a PEM EC P-256 private key (ES256) or the
  base64 of a 64-byte Ed25519 seed + public key (EdDSA), as CDP issues them.

A token names one method and URL and lives ``lifetime`` seconds (CDP's default, 120): one
captured from a call cannot be used for another endpoint, nor for long. Tokens and keys are
never logged; a key that cannot be read is a :class:`ValueError` naming no key material.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pydantic import SecretStr

ISSUER = "cdp"
DEFAULT_LIFETIME = 120  # seconds, CDP's own default
MAX_LIFETIME = 300


class FacilitatorAuth(Protocol):
    """The headers that authenticate one facilitator call."""

    def headers(self, method: str, url: str) -> dict[str, str]:
        """Headers for ``method`` on ``url`` (the full URL of this call)."""
        ...


class StaticHeaders:
    """The same operator headers on every call (a hosted facilitator's API key)."""

    def __init__(self, headers: Mapping[str, SecretStr] | None = None) -> None:
        self._headers = dict(headers or {})

    def headers(self, method: str, url: str) -> dict[str, str]:
        return {name: value.get_secret_value() for name, value in self._headers.items()}


class CdpJwt:
    """A fresh CDP-style JWT per call (see the module docstring), beside ``extra`` headers."""

    def __init__(
        self,
        key_id: str,
        secret: SecretStr,
        *,
        lifetime: int = DEFAULT_LIFETIME,
        extra: Mapping[str, SecretStr] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key_id or any(ord(c) < 0x21 or ord(c) == 0x7F for c in key_id):
            raise ValueError("the facilitator API key id must be printable, without spaces")
        if not 1 <= lifetime <= MAX_LIFETIME:
            raise ValueError(f"the token lifetime must be 1 to {MAX_LIFETIME} seconds")
        if any(name.lower() == "authorization" for name in extra or {}):
            raise ValueError("Authorization is set by the JWT; remove it from the headers file")
        self._key_id = key_id
        self._key = load_private_key(secret)
        self._alg = "ES256" if isinstance(self._key, ec.EllipticCurvePrivateKey) else "EdDSA"
        self._lifetime = lifetime
        self._extra = StaticHeaders(extra)
        self._clock = clock

    @property
    def algorithm(self) -> str:
        return self._alg

    def headers(self, method: str, url: str) -> dict[str, str]:
        return {
            **self._extra.headers(method, url),
            "Authorization": f"Bearer {self.token(method, url)}",
        }

    def token(self, method: str, url: str) -> str:
        parts = urlsplit(url)
        now = int(self._clock())
        header = {
            "alg": self._alg,
            "kid": self._key_id,
            "typ": "JWT",
            "nonce": "".join(secrets.choice("0123456789") for _ in range(16)),
        }
        claims = {
            "sub": self._key_id,
            "iss": ISSUER,
            "aud": None,
            "iat": now,
            "nbf": now,
            "exp": now + self._lifetime,
            "uris": [f"{method.upper()} {parts.netloc}{parts.path}"],
        }
        signing_input = f"{_segment(header)}.{_segment(claims)}".encode("ascii")
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r || s
        else:
            signature = self._key.sign(signing_input)
        return f"{signing_input.decode('ascii')}.{_b64url(signature)}"


def load_private_key(
    secret: SecretStr,
) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    """A CDP API key secret: PEM EC P-256, or base64 of Ed25519 seed (32) + public key (32)."""
    text = secret.get_secret_value().strip().replace("\\n", "\n")
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("the facilitator API key is not a readable PEM private key") from None
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key
        raise ValueError("the facilitator API key must be EC P-256 (ES256) or Ed25519 (EdDSA)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the facilitator API key is neither PEM nor base64") from None
    if len(raw) != 64:
        raise ValueError("a base64 Ed25519 API key must hold 64 bytes (seed + public key)")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if public != raw[32:]:
        raise ValueError("the Ed25519 API key's public half does not match its seed")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(document: dict[str, object]) -> str:
    return _b64url(json.dumps(document, separators=(",", ":")).encode())
