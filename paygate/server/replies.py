"""The reply stage: one entry, :meth:`Replies.send`, from the upstream's reply to the caller.

A reply goes one of two ways, chosen once from the reply plan (plain | v1 | v2), the
upstream's media type and whether a payment settles:

- **whole**: read (bounded), settled first when paid, then sent with its receipt header —
  v1 always, v2 when the upstream did not stream, and paid plaintext (which must not leave
  before its settlement). A paid request whose upstream failed is released before its error
  goes out.
- **stream**: relayed chunk by chunk as it arrives through a chain of :class:`BodyTransform`
  (the usage meter of a metered payment, the in-band payment receipt, the signed receipt, the
  v2 frame sealer, the wire hash the signed receipt of a v2 stream covers). A new concern is
  one more transform, not a branch.

Every paid or sealed reply below 400 carries a signed receipt (paygate.server.receipts).

``write`` waits for the socket to drain, so a slow reader slows the upstream read
(backpressure) instead of growing a buffer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

import enclave
from enclave import ReplySealer, receipts
from paygate import wire
from paygate.server.errors import GatewayError, UpstreamReplyTooLarge
from paygate.server.frontend import running_loop
from paygate.server.opening import PlainReply, ReplyPlan, V1Reply, V2Reply
from paygate.server.payments import (
    Ticket,
    charge_not_recorded,
    receipt_headers,
    settlement_failed_response,
)
from paygate.server.proxy import UpstreamReply
from paygate.server.receipts import (
    InbandSignedReceipt,
    ReceiptIssuer,
    ReceiptRequest,
    payment_claims,
    sealed_header,
    usage_claims,
)
from paygate.upstream.usage import Usage, usage_of
from paygate.x402.inband import InbandReceiptWriter
from paygate.x402.ledger import PaymentState
from paygate.x402.results import Receipt
from paygate.x402.session import PaymentSession

log = logging.getLogger("paygate.server")

# The only upstream headers a sealed reply keeps in clear: anything else (validators, the
# model server's own names, counts, timings) could say what the sealed body holds.
_SEALED_KEPT = frozenset({"retry-after"})
AUTHORIZATION_EXPIRING = "authorization_expiring"
MAX_HELD_EVENT = 1024 * 1024  # bytes of one SSE event held while stripping usage


@dataclass(frozen=True, slots=True)
class ReplyLimits:
    """The reply settings, fixed at start."""

    max_sealed_reply_bytes: int
    max_plain_reply_bytes: int
    settle_margin_seconds: float


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """What is known when a stream's body ends, for the transforms' last bytes."""

    receipt: Receipt | None = None
    error: str | None = None  # an in-band error code: the stream was ended early on purpose

    @property
    def charged(self) -> bool:
        """Whether a signed receipt may state the charge: not when its settlement was refused
        for good (or its outcome is withheld for review): no receipt claims a failed charge."""
        return self.receipt is None or not self.receipt.withhold


class BodyTransform(Protocol):
    """One step of a streamed reply's body pipeline (sans-IO)."""

    def feed(self, chunk: bytes) -> bytes:
        """What to pass on now for ``chunk`` (may be empty: held back)."""
        ...

    async def finish(self, tail: bytes, end: StreamEnd) -> bytes:
        """The last bytes, given the previous transform's last bytes ``tail`` (async: a
        receipt is signed in a TPM or token)."""
        ...


class InbandReceipt:
    """The payment receipt at the end of a plaintext stream (paygate.x402.inband), after an
    in-band error event when the stream was ended early."""

    def __init__(self, media_type: str) -> None:
        self._media_type = media_type
        self._writer = InbandReceiptWriter(media_type)

    def feed(self, chunk: bytes) -> bytes:
        return self._writer.feed(chunk)

    async def finish(self, tail: bytes, end: StreamEnd) -> bytes:
        out = self._writer.feed(tail) if tail else b""
        if end.error is not None:
            out += self._writer.feed(_error_event(self._media_type, end.error))
        return out + self._writer.close(end.receipt.encoded() if end.receipt else None)


