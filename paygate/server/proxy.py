"""Streaming forwarding to the model server over a pool of HTTP/1.1 connections.

The exchanges go through ``paygate.upstream.http1`` (asyncio protocols, httptools' C parser);
the readiness probe keeps the shared aiohttp ClientSession.

Each upstream exchange has four clocks (connect, first byte, idle between chunks, total), each
failing with its own 504; broken connections and malformed replies are 502. Headers are
filtered both ways (hop-by-hop, payment and cookie headers never cross). The upstream is asked
for ``identity`` encoding and anything it compresses anyway is decoded here, so sealing always
works on the plain body and a relayed body never carries a stale Content-Encoding.
The time spent waiting on the upstream is counted, so the gateway can report its own overhead.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import SecretStr

from paygate.server.errors import UpstreamDown, UpstreamFault, UpstreamTimeout, UpstreamUnavailable
from paygate.server.metrics import Metrics
from paygate.upstream import http1
from paygate.upstream.breaker import CircuitBreaker
from paygate.upstream.usage import Usage, UsageReader

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers copied from the caller; everything else (cookies, Authorization, payment
# headers, X-Obol-Reply-Pubkey, the caller's X-Forwarded-*) stays at the gateway.
FORWARDED_REQUEST_HEADERS = frozenset({"accept", "accept-language", "user-agent"})
# Response headers never relayed: they describe the upstream hop, were made stale by decoding,
# or could confuse a caller or the payment layer (a model server must not speak x402).
_DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "set-cookie",
    "set-cookie2",
    "settlement-overrides",
    "server",
    "date",
    "alt-svc",
    "strict-transport-security",
}
RETRY_BASE = 0.05  # seconds before the first retry; doubles each time, with jitter
RETRY_CAP = 2.0  # longest backoff between two attempts (a Retry-After may ask for more)
_DROPPED_RESPONSE_PREFIXES = ("payment-", "x-payment", "x-paygate-", "x-obol-")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream clocks in seconds."""

    connect: float
    first_byte: float
    idle: float
    total: float


def upstream_request_headers(
    caller: Mapping[str, str], *, client_address: str, scheme: str
) -> CIMultiDict[str]:
    """The headers sent upstream: an allowlist from the caller plus our own forwarding facts."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in caller.items():
        if name.lower() in FORWARDED_REQUEST_HEADERS:
            headers.add(name, value)
    headers["Accept-Encoding"] = "identity"
    if client_address:
        headers["X-Forwarded-For"] = client_address
    headers["X-Forwarded-Proto"] = scheme
    return headers


def relayed_response_headers(upstream: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's response headers that may reach the caller."""
    connection_tokens = {
        token.strip().lower()
        for value in _all(upstream, "Connection")
        for token in value.split(",")
        if token.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if (
            lower in _DROPPED_RESPONSE_HEADERS
            or lower in connection_tokens
            or lower.startswith(_DROPPED_RESPONSE_PREFIXES)
        ):
            continue
        out.add(name, value)
    return out


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return list(headers.getall(name, []))
    value = headers.get(name)
    return [value] if value is not None else []


class UpstreamReply:
    """An upstream response whose headers have arrived; read its body in chunks."""

    def __init__(
        self,
        response: http1.Response,
        clock: _Clock,
        on_usage: Callable[[Usage], None] | None = None,
    ) -> None:
        self._response = response
        self._clock = clock
        self.status = response.status
        self.content_type: str | None = response.headers.get("Content-Type")
        # Token usage as the model server states it, read from the body as it passes (set
        # once the body has been read to its end; None if it said nothing).
        self.usage: Usage | None = None
        self._reader = UsageReader(self.content_type) if self.status < 400 else None
        self._usage_reader = self._reader  # None once the body has ended
        self._on_usage = on_usage
        self.headers = relayed_response_headers(response.headers)
        # The length still describes the body we relay only if nothing had to be decoded.
        self.plain_length = response.content_length if response.identity else None

    @property
    def running_usage(self) -> Usage | None:
        """The counts the body stated so far (a stream's running usage), even if cut short."""
        return self._reader.running if self._reader is not None else None

    def keep_text(self) -> None:
        """Keep the completion text as it passes (a metered reply; bounded)."""
        if self._reader is not None:
            self._reader.keep_text = True

    @property
    def completion_text(self) -> str:
        """The completion text the body carried so far (bounded), for counting an early end."""
        return self._reader.text if self._reader is not None else ""

    @property
    def waited(self) -> float:
        """Seconds spent so far waiting on the upstream (connect, headers, chunks)."""
        return self._clock.waited

    def chunks(self) -> Chunks:
        """The decoded body, chunk by chunk as it arrives (idle and total clocks apply)."""
        return Chunks(self)

    async def _next_chunk(self) -> bytes:
        """The next chunk, b"" at the end."""
        body = self._response
        try:
            # What already arrived (often the whole of a small reply, with its headers) is
            # taken without arming a timer; the clocks rule every actual wait.
            chunk = body.read_nowait()
            if not chunk and not body.is_eof():
                chunk = await self._clock.read(body)
        except http1.Http1Error:
            raise UpstreamFault from None
        if not chunk:
            self._finish_usage()
            return b""
        if self._usage_reader is not None:
            self._usage_reader.feed(chunk)
        return chunk

    def arrived(self) -> bytes:
        """The body bytes already here, b"" if none yet (or if the reply failed: the relay
        meets that failure where it always did); taken as :meth:`chunks` takes them."""
        try:
            chunk = self._response.read_nowait()
        except http1.Http1Error:
            return b""
        if chunk and self._usage_reader is not None:
            self._usage_reader.feed(chunk)
        return chunk

    def count_cut(self) -> None:
        """A reply cut short by the caller (gone after the last event it wanted, the OpenAI SDK
        at ``[DONE]``): the usage its body stated so far still counts in the metrics. ``usage``
        stays None: metering tells a cut stream's counts by their source (running, tokenizer)."""
        reader, self._usage_reader = self._usage_reader, None
        if reader is None or self._on_usage is None:
            return
        seen = reader.result()
        if seen is not None:
            self._on_usage(seen)

    def _finish_usage(self) -> None:
        if self._usage_reader is None:
            return
        self.usage = self._usage_reader.result()
        self._usage_reader = None
        if self.usage is not None and self._on_usage is not None:
            self._on_usage(self.usage)

    def arrived_whole(self) -> bytes | None:
        """The whole body if it has all arrived already (a small reply usually comes with its
        headers), else None and nothing is consumed. Counted like a body read in chunks."""
        body = self._response.whole()
        if body is None:
            return None
        if self._usage_reader is not None:
            self._usage_reader.feed(body)
        self._finish_usage()
        return body

    async def read_bounded(self, limit: int) -> bytes | None:
        """The whole decoded body, or None if it exceeds ``limit`` bytes (reading stops there)."""
        whole = self._response.whole()
        if whole is not None:  # all of it came already (a small reply usually does)
            if len(whole) > limit:
                return None
            if whole and self._usage_reader is not None:
                self._usage_reader.feed(whole)
            self._finish_usage()
            return whole
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)


