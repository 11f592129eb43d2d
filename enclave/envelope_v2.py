"""Envelope v2: HPKE-sealed requests bound to their route; replies as an authenticated stream.

Request blob: ``0x02 || enc (65) || HPKE ciphertext``, single-shot (sequence 0, empty AAD), with
``info = "paygate-envelope-v2 request" || 0x00 || METHOD || 0x00 || PATH``. The plaintext is
``reply_secret (32) || body``: the caller's fresh reply secret rides inside the seal, never in a
header. A request sealed for one route does not open on another, and the version is
authenticated (it selects the info label). Anyone holding only ``cryptography``'s HPKE can build
a request: ``b"\\x02" + Suite(P256, HKDF_SHA256, AES_256_GCM).encrypt(secret + body, pk, info)``.

Keyed request (key epochs, per-replica keys): ``0x02 || 0x00 || len (1) || key_id || enc (65) ||
HPKE ciphertext``, and the key id is appended to ``info`` (``... || 0x00 || key_id``), so it is
authenticated: a request whose key id was rewritten does not open. A request without one (the
``0x04`` of ``enc`` follows the version byte) is the unkeyed form above, unchanged.

Reply: ``0x02 || response_nonce (32) || frame ...``, each frame ``header (4) || AES-256-GCM(key,
base_nonce XOR seq, aad = header, chunk)``, the header a big-endian word whose top bit marks the
final frame and whose low 31 bits give the sealed length; ``key`` and ``base_nonce`` come
from HKDF-SHA256 with salt ``enc || response_nonce`` and IKM ``reply_secret``. The sequence in the
nonce catches reordering, duplication and dropping; the authenticated final flag catches
truncation; the per-request key catches splicing from another reply. Layout: docs/PROTOCOL.md.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import hmac256, hpke
from enclave.errors import DecryptionError
from enclave.keys.base import KeyBackend

VERSION = 0x02
SUITE = hpke.SUITE_NAME
REQUEST_LABEL = b"paygate-envelope-v2 request"
REPLY_KEY_LABEL = b"paygate-envelope-v2 reply key"
REPLY_NONCE_LABEL = b"paygate-envelope-v2 reply nonce"
REQUEST_NONCE_LABEL = b"paygate-envelope-v2 request nonce"
RECEIPT_KEY_LABEL = b"paygate-envelope-v2 receipt key"
REPLY_SECRET_LEN = 32
KEYED = 0x00  # after the version byte: a key id follows (an unkeyed blob has enc's 0x04 there)
MAX_KEY_ID = 255
RESPONSE_NONCE_LEN = 32
REQUEST_OVERHEAD = 1 + hpke.N_ENC + hpke.N_T + REPLY_SECRET_LEN
REPLY_HEADER_LEN = 1 + RESPONSE_NONCE_LEN
FRAME_HEADER_LEN = 4
MAX_CHUNK = 1 << 20  # plaintext bytes per frame: bounds every buffer on both ends
MAX_FRAME = MAX_CHUNK + hpke.N_T
_FINAL_BIT = 1 << 31


@functools.lru_cache(maxsize=256)
def request_info(method: str, path: str, key_id: str | None = None) -> bytes:
    """The HPKE ``info`` that binds a sealed request to its HTTP method and path (no query),
    and to the key id it names, when it names one (the same few for every request: kept)."""
    info = REQUEST_LABEL + b"\x00" + method.upper().encode() + b"\x00" + path.encode()
    return info if key_id is None else info + b"\x00" + key_id.encode()


def _key_id_bytes(key_id: str) -> bytes:
    raw = key_id.encode()
    if not 0 < len(raw) <= MAX_KEY_ID or not key_id.isprintable() or not key_id.isascii():
        raise ValueError("a key id is 1 to 255 printable ASCII characters")
    return raw


def request_key_id(blob: bytes) -> str | None:
    """The key id a v2 request names (None: the unkeyed form). Raises DecryptionError for a
    malformed keyed header; nothing here is authenticated until the request opens."""
    blob = bytes(blob[: 3 + MAX_KEY_ID])
    if len(blob) < 2 or blob[0] != VERSION or blob[1] != KEYED:
        return None
    if len(blob) < 3 or blob[2] == 0 or len(blob) < 3 + blob[2]:
        raise DecryptionError
    try:
        key_id = blob[3 : 3 + blob[2]].decode("ascii")
    except UnicodeDecodeError:
        raise DecryptionError from None
    if not key_id.isprintable():
        raise DecryptionError
    return key_id


@dataclass(frozen=True, slots=True)
class ReplyKeys:
    """What both ends need to seal or open the reply to one request."""

    reply_secret: bytes = field(repr=False)
    enc: bytes
    # HKDF-Extract(enc, reply_secret), the PRK of the request nonce and the receipt key: made
    # on first use and kept as an HMAC key (both are needed for one sealed request's receipt).
    _receipt_prk: hmac256.Key | None = field(default=None, init=False, repr=False, compare=False)

    def sealer(self, *, response_nonce: bytes | None = None) -> ReplySealer:
        return ReplySealer(self, response_nonce=response_nonce)

    def opener(self, *, max_frame: int = MAX_FRAME) -> ReplyOpener:
        return ReplyOpener(self, max_frame=max_frame)


@dataclass(frozen=True, slots=True)
class SealedRequest:
    blob: bytes
    reply: ReplyKeys


@dataclass(frozen=True, slots=True)
class OpenedRequest:
    body: bytes = field(repr=False)
    reply: ReplyKeys


def seal_v2(
    public_key: bytes,
    body: bytes,
    *,
    method: str,
    path: str,
    reply_secret: bytes | None = None,
    key_id: str | None = None,
) -> SealedRequest:
    """Seal a request body to the appliance's key, bound to ``method`` and ``path`` (and to
    ``key_id``, carried in the header for the appliance to pick its key, when given)."""
    return _seal_v2_deterministic(
        public_key,
        body,
        method,
        path,
        reply_secret or os.urandom(REPLY_SECRET_LEN),
        None,
        key_id=key_id,
    )


def _seal_v2_deterministic(
    public_key: bytes,
    body: bytes,
    method: str,
    path: str,
    reply_secret: bytes,
    ephemeral: ec.EllipticCurvePrivateKey | None,
    *,
    key_id: str | None = None,
) -> SealedRequest:
    # Test seam: known-answer vectors fix the ephemeral key and the reply secret.
    if len(reply_secret) != REPLY_SECRET_LEN:
        raise ValueError("reply secret must be 32 bytes")
    header = bytes([VERSION])
    if key_id is not None:
        raw = _key_id_bytes(key_id)
        header += bytes([KEYED, len(raw)]) + raw
    info = request_info(method, path, key_id)
    enc, ctx = hpke.setup_base_s(public_key, info, ephemeral=ephemeral)
    blob = header + enc + ctx.seal(b"", reply_secret + body)
    return SealedRequest(blob=blob, reply=ReplyKeys(reply_secret=reply_secret, enc=enc))


def open_v2(key: KeyBackend, blob: bytes, *, method: str, path: str) -> OpenedRequest:
    """Open a v2 request with any key backend; any defect raises the uniform DecryptionError.

    A keyed request opens only with the key id it names in ``info``: the caller picks ``key``
    by :func:`request_key_id` first."""
    blob = bytes(blob)
    if len(blob) < REQUEST_OVERHEAD or blob[0] != VERSION:
        raise DecryptionError
    key_id = request_key_id(blob)
    start = 1 if key_id is None else 3 + blob[2]
    if len(blob) - start + 1 < REQUEST_OVERHEAD:
        raise DecryptionError
    enc, sealed = blob[start : start + hpke.N_ENC], blob[start + hpke.N_ENC :]
    plaintext = hpke.open_base(enc, key, request_info(method, path, key_id), b"", sealed)
    return OpenedRequest(
        body=plaintext[REPLY_SECRET_LEN:],
        reply=ReplyKeys(reply_secret=plaintext[:REPLY_SECRET_LEN], enc=enc),
    )


def request_nonce(keys: ReplyKeys) -> bytes:
    """The request's fresh nonce for its receipt (enclave.receipts.request_digest): derived from
    the reply secret, so it travels inside the seal and costs no byte on the wire."""
    return _receipt_prk(keys).digest(_REQUEST_NONCE_INFO)


def receipt_cipher(keys: ReplyKeys) -> AESGCM:
    """The AEAD that seals a whole reply's receipt header to the caller (enclave.sealed_receipt)."""
    return AESGCM(_receipt_prk(keys).digest(_RECEIPT_KEY_INFO))


