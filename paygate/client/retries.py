"""A paid request whose connection dropped before its reply is sent again, charged once.

The payment carries x402's ``payment-identifier`` (the transport names every v2 payment when the
server declares the extension): the server answers a second request with the same identifier
from the first one's record — served (409 ``payment_already_served`` with its receipt), still in
flight (409 ``payment_in_progress``), or, when nothing was taken, by serving it as new — never
by charging again. So only such a payment is re-sent, and only unchanged: the same payment
header (the same authorization, the same identifier) and the same body, re-sealed with a fresh
reply key; at most :data:`MAX_PAID_RETRIES` times, and only after a connection error before any
reply (a timeout is not retried: the first attempt may still be running).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from paygate.client.core import Send, _Attempt
    from paygate.client.payer import SentPayment

MAX_PAID_RETRIES = 2
# The connection failed before a reply: refused, reset, closed without an answer.
DROPPED = (httpx.NetworkError, httpx.RemoteProtocolError)


def send_paid(
    make: Callable[[], _Attempt], record: SentPayment
) -> Generator[Send, Any, tuple[_Attempt, httpx.Response]]:
    """Send the paid attempt ``make`` builds; re-send it when its connection drops and the
    payment has an identifier (the driver throws the transport's error into the flow)."""
    from paygate.client.core import Send

    tries = 0
    while True:
        attempt = make()
        try:
            response: httpx.Response = yield Send(attempt.request)
        except DROPPED:
            if record.identifier is None or tries >= MAX_PAID_RETRIES:
                raise
            tries += 1
            record.retries = tries
            continue
        return attempt, response