class Chunks:
    """``async for chunk in reply.chunks()`` (an iterator object rather than an async
    generator: one per reply; ``aclose`` is there for ``contextlib.aclosing``)."""

    __slots__ = ("_done", "_reply")

    def __init__(self, reply: UpstreamReply) -> None:
        self._reply = reply
        self._done = False

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        chunk = await self._reply._next_chunk()
        if not chunk:
            self._done = True
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._done = True


class _Clock:
    """The per-exchange deadlines and the tally of time spent waiting on the upstream."""

    def __init__(self, timeouts: Timeouts, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # the pool's (asyncio.get_running_loop costs a getpid() in 3.11)
        self._timeouts = timeouts
        self._deadline = self._loop.time() + timeouts.total
        self.waited = 0.0

    def now(self) -> float:
        return self._loop.time()

    async def head(
        self,
        pool: http1.Pool,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        until: float,
    ) -> http1.Response:
        """Connect (or reuse) and send; the reply's head under the first-byte clock (``until``)
        and the total one; 504 on expiry (ConnectTimeout is left to the caller)."""
        now = self._loop.time()
        try:
            return await pool.request(
                method,
                path,
                headers,
                body,
                connect_timeout=self._timeouts.connect,
                deadline=min(until, self._deadline),
            )
        except http1.ReadTimeout:
            raise UpstreamTimeout("total" if self._deadline <= until else "first_byte") from None
        finally:
            self.waited += self._loop.time() - now

    async def read(self, response: http1.Response) -> bytes:
        """The next body bytes under the idle clock and the total one; 504 on expiry."""
        now = self._loop.time()
        idle_end = now + self._timeouts.idle
        try:
            return await response.read(min(idle_end, self._deadline))
        except http1.ReadTimeout:
            raise UpstreamTimeout("total" if self._deadline <= idle_end else "idle") from None
        finally:
            self.waited += self._loop.time() - now

    async def pause(self, seconds: float) -> None:
        """Wait between attempts (counted as time spent on the upstream)."""
        now = self._loop.time()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.waited += self._loop.time() - now


class Upstream:
    """The model server: a connection pool for the exchanges, the session for the readiness
    probe, and the exchange clocks.

    With a ``breaker``, an open circuit answers 503 at once and refused connections count
    toward opening it. With an ``api_key`` (an attached remote server), every request carries
    ``Authorization: Bearer`` with it; callers' own Authorization never passes (see
    FORWARDED_REQUEST_HEADERS) and the key is never logged or shown.

    Retries (at most ``retries`` per request, each counted in ``metrics``): a connection that
    could not be opened (nothing was sent), or a 503 (the model server is loading), is tried
    again after an exponential backoff with jitter, or after the server's ``Retry-After`` if
    longer, but only while the first-byte deadline allows. Once a reply other than a 503 has
    begun, nothing is retried: it is relayed, and nothing had reached the caller before.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeouts: Timeouts,
        *,
        pool: http1.Pool,
        breaker: CircuitBreaker | None = None,
        api_key: SecretStr | None = None,
        retries: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._pool = pool
        self._base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self._breaker = breaker
        self._api_key = api_key
        self._retries = retries
        self._metrics = metrics

    @property
    def breaker_open(self) -> bool | None:
        """The circuit breaker's state, or None without a breaker."""
        return None if self._breaker is None else self._breaker.is_open

    def _with_key(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        if self._api_key is None:
            return headers
        out = CIMultiDict(headers)
        out["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        return out

    async def probe(self, timeout: float) -> bool:
        """True if the model server answers HTTP at its base URL (any status below 500)."""
        try:
            async with asyncio.timeout(timeout):
                async with self._session.get(
                    self._base_url + "/",
                    allow_redirects=False,
                    headers=self._with_key({"Accept-Encoding": "identity"}),
                ) as response:
                    return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    def exchange(
        self, method: str, path: str, *, body: bytes | None, headers: Mapping[str, str]
    ) -> UpstreamExchange:
        """Send one request; ``async with`` yields once the response headers are in.

        Leaving the block early (an error, a cancelled caller) closes the upstream connection
        instead of returning it to the pool, so the model server sees the abort and stops.
        """
        return UpstreamExchange(self, method, path, body, headers)

    async def _head(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[http1.Response, UpstreamReply]:
        if self._breaker is not None and not self._breaker.allows():
            raise UpstreamDown(retry_after=self._breaker.retry_after)
        clock = _Clock(self.timeouts, self._pool.loop)
        first_byte_end = clock.now() + self.timeouts.first_byte
        attempt = 0
        sent = list(self._with_key(headers).items())
        while True:
            try:
                response = await clock.head(
                    self._pool, method, path, sent, body or None, first_byte_end
                )
            except http1.ConnectTimeout:
                self._failed("connect timeout")
                raise UpstreamTimeout("connect") from None
            except http1.ConnectFailed:
                # Not even connected: nothing was sent, so trying again is safe.
                delay = self._retry_delay(attempt, None, clock, first_byte_end)
                if delay is None:
                    self._failed("connection refused")
                    raise UpstreamUnavailable from None
                await self._before_retry("connect", delay, clock)
                attempt += 1
                continue
            except http1.Http1Error:
                raise UpstreamFault from None
            if response.status == 503:
                retry_after = response.headers.get("Retry-After")
                delay = self._retry_delay(attempt, retry_after, clock, first_byte_end)
                if delay is not None:
                    response.close()  # its body is not read: the connection is not reused
                    await self._before_retry("unavailable", delay, clock)
                    attempt += 1
                    continue
            break
        if self._breaker is not None:
            self._breaker.record_success()
        reply = UpstreamReply(
            response, clock, self._metrics.usage if self._metrics is not None else None
        )
        return response, reply

    def _retry_delay(
        self, attempt: int, retry_after: str | None, clock: _Clock, first_byte_end: float
    ) -> float | None:
        """Seconds to wait before the next attempt, or None: no retries left or no time."""
        if attempt >= self._retries:
            return None
        backoff = min(RETRY_BASE * 2**attempt, RETRY_CAP)
        delay = random.uniform(backoff / 2, backoff)  # noqa: S311 - jitter, not a secret
        asked = _delta_seconds(retry_after)
        if asked is not None:
            delay = max(delay, asked)
        if clock.now() + delay >= first_byte_end:
            return None  # the first byte could not come in time anyway: answer now
        return delay

    async def _before_retry(self, reason: str, delay: float, clock: _Clock) -> None:
        if self._metrics is not None:
            self._metrics.retry(reason)
        await clock.pause(delay)

    def _failed(self, reason: str) -> None:
        if self._breaker is not None:
            self._breaker.record_failure(reason)


class UpstreamExchange:
    """One exchange as a context manager (a class, not a generator: every request enters
    one): the reply on entry; on exit the connection back to the pool when the body was read
    to its end, else closed."""

    __slots__ = ("_args", "_reply", "_response", "_upstream")

    def __init__(
        self,
        upstream: Upstream,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> None:
        self._upstream = upstream
        self._args = (method, path, body, headers)
        self._response: http1.Response | None = None
        self._reply: UpstreamReply | None = None

    async def __aenter__(self) -> UpstreamReply:
        self._response, self._reply = await self._upstream._head(*self._args)
        return self._reply

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response, reply = self._response, self._reply
        assert response is not None
        assert reply is not None
        if exc_type is None:
            response.release()
        elif issubclass(exc_type, ConnectionResetError):
            # The caller's socket (a write to it failed), not the upstream: no mapping.
            reply.count_cut()
            response.close()
        elif issubclass(exc_type, http1.Http1Error):
            response.close()
            raise UpstreamFault from None
        else:  # the caller gone (cancelled), or a fault above
            reply.count_cut()
            response.close()


def _delta_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (an HTTP-date is ignored: backoff applies)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), 3600))
