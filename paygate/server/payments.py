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
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from aiohttp import web

from paygate import wire
from paygate.jsonsafe import UntrustedJSONError
from paygate.server.counting import Tokenizer, usage_from
from paygate.server.errors import ApiStyle, GatewayError, InvalidBatch, InvalidJSON, error_response
from paygate.server.proxy import UpstreamReply
from paygate.server.routes import Route
from paygate.server.shaping import ItemPlan, metered_quote, plan_batch, shape_or_refuse
from paygate.upstream.shaping import RequestShaper, Shaped
from paygate.x402 import codec
from paygate.x402.batch import ITEM_PATH as BATCH_ITEM_PATH
from paygate.x402.batch import BadBatch, parse_batch
from paygate.x402.bazaar import Discovery
from paygate.x402.ledger import Meter, PaymentRecord
from paygate.x402.metering import Fallback, Quote, TokenCounts, TokenPrice, TokenPricing
from paygate.x402.models import USAGE_EXTENSION, ResourceInfo
from paygate.x402.networks import to_atomic_ceiling
from paygate.x402.pricing import PricePolicy, model_of
from paygate.x402.processor import PaymentAdmission, PaymentProcessor, Receipt, Refusal
from paygate.x402.schemes import scheme_of

PAID_CACHE_CONTROL = "private, no-store"


