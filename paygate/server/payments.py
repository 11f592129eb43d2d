"""The payment stage over HTTP: one entry, one exit.

``async with payments.admit(request, route, model=...) as ticket:`` either raises
:class:`PaymentRefused` (a 402 challenge, 400, 409, 503 …) or yields a :class:`Ticket` for the
rest of the request. The reply stage asks the ticket for its receipt (``await ticket.settle()``)
before the reply's end leaves, and records how the reply went (``status``, ``delivered``); the
block's exit finishes the payment exactly once — release what was not earned, settle what is
owed — also when the caller disconnects or anything fails, shielded from cancellation.

The x402 policy itself lives in :mod:`paygate.x402.processor`, free of HTTP; when a payment
settles is a :mod:`paygate.x402.settlement` strategy chosen at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from typing import Any, Protocol

from aiohttp import web

from paygate import wire
from paygate.server.errors import ApiStyle, GatewayError, error_response
from paygate.server.routes import Route
from paygate.x402 import codec
from paygate.x402.ledger import PaymentRecord
from paygate.x402.models import ResourceInfo
from paygate.x402.pricing import PricePolicy
from paygate.x402.processor import Admission, PaymentProcessor, Receipt, Refusal

PAID_CACHE_CONTROL = "private, no-store"


class PaymentRefused(GatewayError):
    """The payment step answered instead of admitting: the answer is ready-made."""

    def __init__(self, response: web.Response, code: str) -> None:
        super().__init__(code)
        self.status = response.status
        self.code = code
        self._response = response

    def render(self, api: ApiStyle) -> web.Response:
        return self._response


class Ticket:
    """An admitted request's payment, from admission to the end of its reply.

    The reply stage writes ``status`` (the upstream's), ``delivered`` (the whole reply reached
    the caller) and the gateway ``caller_gone``; the payment step's exit reads them.
    """

    __slots__ = ("_admission", "_processor", "caller_gone", "delivered", "price", "route", "status")

    def __init__(
        self,
        route: Route,
        *,
        price: Decimal | None = None,
        admission: Admission | None = None,
        processor: PaymentProcessor | None = None,
    ) -> None:
        self.route = route
        self.price = price
        self._admission = admission
        self._processor = processor
        self.status = 0
        self.delivered = False
        self.caller_gone = False

    @property
    def paid(self) -> bool:
        return self._admission is not None and self._admission.paid

    @property
    def settles(self) -> bool:
        """Paid, and the upstream answered below 400: settlement is owed."""
        return self.paid and 0 < self.status < 400

    @property
    def known_receipt(self) -> Receipt | None:
        """A receipt known before the reply (upfront settlement), else None."""
        return self._admission.receipt if self._admission is not None else None

    @property
    def payment_record(self) -> PaymentRecord | None:
        """The ledger's record of this request's payment (None when free)."""
        return self._admission.record if self._admission is not None else None

    @property
    def valid_before(self) -> int | None:
        """The paying authorization's expiry (unix seconds): it cannot settle after it."""
        if self._admission is None or self._admission.payment is None:
            return None
        return int(self._admission.payment.payload.authorization.valid_before)

    async def settle(self) -> Receipt | None:
        """Settle now (a good reply, before its end leaves); the receipt to send, if any."""
        if self._admission is None or self._processor is None:
            return None
        return await self._processor.settle(self._admission)

    async def give_up(self) -> None:
        """Nothing was earned (the upstream failed): release now, before the error is sent,
        so the caller's immediate retry with the same authorization is not "in progress"."""
        self.delivered = False
        await self._finish()

    async def _finish(self) -> None:
        if self._admission is None or self._processor is None:
            return
        await self._processor.finish(
            self._admission,
            succeeded=0 < self.status < 400,
            caller_gone=self.caller_gone,
        )


class PaymentStep(Protocol):
    """The payment stage. Implementations must not log payment headers or signatures."""

    @property
    def needs_model(self) -> bool:
        """True when the price depends on the request body's ``model`` (open before paying)."""
        ...

    def admit(
        self, request: web.Request, route: Route, *, model: str | None = None
    ) -> AbstractAsyncContextManager[Ticket]:
        """Admit the request for the block (a ticket) or raise :class:`PaymentRefused`."""
        ...

    async def close(self, timeout: float) -> None:
        """Wait (bounded) for settlements still running."""
        ...


