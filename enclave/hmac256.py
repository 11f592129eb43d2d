"""HMAC-SHA256 (RFC 2104) from two SHA-256 calls, for the HPKE and reply key schedules.

With OpenSSL 3, ``hmac.digest`` fetches the HMAC implementation on every call: about three
times the cost of the two hashes it computes (4.4 vs 1.5 µs here). The sealed path derives
about a dozen keys per request, so the pads are made with ``bytes.translate`` and the hashes
taken with ``hashlib`` directly. The same bytes as ``hmac.digest(key, msg, "sha256")``
(tests/unit/enclave/test_hmac256.py).
"""

from __future__ import annotations

import hashlib

_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(b ^ 0x36 for b in range(256))  # translate tables: each byte XOR the pad byte
_OPAD = bytes(b ^ 0x5C for b in range(256))


def digest(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 of ``msg`` under ``key``."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    inner = hashlib.sha256(key.translate(_IPAD) + msg).digest()
    return hashlib.sha256(key.translate(_OPAD) + inner).digest()
