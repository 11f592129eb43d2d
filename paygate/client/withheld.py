"""A paid reply the gateway withheld, sent again with the same payment.

A gateway that could not record a paid reply's charge keeps the reply (503 ``lease_lost``: a
replica stalled past its lease; ``ledger_unavailable``: the ledger refused or missed the write)
and releases the payment at once: nothing was charged, and the same authorization may be sent
again (docs/PAYMENTS.md "The charge's record decides the reply"). Sans-IO: :class:`Withheld`
says whether, and after how long, such an answer is retried; :func:`resend_value` is the payment
header to retry with.

Only those two codes, only on a 503, only for a paid attempt: any other 5xx, a 402, a stream
(its 503 comes before its head, so a stream that started is never withheld this way) goes to
the application. The request body is always replayable: the transport reads it whole, within
``max_request_bytes``, before the first send.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass

import httpx

from paygate import wire
from paygate.client.channels import NAME as CHANNEL_SCHEME
from paygate.client.payer import payment_header_value

# The codes of a reply withheld because its charge could not be recorded (payment released).
WITHHELD_CODES = frozenset({"lease_lost", "ledger_unavailable"})
DEFAULT_RETRIES = 1
DEFAULT_MAX_WAIT = 5.0  # seconds: a longer Retry-After hands the 503 to the application
MAX_RETRIES = 5
MAX_WAIT = 60.0
# The gateway always names a Retry-After; without a readable one, its default.
_UNSTATED_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Withheld:
    """How a withheld paid reply is retried: at most ``retries`` times (0: never), each after
    the gateway's ``Retry-After`` when that is at most ``max_wait`` seconds."""

    retries: int = DEFAULT_RETRIES
    max_wait: float = DEFAULT_MAX_WAIT

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise ValueError("withheld_retries must be an integer")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(f"withheld_retries must be 0..{MAX_RETRIES}")
        if isinstance(self.max_wait, bool) or not isinstance(self.max_wait, int | float):
            raise ValueError("withheld_max_wait must be a number of seconds")
        if not (math.isfinite(self.max_wait) and 0 <= self.max_wait <= MAX_WAIT):
            raise ValueError(f"withheld_max_wait must be 0..{MAX_WAIT:g} seconds")

    def delay(self, response: httpx.Response, tries: int) -> float | None:
        """Seconds to wait before sending the withheld request again, or None: not retried
        (not withheld, retries spent, or the gateway asks for a longer wait than allowed)."""
        if not withheld(response) or tries >= self.retries:
            return None
        wait = retry_after(response.headers.get("Retry-After"))
        return wait if wait <= self.max_wait else None


def withheld(response: httpx.Response) -> bool:
    """The gateway withheld a paid reply whose charge it could not record (payment released)."""
    code = response.headers.get(wire.ERROR_HEADER, "").strip()
    return response.status_code == 503 and code in WITHHELD_CODES


def retry_after(value: str | None) -> float:
    """A ``Retry-After`` in seconds (delta-seconds, however long; a date or anything else:
    the gateway's default)."""
    text = (value or "").strip()
    return float(text) if text.isascii() and text.isdigit() else _UNSTATED_WAIT


def resend_value(value: str, scheme: str) -> str:
    """The payment header value to send again. ``exact``/``upto``: the same authorization (its
    nonce was released, not used). ``batch-settlement``: the same voucher — but without a
    deposit the first attempt carried: that deposit was made on chain before the reply (its
    authorization is spent), so sent again it would be refused; the voucher alone is what the
    payer signs next anyway (the same channel, the same cumulative amount)."""
    if scheme != CHANNEL_SCHEME:
        return value
    document = json.loads(base64.b64decode(value))
    payload = document.get("payload")
    if not isinstance(payload, dict) or payload.get("type") != "deposit":
        return value
    document["payload"] = {
        "type": "voucher",
        "channelConfig": payload["channelConfig"],
        "voucher": payload["voucher"],
    }
    return payment_header_value(document)
