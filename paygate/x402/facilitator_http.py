"""HTTP/1.1 to an x402 facilitator: keep-alive connections, httptools' C parser, one deadline.

Why not aiohttp's ``ClientSession`` (what the facilitator calls used before): every paid
request calls ``/verify`` (and ``/settle`` after), and per call the session built a request
object, a URL, a ``ClientTimeout``, a timer context, a ``StreamReader``, a response object and
encoded the body with its own JSON payload class: ~15 % of the paid path's main-thread CPU
(``bench.profile --paid``). Here a call is one bytes write and one future: the request head is
built from a prefix made once, the body arrives already encoded (orjson, by the caller), the
answer is collected by the parser's callbacks into one bounded list, and one timer enforces the
call's deadline.

Why not the forwarding path's pool (:mod:`paygate.upstream.http1`): it resends any request on
a reused connection that closed before a byte of reply, which is right for the model server
and wrong for ``/settle`` (below); it is built for streamed, decoded, backpressured bodies the
facilitator never sends; and it is tuned under the free path's own work. Why httptools rather
than aiohttp's C parser: the reasons in that module (a public callback API; aiohttp's parser is
internal and builds the per-message objects this client exists to avoid).

What stays as it was with the aiohttp session:

- TLS for ``https://`` against the system trust store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` name
  a private CA), credentials in the URL sent as Basic authorization, redirects never followed
  (a 3xx is an answer like any other).
- Two clocks: ``connect_timeout`` for the TCP and TLS handshake and ``timeout`` for the whole
  call, connect included. Either expiring before the connection is made is
  :class:`FacilitatorConnectTimeout`; the total expiring after it is :class:`AnswerTimeout`.
  Both are :class:`TimeoutError`. A facilitator that answers byte by byte is bounded by the
  total.
- :class:`NotSent` (refused, unreachable, no name, a bad certificate, a connect or handshake
  that never completed: :class:`FacilitatorConnectTimeout`, a header that may not be sent,
  every connection busy until the deadline: :class:`PoolBusy`, the client closed while the
  call waited for a connection): the request did not leave — no byte of it is written before
  the connection (TLS included) is made — so a settlement is unavailable and sent again, not of
  unknown outcome (with the session a connect timeout was a plain timeout, and a settlement's
  caller took it as unknown). Everything after the request's bytes left is :class:`Broken`
  (malformed, cut short, lost) or :class:`AnswerTimeout`: the outcome is unknown.
- The answer's body is bounded (:data:`MAX_ANSWER`, after decoding ``gzip``/``deflate``);
  past it the connection is closed and the call fails with :class:`TooLarge`. A head is
  bounded too (:data:`MAX_HEAD`), and so is all the rest (:data:`MAX_FRAMING`: interim
  answers, chunk sizes, trailers).
- At most :data:`CONNECTIONS` open at once; a call waits for a free one within its deadline
  (an idle one the call may not ride, e.g. too old for a settlement, is closed to make room).

The stale-connection rule. A pooled connection can be closed by the facilitator (its idle timer)
while our request is on the wire; the request then meets a closed socket and not one byte of
answer comes back. That request was not processed — but a facilitator that read it and then
died looks exactly the same. So:

- ``/verify`` (read-only) is resent once on a new connection (``resend_stale=True``).
- ``/settle`` moves money and is never resent after its bytes left (``resend_stale=False``):
  a stale connection is :class:`Broken`, the settlement's outcome unknown and reconciled.
  To make that rare, a settlement only takes a connection used within
  :data:`SETTLE_IDLE` seconds — well under the idle timeouts of common servers (Node and
  uvicorn: 5 s) — and opens a new one otherwise. A connection the facilitator closed while it
  sat in the pool is seen (its end arrives on the loop) and never used.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import httptools
import yarl

from paygate.errors import PaygateError

MAX_ANSWER = 64 * 1024  # bytes of an answer's body (decoded)
MAX_HEAD = 16 * 1024  # bytes of an answer's status line and headers
# Bytes an answer may send besides its body: its heads (interim ones too), chunk sizes and
# trailers (which httptools gathers in memory, past the head's and the body's bounds).
MAX_FRAMING = 2 * MAX_HEAD
CONNECTIONS = 100  # open at once (the session's pool size before)
IDLE = 15.0  # a pooled connection idle longer than this is closed, not reused
SETTLE_IDLE = 2.0  # a settlement only rides a connection used this recently
_FRAMING = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "te", "upgrade"}
)
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class FacilitatorHttpError(PaygateError):
    """A call to the facilitator failed."""

    code = "facilitator_exchange_failed"
    message = "the exchange with the facilitator failed"


class NotSent(FacilitatorHttpError):
    """The request did not leave: no connection, or it could not be written safely."""

    code = "facilitator_unreachable"
    message = "the facilitator could not be reached"


class PoolBusy(NotSent):
    """Every connection stayed in use until the call's deadline: the request never left (a
    settlement is then unavailable, not of unknown outcome)."""

    code = "facilitator_connections_busy"
    message = "every connection to the facilitator stayed busy until the call's deadline"


class Broken(FacilitatorHttpError):
    """The request left; the answer was malformed, cut short or lost."""

    code = "facilitator_answer_lost"
    message = "the facilitator's answer was malformed or lost"


class TooLarge(Broken):
    code = "facilitator_answer_too_large"
    message = "the facilitator's answer is too large"


class FacilitatorConnectTimeout(NotSent, TimeoutError):
    """The connection (TCP, and TLS for https) was not made in time: nothing of the request was
    written, so it did not leave (a settlement is unavailable, not of unknown outcome)."""

    code = "facilitator_connect_timeout"
    message = "the connection to the facilitator timed out"


class AnswerTimeout(FacilitatorHttpError, TimeoutError):
    code = "facilitator_timeout"
    message = "the facilitator did not answer in time"


class _StaleConnection(Broken):
    """A reused connection closed before a byte of the answer."""

    code = "facilitator_stale_connection"
    message = "a kept connection to the facilitator closed before its answer"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class FacilitatorHttp:
    """Keep-alive HTTP/1.1 calls to the facilitator at ``url`` (``http://`` or ``https://``)."""

    def __init__(
        self, url: str, *, connections: int = CONNECTIONS, max_answer: int = MAX_ANSWER
    ) -> None:
        parsed = yarl.URL(url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ValueError("the facilitator URL must be http:// or https:// with a host")
        self._host = parsed.raw_host
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._tls = parsed.scheme == "https"
        self._base = parsed
        lines = [
            f"Host: {parsed.host_port_subcomponent}",
            "Accept: application/json",
            "User-Agent: paygate",
        ]
        if parsed.user is not None:
            pair = f"{parsed.user}:{parsed.password or ''}".encode("latin-1")
            lines.append(f"Authorization: Basic {base64.b64encode(pair).decode('ascii')}")
        self._fixed = "".join(line + "\r\n" for line in lines)
        self._credentials = parsed.user is not None
        self._targets: dict[str, str] = {}
        self._connections = connections
        self._max_answer = max_answer
        # The trust store as it is at start (SSL_CERT_FILE/SSL_CERT_DIR name a private CA).
        self._ssl = ssl.create_default_context() if self._tls else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: collections.deque[_FacilitatorConnection] = collections.deque()
        self._open = 0
        self._slots: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def call(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        timeout: float,
        connect_timeout: float,
        resend_stale: bool,
    ) -> Answer:
        """``method`` ``path`` (below the URL's own path) with a JSON ``body``; the answer
        whatever its status. Raises the errors in the module docstring."""
        data = self._encode(method, path, headers, body)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._adopt(loop)
        deadline = loop.time() + timeout
        conn = await self._acquire(loop, deadline, connect_timeout, resend_stale)
        try:
            return await conn.exchange(data, deadline)
        except _StaleConnection:
            if not resend_stale:
                raise Broken("the connection closed before any answer") from None
        # Read-only: once more, on a new connection (a pooled one may be as stale).
        conn = await self._acquire(loop, deadline, connect_timeout, resend_stale, fresh=True)
        return await conn.exchange(data, deadline)

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connections belong to the loop that opened them: another loop starts afresh."""
        for conn in self._idle:
            conn.abandon()
        self._idle.clear()
        self._slots.clear()
        self._open = 0
        self._loop = loop

    def _target(self, path: str) -> str:
        target = self._targets.get(path)
        if target is None:
            url = yarl.URL(str(self._base) + path)  # as the session joined them
            target = url.raw_path_qs or "/"
            if len(self._targets) < 16:
                self._targets[path] = target
        return target

    def _encode(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = [method, " ", self._target(path), " HTTP/1.1\r\n", self._fixed]
        for name, value in headers.items():
            # A name that is not a token, or a CR, LF or NUL in a value, would let a configured
            # header rewrite the request (injection); the framing headers are ours to set.
            if (
                not name
                or not _TOKEN.issuperset(name)
                or name.lower() in _FRAMING
                or (self._credentials and name.lower() == "authorization")
                or "\r" in value
                or "\n" in value
                or "\x00" in value
            ):
                raise NotSent("a facilitator header cannot be sent as configured")
            lines += (name, ": ", value, "\r\n")
        lines += ("Content-Type: application/json\r\nContent-Length: ", str(len(body)), "\r\n\r\n")
        try:
            return "".join(lines).encode("latin-1") + body
        except UnicodeEncodeError:
            raise NotSent("a facilitator header is not latin-1") from None

    def _pooled(self, now: float, max_idle: float) -> _FacilitatorConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if not conn.closed and now - conn.idle_since < max_idle:
                return conn
            if not conn.closed and now - conn.idle_since < IDLE:
                idle.append(conn)  # too old for a settlement, still good for a verification
                return None
            conn.close()
        return None

    async def _acquire(
        self,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        connect_timeout: float,
        read_only: bool,
        *,
        fresh: bool = False,
    ) -> _FacilitatorConnection:
        while True:
            if self._closed:
                raise NotSent("the facilitator client is closed")
            if not fresh:
                conn = self._pooled(loop.time(), IDLE if read_only else SETTLE_IDLE)
                if conn is not None:
                    return conn
            if self._open >= self._connections and self._idle:
                # Full, but with idle connections this call may not ride (too old for a
                # settlement, or a resend's fresh one): the oldest makes room, rather than
                # the call waiting out its deadline on a pool nobody will hand back.
                self._evict(self._idle.popleft())
            if self._open < self._connections:
                return await self._connect(loop, deadline, connect_timeout)
            slot = loop.create_future()  # woken when a connection is back or gone
            self._slots.append(slot)
            timer = loop.call_at(deadline, _expire, slot, PoolBusy)
            try:
                await slot
            finally:
                timer.cancel()

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, deadline: float, connect_timeout: float
    ) -> _FacilitatorConnection:
        self._open += 1
        connect_end = min(loop.time() + connect_timeout, deadline)
        made: list[_FacilitatorConnection] = []

        def connection() -> _FacilitatorConnection:
            made.append(_FacilitatorConnection(self, loop))
            return made[0]

        try:
            async with asyncio.timeout_at(connect_end):
                _, conn = await loop.create_connection(
                    connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._tls else None,
                )
        except TimeoutError:  # the connect's clock or the call's: either way nothing left
            self._failed(made)
            raise FacilitatorConnectTimeout() from None
        except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
            self._failed(made)
            raise NotSent(type(exc).__name__) from None
        except BaseException:
            self._failed(made)
            raise
        return conn

    def _failed(self, made: list[_FacilitatorConnection]) -> None:
        """A connect that failed is gone, once: a transport made before the failure is closed
        by asyncio, and its end must not count it gone again."""
        if made and not made[0].counted:
            return  # its end came first and counted it
        if made:
            made[0].abandon()
        self._gone()

    def _put(self, conn: _FacilitatorConnection) -> None:
        if self._closed:
            conn.close()
            return
        assert self._loop is not None
        now = conn.idle_since = self._loop.time()
        idle = self._idle
        # The oldest end: connections closed or expired under newer ones go here, not later.
        while idle and (idle[0].closed or now - idle[0].idle_since >= IDLE):
            idle.popleft().close()
        idle.append(conn)
        self._wake_one()

    def _evict(self, conn: _FacilitatorConnection) -> None:
        """Close an idle connection and count it gone now (its end arrives later)."""
        if conn.counted:
            conn.abandon()
            self._gone()
        else:
            conn.close()

    def _gone(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    @property
    def open_connections(self) -> int:
        return self._open

    async def close(self) -> None:
        """Close the idle connections; one in use closes when its call ends. A call waiting
        for a connection is woken and refused (NotSent) now, not at its deadline."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)


def _expire(future: asyncio.Future[object], error: type[FacilitatorHttpError]) -> None:
    if not future.done():
        future.set_exception(error())


class _FacilitatorConnection(asyncio.Protocol):
    """One connection to the facilitator, one call at a time; the parser's callbacks fill the
    answer and :meth:`data_received` resolves the call's future when it is whole."""

    def __init__(self, client: FacilitatorHttp, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Answer] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._head = 0  # bytes fed before the head was whole
        self._wire = 0  # bytes fed for this answer, body included
        self._in_body = False
        self._complete = False
        self._keep_alive = False
        self._interim = False
        self._framed = False
        self._encoding = b""
        self._received = False
        self._problem: Broken | None = None
        self._counted = True
        self.reused = False
        self.closed = False
        self.idle_since = 0.0

    # --- the call ---

    async def exchange(self, data: bytes, deadline: float) -> Answer:
        if self.closed or self._transport is None:
            # Closed by the other end before a byte was written: the request did not leave.
            raise NotSent("the connection closed before the request was sent")
        loop = self._loop
        answer = self._answer = loop.create_future()
        self._body, self._size, self._head, self._wire = [], 0, 0, 0
        self._in_body = self._complete = self._interim = self._framed = self._received = False
        self._keep_alive = False
        self._encoding = b""
        self._transport.write(data)
        timer = loop.call_at(deadline, _expire, answer, AnswerTimeout)
        try:
            result = await answer
        except BaseException:
            self.close()  # a timeout, a cancel or a broken answer: never reused
            raise
        finally:
            timer.cancel()
            self._answer = None
        if self._keep_alive and not self.closed:
            self.reused = True
            self._client._put(self)
        else:
            self.close()
        return result

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are duck-typed

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer.done():
            self.close()  # bytes nobody asked for: this connection is not trusted again
            return
        self._received = True
        self._wire += len(data)
        if not self._in_body:
            self._head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            problem: Broken | None = Broken("protocol upgrade")
        except httptools.HttpParserError:
            problem = self._problem or Broken("malformed answer")
        else:
            problem = self._problem
        if self._complete:
            self._finish()
            if problem is not None:
                self.close()  # bytes after the answer: it stands, the connection does not
        elif problem is not None:
            self._fail(problem)
        elif not self._in_body and self._head > MAX_HEAD:
            self._fail(Broken("answer head too large"))
        elif self._wire - self._size > MAX_FRAMING:
            self._fail(TooLarge("answer framing too large"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._counted:
            self._counted = False
            if self._client._loop is self._loop:
                self._client._gone()
        answer = self._answer
        if answer is None or answer.done():
            return
        if self._in_body and not self._framed and self._problem is None:
            self._finish()  # no length, not chunked: the end of the connection ends the body
        elif not self._received and self.reused:
            answer.set_exception(_StaleConnection())
        else:
            answer.set_exception(Broken("connection lost before the answer's end"))

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._complete:
            self._problem = Broken("bytes after the answer")
            raise self._problem  # stops the parser

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self._framed = True
        elif lowered == b"content-encoding":
            self._encoding = value.strip().lower()

    def on_headers_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            self._interim = True  # 100 Continue and friends: the real answer follows
            self._head = 0
            return
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        # A compressed body is held to the same bound on the wire, and again once decoded.
        if self._size > self._client._max_answer:
            self._problem = TooLarge("answer too large")
            raise TooLarge()  # stops the parser
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._framed = False
            self._encoding = b""
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()  # the parser forgets after this

    # --- ends ---

    def _finish(self) -> None:
        answer = self._answer
        if answer is None or answer.done():
            return
        body = b"".join(self._body)
        self._body = []
        encoding = self._encoding
        if encoding not in (b"", b"identity"):
            try:
                body = _decode(encoding, body, self._client._max_answer)
            except Broken as exc:
                self._fail(exc)
                return
        answer.set_result(Answer(self._parser.get_status_code(), body))

    def _fail(self, error: Broken) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(error)
        self.close()

    @property
    def counted(self) -> bool:
        """Whether the pool still counts this connection as open."""
        return self._counted

    def abandon(self) -> None:
        """Forget this connection (its loop is gone or going): never counted again."""
        self._counted = False
        with contextlib.suppress(RuntimeError):  # its loop may be closed already
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()


def _decode(encoding: bytes, body: bytes, limit: int) -> bytes:
    if encoding in (b"gzip", b"x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        raw = not body or (body[0] & 0x0F) != 8  # zlib-wrapped by the RFC, raw in some servers
        decoder = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    else:
        raise Broken("unsupported Content-Encoding")
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error:
        raise Broken("undecodable answer") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise TooLarge("answer too large")
    return out
