"""The fast front end: the forwarding routes served below aiohttp's ``web.Request``.

One listener. Each connection starts with :class:`FastProtocol`, which finds the end of a
request's head itself and parses the head with ``httptools`` (llhttp, in C). A request it
serves itself is the common form of a forwarding route: HTTP/1.1, an origin-form path whose
bytes are its decoded form, a ``Content-Length`` body or none, no ``Expect``, no
``Transfer-Encoding``, no upgrade, within the header limits. It becomes a
:class:`FastRequest` (the few attributes of ``web.Request`` the gateway's stages read) and goes
through the SAME handler chain aiohttp's route calls (request event → tracing → error
answering → :meth:`Gateway.handle`); its response, an aiohttp ``web.Response`` or a prepared
``StreamResponse``, is written by aiohttp's own ``StreamWriter`` (head and body in one write).

Anything else — another route (attestation, console, metrics, health, receipts, batch), a
malformed head, chunked or ``Expect: 100-continue`` uploads, HTTP/1.0, a target aiohttp
normalizes — hands the connection to aiohttp's ``RequestHandler`` at that request's first byte,
with every byte received since: aiohttp serves the rest of the connection as it always did
(its refusals in our error shape, paygate.server.malformed). Nothing of that request has been
consumed, so the hand-off is invisible to the caller.

Why httptools rather than aiohttp's ``HttpRequestParser``: the latter builds the per-message
objects (``RawRequestMessage``, a ``StreamReader``, a yarl URL) this front end exists to avoid,
and is an internal API; httptools is a stable callback API (the upstream client's too).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import HttpVersion11, StreamWriter
from aiohttp.http_writer import _serialize_headers as serialize_head
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from yarl import URL

from paygate.errors import PaygateError
from paygate.server.errors import InternalError, api_style_for_path, error_response
from paygate.server.malformed import GatewayServer

log = logging.getLogger("paygate.server")

Dispatch = Callable[[Any], Awaitable[web.StreamResponse]]
Forwards = Callable[[str, str], bool]

# A path whose raw bytes are what aiohttp would decode it to: no percent-escapes, no dot or
# empty segments, no query (those take aiohttp's path, which normalizes them).
_PLAIN_PATH = re.compile(rb"(?:/[A-Za-z0-9_~:@-][A-Za-z0-9_.~:@-]*)+")
# Headers that make a request one aiohttp's handler serves (framing and protocol switches).
_HAND_OFF_HEADERS = frozenset({b"expect", b"transfer-encoding", b"upgrade"})
_BODY_HIGH = 256 * 1024  # unread request body held before reading pauses
_PIPELINE_HIGH = 64 * 1024  # bytes of the next request(s) held while one is served
_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


class _HandOff(PaygateError):
    """This request is aiohttp's to serve (raised inside the parser's callbacks; never
    leaves the front end)."""

    code = "hand_off"
    message = "the request is handed to aiohttp"


class FastBody:
    """The request body as the admission stage reads it (the subset of aiohttp's
    ``StreamReader`` that ``limits.read_body`` uses), bounded by pausing the socket."""

    __slots__ = ("_chunks", "_eof", "_exc", "_protocol", "_size", "_waiter", "discard")

    def __init__(self, protocol: FastProtocol) -> None:
        self._protocol = protocol
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.discard = False  # answered already: what still arrives is dropped

    def feed(self, data: bytes) -> None:
        if self.discard:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _BODY_HIGH:
            self._protocol.hold_reading(True)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def is_eof(self) -> bool:
        """The whole body has arrived, read or not (aiohttp's ``StreamReader.is_eof``)."""
        return self._eof

    def exception(self) -> BaseException | None:
        return self._exc

    def read_nowait(self) -> bytes:
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._size = 0
        self._protocol.hold_reading(False)
        return data

    async def read(self, n: int = -1) -> bytes:
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if n < 0 or self._size <= n:
            return self.read_nowait()
        first = self._chunks[0]
        if len(first) > n:
            self._chunks[0] = first[n:]
            first = first[:n]
        else:
            del self._chunks[0]
        self._size -= len(first)
        if self._size <= _BODY_HIGH:
            self._protocol.hold_reading(False)
        return first


class _NoBody(FastBody):
    def __init__(self) -> None:
        self._chunks = []
        self._eof = True
        self._exc = None
        self._size = 0


_NO_BODY = _NoBody()


class FastRequest:
    """What the gateway's stages read of a request (the same names as ``web.Request``)."""

    __slots__ = (
        "_protocol",
        "_started",
        "_state",
        "_writer",
        "app",
        "body_exists",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "loop",
        "method",
        "path",
        "remote",
        "transport",
    )
    version = HttpVersion11
    scheme = "http"
    query_string = ""
    query = _EMPTY_QUERY

    def __init__(
        self,
        app: web.Application,
        protocol: FastProtocol,
        method: str,
        path: str,
        headers: CIMultiDictProxy[str],
        body: FastBody | None,
        content_length: int | None,
        keep_alive: bool,
    ) -> None:
        self.app = app
        self.method = method
        self.path = path
        self.headers = headers
        self.content = body if body is not None else _NO_BODY
        self.body_exists = body is not None
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.transport = protocol.transport
        self.remote = protocol.remote
        self.loop = protocol.loop
        self._protocol = protocol
        self._writer: StreamWriter | None = None
        self._started = False
        self._state: dict[Any, Any] = {}

    @property
    def _payload_writer(self) -> StreamWriter:
        # Made only for a streamed reply: a whole one is written without it.
        if self._writer is None:
            self._writer = StreamWriter(self._protocol, self._protocol.loop)
        return self._writer

    writer = _payload_writer

    @property
    def host(self) -> str:
        return self.headers.get("Host") or "localhost"

    @property
    def url(self) -> URL:
        try:
            return URL.build(scheme=self.scheme, authority=self.host, path=self.path, encoded=True)
        except ValueError:  # a Host header that is not an authority
            return URL.build(scheme=self.scheme, host="localhost", path=self.path, encoded=True)

    @property
    def started(self) -> bool:
        """A reply's head has been prepared (nothing else may be sent in its place)."""
        return self._started

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # The app's on_response_prepare signal, as aiohttp's request sends it.
        self._started = True
        for receiver in self.app.on_response_prepare:  # Signal.send, a coroutine less
            await receiver(self, response)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value


def running_loop(request: Any) -> asyncio.AbstractEventLoop:
    """The loop serving ``request``: a :class:`FastRequest` knows it; for another request
    ``asyncio.get_running_loop()``, which in Python 3.11 makes a ``getpid`` system call each
    time (the request path asked it six times per request)."""
    if type(request) is FastRequest:
        return request.loop
    return asyncio.get_running_loop()


class FastProtocol(BaseProtocol):
    """One connection: serves forwarding requests itself, hands anything else to aiohttp."""

    def __init__(self, server: FastServer) -> None:
        super().__init__(server._loop)
        self.loop = server._loop
        self._server = server
        self._parser: Any = httptools.HttpRequestParser(self)
        self._buf = bytearray()
        self._need = 0  # body bytes of the current request not yet received
        self._body: FastBody | None = None
        self._task: asyncio.Task[None] | None = None
        self._close = False  # close once the current request is answered
        self._timer: asyncio.TimerHandle | None = None  # keep-alive or lingering
        # Loop time the connection last went idle; None while a request is served. The
        # keep-alive timer is not re-armed per request: when it fires it checks this.
        self._idle_since: float | None = None
        self._held = False
        self._task_handler = None  # web.Server.connection_lost reads it (aiohttp's handlers')
        self.remote: str | None = None
        # per head
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._length: int | None = None
        self._fields = 0
        self._hosts = 0

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connection_made(self, transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (list, tuple)) and peer:
            self.remote = str(peer[0])
        elif peer:
            self.remote = str(peer)
        self._idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connection_lost(self, exc)  # type: ignore[arg-type]
        self._cancel_timer()
        body = self._body
        if body is not None and not body.is_eof():
            body.set_exception(ConnectionResetError("the caller closed the connection"))
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the caller is gone: stop its request (aiohttp's handler_cancellation)

    def data_received(self, data: bytes) -> None:
        if self._need:
            take = data if len(data) <= self._need else data[: self._need]
            self._feed_body(take)
            if len(take) == len(data):
                return
            data = data[len(take) :]
        self._buf += data
        if self._task is None and not self._need:
            self._next()
        elif len(self._buf) > _PIPELINE_HIGH:
            self.hold_reading(True)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._server.limits
        lower = name.lower()
        self._fields += 1
        if (
            self._fields > limits[2]
            or len(name) > limits[1]
            or len(value) > limits[1]
            or lower in _HAND_OFF_HEADERS
        ):
            raise _HandOff
        if lower == b"content-length":
            self._length = int(value) if value.isdigit() else -1
        elif lower == b"host":
            self._hosts += 1
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.feed_eof()

    # --- the request cycle -----------------------------------------------------------------

    def _next(self) -> None:
        """Start the request at the head of the buffer, if its head has arrived."""
        buf = self._buf
        while buf[:2] == b"\r\n":  # blank lines between requests (llhttp skips them too)
            del buf[:2]
        if not buf:
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # Too long a head, or lines ended by a bare LF (whose end this framing would never
            # find): aiohttp's parser answers them, in our error shape.
            if len(buf) > self._server.limits[0] + 8192 or buf.count(b"\n") != buf.count(b"\r\n"):
                self._hand_off()
            return
        end += 4
        self._idle_since = None  # busy: the keep-alive clock stops
        self._url = b""
        self._headers = []
        self._length = None
        self._fields = 0
        self._hosts = 0
        parser = self._parser
        try:
            parser.feed_data(bytes(buf[:end]))
            method = parser.get_method().decode()
            url = self._url
            if (
                parser.get_http_version() != "1.1"
                or self._length == -1
                or self._hosts != 1  # HTTP/1.1 requires exactly one (aiohttp refuses the rest)
                or len(url) > self._server.limits[0]
                or not _PLAIN_PATH.fullmatch(url)
            ):
                raise _HandOff
            path = url.decode()
            if not self._server.forwards(method, path):
                raise _HandOff
        except Exception:  # _HandOff, any parser complaint (an upgrade too): aiohttp decides
            self._hand_off()
            return
        del buf[:end]
        length = self._length
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        body = None
        if length:
            body = self._body = FastBody(self)
            self._need = length
        request = FastRequest(
            self._server.app,
            self,
            method,
            path,
            headers,
            body,
            length,
            keep_alive=parser.should_keep_alive() and not self._close,
        )
        self._task = self.loop.create_task(self._serve(request))
        if length and buf:
            take = bytes(buf[:length])
            del buf[: len(take)]
            self._feed_body(take)

    def _feed_body(self, data: bytes) -> None:
        self._need -= len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:  # cannot happen for Content-Length framing
            self._need = 0
            self._close = True
        if not self._need and self._task is None:
            self._lingered()

    async def _serve(self, request: FastRequest) -> None:
        try:
            response = await self._server.dispatch(request)
            if response.prepared:
                keep_alive = bool(response.keep_alive)
            elif _whole(response):
                keep_alive = await self._write_whole(request, response)  # type: ignore[arg-type]
            else:
                await response.prepare(request)  # type: ignore[arg-type]
                await response.write_eof()
                keep_alive = bool(response.keep_alive)
        except asyncio.CancelledError:
            return  # the caller went away (connection_lost)
        except ConnectionError:
            keep_alive = False  # the caller went away while its reply was being written
        except Exception as exc:
            # The handler chain answers every error it knows; what escapes it gets the 500 that
            # aiohttp's handler gives (paygate.server.malformed), if nothing went out yet.
            log.error("unexpected %s while serving a request", type(exc).__name__)
            self._answer_internal_error(request)
            keep_alive = False
        finally:
            self._task = None
        if self.transport is None or self.transport.is_closing():
            return  # gone, or closed by the reply stage (a stream cut short)
        if not keep_alive or self._close:
            self.transport.close()
            return
        body = self._body
        if body is not None and self._need:
            # Answered before the body was read: drop the rest for a while, as aiohttp lingers,
            # so the caller reads the answer instead of a reset.
            body.discard = True
            body.read_nowait()  # what is held goes too, and a paused socket reads again
            self._arm(self._server.lingering, self._linger_expired)
            return
        self._body = None
        self._idle()
        if self._buf:
            self._next()

    async def _write_whole(self, request: FastRequest, response: web.Response) -> bool:
        """A whole reply's head and body in one write, with the headers aiohttp's
        ``Response.prepare`` gives it (length, type, date, server, connection); whether the
        connection stays open."""
        await request._prepare_hook(response)  # the request id header
        body: bytes = response.body  # type: ignore[assignment]
        headers = response.headers
        headers.setdefault("Content-Length", str(len(body)))
        if body:
            headers.setdefault("Content-Type", "application/octet-stream")
        if "Date" not in headers:
            headers["Date"] = rfc822_formatted_time()
        headers.setdefault("Server", SERVER_SOFTWARE)
        keep_alive = response.keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        if not keep_alive and "Connection" not in headers:
            headers["Connection"] = "close"
        head = serialize_head(f"HTTP/1.1 {response.status} {response.reason}", headers)
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the caller closed the connection")
        transport.write(head + body)
        return keep_alive

    def _answer_internal_error(self, request: FastRequest) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or request.started:
            return
        response = error_response(InternalError(), api_style_for_path(request.path))
        body: bytes = response.body  # type: ignore[assignment]
        headers = CIMultiDict(response.headers)
        headers["Content-Length"] = str(len(body))
        headers["Date"] = rfc822_formatted_time()
        headers["Server"] = SERVER_SOFTWARE
        headers["Connection"] = "close"
        transport.write(serialize_head(f"HTTP/1.1 500 {response.reason}", headers) + body)

    def _lingered(self) -> None:
        """The rest of an answered request's body has arrived: the next request may start."""
        self._cancel_timer()
        self._body = None
        if self._close:
            if self.transport is not None:
                self.transport.close()
            return
        self._idle()
        if self._buf:
            self._next()

    def _linger_expired(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _idle(self) -> None:
        self.hold_reading(False)
        self._idle_since = now = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(now + self._server.keepalive, self._keepalive_expired)

    def _keepalive_expired(self) -> None:
        self._timer = None
        since = self._idle_since
        if since is None or self._task is not None:
            return  # serving: the clock starts again once the connection is idle
        due = since + self._server.keepalive
        if self.loop.time() < due - 0.001:  # idle again since the timer was armed
            self._timer = self.loop.call_at(due, self._keepalive_expired)
            return
        # Idle, or a head still incomplete (a slow sender): closed, as aiohttp closes it.
        if self.transport is not None:
            self.transport.close()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def hold_reading(self, hold: bool) -> None:
        """Pause the socket while a bounded buffer is full; resume once it drained."""
        if hold == self._held:
            return
        self._held = hold
        if hold:
            self._pause_transport_reading()
        else:
            self._resume_transport_reading()

    def _hand_off(self) -> None:
        """aiohttp's handler takes the connection from this request's first byte on."""
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        self.hold_reading(False)
        self._server.connection_lost(self, None)  # type: ignore[arg-type]
        handler = self._server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data = bytes(self._buf)
        self._buf.clear()
        self.transport = None
        if data:
            handler.data_received(data)

    # --- graceful shutdown (web.Server calls these on every connection) ---------------------

    def close(self) -> None:
        """Stop keep-alive: an idle connection closes now, a busy one after its answer."""
        self._close = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Let the request in progress finish for up to ``timeout``, then cancel it."""
        self._close = True
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=timeout)
        if self.transport is not None:
            self.transport.close()


def _whole(response: web.StreamResponse) -> bool:
    """A reply the front end writes itself: a ``web.Response`` of bytes with a body (no
    1xx/204/304), no compression, no cookies — what every stage answers whole."""
    return (
        type(response) is web.Response
        and type(response.body) is bytes
        and response.status >= 200
        and response.status not in (204, 304)
        and not response.chunked
        and response.compression is False
        and not response._cookies
    )


class FastServer(GatewayServer):
    """``web.Server`` whose connections start on :class:`FastProtocol`."""

    app: web.Application
    dispatch: Dispatch
    forwards: Forwards

    def __call__(self) -> RequestHandler:
        return FastProtocol(self)  # type: ignore[return-value]

    def aiohttp_handler(self) -> RequestHandler:
        return GatewayServer.__call__(self)

    def serve(self, app: web.Application, dispatch: Dispatch, forwards: Forwards) -> None:
        self.app = app
        self.dispatch = dispatch
        self.forwards = forwards
        kwargs = self._kwargs
        # aiohttp's limits and clocks, so both front ends refuse and linger alike.
        self.limits = (
            kwargs.get("max_line_size", 8190),
            kwargs.get("max_field_size", 8190),
            kwargs.get("max_headers", 128),
        )
        self.keepalive = float(kwargs.get("keepalive_timeout", 75.0))
        self.lingering = float(kwargs.get("lingering_time", 10.0))


def install(app: web.Application, dispatch: Dispatch, forwards: Forwards) -> None:
    """Serve ``app`` with the fast front end: its server factory (already made a
    ``GatewayServer`` by paygate.server.malformed.install) now makes a :class:`FastServer`
    that sends forwarding requests to ``dispatch`` (the catch-all route's handler chain)."""
    make = app._make_handler

    def make_handler(*, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> web.Server:
        server = make(loop=loop, **kwargs)
        fast = FastServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
        fast.serve(app, dispatch, forwards)
        return fast

    app._make_handler = make_handler  # type: ignore[method-assign]
