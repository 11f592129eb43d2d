"""httpx transports that seal, pay and open: a drop-in ``http_client`` for the OpenAI SDK.

``httpx.Client(transport=PaygateTransport(...))`` (or ``AsyncPaygateTransport`` with
``httpx.AsyncClient``) seals every request body to the appliance's key, answers one 402 with a
signed x402 payment within the spend policy, and opens the sealed reply, streams chunk by
chunk. Both drive the same sans-IO flow (:mod:`paygate.client.core`); only the I/O differs.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, TypedDict, Unpack

import httpx
from eth_account.signers.local import LocalAccount

from paygate.client.attestation import (
    MAX_EVIDENCE_BYTES,
    AttestationPolicy,
    Attested,
    attestation_flow,
)
from paygate.client.core import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SEALED_REPLY_BYTES,
    MAX_TAIL_BYTES,
    ClientCore,
    Command,
    Deliver,
    Discard,
    Envelope,
    LoadKey,
    ReadBody,
    ReadRequest,
    ReceiptCallback,
    Send,
)
from paygate.client.errors import (
    AttestationFailed,
    ClientError,
    ReceiptInvalid,
    ReceiptMissing,
    ReplyTooLarge,
    RequestTooLarge,
)
from paygate.client.payer import SentPayment, SpendPolicy, X402Version
from paygate.client.pubkey import (
    MAX_PUBKEY_DOCUMENT,
    AsyncAttestationHook,
    AttestationHook,
    EnclaveKey,
)
from paygate.client.receipts import MAX_TAIL_SECONDS
from paygate.client.refunds import refund_answer, refund_requests
from paygate.client.streams import ReplyDecoder
from paygate.x402.models import SettleResponse

MAX_REFUND_ANSWER = 64 * 1024


class TransportOptions(TypedDict, total=False):
    """What both transports take beside ``transport`` and ``attest`` (see
    :class:`PaygateTransport` for each)."""

    envelope: Envelope
    pin: str | bytes | None
    wallet: LocalAccount | None
    spend: SpendPolicy | None
    x402_version: X402Version | None
    pubkey_url: str | None
    on_receipt: ReceiptCallback | None
    max_request_bytes: int
    max_sealed_reply_bytes: int
    attestation: AttestationPolicy | None


def _core(options: TransportOptions) -> ClientCore:
    unknown = set(options) - set(TransportOptions.__annotations__)
    if unknown:  # a misspelt option must not be dropped silently (a pin, a spend policy...)
        raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r}")
    return ClientCore(
        envelope=options.get("envelope", "v2"),
        pin=options.get("pin"),
        wallet=options.get("wallet"),
        spend=options.get("spend"),
        x402_version=options.get("x402_version"),
        pubkey_url=options.get("pubkey_url"),
        on_receipt=options.get("on_receipt"),
        max_request_bytes=options.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
        max_sealed_reply_bytes=options.get(
            "max_sealed_reply_bytes", DEFAULT_MAX_SEALED_REPLY_BYTES
        ),
        attestation=options.get("attestation"),
    )


class _Facade:
    """The read-only view both transports give of their state."""

    _core: ClientCore

    @property
    def payments(self) -> list[SentPayment]:
        """Payments made through this transport, oldest first (the last 1000)."""
        return self._core.payments.log()

    @property
    def last_payment(self) -> SentPayment | None:
        return self._core.payments.last_payment

    @property
    def last_receipt(self) -> SettleResponse | None:
        """The most recent receipt (header or in-band), e.g. after an OpenAI SDK call."""
        return self._core.payments.last_receipt

    @property
    def last_signed_receipt(self) -> dict[str, Any] | None:
        """The claims of the most recent signed receipt verified (attested origins only):
        distinct from :attr:`last_receipt`, the x402 payment receipt."""
        return self._core.payments.last_signed_receipt

    @property
    def spent(self) -> Decimal:
        """Whole tokens signed away so far, settled or not."""
        return self._core.payments.spent

    @property
    def wallet_address(self) -> str | None:
        return self._core.payer.address if self._core.payer is not None else None

    def key(self, origin: str) -> EnclaveKey | None:
        """The cached appliance key of ``origin`` (``scheme://host[:port]``), if fetched."""
        return self._core.cached_key(origin)

    def forget_keys(self) -> None:
        """Drop cached keys: the next request fetches (and pins, attests) again."""
        self._core.forget_keys()

    def attested(self, origin: str) -> Attested | None:
        """What the AttestationPolicy verified at ``origin`` (its checks and binding)."""
        return self._core.attested(origin)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(envelope={self._core.envelope!r}, "
            f"pin={self._core.pin!r}, payer={self._core.payer!r})"
        )


@contextmanager
def _hook_refusal() -> Iterator[None]:
    """Around the caller's attestation hook: what it raises (other than our own ClientError)
    is the refusal of the key, as AttestationFailed."""
    try:
        yield
    except ClientError:
        raise
    except Exception as exc:
        detail = str(exc)[:200] or type(exc).__name__
        raise AttestationFailed(
            f"the attestation hook refused the appliance key: {detail}"
        ) from exc


@dataclass(frozen=True, slots=True)
class _Hook:
    """Ask the caller's attestation hook about ``key`` (→ None, or it raises)."""

    key: EnclaveKey


KeyStep = Send | ReadBody | _Hook


def _fetch(
    request: httpx.Request, limit: int, what: str
) -> Generator[KeyStep, Any, tuple[int, bytes]]:
    response: httpx.Response = yield Send(request)
    body: bytes = yield ReadBody(response, limit, what)
    return response.status_code, body


def _key_flow(core: ClientCore, command: LoadKey) -> Generator[KeyStep, Any, EnclaveKey]:
    """Fetch an origin's key, verify it as the AttestationPolicy asks, ask the hook, cache it
    (sans-IO: both transports carry out the steps, under their own per-transport lock)."""
    request = core.key_request(command)
    status, body = yield from _fetch(request, MAX_PUBKEY_DOCUMENT, "the key document")
    key = core.accept_key(command.origin, status, body)
    if core.attestation is not None:
        flow = attestation_flow(command.origin, core.attestation, key.public_key)
        try:
            exchange = next(flow)
            while True:
                request = core.exchange_request(exchange, command.request, key)
                answer = yield from _fetch(request, MAX_EVIDENCE_BYTES, "the attestation evidence")
                exchange = flow.send(answer)
        except StopIteration as stop:
            attested: Attested = stop.value
        core.store_attested(attested)
        key = core.attested_key(key, attested)
    yield _Hook(key)
    core.store_key(key)
    return key


class PaygateTransport(_Facade, httpx.BaseTransport):
    """Seal, pay, open — for ``httpx.Client``.

    Args:
        transport: the transport that does the HTTP (default ``httpx.HTTPTransport()``).
        envelope: ``"v2"`` (default), ``"v1"`` for Obol-style gateways, ``"plain"`` to only pay.
        pin: the expected appliance key (65-byte point, hex) or its SHA-256 fingerprint.
        attest: called with the key before first use; raising refuses it.
        attestation: an :class:`AttestationPolicy`: verify the appliance's evidence before
            the first request to an origin (and whenever its key changes); refused → a
            ``ClientError`` with its own code, nothing sealed or paid.
        wallet: an eth-account ``LocalAccount`` that pays 402s (None: 402s are returned).
        spend: the :class:`SpendPolicy` (required with a wallet).
        x402_version: answer only v1 or only v2 challenges (None: prefer v2).
        pubkey_url: where to fetch the key (default: ``/v1/enclave/pubkey`` at the origin).
        on_receipt: called with the :class:`SentPayment` when a receipt arrives.
        max_request_bytes, max_sealed_reply_bytes: bounds of what is held in memory.
    """

    def __init__(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        attest: AttestationHook | None = None,
        **options: Unpack[TransportOptions],
    ) -> None:
        self._core = _core(options)
        self._inner = transport if transport is not None else httpx.HTTPTransport()
        self._attest = attest
        self._key_lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        flow = self._core.flow(request)
        opened: list[httpx.Response] = []
        try:
            command = next(flow)
            while True:
                try:
                    result = self._run(command, opened)
                except httpx.TransportError as exc:
                    if not isinstance(command, Send):
                        raise
                    command = flow.throw(exc)  # the flow may re-send (core.send_paid)
                    continue
                command = flow.send(result)
        except StopIteration as stop:
            deliver: Deliver = stop.value
        except BaseException:
            for response in opened:
                response.close()
            flow.close()
            raise
        if deliver.source is None:
            return _whole(deliver)
        assert deliver.decoder is not None  # a streamed body always has its decoder
        return _streamed(deliver, _SyncBody(deliver.source, deliver.decoder))

    def _run(self, command: Command, opened: list[httpx.Response]) -> object:
        if isinstance(command, ReadRequest):
            return _read_request(command.request, command.limit)
        if isinstance(command, LoadKey):
            return self._load_key(command)
        if isinstance(command, Send):
            response = self._inner.handle_request(command.request)
            opened.append(response)
            return response
        if isinstance(command, ReadBody):
            return _read_body(command.response, command.limit, command.what)
        if isinstance(command, Discard):
            command.response.close()
            return None
        raise TypeError(f"unknown command {command!r}")

    def _load_key(self, command: LoadKey) -> EnclaveKey:
        key = self._core.cached_key(command.origin)
        if key is not None:
            return key
        with self._key_lock:  # one fetch per origin, even with many threads
            key = self._core.cached_key(command.origin)
            if key is not None:
                return key
            flow = _key_flow(self._core, command)
            try:
                step = next(flow)
                while True:
                    step = flow.send(self._key_step(step))
            except StopIteration as stop:
                loaded: EnclaveKey = stop.value
                return loaded

    def _key_step(self, step: KeyStep) -> object:
        if not isinstance(step, _Hook):
            return self._run(step, [])  # the body is read (and closed) by the next step
        if self._attest is not None:
            with _hook_refusal():
                self._attest(step.key)
        return None

    def refund(
        self, url: str, *, amount: Decimal | str | None = None, timeout: float | None = 30.0
    ) -> list[SettleResponse]:
        """Refund what is left in this transport's batch-settlement channels with ``url``'s
        origin (``amount``, whole tokens: part of the one channel's rest); their receipts.
        What came back stops counting against the spend policy's ``max_total``."""
        out: list[SettleResponse] = []
        for asked in refund_requests(self._core.payer, url, amount, timeout):
            response = self.handle_request(asked.request)
            try:
                body = _read_body(response, MAX_REFUND_ANSWER, "the refund's answer")
            finally:
                response.close()
            assert self._core.payer is not None
            out.append(
                refund_answer(self._core.payer, asked, response.status_code, response.headers, body)
            )
        return out

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> PaygateTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()


class AsyncPaygateTransport(_Facade, httpx.AsyncBaseTransport):
    """Seal, pay, open — for ``httpx.AsyncClient``. Same arguments as
    :class:`PaygateTransport`; ``transport`` defaults to ``httpx.AsyncHTTPTransport()`` and
    ``attest`` may be a coroutine function."""

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        attest: AsyncAttestationHook | None = None,
        **options: Unpack[TransportOptions],
    ) -> None:
        self._core = _core(options)
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._attest = attest
        self._key_lock = asyncio.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        flow = self._core.flow(request)
        opened: list[httpx.Response] = []
        try:
            command = next(flow)
            while True:
                try:
                    result = await self._run(command, opened)
                except httpx.TransportError as exc:
                    if not isinstance(command, Send):
                        raise
                    command = flow.throw(exc)  # the flow may re-send (core.send_paid)
                    continue
                command = flow.send(result)
        except StopIteration as stop:
            deliver: Deliver = stop.value
        except BaseException:
            for response in opened:
                await response.aclose()
            flow.close()
            raise
        if deliver.source is None:
            return _whole(deliver)
        assert deliver.decoder is not None  # a streamed body always has its decoder
        return _streamed(deliver, _AsyncBody(deliver.source, deliver.decoder))

    async def _run(self, command: Command, opened: list[httpx.Response]) -> object:
        if isinstance(command, ReadRequest):
            return await _aread_request(command.request, command.limit)
        if isinstance(command, LoadKey):
            return await self._load_key(command)
        if isinstance(command, Send):
            response = await self._inner.handle_async_request(command.request)
            opened.append(response)
            return response
        if isinstance(command, ReadBody):
            return await _aread_body(command.response, command.limit, command.what)
        if isinstance(command, Discard):
            await command.response.aclose()
            return None
        raise TypeError(f"unknown command {command!r}")

    async def _load_key(self, command: LoadKey) -> EnclaveKey:
        key = self._core.cached_key(command.origin)
        if key is not None:
            return key
        async with self._key_lock:
            key = self._core.cached_key(command.origin)
            if key is not None:
                return key
            flow = _key_flow(self._core, command)
            try:
                step = next(flow)
                while True:
                    step = flow.send(await self._key_step(step))
            except StopIteration as stop:
                loaded: EnclaveKey = stop.value
                return loaded

    async def _key_step(self, step: KeyStep) -> object:
        if not isinstance(step, _Hook):
            return await self._run(step, [])  # the body is read (and closed) by the next step
        if self._attest is not None:
            with _hook_refusal():
                result = self._attest(step.key)
                if inspect.isawaitable(result):
                    await result
        return None

    async def refund(
        self, url: str, *, amount: Decimal | str | None = None, timeout: float | None = 30.0
    ) -> list[SettleResponse]:
        """As :meth:`PaygateTransport.refund`."""
        out: list[SettleResponse] = []
        for asked in refund_requests(self._core.payer, url, amount, timeout):
            response = await self.handle_async_request(asked.request)
            try:
                body = await _aread_body(response, MAX_REFUND_ANSWER, "the refund's answer")
            finally:
                await response.aclose()
            assert self._core.payer is not None
            out.append(
                refund_answer(self._core.payer, asked, response.status_code, response.headers, body)
            )
        return out

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> AsyncPaygateTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


