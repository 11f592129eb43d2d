"""A pooled HTTP/1.1 client for the forwarding path: asyncio protocols and httptools' C parser.

Why not aiohttp's ``ClientSession`` here: per exchange it builds a request object, a URL, a
connection key, a timer context, a ``StreamReader`` and a response object, which was 38 % of
the gateway's CPU per request (docs/PERFORMANCE.md). This client keeps one parser per
connection and one small :class:`Response` per exchange, and sends head and body in one write.

Why ``httptools`` (llhttp, the parser Node.js uses) rather than aiohttp's C
``HttpResponseParser``: httptools is a public, stable, callback API (status, header, body,
message complete) that leaves the buffering to us, so the body goes from the parser's callback
into one bounded buffer that the relay reads. aiohttp's parser is an internal API (its
signature changed between minor releases) that builds the very per-message objects
(``RawResponseMessage``, a multidict proxy, a ``StreamReader`` with its own buffer and
waiters) this client exists to avoid.

What it keeps from the aiohttp session it replaces
(tests/integration/paygate/server/test_gateway_*.py):

- **Deadlines, not timeout scopes**: each wait (connect, response head, next body bytes) takes
  an absolute loop time; expiry raises :class:`ReadTimeout` or :class:`ConnectTimeout`, and the
  caller (``paygate.server.proxy``) names the clock that ran out. Bytes already buffered are
  returned without arming a timer.
- **Connect failures are told apart**: :class:`ConnectFailed` (refused, unreachable, no
  socket: nothing was sent, so retrying is safe) vs :class:`ConnectTimeout`.
- **Malformed replies** (the parser's errors, a connection lost before the message's end, an
  undecodable ``Content-Encoding``, heads over :data:`MAX_HEAD_BYTES`, and as many bytes
  that are not body in a row after the head: chunk sizes, a trailer) are :class:`ProtocolError`.
- **gzip and deflate** bodies are decoded as they are read, at most :data:`READ_CHUNK` decoded
  bytes per read (a small compressed body cannot balloon a buffer).
- **Pooling**: a connection goes back to the pool only when its reply was read to its end and
  both sides keep it alive; an exchange left early (:meth:`Response.close`) closes it, so the
  model server sees the abort. A reused connection that the server had already closed (its
  keep-alive timer crossing our request; not one byte of reply came back) is retried once on a
  new connection.
- **Backpressure**: reading from the socket pauses while :data:`HIGH_WATER` bytes of body
  wait to be relayed and resumes below :data:`LOW_WATER`; writing waits for the transport to
  drain.
- TCP, TLS (``https://``) or a unix socket (the container relay, docs/UPSTREAM.md).

HEAD is never forwarded (no route takes it); its reply is treated as ending at its head and the
connection is not reused.
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from paygate.errors import PaygateError

MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one reply
MAX_HEADERS = 128
READ_CHUNK = 256 * 1024  # most decoded bytes one read returns
HIGH_WATER = 256 * 1024  # body bytes buffered before the socket read pauses
LOW_WATER = 64 * 1024
KEEPALIVE_SECONDS = 15.0  # an idle pooled connection older than this is closed, not reused
_TIMER_SLACK = 0.001  # seconds a loop's timer may fire before its time


class Http1Error(PaygateError):
    """Any failure of an exchange."""

    code = "upstream_exchange_failed"
    message = "the exchange with the model server failed"


class ConnectFailed(Http1Error):
    """No connection could be opened (refused, unreachable, no socket): nothing was sent."""

    code = "upstream_connect_failed"
    message = "no connection to the model server could be opened"


class ConnectTimeout(Http1Error):
    """The connection was not established before the connect deadline."""

    code = "upstream_connect_timeout"
    message = "the connection to the model server timed out"


class ReadTimeout(Http1Error):
    """The deadline given to a wait passed (response head, or the next body bytes)."""

    code = "upstream_read_timeout"
    message = "the model server did not answer in time"


class ProtocolError(Http1Error):
    """A malformed or truncated reply, or a connection lost before the reply's end."""

    code = "upstream_protocol_error"
    message = "the model server's reply was malformed or cut short"


