"""A hosted facilitator's JWT check, as Coinbase's CDP documents it, for the dev facilitator.

Verified with PyJWT — a different implementation from the gateway's signer
(``paygate.x402.facilitator_auth``), so a token both accept follows the format, not a shared
bug. Refused: no ``Authorization: Bearer``, a bad signature or algorithm, another key id,
an issuer other than ``cdp``, ``nbf`` in the future, ``exp`` past, a lifetime over
``max_lifetime``, no header nonce, and a ``uris`` claim that is not exactly this call's
``"<METHOD> <host><path>"`` (a token taken from /verify does not open /settle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

ALGORITHMS = ("ES256", "EdDSA")


@dataclass(frozen=True, slots=True)
class JwtGuard:
    key_id: str
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey = field(repr=False)
    max_lifetime: int = 300
    leeway: int = 0

    def refuse(self, authorization: str | None, method: str, host: str, path: str) -> str | None:
        """None when the call's token is good, else the reason it is refused."""
        if not authorization or not authorization.startswith("Bearer "):
            return "missing_token"
        token = authorization.removeprefix("Bearer ").strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return "malformed_token"
        if header.get("alg") not in ALGORITHMS or header.get("typ") != "JWT":
            return "bad_algorithm"
        if header.get("kid") != self.key_id:
            return "unknown_key"
        if not isinstance(header.get("nonce"), str) or not header["nonce"]:
            return "no_nonce"
        options: dict[str, Any] = {"require": ["exp", "nbf", "iss", "sub"], "verify_aud": False}
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=[header["alg"]],
                issuer="cdp",
                leeway=self.leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            return "expired_token"
        except jwt.ImmatureSignatureError:
            return "token_not_yet_valid"
        except jwt.PyJWTError:
            return "invalid_token"
        if claims.get("sub") != self.key_id:
            return "wrong_subject"
        if claims["exp"] - claims["nbf"] > self.max_lifetime:
            return "lifetime_too_long"
        if claims.get("uris") != [f"{method.upper()} {host}{path}"]:
            return "wrong_uri"
        return None
