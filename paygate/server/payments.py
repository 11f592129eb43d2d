"""The payment stage over HTTP: one entry, one exit.

``async with payments.admit(request, route, body=...) as ticket:`` either raises
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
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from typing import Any, Protocol

from aiohttp import web

from paygate import wire
from paygate.jsonsafe import UntrustedJSONError
from paygate.server.errors import ApiStyle, GatewayError, InvalidBatch, InvalidJSON, error_response
from paygate.server.proxy import UpstreamReply
from paygate.server.routes import Route
from paygate.x402 import codec
from paygate.x402.batch import ITEM_PATH as BATCH_ITEM_PATH
from paygate.x402.batch import BadBatch, parse_batch
from paygate.x402.bazaar import Discovery
from paygate.x402.ledger import Meter, PaymentRecord
from paygate.x402.metering import Fallback, Quote, TokenPricing, Usage
from paygate.x402.models import ExactEvmPayload, ResourceInfo
from paygate.x402.networks import to_atomic_ceiling
from paygate.x402.pricing import PricePolicy, model_of
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


class _Counted(Protocol):
    @property
    def bytes_seen(self) -> int: ...


class Ticket:
    """An admitted request's payment, from admission to the end of its reply.

    The reply stage writes ``status`` (the upstream's), ``delivered`` (the whole reply reached
    the caller) and the gateway ``caller_gone``; the payment step's exit reads them.
    """

    __slots__ = (
        "_admission",
        "_fallback",
        "_item_quotes",
        "_processor",
        "_quote",
        "_watched",
        "caller_gone",
        "delivered",
        "model",
        "price",
        "route",
        "settle_seconds",
        "status",
        "usage",
    )

    def __init__(
        self,
        route: Route,
        *,
        price: Decimal | None = None,
        admission: Admission | None = None,
        processor: PaymentProcessor | None = None,
        quote: Quote | None = None,
        fallback: Fallback = "max",
        item_quotes: tuple[Quote, ...] | None = None,
        model: str | None = None,
    ) -> None:
        self.route = route
        self.model = model  # the model the request named, when its body was read first
        # The model server's stated usage, set by the gateway when the reply has ended.
        self.usage: Usage | None = None
        self.settle_seconds: float | None = None  # how long the settle call took (traces)
        self._item_quotes = item_quotes  # a metered batch: one quote per item
        self.price = price
        self._admission = admission
        self._processor = processor
        self._quote = quote
        self._fallback: Fallback = fallback
        self.status = 0
        self.delivered = False
        self.caller_gone = False
        # A metered stream's reply and byte count (set by the reply stage): what the meter
        # reads when the stream ends early (caller gone, cut short).
        self._watched: tuple[UpstreamReply, _Counted] | None = None

    @property
    def free_remaining(self) -> int | None:
        """A free (sign-in-with-x) request: how many are left today."""
        return self._admission.free_remaining if self._admission is not None else None

    @property
    def metered(self) -> bool:
        """Paid with a metered scheme (upto): the charge follows the reported usage."""
        return (
            self._admission is not None
            and self._admission.metered
            and (self._quote is not None or self._item_quotes is not None)
        )

    def item_bodies(self, items: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """A batch's bodies for the model server (metered: each output-bounded)."""
        if self.metered and self._item_quotes is not None:
            return tuple(q.body for q in self._item_quotes)
        return items

    def meter_items(self, items: list[tuple[bool, Usage | None, int]]) -> None:
        """A metered batch's meter: per item (succeeded, usage, reply bytes) priced with its
        own quote (failed items cost nothing), summed, capped by the authorization."""
        admission = self._admission
        if not self.metered or admission is None or admission.meter is not None:
            return
        assert self._item_quotes is not None
        assert self._processor is not None
        assert admission.record is not None
        decimals = self._processor.decimals(admission.record.network)
        meters = [
            quote.charge(
                usage,
                reply_bytes=size,
                decimals=decimals,
                maximum=to_atomic_ceiling(quote.maximum, decimals),
                fallback=self._fallback,
            )
            for quote, (ok, usage, size) in zip(self._item_quotes, items, strict=True)
            if ok
        ]
        sources = {m.source for m in meters} - {"upstream"}
        admission.meter = Meter(
            tokens_in=sum(m.tokens_in for m in meters),
            tokens_out=sum(m.tokens_out for m in meters),
            source=min(sources) if sources else "upstream",
            settle_amount=min(sum(m.settle_amount for m in meters), admission.record.amount),
        )

    @property
    def forward_body(self) -> bytes | None:
        """The body the model server gets instead of the caller's (metered: output bounded,
        stream usage asked for), or None."""
        if not self.metered or self._quote is None or self._item_quotes is not None:
            return None
        return self._quote.body

    @property
    def strip_usage(self) -> bool:
        return self._quote is not None and self._quote.strip_usage

    def watch(self, reply: UpstreamReply, counted: _Counted) -> None:
        """The metered reply being streamed, for a meter taken when it ends early."""
        self._watched = (reply, counted)

    def meter(self, usage: Usage | None, *, reply_bytes: int) -> None:
        """Record what a metered reply used (None: the upstream said nothing), once, before
        :meth:`settle`; the charge follows the token prices, capped by the authorization."""
        admission = self._admission
        if not self.metered or admission is None or admission.meter is not None:
            return
        assert self._quote is not None
        assert self._processor is not None
        assert admission.record is not None
        admission.meter = self._quote.charge(
            usage,
            reply_bytes=reply_bytes,
            decimals=self._processor.decimals(admission.record.network),
            maximum=admission.record.amount,
            fallback=self._fallback,
        )

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
        admission = self._admission
        if admission is None or admission.payment is None:
            return None
        if admission.authorized is not None:
            return admission.authorized.valid_before
        payload = admission.payment.payload
        if isinstance(payload, ExactEvmPayload):
            return int(payload.authorization.valid_before)
        return int(payload.permit2_authorization.deadline)

    async def settle(self) -> Receipt | None:
        """Settle now (a good reply, before its end leaves); the receipt to send, if any."""
        if self._admission is None or self._processor is None:
            return None
        started = time.monotonic()
        try:
            return await self._processor.settle(self._admission)
        finally:
            self.settle_seconds = time.monotonic() - started

    @property
    def scheme(self) -> str | None:
        """The paying scheme's name (None when free)."""
        return self._admission.scheme.name if self.paid and self._admission else None

    async def give_up(self) -> None:
        """Nothing was earned (the upstream failed): release now, before the error is sent,
        so the caller's immediate retry with the same authorization is not "in progress"."""
        self.delivered = False
        await self._finish()

    async def _finish(self) -> None:
        if self._admission is None or self._processor is None:
            return
        if self.settles:
            # A metered reply that ended without its meter (caller gone, stream cut short):
            # what the reader saw, else the fallback.
            if self._watched is not None:
                reply, counted = self._watched
                self.meter(reply.usage, reply_bytes=counted.bytes_seen)
            else:
                self.meter(None, reply_bytes=0)
        await self._processor.finish(
            self._admission,
            succeeded=0 < self.status < 400,
            caller_gone=self.caller_gone,
        )
        if self.settles and self._processor.economics is not None:
            meter = self._admission.meter
            tokens = (
                (meter.tokens_in, meter.tokens_out)
                if meter is not None
                else (self.usage.prompt_tokens, self.usage.completion_tokens)
                if self.usage is not None
                else None
            )
            if tokens is not None:
                await self._processor.record_usage(
                    self._admission, model=self.model, tokens_in=tokens[0], tokens_out=tokens[1]
                )