class _Stale(Http1Error):
    """A reused connection closed before a byte of reply: the request may be sent again."""

    code = "upstream_stale_connection"
    message = "a reused connection to the model server was closed"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the model server is: host and port (TLS for https), or a unix socket; the
    ``Host`` header and the path prefix of its base URL."""

    host: str
    port: int
    authority: str
    prefix: str = ""
    tls: bool = False
    unix_path: str | None = None

    @classmethod
    def from_url(cls, base_url: str, *, unix_path: str | None = None) -> Endpoint:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// base URL with a host")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        return cls(
            host=parts.hostname,
            port=port,
            authority=parts.netloc,
            prefix=parts.path.rstrip("/"),
            tls=tls,
            unix_path=unix_path,
        )


class Response:
    """One reply: status and headers once the head is in, then the body read as it arrives."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_complete",
        "_conn",
        "_decoder",
        "_error",
        "_flushed",
        "_tail",
        "_unframed",
        "_waiter",
        "content_length",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(
        self, conn: _Connection, status: int, headers: CIMultiDictProxy[str], unframed: bool
    ) -> None:
        self._conn: _Connection | None = conn
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: Http1Error | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._tail = b""  # compressed bytes the decoder has not consumed yet
        self._flushed = False
        self._unframed = unframed  # no length, not chunked: the body ends when the socket does
        self.status = status
        self.headers = headers
        self.keep_alive = False
        length = headers.get("Content-Length")
        length = length.strip() if length is not None else None
        self.content_length = int(length) if length is not None and length.isdigit() else None
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            self._decoder = None
        elif encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = _DeflateDecoder()
        else:
            raise ProtocolError("unsupported Content-Encoding")

    # --- fed by the connection ---

    def _feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: Http1Error) -> None:
        if not self._complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- read by the relay ---

    @property
    def identity(self) -> bool:
        """True when the body is relayed as received (nothing to decode)."""
        return self._decoder is None

    def exception(self) -> Http1Error | None:
        return self._error

    def is_eof(self) -> bool:
        """True once the whole body has been read (or the reply failed)."""
        if self._error is not None:
            return True
        if not self._complete or self._buffered or self._tail:
            return False
        return self._decoder is None or self._flushed

    def read_nowait(self) -> bytes:
        """The body bytes already here (decoded), or b"" if none; raises a failure once the
        buffered bytes are gone."""
        if self._decoder is not None:
            return self._decode()
        buffered = self._buffered
        if not buffered:
            if self._error is not None:
                raise self._error
            return b""
        buffer = self._buffer
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        conn = self._conn
        if buffered > HIGH_WATER and conn is not None:
            conn.resume_reading()
        return data

    def _decode(self) -> bytes:
        decoder = self._decoder
        assert decoder is not None
        try:
            while True:
                if self._tail:
                    data, self._tail = self._tail, b""
                elif self._buffer:
                    data = self._buffer.popleft()
                    self._buffered -= len(data)
                    if self._buffered < LOW_WATER and self._conn is not None:
                        self._conn.resume_reading()
                elif self._complete and not self._flushed:
                    self._flushed = True
                    return decoder.flush()
                else:
                    if self._error is not None:
                        raise self._error
                    return b""
                out = decoder.decompress(data, READ_CHUNK)
                self._tail = decoder.unconsumed_tail
                if out:
                    return out
        except zlib.error:
            self._error = ProtocolError("undecodable body")
            raise self._error from None

    async def read(self, deadline: float | None) -> bytes:
        """The next body bytes, waiting until ``deadline`` (loop time) at most; b"" at the end.
        Raises :class:`ReadTimeout` on expiry, :class:`ProtocolError` on a broken body."""
        while True:
            data = self.read_nowait()
            if data or self.is_eof():
                if not data and self._error is not None:
                    raise self._error
                return data
            conn = self._conn
            if conn is None:
                raise ProtocolError("connection closed")
            await conn.wait(self, deadline)

    def whole(self) -> bytes | None:
        """The whole body if it has all arrived undecoded, else None (nothing consumed)."""
        if not self._complete or self._error is not None or self._decoder is not None:
            return None
        return self.read_nowait()

    # --- the end of the exchange ---

    def release(self) -> None:
        """Back to the pool if read to its end and kept alive; otherwise the connection closes."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self.keep_alive and self._error is None and not conn.closed:
            conn.reuse()
        else:
            conn.close()

    def close(self) -> None:
        """End the exchange early: the connection is closed, never reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _DeflateDecoder:
    """``Content-Encoding: deflate`` is zlib-wrapped by the RFC, raw in some servers: both."""

    def __init__(self) -> None:
        self._inner: zlib._Decompress | None = None

    @property
    def unconsumed_tail(self) -> bytes:
        return self._inner.unconsumed_tail if self._inner is not None else b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            raw = (data[0] & 0x0F) != 8  # not a zlib header (CM = 8, deflate)
            self._inner = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        return self._inner.decompress(data, max_length)

    def flush(self) -> bytes:
        return self._inner.flush() if self._inner is not None else b""


