"""One request, top to bottom: route → admission → open → forward → reply → finish.

Each stage is one module with one entry that takes what the previous stage produced:

====================  ==========================================  ===========================
stage                 entry                                       produces
====================  ==========================================  ===========================
route                 ``routes.RouteTable.match``                  ``RouteMatch`` or 404
admission             ``admission.Admission.admit`` (async with)   ``Admitted``: ticket, body
open                  ``opening.Opener.open``                      ``OpenedBody``: plaintext,
                                                                   reply plan
forward               ``proxy.Upstream.exchange`` (async with)     ``UpstreamReply``
reply                 ``replies.Replies.send``                     the response
finish                the exit of ``admit`` (the payment ticket)   release or settle, once
====================  ==========================================  ===========================

The one aiohttp handler is :meth:`Gateway.handle`, mounted on every path so that the closed
route table, not aiohttp's router, decides what exists.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from paygate import jsonsafe
from paygate.jsonsafe import UntrustedJSONError
from paygate.server.admission import Admission
from paygate.server.counting import Tokenizer
from paygate.server.epochs import caught_up, check_key_header
from paygate.server.errors import GatewayError, InvalidBatch, QueryNotAllowed, RouteNotFound
from paygate.server.frontend import running_loop
from paygate.server.health import LocalHandler
from paygate.server.isolation import tenant_of
from paygate.server.limits import ConcurrencyLimiter
from paygate.server.logs import facts
from paygate.server.metrics import Metrics
from paygate.server.opening import Opener, PlainReply
from paygate.server.payments import HttpPaymentRefusal
from paygate.server.proxy import upstream_request_headers
from paygate.server.receipts import request_facts, request_nonce_header
from paygate.server.replies import Replies
from paygate.server.routes import RouteMatch, RouteTable, Target
from paygate.server.routing import Routed, Router
from paygate.server.shaping import ItemPlan, plan_batch, shape_or_refuse
from paygate.server.tracing import Tracing, span_facts
from paygate.upstream.shaping import RequestShaper
from paygate.x402.batch import ITEM_PATH, BadBatch, item_error, parse_batch
from paygate.x402.pricing import model_of
from paygate.x402.session import PaymentSession


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """The batch endpoint's bounds, fixed at start."""

    max_items: int = 16
    concurrency: int = 4
    item_reply_bytes: int = 4 * 1024 * 1024


