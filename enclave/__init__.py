"""enclave: hardware-held P-256 keys and the sealed envelopes of paygate (v1 Obol-compatible, v2).

Bytes in, bytes out: no HTTP, no web3, no aiohttp, and never an import of ``paygate``.
"""

from enclave.envelope_v1 import ALGORITHM as V1_ALGORITHM
from enclave.envelope_v1 import open_v1, seal_v1
from enclave.envelope_v2 import SUITE as V2_SUITE
from enclave.envelope_v2 import (
    OpenedRequest,
    ReplyKeys,
    ReplyOpener,
    ReplySealer,
    SealedRequest,
    open_reply,
    open_v2,
    seal_reply,
    seal_v2,
)
from enclave.errors import DecryptionError, EnclaveError, InvalidPublicKey, KeyBackendError
from enclave.keys.base import KeyBackend, KeyInfo
from enclave.keys.software import SoftwareKey

CONTENT_TYPE = "application/x-obol-encrypted"


def envelope_version(blob: bytes) -> int | None:
    """The version byte of a sealed body (1 or 2), or None when it is neither."""
    return blob[0] if blob[:1] in (b"\x01", b"\x02") else None


__all__ = [
    "CONTENT_TYPE",
    "V1_ALGORITHM",
    "V2_SUITE",
    "DecryptionError",
    "EnclaveError",
    "InvalidPublicKey",
    "KeyBackend",
    "KeyBackendError",
    "KeyInfo",
    "OpenedRequest",
    "ReplyKeys",
    "ReplyOpener",
    "ReplySealer",
    "SealedRequest",
    "SoftwareKey",
    "envelope_version",
    "open_reply",
    "open_v1",
    "open_v2",
    "seal_reply",
    "seal_v1",
    "seal_v2",
]
