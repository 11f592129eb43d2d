"""A whole sealed reply's receipt, sealed to the caller in its header.

A whole reply has nowhere in its body to carry a receipt (an Obol v1 caller reads the body as
the model server's JSON), and a clear header would show the model and token counts beside a
sealed body. So the ``X-Paygate-Receipt`` header of a sealed reply holds the receipt token
sealed to the same party as the body: ``base64url(blob)``, the token padded with spaces to a
multiple of :data:`PAD` bytes first (its length says nothing about the usage it states).

- v2: ``nonce (12) || AES-256-GCM(key, nonce, padded token, aad = LABEL)``, ``key`` from
  HKDF-SHA256 over the reply secret (enclave.envelope_v2.receipt_cipher);
- v1: one envelope v1 blob sealed to the caller's reply key.

Any defect opens to the uniform :class:`DecryptionError`.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag

from enclave import envelope_v1
from enclave.envelope_v2 import ReplyKeys, receipt_cipher
from enclave.errors import DecryptionError
from enclave.keys.base import KeyBackend

PAD = 1024
MAX_HEADER = 8 * 1024  # what an opener reads of the header at most
LABEL = b"paygate sealed receipt"
_NONCE_LEN = 12


def _pad(token: str) -> bytes:
    raw = token.encode("ascii")
    return raw + b" " * (-len(raw) % PAD)


def _unpad(raw: bytes) -> str:
    try:
        return raw.rstrip(b" ").decode("ascii")
    except UnicodeDecodeError:
        raise DecryptionError from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(value: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_HEADER:
        raise DecryptionError
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error):
        raise DecryptionError from None


def seal_v2(keys: ReplyKeys, token: str) -> str:
    nonce = os.urandom(_NONCE_LEN)
    return _b64(nonce + receipt_cipher(keys).encrypt(nonce, _pad(token), LABEL))


def open_v2(keys: ReplyKeys, value: str) -> str:
    blob = _unb64(value)
    if len(blob) <= _NONCE_LEN:
        raise DecryptionError
    try:
        raw = receipt_cipher(keys).decrypt(blob[:_NONCE_LEN], blob[_NONCE_LEN:], LABEL)
    except InvalidTag:
        raise DecryptionError from None
    return _unpad(raw)


def seal_v1(reply_key: bytes, token: str) -> str:
    return _b64(envelope_v1.seal_v1(reply_key, _pad(token)))


def open_v1(key: KeyBackend, value: str) -> str:
    return _unpad(envelope_v1.open_v1(key, _unb64(value)))