class PaymentRefused(GatewayError):
    """The payment step answered instead of admitting: the answer is ready-made (its code is
    the message; the response is the refusal's own)."""

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
        "_shaped_body",
        "_watched",
        "batch_plan",
        "caller_gone",
        "delivered",
        "model",
        "price",
        "route",
        "settle_seconds",
        "status",
        "tokenizer",
        "usage",
    )

    def __init__(
        self,
        route: Route,
        *,
        price: Decimal | None = None,
        admission: PaymentAdmission | None = None,
        processor: PaymentProcessor | None = None,
        quote: Quote | None = None,
        fallback: Fallback = "prompt",
        item_quotes: tuple[Quote, ...] | None = None,
        model: str | None = None,
        shaped_body: bytes | None = None,
        batch_plan: tuple[ItemPlan, ...] | None = None,
    ) -> None:
        self.route = route
        self.model = model  # the model the request named, when its body was read first
        # The model server's stated usage, set by the gateway when the reply has ended.
        self.usage: TokenCounts | None = None
        self.settle_seconds: float | None = None  # how long the settle call took (traces)
        # A batch's items as admission planned and priced them (None: not planned yet).
        self.batch_plan = batch_plan
        # The output-bounded body (paygate.upstream.shaping) when admission shaped it.
        self._shaped_body = shaped_body
        # The engine's tokenizer for this request (set by the gateway): counts an early end.
        self.tokenizer: Tokenizer | None = None
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

    def meter_items(self, items: list[tuple[bool, TokenCounts | None, int]]) -> None:
        """A metered batch's meter: per forwarded item (succeeded, usage, reply bytes) priced
        with its own quote (failed and refused items cost nothing), summed, capped by the
        authorization."""
        admission = self._admission
        if not self.metered or admission is None or admission.meter is not None:
            return
        assert self._item_quotes is not None
        assert self._processor is not None
        assert admission.record is not None
        decimals = self._processor.decimals(admission.record.network)
        plan = self.batch_plan or ()
        items = [item for item, p in zip(items, plan, strict=True) if p.forwarded]
        meters = [
            quote.charge(
                usage,
                source="upstream",
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
        """The body the model server gets instead of the caller's (output bounded; metered:
        stream usage asked for too), or None when admission did not shape it."""
        if self.metered and self._quote is not None and self._item_quotes is None:
            return self._quote.body
        return self._shaped_body

    @property
    def strip_usage(self) -> bool:
        return self._quote is not None and self._quote.strip_usage

    def watch(self, reply: UpstreamReply, counted: _Counted) -> None:
        """The metered reply being streamed, for a meter taken when it ends early."""
        self._watched = (reply, counted)

    async def measure(self, reply: UpstreamReply, *, reply_bytes: int) -> None:
        """Meter a metered reply by the best count there is, once, before :meth:`settle`: the
        usage the engine reported at the end; else its running counts (a stream cut short);
        else the engine's tokenizer on the completion delivered; else the fallback."""
        admission = self._admission
        if not self.metered or admission is None or admission.meter is not None:
            return
        assert self._quote is not None
        if reply.usage is not None:
            self.meter(reply.usage, source="upstream", reply_bytes=reply_bytes)
        elif reply.running_usage is not None:
            self.meter(reply.running_usage, source="running", reply_bytes=reply_bytes)
        else:
            counted = None
            if self.tokenizer is not None:
                counted = await self.tokenizer.count(reply.completion_text)
            if counted is not None:
                usage = usage_from(counted, self._quote.prompt_bound)
                self.meter(usage, source="tokenizer", reply_bytes=reply_bytes)
            else:
                self.meter(None, reply_bytes=reply_bytes)

    def meter(
        self, usage: TokenCounts | None, *, source: str = "upstream", reply_bytes: int
    ) -> None:
        """Record what a metered reply used (None: nothing could be counted), once, before
        :meth:`settle`; the charge follows the token prices, capped by the authorization."""
        admission = self._admission
        if not self.metered or admission is None or admission.meter is not None:
            return
        assert self._quote is not None
        assert self._processor is not None
        assert admission.record is not None
        admission.meter = self._quote.charge(
            usage,
            source=source,
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
    def metered_usage(self) -> Meter | None:
        """A metered payment's meter once taken (what it is charged for), else None."""
        return self._admission.meter if self._admission is not None else None

    @property
    def charged(self) -> int | None:
        """Atomic units this payment settles for (the meter's charge, else the amount)."""
        admission = self._admission
        return admission.owed if admission is not None and admission.paid else None

    @property
    def token_price(self) -> TokenPrice | None:
        """A metered payment's token prices."""
        return self._quote.price if self.metered and self._quote is not None else None

    async def keep_receipt(self, token: str, usage: Mapping[str, Any] | None) -> None:
        """Keep a paid reply's signed receipt, and its usage, in the ledger."""
        admission = self._admission
        if admission is None or admission.record is None or self._processor is None:
            return
        await self._processor.keep_receipt(admission.record, token, usage)

    @property
    def valid_before(self) -> int | None:
        """The paying authorization's expiry (unix seconds): it cannot settle after it."""
        admission = self._admission
        if admission is None or admission.payment is None:
            return None
        if admission.authorized is not None:
            return admission.authorized.valid_before
        return scheme_of(admission.payment).valid_before(admission.payment)

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
                await self.measure(reply, reply_bytes=counted.bytes_seen)
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
        self, request: web.Request, route: Route, *, body: bytes | None = None, client: str = ""
    ) -> AbstractAsyncContextManager[Ticket]:
        """Admit the request for the block (a ticket) or raise :class:`PaymentRefused`;
        ``client`` is the caller's address key (per-address limits of free requests)."""
        ...

    async def close(self, timeout: float) -> None:
        """Wait (bounded) for settlements still running."""
        ...


def carries_payment(headers: Mapping[str, str]) -> bool:
    """The request offers a payment (either x402 version's header)."""
    return wire.PAYMENT_SIGNATURE in headers or wire.X_PAYMENT in headers


@dataclass(frozen=True, slots=True)
class _Terms:
    """What admission prices a request at: its model, price, upto quote, a batch's item quotes
    and plan, the per-item limit checks, and the output-bounded body to forward."""

    model: str | None
    price: Decimal
    quote: Quote | None = None
    items: tuple[Quote, ...] | None = None
    plan: tuple[ItemPlan, ...] | None = None
    checks: tuple[tuple[str, str | None], ...] = ()
    shaped_body: bytes | None = None


def _probe(headers: Mapping[str, str]) -> bool:
    """Neither a payment nor a sign-in: the request can only be answered with a 402."""
    return not carries_payment(headers) and wire.SIGN_IN_WITH_X not in headers


class NoPayments:
    """``payment_mode = "off"``: every request is admitted and nothing is settled."""

    needs_body = False

    @contextlib.asynccontextmanager
    async def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None, client: str = ""
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
        shaper: RequestShaper | None = None,
        model_limits: bool = False,
        discovery: Discovery | None = None,
    ) -> None:
        self._discovery = discovery
        self._batch_max_items = batch_max_items
        self._shaper = shaper
        # A payer limit per model: the body's model must be known before the payer check.
        self._model_limits = model_limits
        self._processor = processor
        self._prices = prices
        self._public_url = public_url
        self._description = description
        self._pricing = pricing if {"upto", "batch-settlement"} & set(processor.schemes) else None

    @property
    def needs_body(self) -> bool:
        economics = self._processor.economics
        return (
            self._prices.needs_model
            or self._pricing is not None
            or (economics is not None and economics.needs_model)
            or self._model_limits
        )

    @property
    def processor(self) -> PaymentProcessor:
        return self._processor

    @contextlib.asynccontextmanager
    async def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None, client: str = ""
    ) -> AsyncIterator[Ticket]:
        if not route.paid:
            yield Ticket(route)
            return
        try:
            terms = self._terms(route, body)
        except (UntrustedJSONError, InvalidJSON, InvalidBatch) as exc:
            if not _probe(request.headers):
                if isinstance(exc, UntrustedJSONError):
                    raise InvalidJSON from None
                raise
            # A paymentless probe (a discovery crawler, a client learning the price) gets its
            # 402 before the body is judged: priced as a request without one.
            terms = self._terms(route, None)
        model, price, quote, items = terms.model, terms.price, terms.quote, terms.items
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
            model=model,
            upto_extra=quote.offer_extra() if quote is not None else (),
            request_model=model,
            items=terms.checks,
            client=client,
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
            fallback=self._pricing.fallback if self._pricing is not None else "prompt",
            item_quotes=items,
            model=quote.model if quote is not None else model,
            shaped_body=terms.shaped_body,
            batch_plan=terms.plan,
        )
        try:
            yield ticket
        except (asyncio.CancelledError, ConnectionResetError):
            ticket.caller_gone = True
            raise
        finally:
            # Shielded: a second cancellation must not cut the ledger write short.
            await asyncio.shield(ticket._finish())

    def _terms(self, route: Route, body: bytes | None) -> _Terms:
        """What the request is priced at (``body`` None: a probe, priced without its body)."""
        if route.target == "batch":
            if body is None:  # a probe: one item's price
                price = self._prices.price(method="POST", path=BATCH_ITEM_PATH, model=None)
                return _Terms(None, price)
            price, quote, items, plan = self._batch_terms(body)
            forwarded = [p for p in plan if p.forwarded]
            return _Terms(
                forwarded[0].model if forwarded else None,
                price,
                quote,
                items,
                plan,
                tuple((f"POST {BATCH_ITEM_PATH}", p.model) for p in forwarded),
            )
        shaped = None
        if body is not None and self._shaper is not None:
            shaped = shape_or_refuse(self._shaper, route.path, body)
        model = shaped.model if shaped is not None else None
        if model is None and body is not None:
            model = model_of(body)
        price = self._prices.price(method=route.method, path=route.path, model=model)
        if shaped is None:
            return _Terms(model, price)
        return _Terms(model, price, self._quote(body or b"", shaped), shaped_body=shaped.body())

    def _quote(self, body: bytes, shaped: Shaped) -> Quote | None:
        """The upto terms of a shaped request (None: no token price, or upto not offered)."""
        if self._pricing is None or self._shaper is None:
            return None
        return metered_quote(self._pricing, self._shaper, body, shaped)

    def _batch_terms(
        self, body: bytes
    ) -> tuple[Decimal, Quote | None, tuple[Quote, ...] | None, tuple[ItemPlan, ...]]:
        """A batch's plan (each item shaped or refused, as a single request), its price (the
        forwarded items' prices summed: a refused item is not priced), its upto terms as one
        quote (the maxima summed; the first forwarded item's model names it) and the
        forwarded items' own quotes."""
        try:
            batch = parse_batch(body, max_items=self._batch_max_items)
        except BadBatch as exc:
            raise InvalidBatch(str(exc)) from None
        plan = plan_batch(self._shaper, batch)
        forwarded = [p for p in plan if p.forwarded]
        price = sum(
            (
                self._prices.price(method="POST", path=BATCH_ITEM_PATH, model=p.model)
                for p in forwarded
            ),
            Decimal(0),
        )
        if self._pricing is None or not forwarded:
            return price, None, None, plan
        quotes = [self._quote(p.source, p.shaped) if p.shaped else None for p in forwarded]
        if any(q is None for q in quotes):
            return price, None, None, plan  # an item without a token price: exact only
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
        # The metered bodies (output bounded) replace the planned ones.
        bodies = iter(q.body for q in items)
        plan = tuple(
            ItemPlan(next(bodies), p.model, p.shaped, p.source) if p.forwarded else p for p in plan
        )
        return price, total, items, plan

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
    route's own error shape; a payment operation's answer (a channel refund: not an error) is
    its message with the operation's headers."""
    if refusal.status < 400:
        headers = {"Cache-Control": "no-store", **refusal.headers}
        return web.json_response(
            {"message": refusal.message}, status=refusal.status, headers=headers
        )
    if refusal.challenge is None:
        return error_response(_RefusalError(refusal), route.api)
    headers = {
        wire.PAYMENT_REQUIRED: codec.encode(refusal.challenge.v2),
        wire.ERROR_HEADER: refusal.code,
        "Cache-Control": "no-store",
        **refusal.headers,
    }
    return web.json_response(refusal.challenge.body(), status=refusal.status, headers=headers)


