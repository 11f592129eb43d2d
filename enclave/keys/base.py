"""The one small interface every key backend implements.

A backend holds one P-256 private key and offers exactly what the envelopes need: its public key
and ECDH with a peer's point. Hardware backends keep the private key inside the token or TPM;
the scalar never exists in this process. Signing receipts is a separate protocol,
:class:`ReceiptSigner`, with a second key of its own (never the ECDH key): a backend that
offers it keeps both keys in the same custody.

Backends are synchronous and may block (a PKCS#11 call, a TPM round trip): async callers run
them in an executor. Each backend serialises its own calls, so one instance can be shared by
threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, runtime_checkable


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What an operator or a caller may know about a key: nothing secret."""

    backend: str  # "software" | "pkcs11" | "tpm" | "tee-memory"
    public_key: bytes  # 65-byte uncompressed P-256 point
    persistent: bool  # survives a restart of the appliance
    label: str = ""
    details: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class KeyBackend(Protocol):
    """A P-256 private key that can do ECDH and never hands out its scalar."""

    @property
    def public_key(self) -> bytes:
        """The 65-byte uncompressed SEC1 point (0x04 || X || Y)."""
        ...

    def ecdh(self, peer_public_key: bytes) -> bytes:
        """ECDH with a peer's 65-byte point; returns the 32-byte X coordinate of the shared point.

        Raises :class:`enclave.errors.InvalidPublicKey` for a point that is not on P-256 and a
        :class:`enclave.errors.KeyBackendError` when the backend itself fails.
        """
        ...

    def info(self) -> KeyInfo:
        """A description of the key for operators (no secrets)."""
        ...

    def close(self) -> None:
        """Release sessions and handles. Idempotent."""
        ...


@runtime_checkable
class ReceiptSigner(Protocol):
    """A P-256 signing key beside the ECDH key, for signed receipts and unattested evidence."""

    @property
    def receipt_public_key(self) -> bytes:
        """The 65-byte uncompressed point of the receipt-signing key."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA P-256 over a 32-byte SHA-256 ``digest``: the 64-byte ``r || s``.

        Raises :class:`enclave.errors.KeyBackendError` when the backend fails.
        """
        ...


#: Signed-note signature types of a log key (c2sp.org/signed-note).
LOG_ED25519 = 0x01
LOG_ECDSA = 0x02


@runtime_checkable
class LogSigner(Protocol):
    """The transparency log's checkpoint key, a third key beside the ECDH and receipt keys.

    Ed25519 (signed-note type 0x01) where the keys live in this process's memory; ECDSA P-256
    (type 0x02, the only signing curve the TPM and PKCS#11 backends have) inside the TPM or
    token. docs/TRANSPARENCY.md says why.
    """

    @property
    def log_key_type(self) -> int:
        """0x01 (Ed25519) or 0x02 (ECDSA P-256)."""
        ...

    @property
    def log_public_key(self) -> bytes:
        """The 32-byte Ed25519 key, or the DER SubjectPublicKeyInfo of the P-256 key."""
        ...

    def sign_log(self, message: bytes) -> bytes:
        """The note signature over ``message``: Ed25519, or ECDSA-SHA256 in ASN.1 DER."""
        ...


def spki_of_point(point: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a 65-byte P-256 point (a type 0x02 note key)."""
    from cryptography.hazmat.primitives import serialization

    from enclave import p256

    return p256.load_public_key(point).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def der_signature(raw: bytes) -> bytes:
    """ASN.1 DER of a 64-byte ``r || s`` ECDSA signature."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


class ClosingKey:
    """Mixin: ``with Backend.open(...) as key:`` closes the key (sessions, handles) on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