# --- bodies --------------------------------------------------------------------------------


def _whole(deliver: Deliver) -> httpx.Response:
    return httpx.Response(
        deliver.status,
        headers=deliver.headers,
        content=deliver.content,
        extensions=deliver.extensions,
    )


def _streamed(
    deliver: Deliver, stream: httpx.SyncByteStream | httpx.AsyncByteStream
) -> httpx.Response:
    return httpx.Response(
        deliver.status, headers=deliver.headers, stream=stream, extensions=deliver.extensions
    )


class _SyncBody(httpx.SyncByteStream):
    """A reply body passed through its decoder as it arrives."""

    def __init__(self, source: httpx.Response, decoder: ReplyDecoder) -> None:
        self._source = source
        self._decoder = decoder
        self._raw: Iterator[bytes] | None = None
        self._ended = False

    def _chunks(self) -> Iterator[bytes]:
        if self._raw is None:
            self._raw = iter(self._source.stream)  # type: ignore[arg-type]
        return self._raw

    def __iter__(self) -> Iterator[bytes]:
        deadline: float | None = None
        try:
            for data in self._chunks():
                yield from self._decoder.feed(data)
                if self._decoder.in_tail:
                    now = time.monotonic()
                    deadline = deadline or now + MAX_TAIL_SECONDS
                    if now > deadline:
                        raise _tail_too_slow()
        except httpx.HTTPError as exc:
            if self._decoder.in_tail:
                raise _cut_in_tail() from exc
            raise
        self._ended = True
        yield from self._decoder.end()

    def close(self) -> None:
        try:
            if not self._ended and self._decoder.wants_tail:
                self._read_tail()
        finally:
            self._source.close()

    def _read_tail(self) -> None:
        # The caller stopped after the content (the OpenAI SDK stops at "data: [DONE]"): read
        # a bounded tail for the receipt. It is not content, so its defects are not raised.
        taken = 0
        try:
            for data in self._chunks():
                self._decoder.feed(data)
                taken += len(data)
                if taken > MAX_TAIL_BYTES or not self._decoder.wants_tail:
                    return
            self._ended = True
            self._decoder.end()
        except ReceiptInvalid:
            raise  # a bad signed receipt is never ignored, even after the content
        except (ClientError, httpx.HTTPError):
            return