@dataclass(slots=True, kw_only=True, eq=False)
class Gateway:
    """The request path; every stage is built once in the app factory and passed in."""

    routes: RouteTable
    admission: Admission
    opener: Opener
    upstream: Router
    replies: Replies
    limiter: ConcurrencyLimiter
    metrics: Metrics
    local: Mapping[Target, LocalHandler]
    batch: BatchLimits = field(default_factory=BatchLimits)
    tracing: Tracing | None = None
    shaper: RequestShaper | None = None

    def forwards(self, method: str, path: str) -> bool:
        """Whether ``method path`` is a forwarding route (paygate.server.frontend serves it)."""
        match = self.routes.match(method, path)
        return match is not None and match.route.target == "upstream"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        match = self.routes.match(request.method, request.path)
        if match is None:
            self.metrics.observe("unmatched", 404)
            raise RouteNotFound
        route = match.route
        info = facts(request)
        info.route = route.name
        loop = running_loop(request)
        started = loop.time()
        try:
            if request.query_string and not set(request.query) <= route.query:
                raise QueryNotAllowed  # never forwarded, never echoed
            if route.target == "batch":
                response = await self._batch(request, match)
            elif route.target != "upstream":
                local = self.local.get(route.target)
                if local is None:  # e.g. attestation on a gateway built without it
                    raise RouteNotFound
                response = await local(request)
            else:
                response = await self._forward(request, match, started)
        except GatewayError as exc:
            if isinstance(exc, HttpPaymentRefusal):
                info.payment = exc.code
            self.metrics.observe(route.name, exc.status)
            self.metrics.error(exc.code)
            raise
        finally:
            self.metrics.duration(route.name, loop.time() - started)
        self.metrics.observe(route.name, response.status)
        return response

    async def _forward(
        self, request: web.Request, match: RouteMatch, started: float
    ) -> web.StreamResponse:
        info = facts(request)
        nonce = request_nonce_header(request.headers)  # a bad one is refused before paying
        await caught_up(self.opener.epochs)  # another worker's rotation: opened off the loop
        check_key_header(self.opener.epochs, request.headers)  # before any payment work
        async with self.admission.admit(request, match.route) as admitted:
            info.payment = "paid" if admitted.ticket.session.paid else "free"
            opened = admitted.opened or await self.opener.open(request, admitted.body)
            headers = upstream_request_headers(
                request.headers, client_address=admitted.client, scheme=request.scheme
            )
            # The output-bounded body: shaped at admission (priced), else here (payments
            # off, or a price that did not need the body) by the same function.
            ticket = admitted.ticket
            body = ticket.forward_body
            if body is None:
                shaped = None
                if self.shaper is not None:
                    shaped = shape_or_refuse(self.shaper, match.route.path, opened.body)
                body = shaped.body() if shaped is not None else opened.body
            if body:
                headers["Content-Type"] = "application/json"
            if self.tracing is not None:
                self.tracing.inject(headers)  # the model server joins the request's trace
            named = _model_named(opened.body)  # one parse for the routing, receipt and trace
            model = named or match.params.get("model")
            # Several upstreams: the gateway lists the models itself (the union).
            listing = self.upstream.models_listing(request.method, match.route.path)
            if listing is not None:
                return await self.replies.send_document(
                    opened.reply, admitted.ticket, listing, items=[(True, None, len(listing))]
                )
            routed = Routed()
            with self.limiter.slot():
                async with self.upstream.exchange(
                    request.method,
                    match.upstream_path,
                    body=body,
                    headers=headers,
                    route_path=match.route.path,
                    model=model,
                    tenant=tenant_of(ticket.session.admission.record, admitted.client),
                    routed=routed,
                ) as reply:
                    self.metrics.upstream_latency(match.route.name, reply.waited)
                    if ticket.session.metered and self.shaper is not None:
                        # The tokenizer of the engine that answered (routed: one of several).
                        ticket.session.counter = Tokenizer(
                            self.upstream.client_of(routed.upstream),
                            self.shaper.rules_for(model),
                            match.route.path,
                            body,
                        )
                        reply.keep_text()  # what a cut stream's engine tokenizer counts
                    # The signed receipt's facts (a canonical-JSON digest of the request): only
                    # a paid or sealed reply carries one.
                    signed = ticket.session.paid or not isinstance(opened.reply, PlainReply)
                    try:
                        return await self.replies.send(
                            request,
                            reply,
                            opened.reply,
                            admitted.ticket,
                            started=started,
                            facts=request_facts(
                                request,
                                received=admitted.body,
                                opened=opened,
                                nonce=nonce,
                                model=named,
                                model_digest=routed.digest,
                            )
                            if signed
                            else None,
                        )
                    finally:
                        info.upstream_seconds = reply.waited
                        ticket.session.usage = reply.usage  # known once the body has ended
                        if self.tracing is not None:
                            _describe(request, ticket.session, named)

    async def _batch(self, request: web.Request, match: RouteMatch) -> web.StreamResponse:
        """``POST /v1/batch/chat/completions``: one admission (one payment for every item that
        passed it), then each item forwarded to ``/v1/chat/completions`` as a single request
        would be (shaped the same way; at most ``concurrency`` at once, each holding an
        upstream slot), answered ``{"results": [...]}`` in order.

        ``exact`` moves the signed value or nothing (EIP-3009), so a paid exact batch is whole
        or not at all: when a forwarded item fails, nothing is settled and the completions
        of the others are withheld (``batch_incomplete``). ``upto`` charges each item served."""
        limits = self.batch
        nonce = request_nonce_header(request.headers)
        await caught_up(self.opener.epochs)
        check_key_header(self.opener.epochs, request.headers)
        async with self.admission.admit(request, match.route) as admitted:
            opened = admitted.opened or await self.opener.open(request, admitted.body)
            ticket = admitted.ticket
            plan = ticket.batch_plan
            if plan is None:
                try:
                    batch = parse_batch(opened.body, max_items=limits.max_items)
                except BadBatch as exc:
                    raise InvalidBatch(str(exc)) from None
                plan = plan_batch(self.shaper, batch)
                ticket.batch_plan = plan
            headers = upstream_request_headers(
                request.headers, client_address=admitted.client, scheme=request.scheme
            )
            headers["Content-Type"] = "application/json"
            gate = asyncio.Semaphore(limits.concurrency)
            tenant = tenant_of(ticket.session.admission.record, admitted.client)

            async def one(item: ItemPlan) -> tuple[Any, bool, Any, int]:
                if item.refusal is not None or item.body is None:
                    message, code, status = item.refusal or ("refused", "invalid_batch_item", 400)
                    return item_error(message, code, status), False, None, 0
                async with gate:
                    try:
                        with self.limiter.slot():
                            async with self.upstream.exchange(
                                "POST",
                                ITEM_PATH,
                                body=item.body,
                                headers=headers,
                                model=item.model,
                                tenant=tenant,
                            ) as reply:
                                raw = await reply.read_bounded(limits.item_reply_bytes)
                                status, usage = reply.status, reply.usage
                    except GatewayError as exc:
                        return item_error(str(exc), exc.code, exc.status), False, None, 0
                if raw is None:
                    return (
                        item_error("the reply is too large", "reply_too_large", 502),
                        False,
                        None,
                        0,
                    )
                try:
                    document = jsonsafe.loads(raw, max_bytes=limits.item_reply_bytes)
                except jsonsafe.UntrustedJSONError:
                    return item_error("the reply is not JSON", "bad_gateway", 502), False, None, 0
                if status >= 400:  # the model server's own error, with its status
                    return item_error(_message(document), "upstream_error", status), False, None, 0
                return document, True, usage, len(raw)

            answers = await asyncio.gather(*(one(item) for item in plan))
            if ticket.session.paid and not ticket.session.metered:
                answers = _whole_or_nothing(plan, answers)
            body = json.dumps(
                {"results": [document for document, _, _, _ in answers]}, separators=(",", ":")
            ).encode()
            return await self.replies.send_document(
                opened.reply,
                ticket,
                body,
                items=[(ok, usage, size) for _, ok, usage, size in answers],
                facts=request_facts(
                    request, received=admitted.body, opened=opened, nonce=nonce, model=None
                ),
            )


