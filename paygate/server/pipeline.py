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

from enclave import KeyBackend, ReplySealer
from paygate.server import sealing
from paygate.server.errors import EncryptionRequired, GatewayError, ReplyTooLarge, RouteNotFound
from paygate.server.forwarded import Network, client_address
from paygate.server.limits import ConcurrencyLimiter, read_body
from paygate.server.metrics import Metrics
from paygate.server.payment import (
    PaymentGate,
    PaymentTicket,
    ReplyOutcome,
    receipt_headers,
    settlement_failed_response,
)
from paygate.server.proxy import Upstream, UpstreamReply, upstream_request_headers
from paygate.server.routes import RouteMatch, RouteTable, Target
from paygate.x402.inband import InbandReceiptWriter
from paygate.x402.pricing import model_of

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
        opened: sealing.OpenedBody | None = None
        model: str | None = None
        if self._gate.needs_model and route.paid:
            # Prices per model need the body's ``model``: only then is opening done first.
            opened = await self._open(request, content_type, body)
            model = model_of(opened.body)
        # Step 3, payment: a ticket, or an answer of its own (a 402 challenge).
        admitted = await self._gate.begin(request, route, model=model)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        progress = _Progress()
        try:
            # Step 4, open.
            if opened is None:
                opened = await self._open(request, content_type, body)
            # Step 5, forward; step 6, relay or seal the reply; step 7, settle inside.
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
                progress.status = reply.status
                return await self._relay(
                    _Exchange(request, reply, opened.reply, admitted, started, progress)
                )
        except (asyncio.CancelledError, ConnectionResetError):
            progress.caller_gone = True
            raise
        finally:
            # Release, or settle what is owed and not settled yet, with what actually happened.
            # Shielded: a second cancellation must not cut the ledger write short.
            await asyncio.shield(
                self._gate.complete(
                    admitted,
                    ReplyOutcome(
                        status=progress.status,
                        delivered=progress.delivered,
                        caller_gone=progress.caller_gone,
                    ),
                )
            )

    async def _open(
        self, request: web.Request, content_type: str | None, body: bytes
    ) -> sealing.OpenedBody:
        opened = await sealing.open_body(
            self._key,
            method=request.method,
            path=request.path,
            content_type=content_type,
            body=body,
            reply_pubkey=request.headers.get(sealing.REPLY_PUBKEY_HEADER),
        )
        self._metrics.envelope(opened.envelope)
        return opened

    async def _relay(self, ex: _Exchange) -> web.StreamResponse:
        if ex.ticket.paid and ex.reply.status >= 400:
            # Nothing was earned: release before answering, so that the caller's immediate
            # retry with the same authorization is not refused as "in progress".
            return await self._whole(ex)
        streamed = sealing.is_stream(ex.reply.content_type)
        if isinstance(ex.plan, sealing.V2Reply) and streamed:
            return await self._stream(ex)
        if isinstance(ex.plan, sealing.PlainReply) and (streamed or not ex.settles):
            return await self._stream(ex)
        return await self._whole(ex)

    def _overhead(self, started: float, reply: UpstreamReply) -> str:
        # Time not spent waiting on the upstream, up to now (response start for streams).
        spent = asyncio.get_running_loop().time() - started - reply.waited
        return f"{max(spent, 0.0) * 1000:.2f}"

    async def _whole(self, ex: _Exchange) -> web.Response:
        """A reply sent in one piece once settled: sealed (v1 always; v2 when the upstream did
        not stream) or a paid plaintext reply, which must not leave before its settlement."""
        body = await ex.reply.read_bounded(self._policy.max_sealed_reply_bytes)
        if body is None:
            raise ReplyTooLarge
        if ex.ticket.paid and not ex.settles:
            await self._gate.complete(ex.ticket, ReplyOutcome(ex.reply.status, delivered=False))
        if ex.settles:
            receipt = await self._gate.settle(ex.ticket)
        else:  # an upfront settlement's receipt, if any, still belongs with the answer
            receipt = ex.ticket.admission.receipt if ex.ticket.admission else None
        if receipt is not None and receipt.withhold:
            # Refused for good after serving (e.g. the payer emptied the wallet since verify):
            # the reply stays here rather than going out unpaid.
            return settlement_failed_response(receipt, ex.ticket.route)
        if isinstance(ex.plan, sealing.PlainReply):
            headers = CIMultiDict(ex.reply.headers)
            payload = body
        else:
            payload = sealing.seal_whole(ex.plan, body)
            headers = _without(ex.reply.headers, _SEALED_DROPPED)
            headers.update(sealing.sealed_headers(ex.plan, ex.reply.content_type))
        if ex.ticket.paid:
            headers.update(receipt_headers(receipt))
        headers[OVERHEAD_HEADER] = self._overhead(ex.started, ex.reply)
        ex.progress.delivered = True
        return web.Response(status=ex.reply.status, body=payload, headers=headers)

    async def _stream(self, ex: _Exchange) -> web.StreamResponse:
        """Relay chunk by chunk as they arrive; v2 seals each chunk as one frame.

        ``write`` waits for the socket to drain, so a slow reader slows the upstream read
        (backpressure) instead of growing a buffer here. A paid stream settles after the
        upstream's last chunk and carries its receipt in-band (paygate.x402.inband).
        """
        plan = ex.plan
        reply = ex.reply
        if isinstance(plan, sealing.V2Reply):
            headers = _without(reply.headers, _SEALED_DROPPED)
            headers.update(sealing.sealed_headers(plan, reply.content_type))
            sealer: ReplySealer | None = sealing.stream_sealer(plan)
        else:
            headers = CIMultiDict(reply.headers)
            sealer = None
        known = ex.ticket.admission.receipt if ex.ticket.admission else None
        if ex.ticket.paid:
            # An upfront settlement's receipt is known now; otherwise it comes in-band.
            headers.update(receipt_headers(known))
        inband = (
            InbandReceiptWriter(sealing.media_type(reply.content_type))
            if ex.settles and known is None
            else None
        )
        response = web.StreamResponse(status=reply.status, headers=headers)
        if sealer is None and inband is None and reply.plain_length is not None:
            response.content_length = reply.plain_length
        response.headers[OVERHEAD_HEADER] = self._overhead(ex.started, reply)
        await response.prepare(ex.request)
        try:
            async for chunk in reply.chunks():
                out = inband.feed(chunk) if inband else chunk
                if out:
                    await response.write(sealer.seal(out) if sealer else out)
            tail = b""
            if inband is not None:
                receipt = await self._gate.settle(ex.ticket)
                tail = inband.close(receipt.encoded() if receipt else None)
            if sealer is not None:
                await response.write(sealer.finish(tail))
            elif tail:
                await response.write(tail)
        except ConnectionResetError:
            raise  # the caller went away; nothing to tell it
        except Exception as exc:
            # Headers are gone: the only honest signal left is an incomplete transfer (and
            # for v2, no final frame, which the caller's opener reports as truncation).
            code = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
            self._metrics.error(code)
            log.warning("reply cut mid-stream: %s", code)
            ex.progress.status = 0 if ex.progress.status < 400 else ex.progress.status
            if ex.request.transport is not None:
                ex.request.transport.close()
            return response
        await response.write_eof()
        ex.progress.delivered = True
        return response


@dataclass(slots=True)
class _Progress:
    """What is known so far about how the request ends (read by ``complete``)."""

    status: int = 0
    delivered: bool = False
    caller_gone: bool = False


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One upstream exchange being relayed."""

    request: web.Request
    reply: UpstreamReply
    plan: sealing.ReplyPlan
    ticket: PaymentTicket
    started: float
    progress: _Progress

    @property
    def settles(self) -> bool:
        """A paid request whose upstream answered below 400: settlement is owed."""
        return self.ticket.paid and self.reply.status < 400


def _without(headers: CIMultiDict[str], names: tuple[str, ...]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in names:
            out.add(name, value)
    return out
