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
from collections.abc import Mapping

from aiohttp import web

from enclave import receipts
from paygate.server.admission import Admission
from paygate.server.errors import GatewayError, QueryNotAllowed, RouteNotFound
from paygate.server.health import LocalHandler
from paygate.server.limits import ConcurrencyLimiter
from paygate.server.logs import facts
from paygate.server.metrics import Metrics
from paygate.server.opening import Opener
from paygate.server.payments import PaymentRefused
from paygate.server.proxy import Upstream, upstream_request_headers
from paygate.server.receipts import RequestFacts
from paygate.server.replies import Replies
from paygate.server.routes import RouteMatch, RouteTable, Target
from paygate.x402.pricing import model_of


class Gateway:
    """The request path; every stage is built once in the app factory and passed in."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        admission: Admission,
        opener: Opener,
        upstream: Upstream,
        replies: Replies,
        limiter: ConcurrencyLimiter,
        metrics: Metrics,
        local: Mapping[Target, LocalHandler],
    ) -> None:
        self._routes = routes
        self._admission = admission
        self._opener = opener
        self._upstream = upstream
        self._replies = replies
        self._limiter = limiter
        self._metrics = metrics
        self._local = local

    async def handle(self, request: web.Request) -> web.StreamResponse:
        match = self._routes.match(request.method, request.path)
        if match is None:
            self._metrics.observe("unmatched", 404)
            raise RouteNotFound
        route = match.route
        info = facts(request)
        info.route = route.name
        started = asyncio.get_running_loop().time()
        try:
            if request.query_string and not set(request.query) <= route.query:
                raise QueryNotAllowed  # never forwarded, never echoed
            if route.target != "upstream":
                local = self._local.get(route.target)
                if local is None:  # e.g. attestation on a gateway built without it
                    raise RouteNotFound
                response = await local(request)
            else:
                response = await self._forward(request, match, started)
        except GatewayError as exc:
            if isinstance(exc, PaymentRefused):
                info.payment = exc.code
            self._metrics.observe(route.name, exc.status)
            self._metrics.error(exc.code)
            raise
        finally:
            self._metrics.duration(route.name, asyncio.get_running_loop().time() - started)
        self._metrics.observe(route.name, response.status)
        return response

    async def _forward(
        self, request: web.Request, match: RouteMatch, started: float
    ) -> web.StreamResponse:
        info = facts(request)
        async with self._admission.admit(request, match.route) as admitted:
            info.payment = "paid" if admitted.ticket.paid else "free"
            opened = admitted.opened or await self._opener.open(request, admitted.body)
            headers = upstream_request_headers(
                request.headers, client_address=admitted.client, scheme=request.scheme
            )
            if opened.body:
                headers["Content-Type"] = "application/json"
            with self._limiter.slot():
                async with self._upstream.exchange(
                    request.method, match.upstream_path, body=opened.body, headers=headers
                ) as reply:
                    self._metrics.upstream_latency(match.route.name, reply.waited)
                    try:
                        return await self._replies.send(
                            request,
                            reply,
                            opened.reply,
                            admitted.ticket,
                            started=started,
                            facts=RequestFacts(
                                request_digest=receipts.body_digest(admitted.body),
                                model=model_of(opened.body) if opened.body else None,
                            ),
                        )
                    finally:
                        info.upstream_seconds = reply.waited
