"""RFC 9180 HPKE, base mode, for one suite: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.

Why our own key schedule rather than only ``cryptography.hazmat.primitives.hpke``: that API is
single-shot and takes a private key object, but the appliance's private key lives in a PKCS#11
token or a TPM that offers nothing but ECDH. Decapsulation here needs only ``KeyBackend.ecdh``.
The same code seals (with a test seam that fixes the ephemeral key for known-answer vectors)
and exposes the exporter. It is checked against the RFC 9180 vectors and against
``cryptography``'s HPKE in both directions (tests/unit/enclave/test_hpke.py).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import hmac256, p256
from enclave.errors import DecryptionError, InvalidPublicKey
from enclave.keys.base import KeyBackend

KEM_ID = 0x0010  # DHKEM(P-256, HKDF-SHA256)
KDF_ID = 0x0001  # HKDF-SHA256
AEAD_ID = 0x0002  # AES-256-GCM
SUITE_NAME = "HPKE-Base-DHKEM-P256-HKDF-SHA256-HKDF-SHA256-AES-256-GCM"
N_ENC = 65
N_SECRET = 32
N_K = 32
N_N = 12
N_T = 16
N_H = 32
MODE_BASE = 0x00

_KEM_SUITE = b"KEM" + struct.pack(">H", KEM_ID)
_HPKE_SUITE = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID)


def _extract(salt: bytes, ikm: bytes) -> bytes:
    if not salt:  # RFC 5869: HashLen zeros; every request's KEM extract has this key
        return _ZERO_SALT.digest(ikm)
    return hmac256.digest(salt, ikm)


_ZERO_SALT = hmac256.Key(b"\x00" * N_H)
_EAE_PRK_PREFIX = b"HPKE-v1" + _KEM_SUITE + b"eae_prk"
_SHARED_SECRET_PREFIX = struct.pack(">H", N_SECRET) + b"HPKE-v1" + _KEM_SUITE + b"shared_secret"
_SECRET_PREFIX = b"HPKE-v1" + _HPKE_SUITE + b"secret"


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    if length <= N_H:  # one block (every length this suite uses): HMAC(PRK, info || 0x01)
        return hmac256.digest(prk, info + b"\x01")[:length]
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac256.digest(prk, block + info + bytes([counter]))
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite + label + info, length)


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    """DHKEM's ExtractAndExpand: ``LabeledExtract("", "eae_prk", dh)`` and one
    ``LabeledExpand(eae_prk, "shared_secret", kem_context, 32)`` block, their fixed label
    prefixes made once (every request takes this path)."""
    eae_prk = _ZERO_SALT.digest(_EAE_PRK_PREFIX + dh)
    return hmac256.digest(eae_prk, _SHARED_SECRET_PREFIX + kem_context + b"\x01")


@dataclass(slots=True)
class Context:
    """An HPKE encryption context (RFC 9180 section 5.2): seal/open with a sequence number."""

    key: bytes = field(repr=False)
    base_nonce: bytes = field(repr=False)
    exporter_secret: bytes = field(repr=False)
    seq: int = 0

    def _next_nonce(self) -> bytes:
        if self.seq >= 1 << (8 * N_N):  # pragma: no cover - 2^96 messages
            raise OverflowError("HPKE sequence number overflow")
        seq = self.seq.to_bytes(N_N, "big")
        return bytes(a ^ b for a, b in zip(self.base_nonce, seq, strict=True))

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        ct = AESGCM(self.key).encrypt(self._next_nonce(), plaintext, aad)
        self.seq += 1
        return ct

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        try:
            pt = AESGCM(self.key).decrypt(self._next_nonce(), ciphertext, aad)
        except InvalidTag:
            raise DecryptionError from None
        self.seq += 1
        return pt

    def export(self, exporter_context: bytes, length: int) -> bytes:
        return _labeled_expand(_HPKE_SUITE, self.exporter_secret, b"sec", exporter_context, length)


@functools.lru_cache(maxsize=256)
def _base_context(info: bytes) -> bytes:
    """``mode || psk_id_hash || info_hash`` of mode_base: the same for every request to one
    route (the info binds method and path), so computed once per info."""
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    return bytes([MODE_BASE]) + psk_id_hash + info_hash


def _schedule_message(label: bytes, length: int) -> Callable[[bytes], bytes]:
    """The one HMAC message of ``LabeledExpand(secret, label, context, length)`` (one block:
    ``length`` is at most 32) for an ``info``, made once per info like its context."""

    @functools.lru_cache(maxsize=256)
    def message(info: bytes) -> bytes:
        labeled = struct.pack(">H", length) + b"HPKE-v1" + _HPKE_SUITE + label
        return labeled + _base_context(info) + b"\x01"

    return message


_KEY_MESSAGE = _schedule_message(b"key", N_K)
_NONCE_MESSAGE = _schedule_message(b"base_nonce", N_N)
_EXPORTER_MESSAGE = _schedule_message(b"exp", N_H)


def _secret(shared_secret: bytes) -> hmac256.Key:
    """The key schedule's ``secret``, as the HMAC key of its two or three expands."""
    return hmac256.Key(hmac256.digest(shared_secret, _SECRET_PREFIX))  # LabeledExtract