def _describe(request: web.Request, session: PaymentSession, model: str | None) -> None:
    """What the request's span says (counts and timings only, never content)."""
    span = span_facts(request)
    span.model = model
    span.scheme = session.scheme
    span.settle_seconds = session.settle_seconds
    if session.usage is not None:
        span.input_tokens = session.usage.prompt_tokens
        span.output_tokens = session.usage.completion_tokens


def _whole_or_nothing(
    plan: tuple[ItemPlan, ...], answers: list[tuple[Any, bool, Any, int]]
) -> list[tuple[Any, bool, Any, int]]:
    """An exact batch settles every forwarded item or none: with one failed, the others'
    completions are withheld (unpaid) and every item reads as failed."""
    if all(ok for item, (_, ok, _, _) in zip(plan, answers, strict=True) if item.forwarded):
        return answers
    withheld = item_error(
        "withheld: another item of this exact batch failed, so nothing was charged",
        "batch_incomplete",
        502,
    )
    return [(withheld if ok else doc, False, None, 0) for doc, ok, _, _ in answers]


def _message(document: Any) -> str:
    """The message of a model server's error body (OpenAI or Ollama shape), bounded."""
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error)[:500] if error else "the model server answered an error"


def _model_named(body: bytes) -> str | None:
    """The ``model`` a request body names, for its receipt; None when the body names none or
    is not JSON (the model server answers such a body itself)."""
    if not body:
        return None
    try:
        return model_of(body)
    except UntrustedJSONError:
        return None