def _receipt_prk(keys: ReplyKeys) -> hmac256.Key:
    """HKDF-SHA256 (RFC 5869) with salt ``enc`` and IKM the reply secret, extracted once per
    request: each 32-byte output is then one expand block, ``HMAC(PRK, info || 0x01)``."""
    prk = keys._receipt_prk
    if prk is None:
        prk = hmac256.Key(hmac256.digest(keys.enc, keys.reply_secret))
        object.__setattr__(keys, "_receipt_prk", prk)  # a cache, not state: frozen otherwise
    return prk


# HKDF-Expand's one block for a 32-byte output: ``info || 0x01``.
_REQUEST_NONCE_INFO = REQUEST_NONCE_LABEL + b"\x01"
_RECEIPT_KEY_INFO = RECEIPT_KEY_LABEL + b"\x01"
_REPLY_KEY_INFO = REPLY_KEY_LABEL + b"\x01"
_REPLY_NONCE_INFO = REPLY_NONCE_LABEL + b"\x01"


def _reply_cipher(keys: ReplyKeys, response_nonce: bytes) -> tuple[AESGCM, int]:
    """The reply's AEAD and base nonce (as an integer): HKDF-SHA256 with one extract shared by
    both labels. Each output fits one SHA-256 block, so HKDF-Expand is one HMAC of
    ``label || 0x01`` (RFC 5869, section 2.3): the same bytes as two full HKDF calls."""
    prk = hmac256.Key(hmac256.digest(keys.enc + response_nonce, keys.reply_secret))
    nonce = prk.digest(_REPLY_NONCE_INFO)[:12]
    return AESGCM(prk.digest(_REPLY_KEY_INFO)), int.from_bytes(nonce, "big")


