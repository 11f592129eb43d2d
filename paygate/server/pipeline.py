"""The per-request pipeline: route → limits → payment → open → forward → seal → settle.

Each step is one call into its own module; data flows down once. The one aiohttp handler is
:meth:`Gateway.handle`, mounted on every path so that the closed route table, not aiohttp's
router, decides what exists (unknown paths and methods are 404 in the caller's error shape).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from enclave import KeyBackend
from paygate.server import sealing
from paygate.server.errors import EncryptionRequired, GatewayError, ReplyTooLarge, RouteNotFound
from paygate.server.forwarded import Network, client_address
from paygate.server.limits import ConcurrencyLimiter, read_body
from paygate.server.metrics import Metrics
from paygate.server.payment import PaymentGate, ReplyOutcome
from paygate.server.proxy import Upstream, UpstreamReply, upstream_request_headers
from paygate.server.routes import RouteMatch, RouteTable, Target

OVERHEAD_HEADER = "X-Paygate-Overhead-Ms"
LocalHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("paygate.server")

# Validators of the plaintext that a sealed reply would make stale or misleading.
_SEALED_DROPPED = ("etag", "content-md5", "digest", "content-type")


@dataclass(frozen=True, slots=True)
class PipelinePolicy:
    """The settings the pipeline reads, fixed at startup."""

    max_body_bytes: int
    body_read_timeout: float
    max_sealed_reply_bytes: int
    require_encryption: bool
    trusted_proxies: tuple[Network, ...]


class Gateway:
    """One request's journey through the gateway; everything it needs is passed in."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        key: KeyBackend,
        upstream: Upstream,
        gate: PaymentGate,
        limiter: ConcurrencyLimiter,
        metrics: Metrics,
        policy: PipelinePolicy,
        local: Mapping[Target, LocalHandler],
    ) -> None:
        self._routes = routes
        self._key = key
        self._upstream = upstream
        self._gate = gate
        self._limiter = limiter
        self._metrics = metrics
        self._policy = policy
        self._local = local

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Step 1, the route table; local routes answer here, upstream routes go on."""
        match = self._routes.match(request.method, request.path)
        if match is None:
            self._metrics.observe("unmatched", 404)
            raise RouteNotFound
        route = match.route
        try:
            if route.target != "upstream":
                response = await self._local[route.target](request)
            else:
                with self._limiter.slot():
                    response = await self._forward(request, match)
        except GatewayError as exc:
            self._metrics.observe(route.name, exc.status)
            self._metrics.error(exc.code)
            raise
        self._metrics.observe(route.name, response.status)
        return response

    async def _forward(self, request: web.Request, match: RouteMatch) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        route = match.route
        content_type = request.headers.get("Content-Type")
        # Step 2, limits and policy: cheap refusals come before payment and before any ECDH.
        if (
            self._policy.require_encryption
            and route.paid
            and request.body_exists
            and not sealing.is_sealed(content_type)
        ):
            raise EncryptionRequired
        body = await read_body(
            request, limit=self._policy.max_body_bytes, timeout=self._policy.body_read_timeout
        )
        # Step 3, payment: a ticket, or an answer of its own (a 402 challenge).
        admitted = await self._gate.begin(request, route)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        outcome = ReplyOutcome(status=0, delivered=False)
        try:
            # Step 4, open.
            opened = await sealing.open_body(
                self._key,
                method=request.method,
                path=request.path,
                content_type=content_type,
                body=body,
                reply_pubkey=request.headers.get(sealing.REPLY_PUBKEY_HEADER),
            )
            self._metrics.envelope(opened.envelope)
            # Step 5, forward; step 6, relay or seal the reply.
            headers = upstream_request_headers(
                request.headers,
                client_address=client_address(
                    request.remote,
                    request.headers.getall("X-Forwarded-For", []),
                    self._policy.trusted_proxies,
                ),
                scheme=request.scheme,
            )
            if opened.body:
                headers["Content-Type"] = "application/json"
            async with self._upstream.exchange(
                request.method, match.upstream_path, body=opened.body, headers=headers
            ) as reply:
                response, delivered = await self._relay(request, reply, opened.reply, started)
            outcome = ReplyOutcome(status=response.status, delivered=delivered)
            return response
        finally:
            # Step 7, settle (or release) exactly once, with what the caller actually got.
            await self._gate.complete(admitted, outcome)

    async def _relay(
        self,
        request: web.Request,
        reply: UpstreamReply,
        plan: sealing.ReplyPlan,
        started: float,
    ) -> tuple[web.StreamResponse, bool]:
        if isinstance(plan, sealing.PlainReply):
            return await self._stream(request, reply, None, started)
        if isinstance(plan, sealing.V2Reply) and sealing.is_stream(reply.content_type):
            return await self._stream(request, reply, plan, started)
        return await self._whole(reply, plan, started), True

    def _overhead(self, started: float, reply: UpstreamReply) -> str:
        # Time not spent waiting on the upstream, up to now (response start for streams).
        spent = asyncio.get_running_loop().time() - started - reply.waited
        return f"{max(spent, 0.0) * 1000:.2f}"

    async def _whole(
        self, reply: UpstreamReply, plan: sealing.V1Reply | sealing.V2Reply, started: float
    ) -> web.Response:
        """A reply sealed in one piece: v1 always, v2 when the upstream did not stream."""
        body = await reply.read_bounded(self._policy.max_sealed_reply_bytes)
        if body is None:
            raise ReplyTooLarge
        sealed = sealing.seal_whole(plan, body)
        headers = _without(reply.headers, _SEALED_DROPPED)
        headers.update(sealing.sealed_headers(plan, reply.content_type))
        headers[OVERHEAD_HEADER] = self._overhead(started, reply)
        return web.Response(status=reply.status, body=sealed, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        reply: UpstreamReply,
        plan: sealing.V2Reply | None,
        started: float,
    ) -> tuple[web.StreamResponse, bool]:
        """Relay chunk by chunk as they arrive; v2 seals each chunk as one frame.

        ``write`` waits for the socket to drain, so a slow reader slows the upstream read
        (backpressure) instead of growing a buffer here.
        """
        if plan is None:
            headers = CIMultiDict(reply.headers)
            sealer = None
        else:
            headers = _without(reply.headers, _SEALED_DROPPED)
            headers.update(sealing.sealed_headers(plan, reply.content_type))
            sealer = sealing.stream_sealer(plan)
        response = web.StreamResponse(status=reply.status, headers=headers)
        if plan is None and reply.plain_length is not None:
            response.content_length = reply.plain_length
        response.headers[OVERHEAD_HEADER] = self._overhead(started, reply)
        await response.prepare(request)
        try:
            async for chunk in reply.chunks():
                await response.write(sealer.seal(chunk) if sealer else chunk)
            if sealer is not None:
                await response.write(sealer.finish())
        except ConnectionResetError:
            raise  # the caller went away; nothing to tell it
        except Exception as exc:
            # Headers are gone: the only honest signal left is an incomplete transfer (and
            # for v2, no final frame, which the caller's opener reports as truncation).
            code = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
            self._metrics.error(code)
            log.warning("reply cut mid-stream: %s", code)
            if request.transport is not None:
                request.transport.close()
            return response, False
        await response.write_eof()
        return response, True


def _without(headers: CIMultiDict[str], names: tuple[str, ...]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in names:
            out.add(name, value)
    return out
