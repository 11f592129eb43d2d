"""A channel's cooperative refund (batch-settlement), sans-IO: the request, its answer, the steps.

The refund is x402's ``refund`` payload — a zero-charge voucher for what was charged, and an
optional amount — sent to the route the channel last paid; the route is not served, and the
seller's receipt names the refund's transaction. It goes unsealed (it carries nothing but the
payment) and without the caller's body. What came back (the amount asked, or the whole rest,
never more than our own count of the channel's remainder) stops counting against
``max_total``; the channel is forgotten once drained.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import httpx

from paygate import wire
from paygate.client.channels import OpenChannel, origin_of
from paygate.client.core import PRESET_PAYMENT
from paygate.client.errors import PaymentRefused, SpendRefused
from paygate.client.payer import Payer, payment_header_value, refusal_reason
from paygate.client.steps import Fetch, Steps
from paygate.x402 import codec
from paygate.x402.models import PaymentPayload, SettleResponse
from paygate.x402.networks import from_atomic, to_atomic

MAX_REFUND_ANSWER = 64 * 1024


@dataclass(frozen=True, slots=True)
class RefundRequest:
    channel: OpenChannel
    request: httpx.Request
    amount: int | None


def refund_requests(
    payer: Payer | None, url: str, amount: Decimal | str | None, timeout: float | None
) -> list[RefundRequest]:
    """One refund request per open channel of ``url``'s origin (``amount``, whole tokens: a
    part of the one channel's remainder; None: all of each)."""
    book = payer.channels if payer is not None else None
    if payer is None or book is None:
        raise SpendRefused("this transport opens no channels (SpendPolicy.channel_deposit)")
    channels = book.channels(url)
    if not channels:
        raise SpendRefused(f"no open channel with {origin_of(url)}")
    if amount is not None and len(channels) > 1:
        raise ValueError("a partial refund names one channel: this origin has several")
    out: list[RefundRequest] = []
    for channel in channels:
        atomic = None if amount is None else to_atomic(Decimal(amount), channel.decimals)
        document = {
            "x402Version": 2,
            "accepted": channel.requirement,
            "payload": book.refund_payload(channel, atomic),
        }
        if channel.resource is not None:
            document["resource"] = channel.resource
        PaymentPayload.model_validate(document)  # what we send must be what we model
        value = payment_header_value(document)
        extensions: dict[str, object] = {PRESET_PAYMENT: (wire.PAYMENT_SIGNATURE, value)}
        if timeout is not None:
            extensions["timeout"] = httpx.Timeout(timeout).as_dict()
        request = httpx.Request(
            "POST",
            channel.url,
            headers={"Content-Type": "application/json"},
            content=b"{}",
            extensions=extensions,
        )
        out.append(RefundRequest(channel, request, atomic))
    return out


def refund_steps(
    payer: Payer | None, url: str, amount: Decimal | str | None, timeout: float | None
) -> Steps[list[SettleResponse]]:
    """A transport's ``refund`` as steps: each request (:func:`refund_requests`) sent through
    the transport itself, each answer counted (:func:`refund_answer`); the receipts."""
    out: list[SettleResponse] = []
    for asked in refund_requests(payer, url, amount, timeout):
        response, body = yield Fetch(asked.request, MAX_REFUND_ANSWER, "the refund's answer")
        assert payer is not None  # refund_requests asks nothing without one
        out.append(refund_answer(payer, asked, response.status_code, response.headers, body))
    return out


def refund_answer(
    payer: Payer, asked: RefundRequest, status: int, headers: httpx.Headers, body: bytes
) -> SettleResponse:
    """The seller's answer to a refund: its receipt, counted (refused → PaymentRefused)."""
    value = headers.get(wire.PAYMENT_RESPONSE)
    receipt: SettleResponse | None = None
    if value:
        try:
            receipt = codec.decode_settle_response(value, header=wire.PAYMENT_RESPONSE)
        except codec.PaymentHeaderError:
            receipt = None
    if status >= 400 or receipt is None or not receipt.success:
        raise PaymentRefused(refusal_reason(headers, body), status=status)
    channel = asked.channel
    # The answer's "amount" is what was refunded (the SDK's and paygate's receipts).
    rest = channel.rest
    stated = receipt.amount
    back = int(stated) if stated is not None and stated.isdigit() else None
    expected = asked.amount if asked.amount is not None else rest
    # What we count as returned: what the seller says, never more than we expect.
    returned = expected if back is None else min(back, expected)
    assert payer.channels is not None
    counted = payer.channels.refunded(channel, returned)
    payer.refunded(from_atomic(counted, channel.decimals))
    return receipt
