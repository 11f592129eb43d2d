"""Envelope v1: ECIES-P256-HKDF-SHA256-AES256GCM, byte-compatible with the Obol gateway.

Blob: ``0x01 || ephemeral public key (65) || nonce (12) || ciphertext || tag (16)``.
Key: HKDF-SHA256 with an empty salt, IKM = ECDH X coordinate, info = ephemeral pub || recipient
pub. No associated data. Kept only for compatibility: v1 binds nothing to the request, carries
the reply key in a clear header and cannot stream (docs/PROTOCOL.md); v2 fixes all three.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave import p256
from enclave.errors import DecryptionError, InvalidPublicKey
from enclave.keys.base import KeyBackend

VERSION = 0x01
ALGORITHM = "ECIES-P256-HKDF-SHA256-AES256GCM"
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = 1 + p256.POINT_LEN + NONCE_LEN + TAG_LEN  # 94


def _derive_key(shared_x: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=ephemeral_pub + recipient_pub)
    return hkdf.derive(shared_x)


def seal_v1(public_key: bytes, plaintext: bytes) -> bytes:
    """Seal ``plaintext`` to a 65-byte P-256 public key as one v1 blob."""
    return _seal_v1_deterministic(
        public_key, plaintext, ec.generate_private_key(p256.CURVE), os.urandom(NONCE_LEN)
    )


def _seal_v1_deterministic(
    public_key: bytes, plaintext: bytes, ephemeral: ec.EllipticCurvePrivateKey, nonce: bytes
) -> bytes:
    # Test seam: known-answer vectors fix the ephemeral key and nonce. Production uses seal_v1.
    recipient = p256.load_public_key(public_key)
    ephemeral_pub = p256.encode_public_key(ephemeral.public_key())
    shared_x = ephemeral.exchange(ec.ECDH(), recipient)
    key = _derive_key(shared_x, ephemeral_pub, public_key)
    return bytes([VERSION]) + ephemeral_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, None)


def open_v1(key: KeyBackend, blob: bytes) -> bytes:
    """Open a v1 blob with any key backend.

    Every malformed, tampered or misaddressed blob raises the same :class:`DecryptionError`.
    A failing backend (token removed, TPM gone) raises its own KeyBackendError instead: that is
    an operational fault, not a property of the blob, so it reveals nothing about the blob.
    """
    blob = bytes(blob)
    if len(blob) < OVERHEAD or blob[0] != VERSION:
        raise DecryptionError
    ephemeral_pub = blob[1 : 1 + p256.POINT_LEN]
    nonce = blob[1 + p256.POINT_LEN : 1 + p256.POINT_LEN + NONCE_LEN]
    sealed = blob[1 + p256.POINT_LEN + NONCE_LEN :]
    try:
        # Validate in software first: an off-curve point never reaches the hardware.
        p256.load_public_key(ephemeral_pub)
    except InvalidPublicKey:
        raise DecryptionError from None
    shared_x = key.ecdh(ephemeral_pub)
    aes_key = _derive_key(shared_x, ephemeral_pub, key.public_key)
    try:
        return AESGCM(aes_key).decrypt(nonce, sealed, None)
    except InvalidTag:
        raise DecryptionError from None