class _AsyncBody(httpx.AsyncByteStream):
    """The async twin of :class:`_SyncBody`.

    Each raw read runs as its own task, awaited through ``asyncio.shield``: a reader cancelled
    mid-read (the OpenAI SDK drains a finished stream for only 0.1 s) leaves the stream intact,
    so ``aclose`` can still collect a receipt that follows the content.
    """

    def __init__(self, source: httpx.Response, decoder: ReplyDecoder) -> None:
        self._source = source
        self._decoder = decoder
        self._raw: AsyncIterator[bytes] | None = None
        self._pending: asyncio.Future[bytes | None] | None = None
        self._ended = False

    async def _next_raw(self) -> bytes | None:
        if self._raw is None:
            self._raw = aiter(self._source.stream)  # type: ignore[arg-type]
        task = self._pending
        if task is None:
            task = self._pending = asyncio.ensure_future(_anext_or_none(self._raw))
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._pending = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        deadline: float | None = None
        while True:
            try:
                if deadline is None:
                    data = await self._next_raw()
                else:
                    async with asyncio.timeout_at(deadline):
                        data = await self._next_raw()
            except TimeoutError:
                if deadline is None:
                    raise
                raise _tail_too_slow() from None
            except httpx.HTTPError as exc:
                if self._decoder.in_tail:
                    raise _cut_in_tail() from exc
                raise
            if data is None:
                break
            for chunk in self._decoder.feed(data):
                yield chunk
            if deadline is None and self._decoder.in_tail:
                deadline = asyncio.get_running_loop().time() + MAX_TAIL_SECONDS
        self._ended = True
        for chunk in self._decoder.end():
            yield chunk

    async def aclose(self) -> None:
        try:
            if not self._ended and self._decoder.wants_tail:
                await self._read_tail()
        finally:
            task, self._pending = self._pending, None
            if task is not None:
                task.cancel()
                task.add_done_callback(_retrieve)
            await self._source.aclose()

    async def _read_tail(self) -> None:
        taken = 0
        try:
            while (data := await self._next_raw()) is not None:
                self._decoder.feed(data)
                taken += len(data)
                if taken > MAX_TAIL_BYTES or not self._decoder.wants_tail:
                    return
            self._ended = True
            self._decoder.end()
        except ReceiptInvalid:
            raise  # a bad signed receipt is never ignored, even after the content
        except (ClientError, httpx.HTTPError):
            return


