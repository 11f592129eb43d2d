"""httpx transports that seal, pay and open: a drop-in ``http_client`` for the OpenAI SDK.

``httpx.Client(transport=PaygateTransport(...))`` (or ``AsyncPaygateTransport`` with
``httpx.AsyncClient``) seals every request body to the appliance's key, answers one 402 with a
signed x402 payment within the spend policy, and opens the sealed reply, streams chunk by
chunk. Both run the same sans-IO steps (:mod:`paygate.client.steps`, around the flow of
:mod:`paygate.client.core`): each only does a step's I/O, and holds its own kind of key lock.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from types import TracebackType
from typing import Any, Generic, TypedDict, TypeVar, Unpack

import httpx
from eth_account.signers.local import LocalAccount

from paygate.client.attestation import AttestationPolicy, Attested
from paygate.client.core import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SEALED_REPLY_BYTES,
    MAX_TAIL_BYTES,
    ClientCore,
    Deliver,
    Discard,
    Envelope,
    LoadKey,
    ReadBody,
    ReadRequest,
    ReceiptCallback,
    SaveChannels,
    Send,
    Wait,
)
from paygate.client.errors import (
    ClientError,
    ReceiptInvalid,
    ReceiptMissing,
    ReplyTooLarge,
    RequestTooLarge,
)
from paygate.client.payer import SentPayment, SpendPolicy, X402Version
from paygate.client.pubkey import AsyncAttestationHook, AttestationHook, EnclaveKey
from paygate.client.receipts import MAX_TAIL_SECONDS
from paygate.client.refunds import refund_steps
from paygate.client.steps import Fetch, Run, Step, Steps, key_steps, request_steps
from paygate.client.streams import ReplyDecoder
from paygate.client.withheld import DEFAULT_MAX_WAIT, DEFAULT_RETRIES, Withheld
from paygate.x402.models import SettleResponse

T = TypeVar("T")


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
    channel_state: str | os.PathLike[str] | None
    withheld_retries: int
    withheld_max_wait: float


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
        channel_state=options.get("channel_state"),
        withheld=Withheld(
            options.get("withheld_retries", DEFAULT_RETRIES),
            options.get("withheld_max_wait", DEFAULT_MAX_WAIT),
        ),
    )


HttpT = TypeVar("HttpT", httpx.BaseTransport, httpx.AsyncBaseTransport)
HookT = TypeVar("HookT", AttestationHook, AsyncAttestationHook)


class _Transport(Generic[HttpT, HookT]):
    """What both transports hold and show: the sans-IO core, the transport that does the HTTP
    (``_http()`` by default), the caller's attestation hook, and the key lock (``_lock()``)."""

    _http: Callable[[], HttpT]
    _lock: Callable[[], Any]

    def __init__(
        self,
        *,
        transport: HttpT | None = None,
        attest: HookT | None = None,
        **options: Unpack[TransportOptions],
    ) -> None:
        self._core = _core(options)
        self._inner: HttpT = transport if transport is not None else self._http()
        self._attest = attest
        self._key_lock = self._lock()

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


