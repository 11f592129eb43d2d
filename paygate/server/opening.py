"""The open stage: which envelope a request uses, its plaintext, and how its reply is sealed.

One entry, :func:`open_body`, between admission and forwarding.

- Request: ``Content-Type: application/x-obol-encrypted`` (parameters tolerated) means sealed;
  the first body byte picks v1 or v2. v2 is opened bound to the method and the path (no query).
- Key epochs (:class:`~enclave.keys.epochs.EpochKeys`): a keyed v2 request opens only with the
  live epoch it names (a retired one: ``key_epoch_retired``, another replica's:
  ``wrong_replica``); a request without a key id (v1, unkeyed v2) with the current epoch, then
  the previous one within its grace period. The epoch that opened the request signs its receipt.
- Reply: v1 (Obol) seals the whole reply to the clear ``X-Obol-Reply-Pubkey``; v2 seals to the
  reply secret inside the request, frame by frame for streams. Plaintext needs neither.
Every defect of a sealed body is the one uniform :class:`DecryptionFailed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

import enclave
from enclave import (
    DecryptionError,
    EnclaveError,
    InvalidPublicKey,
    KeyBackend,
    KeyBackendError,
    ReplyKeys,
    envelope_v2,
    p256,
)
from enclave.keys.epochs import Epoch, EpochKeys, EpochRetired, WrongReplica
from paygate import wire
from paygate.server.epochs import caught_up, refusal
from paygate.server.errors import (
    DecryptionFailed,
    InvalidReplyKey,
    KeyUnavailable,
    ReplyKeyNotAllowed,
)

_MAX_PUBKEY_HEADER = 200  # 130 hex digits plus slack for "0x" and spaces


@dataclass(frozen=True, slots=True)
class PlainReply:
    """The reply goes back as the model server sent it."""


@dataclass(frozen=True, slots=True)
class V1Reply:
    """Obol compatibility: the whole reply sealed as one v1 blob to a key from a clear header."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class V2Reply:
    """The reply sealed to the secret carried inside the v2 request; streams stay streams."""

    keys: ReplyKeys = field(repr=False)


ReplyPlan = PlainReply | V1Reply | V2Reply


@dataclass(frozen=True, slots=True)
class OpenedBody:
    """A request body after opening: what goes upstream and how its reply is to be sealed."""

    body: bytes = field(repr=False)
    envelope: int  # 0 plaintext, 1 or 2
    reply: ReplyPlan


def parse_reply_pubkey(value: str) -> bytes:
    """The 65-byte key of an ``X-Obol-Reply-Pubkey`` header; InvalidReplyKey otherwise."""
    if len(value) > _MAX_PUBKEY_HEADER:
        raise InvalidReplyKey
    try:
        return p256.parse_public_key_hex(value)
    except InvalidPublicKey:
        raise InvalidReplyKey from None


async def open_body(
    key: KeyBackend,
    *,
    method: str,
    path: str,
    content_type: str | None,
    body: bytes,
    reply_pubkey: str | None,
    inline: bool = False,
    epochs: EpochKeys | None = None,
    timed: Callable[[KeyBackend], KeyBackend] | None = None,
) -> OpenedBody:
    """Open ``body`` if it is sealed and decide the reply plan.

    A hardware key backend blocks (PKCS#11, TPM), so opening runs in the default executor;
    with ``inline`` (keys in this process's memory: one ECDH, about 60 µs) it runs on the
    loop, which costs less than the hand-off to a thread and back.
    """
    v1_reply = parse_reply_pubkey(reply_pubkey) if reply_pubkey is not None else None
    if not wire.is_sealed(content_type):
        return OpenedBody(body, 0, V1Reply(v1_reply) if v1_reply else PlainReply())
    version = enclave.envelope_version(body)
    if version == 2 and v1_reply is not None:
        raise ReplyKeyNotAllowed
    if epochs is not None and version in (1, 2):
        return await _open_epoch(epochs, version, body, method, path, v1_reply, timed)
    try:
        if version == 1:
            if inline:
                plaintext = enclave.open_v1(key, body)
            else:
                loop = asyncio.get_running_loop()  # a getpid() in 3.11: only when needed
                plaintext = await loop.run_in_executor(None, enclave.open_v1, key, body)
            return OpenedBody(plaintext, 1, V1Reply(v1_reply) if v1_reply else PlainReply())
        if version == 2:
            if inline:
                opened = _open_v2(key, body, method, path)
            else:
                loop = asyncio.get_running_loop()
                opened = await loop.run_in_executor(None, _open_v2, key, body, method, path)
            return OpenedBody(opened.body, 2, V2Reply(opened.reply))
    except KeyBackendError:
        raise KeyUnavailable from None
    except (DecryptionError, EnclaveError, ValueError):
        raise DecryptionFailed from None
    raise DecryptionFailed


