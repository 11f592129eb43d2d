"""Reply bodies, sans-IO: open sealed v2 frames as they arrive and spot the in-band receipt.

A paid stream's receipt comes at its end, inside the stream (and for sealed v2, inside the
sealed frames): an SSE comment ``: x402-payment-response <base64>`` after the last event, or an
``"x402PaymentResponse"`` key on NDJSON's final ``"done": true`` line. Both are invisible to
SSE and JSON consumers, so the plaintext passes through unchanged; the scanner only watches it,
a line at a time, within a bound.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from enclave import DecryptionError, ReplyKeys
from paygate import jsonsafe, wire
from paygate.client.errors import PaymentRefused, ReplyOpenFailed
from paygate.wire import NDJSON, SSE
from paygate.x402 import codec
from paygate.x402.inband import NDJSON_KEY as NDJSON_RECEIPT_KEY
from paygate.x402.inband import SSE_PREFIX as SSE_RECEIPT_PREFIX
from paygate.x402.models import SettleResponse

_SSE_DONE = b"data: [DONE]"
SETTLEMENT_PENDING = "settlement_pending"  # the seller settles later: not a refusal
_NDJSON_DONE = re.compile(rb'"done"\s*:\s*true')
# The receipt line is short; an NDJSON final line may carry Ollama's context array. Longer
# lines are passed through unscanned.
MAX_SCANNED_LINE = 1 << 20

ReceiptSink = Callable[[SettleResponse | None, str | None], None]
"""Receives the in-band receipt (or None and an error message if it could not be read)."""


class ReceiptScanner:
    """Watches SSE or NDJSON plaintext for the in-band receipt, one bounded line at a time."""

    def __init__(self, content_type: str | None, sink: ReceiptSink) -> None:
        kind = wire.media_type(content_type)
        self._kind = kind if kind in (SSE, NDJSON) else ""
        self._sink = sink
        self._line = bytearray()
        self._overflow = False
        self.found = False
        self.content_ended = False  # the last event/line of content has been seen
        self.refused: str | None = None  # the receipt says its settlement failed: why

    @property
    def active(self) -> bool:
        return bool(self._kind)

    def feed(self, data: bytes) -> None:
        if not self._kind or self.found:
            return
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._overflow:
                if len(self._line) + len(piece) > MAX_SCANNED_LINE:
                    self._overflow, self._line = True, bytearray()
                else:
                    self._line += piece
            if end < 0:
                return
            if not self._overflow:
                self._line_done(bytes(self._line).rstrip(b"\r"))
            self._line, self._overflow = bytearray(), False
            start = end + 1

    def finish(self) -> None:
        """The stream ended: a last line without a newline still counts."""
        if self._line and not self._overflow and not self.found:
            self._line_done(bytes(self._line).rstrip(b"\r"))
        self._line = bytearray()

    def _line_done(self, line: bytes) -> None:
        if self._kind == SSE:
            if line.startswith(_SSE_DONE):
                self.content_ended = True
            elif line.startswith(SSE_RECEIPT_PREFIX):
                self._receipt(line[len(SSE_RECEIPT_PREFIX) :].decode("ascii", "replace"))
        elif _NDJSON_DONE.search(line):
            self._ndjson(line)

    def _ndjson(self, line: bytes) -> None:
        try:
            data = jsonsafe.loads(line, max_bytes=MAX_SCANNED_LINE)
        except jsonsafe.UntrustedJSONError:
            return
        if not isinstance(data, dict) or data.get("done") is not True:
            return
        self.content_ended = True
        value = data.get(NDJSON_RECEIPT_KEY)
        if isinstance(value, str):
            self._receipt(value)

    def _receipt(self, value: str) -> None:
        self.found = True
        try:
            receipt = codec.decode_settle_response(value, header="in-band receipt")
        except codec.PaymentHeaderError as exc:
            self._sink(None, str(exc))
            return
        if not receipt.success and receipt.error_reason != SETTLEMENT_PENDING:
            # Refused for good after the content went out (a pending one settles later).
            self.refused = receipt.refusal_reason
        self._sink(receipt, None)


class ReplyDecoder(Protocol):
    """Turns the body as received into the body handed to the caller."""

    def feed(self, data: bytes) -> list[bytes]: ...

    def end(self) -> list[bytes]:
        """The body ended; raises if it was incomplete."""
        ...

    @property
    def wants_tail(self) -> bool:
        """The caller stopped reading after the content but before a pending receipt."""
        ...

    @property
    def in_tail(self) -> bool:
        """The content's end was seen and the end is held back for the receipt that follows
        (paygate.client.receipts): it must come within the tail's bounds."""
        ...

    @property
    def refusal(self) -> str | None:
        """The in-band x402 receipt's refusal seen so far (unsigned: its word alone)."""
        ...


class PlainDecoder:
    """A reply in the clear: passed through, scanned for a receipt."""

    def __init__(self, scanner: ReceiptScanner | None) -> None:
        self._scanner = scanner

    def feed(self, data: bytes) -> list[bytes]:
        if self._scanner is not None:
            self._scanner.feed(data)
        return [data] if data else []

    def end(self) -> list[bytes]:
        if self._scanner is not None:
            self._scanner.finish()
            if self._scanner.refused is not None:
                # The seller could not settle the payment: the reply is not paid for, as a
                # whole reply's 402 says; its end is not handed out as a clean one.
                raise PaymentRefused(self._scanner.refused)
        return []

    @property
    def wants_tail(self) -> bool:
        s = self._scanner
        return s is not None and s.active and s.content_ended and not s.found

    @property
    def refusal(self) -> str | None:
        return self._scanner.refused if self._scanner is not None else None

    in_tail = False


class SealedDecoder:
    """A v2 sealed reply: every chunk is authenticated before it is handed out, in order;
    the end without the authenticated final frame is truncation."""

    def __init__(self, keys: ReplyKeys, scanner: ReceiptScanner | None) -> None:
        self._opener = keys.opener()
        self._plain = PlainDecoder(scanner)

    def feed(self, data: bytes) -> list[bytes]:
        try:
            chunks = self._opener.feed(data)
        except DecryptionError:
            raise ReplyOpenFailed(
                "the sealed reply failed to open (tampered or reordered)"
            ) from None
        out: list[bytes] = []
        for chunk in chunks:
            out += self._plain.feed(chunk)
        return out

    def end(self) -> list[bytes]:
        try:
            self._opener.close()
        except DecryptionError:
            raise ReplyOpenFailed("the sealed reply ended before its final frame") from None
        return self._plain.end()

    @property
    def wants_tail(self) -> bool:
        return self._plain.wants_tail

    @property
    def refusal(self) -> str | None:
        return self._plain.refusal

    in_tail = False
