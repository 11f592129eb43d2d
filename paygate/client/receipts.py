"""Check the signed receipt of every paid or sealed reply from an attested appliance.

Where the gateway puts it and what its ``reply_digest`` covers (paygate.server.receipts,
docs/ATTESTATION.md): whole replies carry ``X-Paygate-Receipt`` over the body as received;
streams carry it last, in-band: an SSE comment ``: paygate-receipt <token>`` (digest of the
bytes before that line), a ``paygate_receipt`` key on NDJSON's ``"done": true`` object (digest
of the bytes before that line), and for v2 inside the final sealed frame (digest of the bytes
received before that frame). Sans-IO: a :class:`ReceiptCheck` watches the raw bytes and the
plaintext as the decoder passes them, and raises at the end if anything is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from enclave.envelope_v2 import FRAME_HEADER_LEN, REPLY_HEADER_LEN
from paygate import wire
from paygate.client.attestation import Attested, check_receipt
from paygate.client.errors import ReceiptInvalid
from paygate.client.streams import ReplyDecoder

SSE_PREFIX = b": paygate-receipt "
NDJSON_KEY = "paygate_receipt"
_FINAL_BIT = 1 << 31
_MAX_LINE = 1 << 20


@dataclass
class SignedReceipt:
    """``response.extensions["paygate_receipt"]``: filled in when the reply has been read
    and its receipt verified."""

    claims: dict[str, Any] | None = None
    token: str | None = field(default=None, repr=False)


class ReceiptCheck:
    """Follows one reply; :meth:`end` verifies its receipt (or raises :class:`ReceiptInvalid`)."""

    def __init__(
        self,
        attested: Attested,
        *,
        request_digest: str,
        header_token: str | None,
        content_type: str | None,
        v2_stream: bool,
        result: SignedReceipt,
    ) -> None:
        self._attested = attested
        self._request_digest = request_digest
        self._header = header_token
        self._kind = wire.media_type(content_type)
        self._v2 = v2_stream and header_token is None
        self._result = result
        self._raw = hashlib.sha256()
        # In-band, plaintext: the hash at the start of the current line (plain == raw).
        self._line_start = self._raw.copy()
        self._line = bytearray()
        self._line_too_long = False
        # In-band, v2: the hash before the final frame.
        self._frames = bytearray()
        self._header_seen = False
        self._before_final: Any = None
        self._token: str | None = None
        self._digest_at_token: str | None = None
        self.content_ended = False

    @property
    def wants_tail(self) -> bool:
        return self._header is None and self.content_ended and self._token is None

    def raw(self, data: bytes) -> None:
        """Bytes as received, before any opening."""
        if self._v2:
            self._track_frames(data)
        elif self._header is not None:
            self._raw.update(data)
        # In-band plaintext replies are hashed in plain(), line by line (the same bytes).

    def plain(self, data: bytes) -> None:
        """Bytes as handed to the caller (after opening)."""
        if self._header is not None or self._token is not None:
            return
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start : end + 1]
            if not self._v2 and not self._line:
                self._line_start = self._raw.copy()
            if not self._v2:
                self._raw.update(piece)
            if len(self._line) + len(piece) > _MAX_LINE:
                self._line_too_long = True
            elif not self._line_too_long:
                self._line += piece
            if end < 0:
                return
            if not self._line_too_long:
                self._line_done(bytes(self._line).rstrip(b"\r\n"))
            self._line, self._line_too_long = bytearray(), False
            start = end + 1

    def _line_done(self, line: bytes) -> None:
        if self._kind == wire.SSE:
            if line.startswith(b"data: [DONE]"):
                self.content_ended = True
            elif line.startswith(SSE_PREFIX):
                self._found(line[len(SSE_PREFIX) :].decode("ascii", "replace"))
            return
        if self._kind == wire.NDJSON and b'"done"' in line:
            try:
                value = json.loads(line)
            except (UnicodeDecodeError, ValueError, RecursionError):
                return
            if isinstance(value, dict) and value.get("done") is True:
                self.content_ended = True
                token = value.get(NDJSON_KEY)
                if isinstance(token, str):
                    self._found(token)

    def _found(self, token: str) -> None:
        # The digest is fixed once the receipt is seen: verify now, so that a caller who stops
        # reading right after it (the tail read) still gets a bad receipt raised.
        self._token = token
        if self._v2:
            before = self._before_final
            self._digest_at_token = None if before is None else "sha256:" + before.hexdigest()
        else:
            self._digest_at_token = "sha256:" + self._line_start.hexdigest()
        self._verify(token, self._digest_at_token)

    def _verify(self, token: str | None, digest: str | None) -> None:
        if token is None or digest is None:
            raise ReceiptInvalid("the reply carries no signed receipt")
        self._result.claims = check_receipt(
            self._attested, token, request_digest=self._request_digest, reply_digest=digest
        )
        self._result.token = token

    def _track_frames(self, data: bytes) -> None:
        # Hash frame by frame; remember the hash as it was when the final frame began.
        self._frames += data
        if not self._header_seen:
            if len(self._frames) < REPLY_HEADER_LEN:
                return
            self._raw.update(self._frames[:REPLY_HEADER_LEN])
            del self._frames[:REPLY_HEADER_LEN]
            self._header_seen = True
        while self._before_final is None and len(self._frames) >= FRAME_HEADER_LEN:
            (word,) = struct.unpack(">I", self._frames[:FRAME_HEADER_LEN])
            if word & _FINAL_BIT:
                self._before_final = self._raw.copy()
                self._frames.clear()
                return
            size = FRAME_HEADER_LEN + (word & ~_FINAL_BIT)
            if len(self._frames) < size:
                return
            self._raw.update(self._frames[:size])
            del self._frames[:size]

    def end(self) -> None:
        """The reply was read to its end: verify, or raise."""
        if self._line and not self._line_too_long and self._token is None:
            self._line_done(bytes(self._line).rstrip(b"\r\n"))
        if self._header is not None:
            self._verify(self._header, "sha256:" + self._raw.hexdigest())
        elif self._token is None:
            raise ReceiptInvalid("the reply carries no signed receipt")


class CheckedDecoder:
    """A decoder whose input and output a :class:`ReceiptCheck` watches."""

    def __init__(self, inner: ReplyDecoder, check: ReceiptCheck) -> None:
        self._inner = inner
        self._check = check

    def feed(self, data: bytes) -> list[bytes]:
        self._check.raw(data)
        out = self._inner.feed(data)
        for chunk in out:
            self._check.plain(chunk)
        return out

    def end(self) -> list[bytes]:
        out = self._inner.end()
        for chunk in out:
            self._check.plain(chunk)
        self._check.end()
        return out

    @property
    def wants_tail(self) -> bool:
        return self._inner.wants_tail or self._check.wants_tail