def carries_payment(headers: Mapping[str, str]) -> bool:
    """The request offers a payment (either x402 version's header)."""
    return wire.PAYMENT_SIGNATURE in headers or wire.X_PAYMENT in headers


class NoPayments:
    """``payment_mode = "off"``: every request is admitted and nothing is settled."""

    needs_model = False

    @contextlib.asynccontextmanager
    async def admit(
        self, request: web.Request, route: Route, *, model: str | None = None
    ) -> AsyncIterator[Ticket]:
        yield Ticket(route)

    async def close(self, timeout: float) -> None:
        return None


class X402Payments:
    """x402 over HTTP: headers in, challenges and receipts out; policy in the processor."""

    def __init__(
        self,
        processor: PaymentProcessor,
        prices: PricePolicy,
        *,
        public_url: str | None = None,
        description: str = "paygate inference",
    ) -> None:
        self._processor = processor
        self._prices = prices
        self._public_url = public_url
        self._description = description

    @property
    def needs_model(self) -> bool:
        return self._prices.needs_model

    @property
    def processor(self) -> PaymentProcessor:
        return self._processor

    @contextlib.asynccontextmanager
    async def admit(
        self, request: web.Request, route: Route, *, model: str | None = None
    ) -> AsyncIterator[Ticket]:
        if not route.paid:
            yield Ticket(route)
            return
        price = self._prices.price(method=route.method, path=route.path, model=model)
        admitted = await self._processor.admit(
            request.headers,
            price=price,
            resource=ResourceInfo(
                url=self._resource_url(request),
                description=self._description,
                mime_type=wire.JSON,
            ),
            route=route.name,
        )
        if isinstance(admitted, Refusal):
            raise PaymentRefused(refusal_response(admitted, route), admitted.code)
        ticket = Ticket(route, price=price, admission=admitted, processor=self._processor)
        try:
            yield ticket
        except (asyncio.CancelledError, ConnectionResetError):
            ticket.caller_gone = True
            raise
        finally:
            # Shielded: a second cancellation must not cut the ledger write short.
            await asyncio.shield(ticket._finish())

    async def close(self, timeout: float) -> None:
        await self._processor.drain(timeout)

    def _resource_url(self, request: web.Request) -> str:
        # The configured public URL, when set, instead of trusting the Host header.
        if self._public_url:
            return self._public_url + request.path
        return str(request.url.with_query(None))


class _RefusalError(GatewayError):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message, headers=dict(refusal.headers))
        self.status = refusal.status
        self.code = refusal.code


def refusal_response(refusal: Refusal, route: Route) -> web.Response:
    """A refusal as HTTP: challenges in x402's shape (v1 body + v2 header), others in the
    route's own error shape."""
    if refusal.challenge is None:
        return error_response(_RefusalError(refusal), route.api)
    headers = {
        wire.PAYMENT_REQUIRED: codec.encode(refusal.challenge.v2),
        wire.ERROR_HEADER: refusal.code,
        "Cache-Control": "no-store",
        **refusal.headers,
    }
    return web.json_response(refusal.challenge.body(), status=refusal.status, headers=headers)


def settlement_failed_response(receipt: Receipt, route: Route) -> web.Response:
    """A reply withheld because its settlement was refused for good, with that receipt."""
    reason = receipt.response.error_reason or "settle_failed"
    error = _RefusalError(
        Refusal(402, "settlement_failed", f"the payment could not be settled: {reason}")
    )
    response = error_response(error, route.api)
    response.headers[receipt.header] = receipt.encoded()
    response.headers["Cache-Control"] = "no-store"
    return response


def receipt_headers(receipt: Receipt | None) -> dict[str, Any]:
    """Headers of a paid reply: its receipt (when settled already) and no caching."""
    headers: dict[str, Any] = {"Cache-Control": PAID_CACHE_CONTROL}
    if receipt is not None:
        headers[receipt.header] = receipt.encoded()
    return headers


def seconds_left(valid_before: int | None) -> float | None:
    """Seconds until an authorization expires (None: no authorization)."""
    return None if valid_before is None else valid_before - time.time()