def key_schedule(shared_secret: bytes, info: bytes) -> Context:
    """KeySchedule for mode_base (no PSK)."""
    secret = _secret(shared_secret)
    return Context(
        key=secret.digest(_KEY_MESSAGE(info)),
        base_nonce=secret.digest(_NONCE_MESSAGE(info))[:N_N],
        exporter_secret=secret.digest(_EXPORTER_MESSAGE(info)),
    )


def setup_base_s(
    recipient_public_key: bytes, info: bytes, *, ephemeral: ec.EllipticCurvePrivateKey | None = None
) -> tuple[bytes, Context]:
    """Sender setup: returns ``(enc, context)``. ``ephemeral`` is a test seam for vectors."""
    recipient = p256.load_public_key(recipient_public_key)
    eph = ephemeral or ec.generate_private_key(p256.CURVE)
    enc = p256.encode_public_key(eph.public_key())
    dh = eph.exchange(ec.ECDH(), recipient)
    shared = _extract_and_expand(dh, enc + recipient_public_key)
    return enc, key_schedule(shared, info)


def _shared_secret_r(enc: bytes, key: KeyBackend) -> bytes:
    try:
        # Every backend validates the point before its ECDH (KeyBackend.ecdh's contract: an
        # off-curve point never reaches a TPM or token); parsing it here too cost a second
        # on-curve check per sealed request.
        dh = key.ecdh(enc)
    except InvalidPublicKey:
        raise DecryptionError from None
    return _extract_and_expand(dh, enc + key.public_key)


def setup_base_r(enc: bytes, key: KeyBackend, info: bytes) -> Context:
    """Receiver setup over any key backend: the only private-key operation is ECDH.

    A malformed ``enc`` raises :class:`DecryptionError` (uniform with every other open failure).
    """
    return key_schedule(_shared_secret_r(enc, key), info)


def open_base(enc: bytes, key: KeyBackend, info: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    """Single-shot open (RFC 9180 section 6.1, ``OpenBase``): :func:`setup_base_r` and one
    ``open`` at sequence 0, whose nonce is the base nonce. Only the AEAD key and base nonce
    are derived: a single message has no use for the exporter secret (one HMAC fewer).
    Any defect raises :class:`DecryptionError`."""
    secret = _secret(_shared_secret_r(enc, key))
    aead_key = secret.digest(_KEY_MESSAGE(info))
    base_nonce = secret.digest(_NONCE_MESSAGE(info))[:N_N]
    try:
        return AESGCM(aead_key).decrypt(base_nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionError from None
