"""P-256 points, ECDH and digest signatures in software: the one place that parses untrusted
public keys."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from enclave.errors import InvalidPublicKey

POINT_LEN = 65  # 0x04 || X (32) || Y (32), SEC1 uncompressed
SCALAR_LEN = 32
CURVE = ec.SECP256R1()
# ECDSA over a SHA-256 digest already made: one immutable description for every signature
# (building it per call cost a sixth of a receipt's signature).
_PREHASHED_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))


def load_public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    """Parse a 65-byte uncompressed SEC1 point, checking that it lies on P-256.

    Raises :class:`InvalidPublicKey` for anything else (compressed points included: the wire
    formats fix the uncompressed encoding, so accepting others would give one key two names).
    """
    if len(point) != POINT_LEN or point[0] != 0x04:
        raise InvalidPublicKey
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, bytes(point))
    except ValueError:
        raise InvalidPublicKey from None


def encode_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """The 65-byte uncompressed SEC1 encoding of a P-256 public key."""
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def parse_public_key_hex(text: str) -> bytes:
    """Decode a hex public key (as carried in JSON and headers) and validate it."""
    try:
        raw = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise InvalidPublicKey from None
    load_public_key(raw)
    return raw


def software_ecdh(private_key: ec.EllipticCurvePrivateKey, peer_point: bytes) -> bytes:
    """ECDH with a validated peer point: the 32-byte X coordinate of the shared point."""
    return private_key.exchange(ec.ECDH(), load_public_key(peer_point))


def fingerprint(point: bytes) -> str:
    """A short, stable name for a public key: hex SHA-256 of the 65-byte point."""
    return hashlib.sha256(point).hexdigest()


def sign_digest(private_key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """ECDSA P-256 over a 32-byte SHA-256 ``digest``: ``r || s``, 32 bytes each."""
    if len(digest) != 32:
        raise ValueError("a SHA-256 digest is 32 bytes")
    r, s = decode_dss_signature(private_key.sign(digest, _PREHASHED_ECDSA))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")
