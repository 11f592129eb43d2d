"""The payment stage over HTTP: headers in; 402 challenges, refusals and PAYMENT-RESPONSE
headers out. No payment policy here.

``async with payments.admit(request, route, body=...) as ticket:`` prices the request (its
model, a metered quote, a batch's plan), hands the headers to the processor's admission and
either raises :class:`HttpPaymentRefusal` (a 402 challenge, 400, 409, 503 …) or yields a
:class:`Ticket` whose ``session`` (:class:`paygate.x402.session.PaymentSession`) owns the
payment for the rest of the request. The block's exit is the session's one exit: it finishes
the payment exactly once — release what was not earned, settle what is owed — also when the
caller disconnects or anything fails, shielded from cancellation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import KW_ONLY, dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web

from paygate import wire
from paygate.jsonsafe import UntrustedJSONError
from paygate.server.errors import ApiStyle, GatewayError, InvalidBatch, InvalidJSON, error_response
from paygate.server.routes import Route
from paygate.server.shaping import ItemPlan, metered_quote, plan_batch, shape_or_refuse
from paygate.upstream.shaping import RequestShaper, Shaped
from paygate.x402 import codec
from paygate.x402.batch import ITEM_PATH as BATCH_ITEM_PATH
from paygate.x402.batch import BadBatch, parse_batch
from paygate.x402.bazaar import Discovery
from paygate.x402.metering import Quote, TokenPricing
from paygate.x402.models import USAGE_EXTENSION, ResourceInfo
from paygate.x402.pricing import PricePolicy, model_of
from paygate.x402.processor import PaymentProcessor
from paygate.x402.refusal import Refusal
from paygate.x402.results import Receipt
from paygate.x402.schemes import SCHEMES
from paygate.x402.session import MeteredTerms, PaymentSession
from paygate.x402.settlements import REPLY_SERVED

PAID_CACHE_CONTROL = "private, no-store"
# Resources (URL and description) kept for the 402s and requirements: more are made afresh.
_RESOURCES = 256


class HttpPaymentRefusal(GatewayError):
    """The payment step answered instead of admitting: the answer is ready-made (its code is
    the message; the response is the refusal's own)."""

    message = "the payment step answered instead of admitting"

    def __init__(self, response: web.Response, code: str, *, server_side: bool = False) -> None:
        super().__init__(code)
        self.status = response.status
        self.code = code
        self.server_side = server_side  # this server's failure, not the caller's doing
        self._response = response

    def render(self, api: ApiStyle) -> web.Response:
        return self._response


class Ticket:
    """An admitted request as the HTTP side holds it: its route, what admission made of its body
    (the body to forward, a batch's plan) and its payment :attr:`session`
    (paygate.x402.session), to which the reply stage reports and which the payment step's exit
    finishes."""

    __slots__ = ("batch_plan", "forward_body", "route", "session", "strip_usage")

    def __init__(
        self,
        route: Route,
        session: PaymentSession | None = None,
        *,
        forward_body: bytes | None = None,
        strip_usage: bool = False,
        batch_plan: tuple[ItemPlan, ...] | None = None,
    ) -> None:
        self.route = route
        self.session = session if session is not None else PaymentSession.unpaid()
        # The body the model server gets instead of the caller's (output bounded; metered:
        # stream usage asked for too), or None when admission did not shape it.
        self.forward_body = forward_body
        # The caller did not ask for stream usage: the gateway asked for it, and strips it.
        self.strip_usage = strip_usage
        # A batch's items as admission planned and priced them (None: not planned yet).
        self.batch_plan = batch_plan


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
        """Admit the request for the block (a ticket) or raise :class:`HttpPaymentRefusal`;
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
    items: tuple[Quote | None, ...] | None = None  # a batch's, per item (None: not forwarded)
    plan: tuple[ItemPlan, ...] | None = None
    checks: tuple[tuple[str, str | None], ...] = ()
    shaped_body: bytes | None = None


def _probe(headers: Mapping[str, str]) -> bool:
    """Neither a payment nor a sign-in: the request can only be answered with a 402."""
    return not carries_payment(headers) and wire.SIGN_IN_WITH_X not in headers


class Unpaid:
    """The ticket of a request that pays nothing, held for the block (no generator: every
    unpaid request takes one)."""

    __slots__ = ("_ticket",)

    def __init__(self, route: Route) -> None:
        self._ticket = Ticket(route)

    async def __aenter__(self) -> Ticket:
        return self._ticket

    async def __aexit__(self, *exc: object) -> None:
        return None


class NoPayments:
    """``payment_mode = "off"``: every request is admitted and nothing is settled."""

    needs_body = False

    def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None, client: str = ""
    ) -> Unpaid:
        return Unpaid(route)

    async def close(self, timeout: float) -> None:
        return None


@dataclass(slots=True, eq=False)
class X402Payments:
    """x402 over HTTP: headers in, challenges and receipts out; admission in the processor,
    the payment after it in the session (paygate.x402.session)."""

    processor: PaymentProcessor
    prices: PricePolicy
    _: KW_ONLY
    public_url: str | None = None
    description: str = "paygate inference"
    pricing: TokenPricing | None = None  # kept only when a scheme of the processor is metered
    batch_max_items: int = 16
    shaper: RequestShaper | None = None
    # A payer limit per model: the body's model must be known before the payer check.
    model_limits: bool = False
    discovery: Discovery | None = None

    _resources: dict[tuple[str, str, str, str | None], ResourceInfo] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not any(SCHEMES[s].metered for s in self.processor.schemes):
            self.pricing = None

    @property
    def needs_body(self) -> bool:
        economics = self.processor.economics
        return (
            self.prices.needs_model
            or self.pricing is not None
            or (economics is not None and economics.needs_model)
            or self.model_limits
        )

    def admit(
        self, request: web.Request, route: Route, *, body: bytes | None = None, client: str = ""
    ) -> AbstractAsyncContextManager[Ticket]:
        if not route.paid:
            return Unpaid(route)
        return Paid(self, request, route, body, client)

    async def _admit_paid(
        self, request: web.Request, route: Route, *, body: bytes | None, client: str
    ) -> Ticket:
        """The ticket of an admitted request (its session entered: the caller's block exit is
        the session's), or :class:`HttpPaymentRefusal`."""
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
        description = self.description
        if self.discovery is not None:
            description = self.discovery.description(route.method, route.path)
        metered = None
        if quote is not None:
            fallback = self.pricing.fallback if self.pricing is not None else "prompt"
            metered = MeteredTerms(quote, items, fallback)
        session = await self.processor.admit(
            request.headers,
            price=price,
            resource=self._resource(request, description),
            route=route.name,
            metered=metered,
            model=model,
            request_model=model,
            items=terms.checks,
            client=client,
        )
        if isinstance(session, Refusal):
            if session.challenge is not None and self.discovery is not None:
                challenge = self.discovery.decorate(
                    session.challenge, route.method, route.path, request.path
                )
                session = dataclasses.replace(session, challenge=challenge)
            raise HttpPaymentRefusal(
                refusal_response(session, route), session.code, server_side=session.server_side
            )
        forward = terms.shaped_body
        if session.metered and quote is not None and items is None:
            forward = quote.body
        await session.__aenter__()  # its exit is the block's (Paid.__aexit__)
        return Ticket(
            route,
            session,
            forward_body=forward,
            strip_usage=quote is not None and quote.strip_usage,
            batch_plan=terms.plan,
        )

    def _terms(self, route: Route, body: bytes | None) -> _Terms:
        """What the request is priced at (``body`` None: a probe, priced without its body)."""
        if route.target == "batch":
            if body is None:  # a probe: one item's price
                price = self.prices.price(method="POST", path=BATCH_ITEM_PATH, model=None)
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
        if body is not None and self.shaper is not None:
            shaped = shape_or_refuse(self.shaper, route.path, body)
        model = shaped.model if shaped is not None else None
        if model is None and body is not None:
            model = model_of(body)
        price = self.prices.price(method=route.method, path=route.path, model=model)
        if shaped is None:
            return _Terms(model, price)
        return _Terms(model, price, self._quote(body or b"", shaped), shaped_body=shaped.body())

    def _quote(self, body: bytes, shaped: Shaped) -> Quote | None:
        """The upto terms of a shaped request (None: no token price, or upto not offered)."""
        if self.pricing is None or self.shaper is None:
            return None
        return metered_quote(self.pricing, self.shaper, body, shaped)

    def _batch_terms(
        self, body: bytes
    ) -> tuple[Decimal, Quote | None, tuple[Quote | None, ...] | None, tuple[ItemPlan, ...]]:
        """A batch's plan (each item shaped or refused, as a single request), its price (the
        forwarded items' prices summed: a refused item is not priced), its upto terms as one
        quote (the maxima summed; the first forwarded item's model names it) and each item's
        own quote (None for an item not forwarded)."""
        try:
            batch = parse_batch(body, max_items=self.batch_max_items)
        except BadBatch as exc:
            raise InvalidBatch(str(exc)) from None
        plan = plan_batch(self.shaper, batch)
        forwarded = [p for p in plan if p.forwarded]
        price = sum(
            (
                self.prices.price(method="POST", path=BATCH_ITEM_PATH, model=p.model)
                for p in forwarded
            ),
            Decimal(0),
        )
        if self.pricing is None or not forwarded:
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
        quoted = iter(items)
        return price, total, tuple(next(quoted) if p.forwarded else None for p in plan), plan

    async def close(self, timeout: float) -> None:
        await self.processor.settlements.drain(timeout)

    def _resource(self, request: web.Request, description: str | None) -> ResourceInfo:
        """What the request pays for, as the 402 and a v1 requirement name it: made once per
        URL and description (the same few paid routes on every request)."""
        # The URL (its query dropped) follows from the scheme, Host header and raw path (an
        # aiohttp request's ``raw_path`` has the query too: only a wider key); a request
        # without ``raw_path`` (the fast front end's) has its raw path as ``path``.
        key = (
            request.scheme,
            request.host,
            getattr(request, "raw_path", None) or request.path,
            description,
        )
        made = self._resources.get(key)
        if made is None:
            made = ResourceInfo(
                url=self._resource_url(request), description=description, mime_type=wire.JSON
            )
            if len(self._resources) >= _RESOURCES:  # Host is the caller's: bounded
                self._resources.clear()
            self._resources[key] = made
        return made

    def _resource_url(self, request: web.Request) -> str:
        # The configured public URL, when set, instead of trusting the Host header.
        if self.public_url:
            return self.public_url + request.path
        return str(request.url.with_query(None))


class Paid:
    """``async with`` a paid request's admission: enter admits (a ticket) or raises
    :class:`HttpPaymentRefusal`; the exit is the payment session's one exit (it finishes the
    payment, whatever ended the block). A class rather than a generator: every paid request
    enters one."""

    __slots__ = ("_body", "_client", "_payments", "_request", "_route", "_session")

    def __init__(
        self,
        payments: X402Payments,
        request: web.Request,
        route: Route,
        body: bytes | None,
        client: str,
    ) -> None:
        self._payments = payments
        self._request = request
        self._route = route
        self._body = body
        self._client = client
        self._session: PaymentSession | None = None

    async def __aenter__(self) -> Ticket:
        ticket = await self._payments._admit_paid(
            self._request, self._route, body=self._body, client=self._client
        )
        self._session = ticket.session
        return ticket

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._session is not None  # entered: an admission that raised has no exit
        await self._session.__aexit__(kind, error, traceback)


class _RefusalError(GatewayError):
    """A processor refusal answered as an error (its status, code and headers)."""

    message = "the payment was refused"

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message, headers=dict(refusal.headers))
        self.status = refusal.status
        self.code = refusal.code


def refusal_response(refusal: Refusal, route: Route) -> web.Response:
    """A refusal as HTTP: challenges in x402's shape (v1 body + v2 header), others in the
    route's own error shape; a payment operation's answer (``Scheme.operation``: a channel's
    refund, not an error) is its message with the operation's headers."""
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


class ChargeNotRecorded(GatewayError):
    """A paid reply withheld because the ledger write that records its charge was refused or
    not made (paygate.x402.session: ``unrecorded``): it never leaves unpaid, nor with a receipt
    claiming a charge nobody recorded. Nothing was charged: the same payment may be sent again."""

    status = 503
    code = "ledger_unavailable"
    message = "the payment ledger could not record the charge: nothing was served or charged"


class ReplyLeaseLost(ChargeNotRecorded):
    """This process was stalled past its lease on the payment and another replica released
    (or took) it: this reply is not charged, so it is not sent."""

    code = "lease_lost"
    message = (
        "this gateway lost the payment's reservation while the reply was made: nothing was "
        "served or charged; send the payment again"
    )


class ReplyServedElsewhere(GatewayError):
    """Settled upfront, this payment's one reply was served to another request carrying it (the
    payer's retry, while this replica was frozen): charged once, for that reply, so this one is
    withheld. Not a 503 to retry (a retry is refused 402, used), nor the caller's fault (a
    frozen replica and an honest retry make it): it doubts nobody."""

    status = 409
    code = REPLY_SERVED
    message = (
        "the reply this payment bought was already served to another request carrying it: "
        "it was charged once, for that reply; this one is not sent"
    )
    server_side = True


def charge_not_recorded(code: str) -> GatewayError:
    """The error that withholds a reply whose charge was not recorded for ``code`` (or, settled
    upfront, whose one reply went to another request: ``payment_already_served``)."""
    if code == REPLY_SERVED:
        return ReplyServedElsewhere()
    kind = ReplyLeaseLost if code == ReplyLeaseLost.code else ChargeNotRecorded
    return kind(retry_after=1)


def settlement_failed_response(
    receipt: Receipt, route: Route, *, sealed: bool = False
) -> web.Response:
    """A reply withheld because its settlement was refused for good, with that receipt."""
    reason = receipt.response.refusal_reason
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