def _nonce(base: int, seq: int) -> bytes:
    return (base ^ seq).to_bytes(12, "big")


class ReplySealer:
    """Seals a reply chunk by chunk. The first output carries the reply header.

    Chunks larger than ``MAX_CHUNK`` are split, so every frame fits the opener's bound.
    ``finish`` (or ``seal(..., final=True)``) must be called exactly once, last.
    """

    def __init__(self, keys: ReplyKeys, *, response_nonce: bytes | None = None) -> None:
        nonce = response_nonce if response_nonce is not None else os.urandom(RESPONSE_NONCE_LEN)
        if len(nonce) != RESPONSE_NONCE_LEN:
            raise ValueError("response nonce must be 32 bytes")
        self._aead, self._base_nonce = _reply_cipher(keys, nonce)
        self._header: bytes | None = bytes([VERSION]) + nonce
        self._seq = 0
        self._finished = False

    def seal(self, chunk: bytes, *, final: bool = False) -> bytes:
        if self._finished:
            raise RuntimeError("reply already finished")
        if len(chunk) <= MAX_CHUNK:  # the usual case: one frame, one concatenation
            word = (len(chunk) + hpke.N_T) | (_FINAL_BIT if final else 0)
            header = word.to_bytes(4, "big")
            nonce = (self._base_nonce ^ self._seq).to_bytes(12, "big")  # _nonce, inline
            sealed = self._aead.encrypt(nonce, chunk, header)
            self._seq += 1
            self._finished = final
            if self._header is not None:
                lead, self._header = self._header, None
                return lead + header + sealed
            return header + sealed
        out = bytearray(self._header or b"")
        self._header = None
        pieces = [chunk[i : i + MAX_CHUNK] for i in range(0, len(chunk), MAX_CHUNK)] or [b""]
        for index, piece in enumerate(pieces):
            last = final and index == len(pieces) - 1
            header = struct.pack(">I", (len(piece) + hpke.N_T) | (_FINAL_BIT if last else 0))
            out += header + self._aead.encrypt(_nonce(self._base_nonce, self._seq), piece, header)
            self._seq += 1
        self._finished = final
        return bytes(out)

    def finish(self, chunk: bytes = b"") -> bytes:
        return self.seal(chunk, final=True)


