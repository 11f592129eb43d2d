"""The sealing key of an appliance running inside a TEE (SEV-SNP or TDX guest, Nitro enclave).

A software P-256 key generated at start inside the guest's encrypted memory and never written
anywhere: the TEE's memory encryption is what keeps it from the host, and the attestation
evidence (report_data / public_key) is what binds it to the measured guest. It dies with the
process, so every start has a new key and callers learn it through fresh evidence. Its receipt
key (:class:`~enclave.keys.base.ReceiptSigner`) and its transparency log key (Ed25519,
:class:`~enclave.keys.base.LogSigner`) are made and kept the same way.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from enclave import p256
from enclave.errors import KeyBackendError
from enclave.keys.base import LOG_ED25519, ClosingKey, KeyInfo


class TeeMemoryKey(ClosingKey):
    """A P-256 key that exists only in this process's (encrypted) memory."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._private_key: ec.EllipticCurvePrivateKey | None = private_key
        self._public = p256.encode_public_key(private_key.public_key())
        self._receipt: ec.EllipticCurvePrivateKey | None = ec.generate_private_key(p256.CURVE)
        self._receipt_public = p256.encode_public_key(self._receipt.public_key())
        self._log: ed25519.Ed25519PrivateKey | None = ed25519.Ed25519PrivateKey.generate()
        self._log_public = self._log.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> TeeMemoryKey:
        return cls(ec.generate_private_key(p256.CURVE))

    @property
    def public_key(self) -> bytes:
        return self._public

    def public_key_spki(self) -> bytes:
        """SubjectPublicKeyInfo DER: what a Nitro document's ``public_key`` carries."""
        key = ec.EllipticCurvePublicKey.from_encoded_point(p256.CURVE, self._public)
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def ecdh(self, peer_public_key: bytes) -> bytes:
        if self._private_key is None:
            raise KeyBackendError("the in-memory key was closed")
        return p256.software_ecdh(self._private_key, peer_public_key)

    @property
    def receipt_public_key(self) -> bytes:
        return self._receipt_public

    def sign_digest(self, digest: bytes) -> bytes:
        if self._receipt is None:
            raise KeyBackendError("the in-memory key was closed")
        return p256.sign_digest(self._receipt, digest)

    @property
    def log_key_type(self) -> int:
        return LOG_ED25519

    @property
    def log_public_key(self) -> bytes:
        return self._log_public

    def sign_log(self, message: bytes) -> bytes:
        if self._log is None:
            raise KeyBackendError("the in-memory key was closed")
        return self._log.sign(message)

    def info(self) -> KeyInfo:
        return KeyInfo(
            backend="tee-memory",
            public_key=self._public,
            persistent=False,
            label="in-guest memory",
            details={"storage": "none: generated at start, never written"},
        )

    def close(self) -> None:
        """Drop the key: after this, nothing in the process refers to the scalar."""
        self._private_key = None
        self._receipt = None
        self._log = None

    def __repr__(self) -> str:
        return f"TeeMemoryKey(public_key={self._public.hex()[:18]}…)"