class UsageMeter:
    """A metered stream, first in the chain (on the plaintext): counts the reply's bytes (the
    `estimate` fallback's measure) and, for a caller who did not ask for stream usage, strips
    the usage the gateway asked the model server for — the ``usage`` key goes, and an event
    left with no ``choices`` goes whole (llama-server puts usage on the final chunk beside
    ``finish_reason``, OpenAI on a chunk of its own). The usage itself is read by the upstream
    reply (``paygate.upstream.usage``). Events without usage pass byte for byte; one event is
    held at most :data:`MAX_HELD_EVENT` bytes, past which everything passes untouched."""

    def __init__(self, media_type: str, *, strip: bool) -> None:
        self._strip = strip and media_type == wire.SSE
        self._held = b""
        self._gave_up = False
        self.bytes_seen = 0

    def feed(self, chunk: bytes) -> bytes:
        self.bytes_seen += len(chunk)
        if not self._strip or self._gave_up:
            return chunk
        data = self._held + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._held = data
            if len(data) > MAX_HELD_EVENT:
                self._gave_up, self._held = True, b""
                return data
            return b""
        complete, self._held = data[: cut + 2], data[cut + 2 :]
        return b"".join(_strip_usage(event + b"\n\n") for event in complete.split(b"\n\n")[:-1])

    async def finish(self, tail: bytes, end: StreamEnd) -> bytes:
        out = self.feed(tail) if tail else b""
        rest, self._held = self._held, b""
        return out + (_strip_usage(rest) if rest else b"")


def _strip_usage(event: bytes) -> bytes:
    """One SSE event without the usage the caller did not ask for (b"" if nothing is left)."""
    if b'"usage"' not in event:
        return event
    lines = event.split(b"\n")
    for index, line in enumerate(lines):
        if not line.startswith(b"data:"):
            continue
        try:
            document = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if not isinstance(document, dict) or usage_of(document) is None:
            continue
        document.pop("usage", None)
        if not document.get("choices"):
            return b""
        lines[index] = b"data: " + json.dumps(document, separators=(",", ":")).encode()
    return b"\n".join(lines)


class FrameSealer:
    """v2: each chunk sealed as one frame; the final frame carries the last bytes."""

    def __init__(self, sealer: ReplySealer) -> None:
        self._sealer = sealer

    def feed(self, chunk: bytes) -> bytes:
        return self._sealer.seal(chunk) if chunk else b""

    async def finish(self, tail: bytes, end: StreamEnd) -> bytes:
        return self._sealer.finish(tail)


class Chain:
    """Transforms applied in order."""

    def __init__(self, transforms: Sequence[BodyTransform]) -> None:
        self._transforms = tuple(transforms)

    def __bool__(self) -> bool:
        return bool(self._transforms)

    def feed(self, chunk: bytes) -> bytes:
        for transform in self._transforms:
            if not chunk:
                return b""
            chunk = transform.feed(chunk)
        return chunk

    async def finish(self, end: StreamEnd) -> bytes:
        tail = b""
        for transform in self._transforms:
            tail = await transform.finish(tail, end)
        return tail


class ReplyObserver(Protocol):
    """Where the reply stage reports (metrics); labels are route names and error codes."""

    def error(self, code: str) -> None:
        """A reply cut mid-stream, by code."""
        ...

    def overhead(self, route: str, seconds: float) -> None:
        """Gateway time not spent waiting on the upstream, up to the reply's start."""
        ...

    def first_chunk(self, route: str, seconds: float) -> None:
        """Arrival to the first body bytes handed to the caller's socket."""
        ...