class ReplyOpener:
    """Sans-IO opener: ``feed`` bytes as they arrive, get plaintext chunks back in order.

    Buffers at most one frame (``max_frame``). Raises the uniform DecryptionError on any
    tampering; ``close`` raises it if the final frame never came (truncation).
    """

    def __init__(self, keys: ReplyKeys, *, max_frame: int = MAX_FRAME) -> None:
        self._keys = keys
        self._max_frame = max_frame
        self._buf = bytearray()
        self._aead: AESGCM | None = None
        self._base_nonce = 0
        self._seq = 0
        self._done = False
        self._failed = False

    @property
    def done(self) -> bool:
        """True once the authenticated final frame has been opened."""
        return self._done

    def feed(self, data: bytes) -> list[bytes]:
        if self._failed:
            raise DecryptionError
        try:
            return list(self._feed(data))
        except DecryptionError:
            self._failed = True
            raise

    def _feed(self, data: bytes) -> Iterator[bytes]:
        if self._done:
            if data:
                raise DecryptionError  # nothing may follow the final frame
            return
        self._buf += data
        if self._aead is None:
            if len(self._buf) < REPLY_HEADER_LEN:
                if self._buf[:1] not in (b"", bytes([VERSION])):
                    raise DecryptionError
                return
            if self._buf[0] != VERSION:
                raise DecryptionError
            self._aead, self._base_nonce = _reply_cipher(
                self._keys, bytes(self._buf[1:REPLY_HEADER_LEN])
            )
            del self._buf[:REPLY_HEADER_LEN]
        while len(self._buf) >= FRAME_HEADER_LEN:
            header = bytes(self._buf[:FRAME_HEADER_LEN])
            (word,) = struct.unpack(">I", header)
            length, final = word & ~_FINAL_BIT, bool(word & _FINAL_BIT)
            if length < hpke.N_T or length > self._max_frame:
                raise DecryptionError
            if len(self._buf) < FRAME_HEADER_LEN + length:
                return
            sealed = bytes(self._buf[FRAME_HEADER_LEN : FRAME_HEADER_LEN + length])
            del self._buf[: FRAME_HEADER_LEN + length]
            try:
                chunk = self._aead.decrypt(_nonce(self._base_nonce, self._seq), sealed, header)
            except InvalidTag:
                raise DecryptionError from None
            self._seq += 1
            self._done = final
            if chunk:
                yield chunk
            if self._done:
                if self._buf:
                    raise DecryptionError
                return

    def close(self) -> None:
        """The stream ended: raise unless it ended with the authenticated final frame."""
        if self._failed or not self._done:
            self._failed = True
            raise DecryptionError


def seal_reply(keys: ReplyKeys, body: bytes, *, response_nonce: bytes | None = None) -> bytes:
    """A whole (non-streaming) reply as one sealed message."""
    return ReplySealer(keys, response_nonce=response_nonce).seal(body, final=True)


def open_reply(keys: ReplyKeys, blob: bytes) -> bytes:
    """Open a whole reply; raises DecryptionError unless it is complete and untampered."""
    opener = keys.opener()
    out = b"".join(opener.feed(blob))
    opener.close()
    return out