def settlement_failed_response(
    receipt: Receipt, route: Route, *, sealed: bool = False
) -> web.Response:
    """A reply withheld because its settlement was refused for good, with that receipt."""
    reason = receipt.response.error_reason or "settle_failed"
    error = _RefusalError(
        Refusal(402, "settlement_failed", f"the payment could not be settled: {reason}")
    )
    response = error_response(error, route.api)
    response.headers[receipt.header] = _clear(receipt, sealed).encoded()
    response.headers["Cache-Control"] = "no-store"
    return response


def receipt_headers(receipt: Receipt | None, *, sealed: bool = False) -> dict[str, Any]:
    """Headers of a paid reply: its receipt (when settled already) and no caching. A sealed
    reply's clear receipt says what x402 requires and no usage (that is in the sealed one)."""
    headers: dict[str, Any] = {"Cache-Control": PAID_CACHE_CONTROL}
    if receipt is not None:
        headers[receipt.header] = _clear(receipt, sealed).encoded()
    return headers


def _clear(receipt: Receipt, sealed: bool) -> Receipt:
    extensions = receipt.response.extensions
    if not sealed or not extensions or USAGE_EXTENSION not in extensions:
        return receipt
    rest = {k: v for k, v in extensions.items() if k != USAGE_EXTENSION}
    response = receipt.response.model_copy(update={"extensions": rest or None})
    return dataclasses.replace(receipt, response=response)


def seconds_left(valid_before: int | None) -> float | None:
    """Seconds until an authorization expires (None: no authorization)."""
    return None if valid_before is None else valid_before - time.time()