def _tail_too_slow() -> ReceiptMissing:
    return ReceiptMissing(
        f"the reply's receipt did not arrive within {MAX_TAIL_SECONDS:g} s of its content's end"
    )


def _cut_in_tail() -> ReceiptMissing:
    return ReceiptMissing("the connection ended after the reply's content, before its receipt")


def _retrieve(task: asyncio.Future[bytes | None]) -> None:
    # An abandoned read's outcome is of no interest, but asyncio warns unless it is fetched.
    if not task.cancelled():
        task.exception()


async def _anext_or_none(raw: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(raw)
    except StopAsyncIteration:
        return None


def _read_request(request: httpx.Request, limit: int) -> bytes:
    buf = bytearray()
    for chunk in request.stream:  # type: ignore[union-attr]
        buf += chunk
        if len(buf) > limit:
            raise RequestTooLarge(f"the request body passed {limit} bytes")
    return bytes(buf)


async def _aread_request(request: httpx.Request, limit: int) -> bytes:
    buf = bytearray()
    async for chunk in request.stream:  # type: ignore[union-attr]
        buf += chunk
        if len(buf) > limit:
            raise RequestTooLarge(f"the request body passed {limit} bytes")
    return bytes(buf)


def _read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    buf = bytearray()
    try:
        for chunk in response.stream:  # type: ignore[union-attr]
            buf += chunk
            if len(buf) > limit:
                raise ReplyTooLarge(f"{what} passed {limit} bytes")
    finally:
        response.close()
    return bytes(buf)


async def _aread_body(response: httpx.Response, limit: int, what: str) -> bytes:
    buf = bytearray()
    try:
        async for chunk in response.stream:  # type: ignore[union-attr]
            buf += chunk
            if len(buf) > limit:
                raise ReplyTooLarge(f"{what} passed {limit} bytes")
    finally:
        await response.aclose()
    return bytes(buf)