class PaymentStep(Protocol):
    """The payment stage. Implementations must not log payment headers or signatures."""

    @property
    def needs_body(self) -> bool:
        """True when the price depends on the request body (its ``model``, its tokens): the
        body is read and opened, within the unpaid bounds, before paying."""
        ...

    def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None
    ) -> AbstractAsyncContextManager[Ticket]:
        """Admit the request for the block (a ticket) or raise :class:`PaymentRefused`."""
        ...

    async def close(self, timeout: float) -> None:
        """Wait (bounded) for settlements still running."""
        ...


def carries_payment(headers: Mapping[str, str]) -> bool:
    """The request offers a payment (either x402 version's header)."""
    return wire.PAYMENT_SIGNATURE in headers or wire.X_PAYMENT in headers


def _probe(headers: Mapping[str, str]) -> bool:
    """Neither a payment nor a sign-in: the request can only be answered with a 402."""
    return not carries_payment(headers) and wire.SIGN_IN_WITH_X not in headers


class NoPayments:
    """``payment_mode = "off"``: every request is admitted and nothing is settled."""

    needs_body = False

    @contextlib.asynccontextmanager
    async def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None
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
        pricing: TokenPricing | None = None,
        batch_max_items: int = 16,
        discovery: Discovery | None = None,
    ) -> None:
        self._discovery = discovery
        self._batch_max_items = batch_max_items
        self._processor = processor
        self._prices = prices
        self._public_url = public_url
        self._description = description
        self._pricing = pricing if "upto" in processor.schemes else None

    @property
    def needs_body(self) -> bool:
        economics = self._processor.economics
        return (
            self._prices.needs_model
            or self._pricing is not None
            or (economics is not None and economics.needs_model)
        )

    @property
    def processor(self) -> PaymentProcessor:
        return self._processor

    @contextlib.asynccontextmanager
    async def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None
    ) -> AsyncIterator[Ticket]:
        if not route.paid:
            yield Ticket(route)
            return
        try:
            model, price, quote, items = self._terms(route, body)
        except (UntrustedJSONError, InvalidBatch) as exc:
            if not _probe(request.headers):
                if isinstance(exc, InvalidBatch):
                    raise
                raise InvalidJSON from None
            # A paymentless probe (a discovery crawler, a client learning the price) gets its
            # 402 before the body is judged: priced as a request without one.
            model, price, quote, items = self._terms(route, None)
        description = self._description
        if self._discovery is not None:
            description = self._discovery.description(route.method, route.path)
        admitted = await self._processor.admit(
            request.headers,
            price=price,
            resource=ResourceInfo(
                url=self._resource_url(request),
                description=description,
                mime_type=wire.JSON,
            ),
            route=route.name,
            maximum=quote.maximum if quote is not None else None,
            model=quote.model if quote is not None else None,
            upto_extra=quote.offer_extra() if quote is not None else (),
            request_model=model,
        )
        if isinstance(admitted, Refusal):
            if admitted.challenge is not None and self._discovery is not None:
                challenge = self._discovery.decorate(
                    admitted.challenge, route.method, route.path, request.path
                )
                admitted = dataclasses.replace(admitted, challenge=challenge)
            raise PaymentRefused(refusal_response(admitted, route), admitted.code)
        ticket = Ticket(
            route,
            price=price,
            admission=admitted,
            processor=self._processor,
            quote=quote,
            fallback=self._pricing.fallback if self._pricing is not None else "max",
            item_quotes=items,
            model=quote.model if quote is not None else model,
        )
        try:
            yield ticket
        except (asyncio.CancelledError, ConnectionResetError):
            ticket.caller_gone = True
            raise
        finally:
            # Shielded: a second cancellation must not cut the ledger write short.
            await asyncio.shield(ticket._finish())

    def _terms(
        self, route: Route, body: bytes | None
    ) -> tuple[str | None, Decimal, Quote | None, tuple[Quote, ...] | None]:
        """The request's model, price, upto quote and a batch's item quotes."""
        if route.target == "batch":
            if body is None:  # a probe: one item's price
                price = self._prices.price(method="POST", path=BATCH_ITEM_PATH, model=None)
                return None, price, None, None
            return None, *self._batch_terms(body)
        model = model_of(body) if body is not None else None
        price = self._prices.price(method=route.method, path=route.path, model=model)
        quote = None
        if self._pricing is not None and body is not None:
            quote = self._pricing.quote(route.path, body)
        return model, price, quote, None

    def _batch_terms(self, body: bytes) -> tuple[Decimal, Quote | None, tuple[Quote, ...] | None]:
        """A batch's price (the items' prices summed), its upto terms as one quote (the maxima
        summed; the model of the first item names it) and the items' own quotes."""
        try:
            batch = parse_batch(body, max_items=self._batch_max_items)
        except BadBatch as exc:
            raise InvalidBatch(str(exc)) from None
        price = sum(
            (
                self._prices.price(method="POST", path=BATCH_ITEM_PATH, model=m)
                for m in batch.models
            ),
            Decimal(0),
        )
        if self._pricing is None:
            return price, None, None
        quotes = [self._pricing.quote(BATCH_ITEM_PATH, item) for item in batch.items]
        if any(q is None for q in quotes):
            return price, None, None  # an item without a token price: exact only
        items = tuple(q for q in quotes if q is not None)
        first = items[0]
        total = Quote(
            model=first.model,
            price=first.price,
            prompt_bound=sum(q.prompt_bound for q in items),
            max_tokens=sum(q.max_tokens for q in items),
            maximum=sum((q.maximum for q in items), Decimal(0)),
            body=b"",
            strip_usage=False,
        )
        return price, total, items

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