class _Connection(asyncio.Protocol):
    """One upstream connection: a parser fed by ``data_received``, one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool._loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._head_names: list[bytes] = []
        self._head_values: list[bytes] = []
        self._head_bytes = 0  # bytes fed while a head is incomplete (the parser holds them)
        # Bytes fed since the last body byte once the head is read: chunk sizes and a trailer,
        # which the parser gathers in memory past the head's bound and the body's.
        self._framing_bytes = 0
        self._parsed_head = 0  # bytes of the head's status and headers
        self._interim = False
        self._head_only = False
        self._waiting = False  # an exchange is under way on this connection
        self._received = False  # a byte of the current reply arrived
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._counted = True
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._waiting:
            self._lost(ProtocolError("bytes without a request"))  # never pooled again
            return
        self._received = True
        # Reset by each body byte (on_body): only a run of bytes that are not body counts.
        self._framing_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._lost(ProtocolError("protocol upgrade"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._lost(cause if isinstance(cause, Http1Error) else ProtocolError("malformed"))
            return
        if self._response is None:
            # The parser holds a header until it ends: bound what a head may take.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._lost(ProtocolError("reply head too large"))
        elif self._framing_bytes > MAX_HEAD_BYTES:
            self._lost(ProtocolError("reply trailer too large"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        response = self._response
        if response is not None and response._unframed and not response._complete:
            # No length, not chunked: the end of the connection is the end of the body.
            response.keep_alive = False
            response._finish()
        stale = self.reused and not self._received and self._head is not None
        self._lost(_Stale() if stale else ProtocolError("connection lost"))

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if not self._waiting:
            raise ProtocolError("a second reply to one request")
        self._head_names, self._head_values, self._parsed_head = [], [], 0

    def on_status(self, status: bytes) -> None:
        self._parsed_head += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_names.append(name)
        self._head_values.append(value)
        self._parsed_head += len(name) + len(value)
        if len(self._head_names) > MAX_HEADERS or self._parsed_head > MAX_HEAD_BYTES:
            raise ProtocolError("reply head too large")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue and friends: the real reply follows
            return
        headers: CIMultiDict[str] = CIMultiDict(
            zip(
                [n.decode("utf-8", "surrogateescape") for n in self._head_names],
                [v.decode("utf-8", "surrogateescape") for v in self._head_values],
                strict=True,
            )
        )
        unframed = (
            "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        )
        response = Response(self, status, CIMultiDictProxy(headers), unframed)
        self._response = response
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:
            response.keep_alive = False
            response._finish()

    def on_body(self, body: bytes) -> None:
        self._framing_bytes = 0
        if self._response is not None and not self._head_only:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        response = self._response
        if response is not None and not response._complete:
            response.keep_alive = self._parser.should_keep_alive()
            response._finish()
        self._waiting = False  # anything more before the next request is a protocol error

    # --- used by the pool and the response ---

    def send(self, data: bytes, head_only: bool) -> None:
        assert self._transport is not None
        self._waiting, self._received, self._head_only = True, False, head_only
        self._head_bytes = self._framing_bytes = 0
        self._head = self._loop.create_future()
        self._transport.write(data)

    async def drained(self, deadline: float | None) -> None:
        if self._drain is not None:
            await self._until(self._drain, deadline)

    async def head(self, deadline: float | None) -> Response:
        head = self._head
        assert head is not None
        if not head.done():
            await self._until(head, deadline)
        return head.result()

    async def wait(self, response: Response, deadline: float | None) -> None:
        """Wait for more of ``response``'s body (or its end, or a failure)."""
        waiter = self._loop.create_future()
        response._waiter = waiter
        try:
            await self._until(waiter, deadline)
        finally:
            response._waiter = None

    async def _until(self, future: asyncio.Future[object], deadline: float | None) -> None:
        if deadline is None:
            await future
            return
        deadlines = self._pool._deadlines
        deadlines.add(future, deadline)
        try:
            await future
        finally:
            deadlines.discard(future)

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = False
            self._transport.resume_reading()

    def reuse(self) -> None:
        self._response, self._head = None, None
        self._pool._put(self)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self._lost(ProtocolError("closed"))

    def _lost(self, error: Http1Error) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        if self._response is not None:
            self._response._fail(error)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(error)
        if self._counted:
            self._counted = False
            self._pool._gone()


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_exception(ReadTimeout())