class Replies:
    """Sends replies; reports errors cut mid-stream and timings to ``observer``."""

    def __init__(
        self,
        limits: ReplyLimits,
        observer: ReplyObserver,
        receipts: ReceiptIssuer | None = None,
    ) -> None:
        self._limits = limits
        self._observer = observer
        self._receipts = receipts

    async def send(
        self,
        request: web.Request,
        reply: UpstreamReply,
        plan: ReplyPlan,
        ticket: Ticket,
        *,
        started: float,
        facts: ReceiptRequest | None = None,
    ) -> web.StreamResponse:
        session = ticket.session
        session.status = reply.status
        # A signed receipt for every paid or sealed reply that succeeded.
        signs = (
            self._receipts is not None
            and facts is not None
            and reply.status < 400
            and (session.paid or not isinstance(plan, PlainReply))
        )
        sign = facts if signs else None
        streamed = wire.is_stream(reply.content_type)
        # A paid request whose upstream failed goes out whole: released before its error.
        if not (session.paid and reply.status >= 400):
            if isinstance(plan, V2Reply) and streamed:
                return await self._stream(request, reply, plan, ticket, started, sign)
            if isinstance(plan, PlainReply) and (streamed or not session.settles):
                return await self._stream(request, reply, plan, ticket, started, sign)
        try:
            return await self._whole(request, reply, plan, ticket, started, sign)
        except GatewayError:
            # Nothing went out (too large, a broken upstream body): nothing was earned.
            session.status = 0
            raise

    async def send_document(
        self,
        plan: ReplyPlan,
        ticket: Ticket,
        body: bytes,
        *,
        items: list[tuple[bool, Usage | None, int]],
        facts: ReceiptRequest | None = None,
    ) -> web.Response:
        """A reply the gateway composed (the batch's results), sent whole like ``_whole``:
        settled first when any item succeeded (else released), sealed per the plan."""
        succeeded = any(ok for ok, _, _ in items)
        session = ticket.session
        session.status = 200 if succeeded else 502
        receipt = await session.items_ended(items)
        if session.unrecorded is not None:  # nothing records the charge: not sent
            raise _withheld(session)
        sealed = not isinstance(plan, PlainReply)
        if receipt is not None and receipt.withhold:
            return settlement_failed_response(receipt, ticket.route, sealed=sealed)
        headers: CIMultiDict[str] = CIMultiDict()
        if isinstance(plan, PlainReply):
            payload = body
            headers["Content-Type"] = wire.JSON
        else:
            payload = seal_whole(plan, body)
            headers.update(sealed_headers(plan, wire.JSON))
        if session.paid:
            headers.update(receipt_headers(receipt, sealed=sealed))
        if succeeded and facts is not None and (session.paid or sealed):
            total = [u for ok, u, _ in items if ok and u is not None]
            usage = Usage(
                sum(u.prompt_tokens for u in total), sum(u.completion_tokens for u in total)
            )
            await self._sign_whole(headers, plan, session, facts, body, receipt, usage)
        return web.Response(status=200, body=payload, headers=headers)

    async def _sign_whole(
        self,
        headers: CIMultiDict[str],
        plan: ReplyPlan,
        session: PaymentSession,
        facts: ReceiptRequest,
        body: bytes,
        receipt: Receipt | None,
        usage: Usage | None,
    ) -> None:
        """A whole reply's signed receipt header (sealed to the caller on a sealed reply)."""
        if self._receipts is None:
            return
        token, stated = await self._whole_receipt(
            self._receipts, session, facts, body, receipt, usage, publish=False
        )
        headers[wire.RECEIPT_HEADER] = sealed_header(plan, token)
        await session.keep_receipt(token, stated)
        if session.unrecorded is not None:  # SERVED, kept with it, refused (verify-only)
            raise _withheld(session)
        # Logged only now, the reply sure to go out: a withheld reply's receipt never reaches
        # the public log (one kept but not logged, a crash here, is recovered: paygate.tlog).
        await self._receipts.publish(token)

    @staticmethod
    async def _whole_receipt(
        issuer: ReceiptIssuer,
        session: PaymentSession,
        facts: ReceiptRequest,
        body: bytes,
        receipt: Receipt | None,
        usage: Usage | None,
        *,
        publish: bool,
    ) -> tuple[str, dict[str, object] | None]:
        """A whole reply's signed receipt and the usage it states (``publish``: recorded in the
        transparency log now)."""
        stated = usage_claims(usage, session.admission.meter)
        token = await issuer.token(
            facts,
            receipts.body_digest(body),
            payment=_payment(session, receipt),
            usage=stated,
            publish=publish,
        )
        return token, stated

    async def _whole(
        self,
        request: web.Request,
        reply: UpstreamReply,
        plan: ReplyPlan,
        ticket: Ticket,
        started: float,
        facts: ReceiptRequest | None,
    ) -> web.Response:
        """A reply sent in one piece once settled (see the module docstring)."""
        if isinstance(plan, PlainReply):
            body = await reply.read_bounded(self._limits.max_plain_reply_bytes)
            if body is None:
                raise UpstreamReplyTooLarge(
                    "the model server's reply is larger than this gateway holds for settlement"
                )
        else:
            body = await reply.read_bounded(self._limits.max_sealed_reply_bytes)
            if body is None:
                raise UpstreamReplyTooLarge
        session = ticket.session
        issuer = self._receipts
        sign = None
        if facts is not None and issuer is not None and session.settles:
            known = facts

            async def sign() -> tuple[str, dict[str, object] | None]:
                # Before a settlement that is a charge in this ledger (the session decides):
                # the same claims as after it, kept in its transaction; recorded in the log
                # only once the reply is sure to go out.
                return await self._whole_receipt(
                    issuer, session, known, body, None, reply.usage, publish=False
                )

        receipt = await session.reply_ended(
            reply,
            reply_bytes=len(body),
            # _sign_whole keeps it before this returns: SERVED may go with it (one write).
            receipt_follows=facts is not None and issuer is not None,
            sign=sign,
            publish=issuer.publish if issuer is not None else None,
        )
        if session.unrecorded is not None:
            # The charge's fenced write was refused (this process stalled past its lease,
            # another replica took the payment) or not made: the reply stays here, and no
            # receipt claims a charge the ledger never recorded.
            raise _withheld(session)
        sealed = not isinstance(plan, PlainReply)
        if receipt is not None and receipt.withhold:
            # Refused for good after serving (e.g. the payer emptied the wallet since verify,
            # or the authorization expired): the reply stays here rather than going out unpaid.
            return settlement_failed_response(receipt, ticket.route, sealed=sealed)
        if isinstance(plan, PlainReply):
            headers = CIMultiDict(reply.headers)
            payload = body
        else:
            payload = seal_whole(plan, body)
            headers = _sealed_headers(reply, plan)
        if session.paid:
            headers.update(receipt_headers(receipt, sealed=sealed))
        if session.admission.free_remaining is not None:
            headers[wire.FREE_REMAINING_HEADER] = str(session.admission.free_remaining)
        signed = session.admission.reply_receipt
        if signed is not None and issuer is not None:
            token, usage = signed
            headers[wire.RECEIPT_HEADER] = sealed_header(plan, token)
            if not session.admission.receipt_kept:  # else kept and logged with the settlement
                await issuer.publish(token)
                await session.keep_receipt(token, usage)
        elif facts is not None:
            await self._sign_whole(headers, plan, session, facts, body, receipt, reply.usage)
        elapsed = running_loop(request).time() - started
        headers[wire.OVERHEAD_HEADER] = self._overhead(ticket, started, reply, elapsed)
        self._observer.first_chunk(ticket.route.name, elapsed)
        return web.Response(status=reply.status, body=payload, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        reply: UpstreamReply,
        plan: PlainReply | V2Reply,
        ticket: Ticket,
        started: float,
        facts: ReceiptRequest | None,
    ) -> web.StreamResponse:
        """Relay chunk by chunk through the transform chain; a paid stream settles after the
        upstream's last chunk and carries its receipts in-band."""
        session = ticket.session
        known = session.admission.receipt
        inband = session.settles and known is None  # the receipt goes at the stream's end
        media = wire.media_type(reply.content_type)
        transforms: list[BodyTransform] = []
        meter = None
        if session.settles and session.metered:
            meter = UsageMeter(wire.media_type(reply.content_type), strip=ticket.strip_usage)
            session.watch(reply, meter)
            transforms.append(meter)
        if inband:
            transforms.append(InbandReceipt(media))
        kept: list[tuple[str, dict[str, object] | None]] = []
        if facts is not None and self._receipts is not None and media in wire.STREAM_MEDIA_TYPES:
            issuer = self._receipts

            async def sign(digest: str, end: StreamEnd) -> str | None:
                # The upstream's body has ended and the payment settled: usage and charge are
                # known now. Refused for good: a signed refusal (no charge) in its place, bound
                # to the request and what went out like the charge's, never kept as a reply's.
                if not end.charged:
                    assert end.receipt is not None
                    record = session.admission.record
                    if record is None or record.state is not PaymentState.FAILED:
                        # Not refused for good in the ledger: in doubt, flagged for review
                        # (the nonce used, by a cancel or by a transfer to us), or its FAILED
                        # not recorded (a reconcile may yet settle it). It may still be charged:
                        # neither a refusal nor a charge is signed.
                        return None
                    payment = _payment(session, end.receipt)
                    if payment is None:
                        return None
                    reason = end.receipt.response.refusal_reason
                    return await issuer.refusal(facts, digest, payment=payment, reason=reason)
                usage = usage_claims(reply.usage, session.admission.meter)
                token = await issuer.token(
                    facts, digest, payment=_payment(session, end.receipt or known), usage=usage
                )
                kept.append((token, usage))
                return token

            # On the plaintext: for v2 it is sealed into the final frame with the rest.
            transforms.append(InbandSignedReceipt(media, sign))
        if isinstance(plan, V2Reply):
            transforms.append(FrameSealer(plan.keys.sealer()))
            headers = _sealed_headers(reply, plan)
        else:
            headers = CIMultiDict(reply.headers)
        chain = Chain(transforms)
        if session.settles and await session.confirm_lease() is not None:
            # Its charge is recorded after the reply has left: not sent by a process whose
            # lease on the payment is gone (stalled past it), which could never charge it.
            # Settled upfront: not sent when another request served the reply it bought.
            raise _withheld(session)
        if inband:
            session.stream_began()
        if session.paid:
            # An upfront settlement's receipt is known now; otherwise it comes in-band.
            headers.update(receipt_headers(known, sealed=isinstance(plan, V2Reply)))
        if session.admission.free_remaining is not None:
            headers[wire.FREE_REMAINING_HEADER] = str(session.admission.free_remaining)
        if not chain and reply.plain_length is not None:
            body = reply.arrived_whole()
            if body is not None and len(body) == reply.plain_length:
                # All of it is here: one write of head and body instead of a relay loop.
                whole = web.Response(status=reply.status, body=body, headers=headers)
                elapsed = running_loop(request).time() - started
                whole.headers[wire.OVERHEAD_HEADER] = self._overhead(
                    ticket, started, reply, elapsed
                )
                self._observer.first_chunk(ticket.route.name, elapsed)
                return whole
        response = web.StreamResponse(status=reply.status, headers=headers)
        if not chain and reply.plain_length is not None:
            response.content_length = reply.plain_length
        response.headers[wire.OVERHEAD_HEADER] = self._overhead(ticket, started, reply)
        # The first chunk often came with the upstream's head: then the stream's head and it go
        # out in one write. When it has not (a slow first token), the head goes now, alone.
        early = reply.arrived()
        first = chain.feed(early) if early else b""
        if first:
            response._send_headers_immediately = False  # sent with the first write
        await response.prepare(request)
        route = ticket.route.name
        try:
            error = await self._relay(
                response,
                reply,
                chain,
                self._settle_deadline(session, inband),
                lambda: self._observer.first_chunk(route, _since(started)),
                first,
                session if inband else None,
            )
            # The body has ended: metered by what passed, settled (the in-band receipt).
            receipt = await session.reply_ended(
                reply, reply_bytes=meter.bytes_seen if meter is not None else 0
            )
            if session.unrecorded is not None:
                # Stalled past its lease mid-stream: the charge was not recorded, so the end
                # (the receipts, a v2 final frame) never goes: the caller sees it cut.
                raise _withheld(session)
            # Settled, or refused for good (the payer moved the funds since verify, the
            # facilitator said invalid): then what went out is not paid for, and the end says
            # so with the refusing x402 receipt (what a whole reply's 402 carries) and a signed
            # refusal in the place of the receipt that would claim the charge (StreamEnd.charged).
            tail = await chain.finish(StreamEnd(receipt=receipt, error=error))
            if tail:
                await response.write(tail)
            for token, usage in kept:
                await session.keep_receipt(token, usage)
        except ConnectionResetError:
            raise  # the caller went away; nothing to tell it
        except Exception as exc:
            # Headers are gone: the only honest signal left is an incomplete transfer (and
            # for v2, no final frame, which the caller's opener reports as truncation).
            code = exc.code if isinstance(exc, GatewayError) else type(exc).__name__
            self._observer.error(code)
            log.warning("reply cut mid-stream: %s", code)
            if meter is None:
                session.status = 0 if session.status < 400 else session.status
            # else metered: what was produced before the cut is charged (the session's exit
            # counts it: running usage, the engine's tokenizer, else the fallback).
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    def _settle_deadline(self, session: PaymentSession, inband: bool) -> float | None:
        """The loop time by which a paid stream must end so that its authorization can still
        settle (``validBefore`` minus the settle margin), or None."""
        valid_before = session.valid_before
        if not inband or valid_before is None:
            return None
        left = valid_before - self._limits.settle_margin_seconds - time.time()
        return asyncio.get_running_loop().time() + left

    def _overhead(
        self, ticket: Ticket, started: float, reply: UpstreamReply, elapsed: float | None = None
    ) -> str:
        # Time not spent waiting on the upstream, up to now (response start for streams).
        if elapsed is None:
            elapsed = _since(started)
        spent = max(elapsed - reply.waited, 0.0)
        self._observer.overhead(ticket.route.name, spent)
        return f"{spent * 1000:.2f}"

    @staticmethod
    async def _relay(
        response: web.StreamResponse,
        reply: UpstreamReply,
        chain: Chain,
        deadline: float | None,
        on_first: Callable[[], None],
        early: bytes = b"",
        lease: PaymentSession | None = None,
    ) -> str | None:
        """Relay every chunk (``early``: what the chain made of the bytes already here, the
        first write, which carries the head); with a deadline, stop there and say why (an
        in-band error); with ``lease``, each write waits on its lease (see :func:`_pump`)."""
        async with contextlib.aclosing(reply.chunks()) as chunks:
            if deadline is None:  # the usual case: no scope to set up and tear down
                await _pump(response, chunks, chain, on_first, early, lease)
                return None
            try:
                async with asyncio.timeout_at(deadline) as scope:
                    await _pump(response, chunks, chain, on_first, early, lease)
            except TimeoutError:
                if scope.expired():
                    return AUTHORIZATION_EXPIRING
                raise
        return None