class PaygateTransport(_Transport[httpx.BaseTransport, AttestationHook], httpx.BaseTransport):
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
        channel_state: a file keeping the batch-settlement channels across restarts
            (docs/CLIENT.md "Channels across restarts"); held by this transport until closed.
        withheld_retries: times a paid reply the gateway withheld (503 ``lease_lost`` or
            ``ledger_unavailable``: its charge not recorded, the payment released) is sent
            again with the same payment (default 1; 0: the 503 goes to the caller).
        withheld_max_wait: the longest ``Retry-After`` (seconds) waited for such a retry
            (default 5); the gateway asking longer, the 503 goes to the caller.
    """

    _http = httpx.HTTPTransport
    _lock = threading.Lock  # one key fetch at a time, even with many threads

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return _response(self._drive(request_steps(self._core, request)), _SyncBody)

    def refund(
        self, url: str, *, amount: Decimal | str | None = None, timeout: float | None = 30.0
    ) -> list[SettleResponse]:
        """Refund what is left in this transport's batch-settlement channels with ``url``'s
        origin (``amount``, whole tokens: part of the one channel's rest); their receipts.
        What came back stops counting against the spend policy's ``max_total``."""
        return self._drive(refund_steps(self._core.payer, url, amount, timeout))

    def _drive(self, steps: Steps[T]) -> T:
        run = Run(steps)
        while run.step is not None:
            try:
                result = self._do(run.step)
            except BaseException as exc:
                run.throw(exc)
            else:
                run.send(result)
        return run.result

    def _do(self, step: Step) -> object:
        """One step's I/O (see paygate.client.steps)."""
        if isinstance(step, ReadRequest):
            return _read_request(step.request, step.limit)
        if isinstance(step, LoadKey):
            with self._key_lock:
                return self._drive(key_steps(self._core, step))
        if isinstance(step, SaveChannels):
            return step.save()
        if isinstance(step, Wait):
            return time.sleep(step.seconds)
        if isinstance(step, Send):
            return self._inner.handle_request(step.request)
        if isinstance(step, ReadBody):
            return _read_body(step.response, step.limit, step.what)
        if isinstance(step, Discard):
            return step.response.close()
        if isinstance(step, Fetch):
            response = self.handle_request(step.request)
            return response, _read_body(response, step.limit, step.what)
        if self._attest is not None:  # Hook
            self._attest(step.key)
        return None

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._core.close()

    def __enter__(self) -> PaygateTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()


class AsyncPaygateTransport(
    _Transport[httpx.AsyncBaseTransport, AsyncAttestationHook], httpx.AsyncBaseTransport
):
    """Seal, pay, open — for ``httpx.AsyncClient``. Same arguments as
    :class:`PaygateTransport`; ``transport`` defaults to ``httpx.AsyncHTTPTransport()`` and
    ``attest`` may be a coroutine function."""

    _http = httpx.AsyncHTTPTransport
    _lock = asyncio.Lock

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        attest: AsyncAttestationHook | None = None,
        **options: Unpack[TransportOptions],
    ) -> None:
        super().__init__(transport=transport, attest=attest, **options)
        # The channel state file's writes after an answer (two fsyncs each) go to one thread
        # of our own, so the caller's event loop never waits on the disk.
        self._writer: ThreadPoolExecutor | None = None
        payer = self._core.payer
        if payer is not None and payer.channels is not None and payer.channels.keeps_state:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="paygate-channel-state")
            payer.channels.write_later(self._writer.submit)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return _response(await self._drive(request_steps(self._core, request)), _AsyncBody)

    async def refund(
        self, url: str, *, amount: Decimal | str | None = None, timeout: float | None = 30.0
    ) -> list[SettleResponse]:
        """As :meth:`PaygateTransport.refund`."""
        return await self._drive(refund_steps(self._core.payer, url, amount, timeout))

    async def _drive(self, steps: Steps[T]) -> T:
        run = Run(steps)
        while run.step is not None:
            try:
                result = await self._do(run.step)
            except BaseException as exc:
                run.throw(exc)
            else:
                run.send(result)
        return run.result

    async def _do(self, step: Step) -> object:
        if isinstance(step, ReadRequest):
            return await _aread_request(step.request, step.limit)
        if isinstance(step, LoadKey):
            async with self._key_lock:
                return await self._drive(key_steps(self._core, step))
        if isinstance(step, SaveChannels):
            # Two fsyncs: in a worker thread, so the event loop runs on; awaited, so the
            # payment is sent only once the state is on disk.
            return await asyncio.to_thread(step.save)
        if isinstance(step, Wait):
            return await asyncio.sleep(step.seconds)
        if isinstance(step, Send):
            return await self._inner.handle_async_request(step.request)
        if isinstance(step, ReadBody):
            return await _aread_body(step.response, step.limit, step.what)
        if isinstance(step, Discard):
            return await step.response.aclose()
        if isinstance(step, Fetch):
            response = await self.handle_async_request(step.request)
            return response, await _aread_body(response, step.limit, step.what)
        if self._attest is not None:  # Hook
            called = self._attest(step.key)
            if inspect.isawaitable(called):
                await called
        return None

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            # The queued writes finish, then the last one: in a thread, off the event loop.
            await asyncio.to_thread(self._close_core)

    def _close_core(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        self._core.close()

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


def _response(deliver: Deliver, body: type[_SyncBody] | type[_AsyncBody]) -> httpx.Response:
    """The response for httpx: the whole content, or the source streamed through ``body``."""
    if deliver.source is None:
        return httpx.Response(
            deliver.status,
            headers=deliver.headers,
            content=deliver.content,
            extensions=deliver.extensions,
        )
    assert deliver.decoder is not None  # a streamed body always has its decoder
    stream = body(deliver.source, deliver.decoder)
    return httpx.Response(
        deliver.status, headers=deliver.headers, stream=stream, extensions=deliver.extensions
    )


class _Body:
    """What both reply bodies share: the source, its decoder, and the bounded read of the tail
    when the caller stops after the content (the OpenAI SDK stops at "data: [DONE]"), for the
    receipt that follows it."""

    def __init__(self, source: httpx.Response, decoder: ReplyDecoder) -> None:
        self._source = source
        self._decoder = decoder
        self._ended = False
        self._tail_read = 0

    def _end(self) -> list[bytes]:
        self._ended = True
        return self._decoder.end()

    def _wants_tail(self) -> bool:
        return not self._ended and self._decoder.wants_tail

    def _tail(self, data: bytes) -> bool:
        """Feed a chunk of the tail: whether to read on (the receipt is due, within bounds)."""
        self._decoder.feed(data)
        self._tail_read += len(data)
        return self._tail_read <= MAX_TAIL_BYTES and self._decoder.wants_tail


@contextmanager
def _tail_defects_ignored() -> Iterator[None]:
    """The tail is not content, so its defects are not raised; but a bad signed receipt is
    never ignored, even after the content."""
    try:
        yield
    except ReceiptInvalid:
        raise
    except (ClientError, httpx.HTTPError):
        pass


class _SyncBody(_Body, httpx.SyncByteStream):
    """A reply body passed through its decoder as it arrives."""

    _raw: Iterator[bytes] | None = None

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
        yield from self._end()

    def close(self) -> None:
        try:
            if self._wants_tail():
                self._read_tail()
        finally:
            self._source.close()

    def _read_tail(self) -> None:
        with _tail_defects_ignored():
            for data in self._chunks():
                if not self._tail(data):
                    return
            self._end()


class _AsyncBody(_Body, httpx.AsyncByteStream):
    """The async twin of :class:`_SyncBody`.

    Each raw read runs as its own task, awaited through ``asyncio.shield``: a reader cancelled
    mid-read (the OpenAI SDK drains a finished stream for only 0.1 s) leaves the stream intact,
    so ``aclose`` can still collect a receipt that follows the content.
    """

    _raw: AsyncIterator[bytes] | None = None
    _pending: asyncio.Future[bytes | None] | None = None

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
        for chunk in self._end():
            yield chunk

    async def aclose(self) -> None:
        try:
            if self._wants_tail():
                await self._read_tail()
        finally:
            task, self._pending = self._pending, None
            if task is not None:
                task.cancel()
                task.add_done_callback(_retrieve)
            await self._source.aclose()

    async def _read_tail(self) -> None:
        with _tail_defects_ignored():
            while (data := await self._next_raw()) is not None:
                if not self._tail(data):
                    return
            self._end()


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