class _Deadlines:
    """The deadlines of every wait on a pool's connections (a reply's head, the next body
    bytes, a drain) under one timer, armed at the earliest: a wait adds and removes a dict
    entry instead of arming and cancelling a timer of its own (about a microsecond each in
    uvloop, once per request and once per streamed chunk). The deadlines of later waits are
    usually later (the same clocks, started later), so the timer is seldom re-armed; when it
    fires, the waits due fail with :class:`ReadTimeout` and it is armed at the next one."""

    __slots__ = ("_at", "_loop", "_timer", "_waits")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waits: dict[asyncio.Future[object], float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the timer fires (inf: not armed)

    def __len__(self) -> int:
        return len(self._waits)

    def add(self, future: asyncio.Future[object], deadline: float) -> None:
        self._waits[future] = deadline
        if deadline < self._at:
            self._arm(deadline)

    def discard(self, future: asyncio.Future[object]) -> None:
        self._waits.pop(future, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._at = None, math.inf
        # A timer may fire a little early (uvloop counts milliseconds): as a timer per wait
        # did, a wait due within that counts as due.
        now = self._loop.time() + _TIMER_SLACK
        due = [future for future, deadline in self._waits.items() if deadline <= now]
        for future in due:
            del self._waits[future]
            _expire(future)
        if self._waits:
            self._arm(min(self._waits.values()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._at = None, math.inf


class Pool:
    """Keep-alive connections to one :class:`Endpoint`, at most ``limit`` open at once."""

    def __init__(self, endpoint: Endpoint, *, limit: int) -> None:
        self.endpoint = endpoint
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open = 0
        self._slots: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = ssl.create_default_context() if endpoint.tls else None
        self._head_prefix = f" HTTP/1.1\r\nHost: {endpoint.authority}\r\n"
        self._closed = False
        self._deadlines = _Deadlines(self._loop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pool's connections belong to."""
        return self._loop

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        *,
        connect_timeout: float,
        deadline: float | None,
    ) -> Response:
        """Send one request; return once the reply's head is in (before ``deadline``).

        ``path`` is already percent-encoded (the route table builds it). Raises
        :class:`ConnectFailed`, :class:`ConnectTimeout`, :class:`ReadTimeout` or
        :class:`ProtocolError`."""
        data = self._encode(method, path, headers, body)
        head_only = method == "HEAD"
        for _ in range(2):
            conn = await self._acquire(connect_timeout, deadline)
            try:
                conn.send(data, head_only)
                await conn.drained(deadline)
                return await conn.head(deadline)
            except _Stale:
                continue  # the server had closed it; nothing was answered: a fresh one
            except BaseException:
                conn.close()
                raise
        raise ProtocolError("connection lost")

    def _encode(
        self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> bytes:
        lines = [method, " ", self.endpoint.prefix, path, self._head_prefix]
        count = 2
        for name, value in headers:
            lines += (name, ": ", value, "\r\n")
            count += 1
        if body or method not in ("GET", "HEAD"):
            lines += ("Content-Length: ", str(len(body) if body else 0), "\r\n")
            count += 1
        lines.append("\r\n")
        head = "".join(lines)
        # A CR or LF inside a method, path, name or value would split the head (injection).
        if head.count("\n") != count + 1 or head.count("\r") != count + 1:
            raise ValueError("CR or LF inside a request line or header")
        encoded = head.encode("utf-8", "surrogateescape")  # as the caller sent it
        return encoded + body if body else encoded

    async def _acquire(self, connect_timeout: float, deadline: float | None) -> _Connection:
        if self._closed:
            raise ConnectFailed("the pool is closed")
        now = self._loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if not conn.closed and now - conn.idle_since < KEEPALIVE_SECONDS:
                conn.reused = True
                return conn
            conn.close()
        connect_end = now + connect_timeout
        if deadline is not None and deadline < connect_end:
            connect_end, expiry = deadline, ReadTimeout
        else:
            expiry = ConnectTimeout
        while self._open >= self._limit:
            slot = self._loop.create_future()
            self._slots.append(slot)
            timer = self._loop.call_at(connect_end, _expire, slot)
            try:
                await slot
            except ReadTimeout:
                raise expiry() from None
            finally:
                timer.cancel()
            if idle:
                return await self._acquire(connect_timeout, deadline)
        self._open += 1
        try:
            async with asyncio.timeout_at(connect_end):
                conn = await self._connect()
        except TimeoutError:
            self._gone()
            raise expiry() from None
        except OSError as exc:
            self._gone()
            raise ConnectFailed(type(exc).__name__) from None
        except BaseException:
            self._gone()
            raise
        return conn

    async def _connect(self) -> _Connection:
        endpoint = self.endpoint
        if endpoint.unix_path is not None:
            _, conn = await self._loop.create_unix_connection(
                lambda: _Connection(self), endpoint.unix_path
            )
        else:
            _, conn = await self._loop.create_connection(
                lambda: _Connection(self),
                endpoint.host,
                endpoint.port,
                ssl=self._ssl,
                server_hostname=endpoint.host if self._ssl else None,
            )
        return conn

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        self._wake_one()

    def _gone(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    async def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        if not len(self._deadlines):
            self._deadlines.close()  # else the exchanges under way keep their clocks