async def _pump(
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    chain: Chain,
    on_first: Callable[[], None],
    early: bytes,
    lease: PaymentSession | None = None,
) -> None:
    """Write ``early``, then what the chain makes of each chunk; ``on_first`` after the first
    write. With ``lease`` (a stream charged after it has left), the move recording its progress
    starts right after the first write (in the background: the first chunk waits for no ledger
    call), and no write goes out past the stream's lease window (a clock read) until that move,
    or a fenced renewal, says the payment is still this process's: a replica woken from a stall
    past its lease stops at once instead of sending the rest uncharged."""
    first = not early
    if early:
        await response.write(early)
        on_first()
        if lease is not None:
            lease.content_sent()
    async for chunk in chunks:
        out = chain.feed(chunk)
        if out:
            if (
                lease is not None
                and not lease.lease_live()
                and await lease.stream_progress() is not None
            ):
                raise _withheld(lease)
            await response.write(out)
            if first:
                first = False
                on_first()
                if lease is not None:
                    lease.content_sent()


def _withheld(session: PaymentSession) -> GatewayError:
    """The error that withholds a reply whose charge was not recorded. The reply counts as not
    made (status 0): the request's exit releases what is left rather than mark it served,
    which would charge a reply nobody got (verify-only's SERVED) and refuse its retry."""
    session.status = 0
    return charge_not_recorded(session.unrecorded or "")


