"""In-band receipts for streamed replies, in forms that standard stream clients ignore.

A stream's headers leave before its settlement, so the receipt travels at its end:

- SSE (``text/event-stream``): a comment line ``: x402-payment-response <base64>`` and a blank
  line after the upstream's last event. SSE parsers skip comment lines (WHATWG HTML §9.2.6).
- NDJSON (``application/x-ndjson``, Ollama): the final ``"done": true`` object is held back
  until settlement and gets one more key, ``x402PaymentResponse``. Ollama clients already meet
  new keys in that object (every release adds some), and no extra line is invented.

The base64 value is the same as the ``PAYMENT-RESPONSE`` header's. Sans-IO; the client's reader
(``paygate.client.streams``) takes the names from here.
"""

from __future__ import annotations

import json
from typing import Any

from paygate import jsonsafe
from paygate.wire import NDJSON, SSE

SSE_PREFIX = b": x402-payment-response "
NDJSON_KEY = "x402PaymentResponse"
_MAX_HELD = 1024 * 1024  # past this, stop looking for the done line and pass everything through


class InbandReceiptWriter:
    """Wraps the reply's plaintext chunks; ``close(receipt)`` gives the stream's last bytes."""

    def __init__(self, media_type: str) -> None:
        self._ndjson = media_type == NDJSON
        self._sse = media_type == SSE
        self._holder = DoneLineHolder()

    def feed(self, chunk: bytes) -> bytes:
        """What to send now for ``chunk``."""
        return self._holder.feed(chunk) if self._ndjson else chunk

    def close(self, receipt: str | None) -> bytes:
        """The stream's remaining bytes, carrying ``receipt`` (base64) when there is one."""
        rest = self._holder.release()
        if receipt is None:
            return rest
        if self._sse:
            return rest + SSE_PREFIX + receipt.encode("ascii") + b"\n\n"
        if self._ndjson and rest and not self._holder.gave_up:
            first, sep, after = rest.partition(b"\n")
            done = done_object(first)
            if done is None:  # not the held done line after all (fuzz-found)
                return rest
            done[NDJSON_KEY] = receipt
            return json.dumps(done, separators=(",", ":")).encode() + sep + after
        return rest


class DoneLineHolder:
    """Holds back an NDJSON stream's final ``"done": true`` line (and anything after it) so
    that something can join it at the end; passes every other line on at once. Past
    ``_MAX_HELD`` bytes held it gives up and passes everything through."""

    def __init__(self) -> None:
        self._partial = b""  # an incomplete line
        self._held = b""  # the done line and anything after it
        self.gave_up = False

    def feed(self, chunk: bytes) -> bytes:
        """What to pass on now for ``chunk``."""
        if self.gave_up:
            return chunk
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        complete, self._partial = data[:cut], data[cut:]
        out = b""
        if self._held:
            self._held += complete
        else:
            start = 0
            for line in complete.splitlines(keepends=True):
                if _is_done_line(line):
                    self._held = complete[start:]
                    break
                out += line
                start += len(line)
        if len(self._held) + len(self._partial) > _MAX_HELD:
            self.gave_up = True
            out, self._held, self._partial = out + self._held + self._partial, b"", b""
        return out

    def release(self) -> bytes:
        """Everything held back (the done line first, if one came)."""
        rest = self._held + self._partial
        self._held = self._partial = b""
        return rest


def done_object(line: bytes) -> dict[str, Any] | None:
    """``line`` as a JSON object (bounded, untrusted), or None."""
    try:
        value = jsonsafe.loads(line, max_bytes=_MAX_HELD)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_done_line(line: bytes) -> bool:
    if b'"done"' not in line:
        return False
    value = done_object(line)
    return value is not None and value.get("done") is True