def _open_v2(key: KeyBackend, body: bytes, method: str, path: str) -> enclave.OpenedRequest:
    return enclave.open_v2(key, body, method=method, path=path)


async def _open_epoch(
    epochs: EpochKeys,
    version: int,
    body: bytes,
    method: str,
    path: str,
    v1_reply: bytes | None,
    timed: Callable[[KeyBackend], KeyBackend] | None,
) -> OpenedBody:
    """Open with the epoch the request names, or (unkeyed) the current then the previous."""
    candidates: list[Epoch]
    try:
        key_id = envelope_v2.request_key_id(body) if version == 2 else None
        candidates = [epochs.lookup(key_id)] if key_id is not None else epochs.unkeyed()
    except DecryptionError:
        raise DecryptionFailed from None
    except (EpochRetired, WrongReplica) as exc:
        raise refusal(exc) from None
    loop = asyncio.get_running_loop()
    for epoch in candidates:
        key: KeyBackend | None = epoch.key
        if key is None:  # retired between the lookup and now
            raise refusal(EpochRetired())
        if timed is not None:
            key = timed(key)
        try:
            if version == 1:
                plaintext = await loop.run_in_executor(None, enclave.open_v1, key, body)
                opened = OpenedBody(plaintext, 1, V1Reply(v1_reply) if v1_reply else PlainReply())
            else:
                request = await loop.run_in_executor(None, _open_v2, key, body, method, path)
                opened = OpenedBody(request.body, 2, V2Reply(request.reply))
        except KeyBackendError:
            if epoch.key is None:  # destroyed while this request waited for it
                raise refusal(EpochRetired()) from None
            raise KeyUnavailable from None
        except (DecryptionError, EnclaveError, ValueError):
            continue
        epochs.bind(epoch)  # this request's receipt is signed by its epoch's receipt key
        return opened
    raise DecryptionFailed


#: Backends whose key is in this process's memory: their ECDH never blocks.
INLINE_BACKENDS = frozenset({"software", "tee-memory"})


class Opener:
    """The open stage for the gateway: the key backend, and the envelope count per request."""

    def __init__(
        self,
        key: KeyBackend,
        on_opened: Callable[[int], None],
        *,
        epochs: EpochKeys | None = None,
        timed: Callable[[KeyBackend], KeyBackend] | None = None,
    ) -> None:
        self._key = key
        self._on_opened = on_opened
        self._inline = key.info().backend in INLINE_BACKENDS
        self._epochs = epochs
        self._timed = timed

    @property
    def inline(self) -> bool:
        """The key is in this process's memory: an open is one ECDH, never a device trip."""
        return self._inline

    @property
    def epochs(self) -> EpochKeys | None:
        return self._epochs

    async def open(self, request: web.Request, body: bytes) -> OpenedBody:
        await caught_up(self._epochs)  # an unkeyed request, or admission opening it first
        opened = await open_body(
            self._key,
            method=request.method,
            path=request.path,
            content_type=request.headers.get("Content-Type"),
            body=body,
            reply_pubkey=request.headers.get(wire.REPLY_PUBKEY_HEADER),
            inline=self._inline,
            epochs=self._epochs,
            timed=self._timed,
        )
        self._on_opened(opened.envelope)
        return opened