def _payment(session: PaymentSession, receipt: Receipt | None) -> dict[str, object] | None:
    """The receipt's payment claims, once the charge is known (after metering and settling)."""
    return payment_claims(
        session.admission.record,
        charged=session.charged,
        price=session.token_price,
        receipt=receipt,
    )


def seal_whole(plan: V1Reply | V2Reply, body: bytes) -> bytes:
    """A whole (non-streamed) reply as one sealed message of the plan's envelope."""
    if isinstance(plan, V1Reply):
        return enclave.seal_v1(plan.public_key, body)
    return enclave.seal_reply(plan.keys, body)


def sealed_headers(plan: V1Reply | V2Reply, original_content_type: str | None) -> dict[str, str]:
    """Headers of a sealed reply: the sealed media type, and the plaintext's for the client."""
    headers = {
        "Content-Type": wire.SEALED_MEDIA_TYPE,
        wire.ENVELOPE_HEADER: "v1" if isinstance(plan, V1Reply) else "v2",
    }
    if original_content_type:
        headers[wire.ORIGINAL_TYPE_HEADER] = original_content_type
    return headers


def _sealed_headers(reply: UpstreamReply, plan: V1Reply | V2Reply) -> CIMultiDict[str]:
    """:func:`sealed_headers` and, of the upstream's, only what transport needs
    (:data:`_SEALED_KEPT`); a sealed reply is never cached."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in reply.headers.items():
        if name.lower() in _SEALED_KEPT:
            headers.add(name, value)
    headers.update(sealed_headers(plan, reply.content_type))
    headers["Cache-Control"] = "no-store"
    return headers


def _since(started: float) -> float:
    return asyncio.get_running_loop().time() - started


def _error_event(media_type: str, code: str) -> bytes:
    """An error as the stream's own last event: SSE ``data:`` with OpenAI's error object, or
    Ollama's final NDJSON object (``done`` true, so the in-band receipt joins it)."""
    message = "the payment authorization expires: the stream ends here and is settled"
    if media_type == wire.NDJSON:
        line = {"error": message, "code": code, "done": True}
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"
    error = {"error": {"message": message, "type": "payment_error", "code": code}}
    return b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"
