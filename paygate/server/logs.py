"""Logging that cannot leak: one structured event per request, redaction at the formatter.

- ``PAYGATE_LOG_FORMAT=json``: one JSON object per line (``ts``, ``level``, ``logger``,
  ``msg``, ``request_id`` when inside a request, and the request event's fields); ``text`` is
  the same for humans.
- ``PAYGATE_LOG_LEVEL`` sets the level; the dependencies that trace RPC traffic (web3,
  urllib3, requests, aiohttp's client, eth-account, x402) are held at WARNING whatever it is:
  their DEBUG output quotes URLs with API keys and request bodies.
- The formatter is the last line of defence: it replaces the operator's configured secrets
  (keys, PINs, API keys, facilitator header values, the path and query of a chain RPC URL)
  with ``***``, strips credentials and query values from any URL, and reduces an attached
  exception to its class name (aiohttp's messages can quote a header line).
- The request event (logger ``paygate.request``) carries the request id, route, status,
  durations and the payment outcome — never a body, a header value, a signature or a secret.

``X-Request-Id``: taken from the request when the peer is a trusted proxy and the value is a
short token, else generated; returned on every response and attached to every log record
made while the request runs (background settlement tasks inherit it).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from paygate import wire
from paygate.redact import scrub, secret_parts
from paygate.server.forwarded import Network, is_trusted
from paygate.server.frontend import running_loop

REQUEST_ID_HEADER = wire.REQUEST_ID_HEADER
_REQUEST_KEY = "paygate.request"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
# scheme://[userinfo@]host[path][?query]; quotes and backslashes end a URL (JSON, repr).
_URL = re.compile(
    r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/?#@\"'\\]+@)?([^\s/?#\"'\\]*)"
    r"([^\s?#\"'\\]*)(\?[^\s#\"'\\]*)?"
)
MIN_SECRET = 6  # shorter "secrets" (a test PIN such as 1234) would redact ordinary words
#: Dependencies whose DEBUG/INFO lines carry RPC URLs, request bodies or answers.
QUIET_LOGGERS = ("web3", "urllib3", "requests", "aiohttp.client", "eth_account", "x402")
_current_request: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "paygate_request_id", default=None
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- per-request facts ---------------------------------------------------------------------


@dataclass(slots=True)
class RequestFacts:
    """What the request event reports; the gateway fills it as the request goes."""

    request_id: str
    route: str = "unmatched"
    payment: str = "none"  # none | free | paid | a refusal code
    upstream_seconds: float | None = None
    sent_status: int = 0  # the status whose headers went out (a stream's, before its body)
    returned_status: int = 0  # the handler's response's; 0 when it raised (the caller left)

    @property
    def status(self) -> int:
        """The status the caller got: a stream's sent headers', else the returned one's."""
        return self.sent_status or self.returned_status


def facts(request: web.Request) -> RequestFacts:
    """The request's facts (a detached record when the logging middleware is not installed)."""
    found = request.get(_REQUEST_KEY)
    if isinstance(found, RequestFacts):
        return found
    made = RequestFacts(request_id="")
    request[_REQUEST_KEY] = made
    return made


async def answer_noted(
    handler: Handler, request: web.Request, record: RequestFacts
) -> web.StreamResponse:
    """``handler``'s response, its status noted in ``record`` (for the event and the span)."""
    response = await handler(request)
    record.returned_status = response.status
    return response


def request_id_for(
    peer: str | None, offered: str | None, trusted_proxies: Sequence[Network]
) -> str:
    """The caller's request id when a trusted proxy vouches for it, else a fresh one."""
    if (
        offered
        and trusted_proxies
        and is_trusted(peer or "", trusted_proxies)
        and _REQUEST_ID.fullmatch(offered)
    ):
        return offered
    return _fresh_ids.next()


class _FreshIds:
    """128 random bits per request id, as hex (a uuid4 has 122 and costs more), drawn from the
    OS in blocks: one ``getrandom`` system call per 256 ids instead of one per request. A
    forked worker starts a block of its own (no two processes hand out the same ids)."""

    BLOCK = 4096

    def __init__(self) -> None:
        self._block = b""
        self._at = 0

    def reset(self) -> None:
        self._block, self._at = b"", 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._block):
            self._block, at = os.urandom(self.BLOCK), 0
        self._at = at + 16
        return self._block[at : at + 16].hex()


_fresh_ids = _FreshIds()
os.register_at_fork(after_in_child=_fresh_ids.reset)


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def request_events(trusted_proxies: Sequence[Network]) -> Middleware:
    """Wraps the catch-all handler: assigns the request id, emits the one event per request.

    Called by the handler, not mounted as a middleware (aiohttp rebuilds its middleware chain
    per request); it wraps the error answering, so it sees the status actually sent."""
    log = logging.getLogger("paygate.request")

    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request_id_for(
            request.remote, request.headers.get(REQUEST_ID_HEADER), trusted_proxies
        )
        record = RequestFacts(request_id=rid)
        request[_REQUEST_KEY] = record
        token = _current_request.set(rid)
        try:
            # answer_noted, inline: one coroutine less per request.
            response = await handler(request)
            record.returned_status = response.status
            return response
        finally:
            # A stream whose caller left after its headers: the status sent, and say so.
            event: dict[str, object] = {
                "request_id": rid,
                "method": request.method,
                "route": record.route,
                "status": record.status or 499,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "payment": record.payment,
            }
            if record.returned_status in (0, 499):
                event["caller_gone"] = True
            if record.upstream_seconds is not None:
                event["upstream_ms"] = round(record.upstream_seconds * 1000, 2)
            sink = _event_sink(log)
            if sink is not None:
                sink.defer_event(rid, event, running_loop(request))
            else:
                log.info("request", extra={"event": event})
            _current_request.reset(token)

    return middleware


_EVENT_MESSAGE = "request"


def _event_sink(log: logging.Logger) -> DeferredStreamHandler | None:
    """The handler that may take the request event without a ``LogRecord``: when it is the
    only place the event could go (no other handler or filter between the logger and the
    root, the installed filters and formatter unchanged, INFO enabled) — what the record
    would become is then known, so the handler formats the same line from the event itself.
    Anything else (a test's capture handler, an operator's extra handler) gets the record."""
    if log.disabled or not log.isEnabledFor(logging.INFO):
        return None
    node: logging.Logger | None = log
    while node is not None:
        if node.filters:
            return None
        if node.handlers:
            if node.parent is not None or len(node.handlers) != 1:
                return None
            handler = node.handlers[0]
            if isinstance(handler, DeferredStreamHandler) and handler.takes_events():
                return handler
            return None
        if not node.propagate:
            return None
        node = node.parent  # type: ignore[assignment]
    return None


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streams included, carries the request id."""
    record = request.get(_REQUEST_KEY)
    if isinstance(record, RequestFacts) and record.request_id:
        record.sent_status = response.status
        response.headers[REQUEST_ID_HEADER] = record.request_id


# --- redaction and formatting --------------------------------------------------------------


class Redactor:
    """Replaces known secrets and URL credentials in formatted log text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        # Every URL the pattern matches has "://": most lines (the request event) have none.
        return _URL.sub(_redact_url, text) if "://" in text else text


def _redact_url(match: re.Match[str]) -> str:
    scheme, userinfo, host, path, query = match.groups()
    out = scheme + ("***@" if userinfo else "") + host + path
    if query:
        names = [part.partition("=")[0] for part in query[1:].split("&") if part]
        out += "?" + "&".join(f"{name}=***" for name in names)
    return out


_last_second: tuple[int, str] = (-1, "")


def _second(epoch: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of ``epoch``, formatted once per second."""
    global _last_second
    if _last_second[0] != epoch:
        _last_second = (epoch, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)))
    return _last_second[1]


def _event_base(created: float, rid: str, event: dict[str, object]) -> dict[str, object]:
    """What :func:`_base` makes of the request event's record (logged at ``created``)."""
    out: dict[str, object] = {
        "ts": _second(int(created)) + f".{int((created - int(created)) * 1000):03d}Z",
        "level": "INFO",
        "logger": "paygate.request",
        "msg": _EVENT_MESSAGE,
    }
    if rid:
        out["request_id"] = rid
    out.update(event)
    return out


def _base(record: logging.LogRecord) -> dict[str, object]:
    message = record.getMessage()
    if record.exc_info and record.exc_info[0] is not None:
        message = f"{message} ({record.exc_info[0].__name__})"
    out: dict[str, object] = {
        "ts": _second(int(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname,
        "logger": record.name,
        "msg": message,
    }
    rid = getattr(record, "request_id", None)
    if rid:
        out["request_id"] = rid
    event = getattr(record, "event", None)
    if isinstance(event, dict):
        out.update(event)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record, redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(json.dumps(_base(record), separators=(",", ":"), default=str))

    def format_event(self, created: float, rid: str, event: dict[str, object]) -> str:
        data = _event_base(created, rid, event)
        return self._redact(json.dumps(data, separators=(",", ":"), default=str))


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg key=value ...``, redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._line(_base(record))

    def format_event(self, created: float, rid: str, event: dict[str, object]) -> str:
        if event and (not rid or next(iter(event)) == "request_id"):
            # The event's own order is the line's (the usual event: its request id first).
            ms = int((created - int(created)) * 1000)
            tail = " ".join([f"{key}={value}" for key, value in event.items()])
            return self._redact(
                f"{_second(int(created))}.{ms:03d}Z INFO paygate.request: {_EVENT_MESSAGE} {tail}"
            )
        return self._line(_event_base(created, rid, event))

    def _line(self, data: dict[str, object]) -> str:
        head = f"{data.pop('ts')} {data.pop('level')} {data.pop('logger')}: {data.pop('msg')}"
        tail = " ".join(f"{key}={value}" for key, value in data.items())
        return self._redact(f"{head} {tail}" if tail else head)


class SecretTextFilter(logging.Filter):
    """Masks the credential parts of the service URLs in every line (message and arguments)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            clean = scrub(message, self._secrets)
            if clean != message:
                record.msg, record.args = clean, None
        return True


class DeferredStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, on the event loop's thread, formats and writes INFO and DEBUG
    records after the current loop iteration, in one write: the request event is made as the
    handler returns, before aiohttp sends the reply, so writing it there would delay every
    reply by a write system call, and one write per line costs more than one per iteration.

    WARNING and above, records from other threads, and any record once :data:`MAX_DEFERRED`
    wait, go out at once (after what waits, so the order holds); ``flush`` (logging's exit
    hook) writes what waits. Filters run at logging time as always (the request id)."""

    MAX_DEFERRED = 256

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        # Records, and request events taken without a record (created, request id, fields).
        self._pending: list[logging.LogRecord | tuple[float, str, dict[str, object]]] = []
        # What install_logging set up: while unchanged, the request event's line is known.
        self._event_setup: tuple[list[logging.Filter], logging.Formatter] | None = None
        # The loop a write is scheduled on (a loop stopped before running it must not leave
        # the records of the next loop waiting).
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def take_events(self, filters: list[logging.Filter]) -> None:
        """Let the request event skip its ``LogRecord`` while ``filters`` (the ones that turn
        its record into the line :meth:`format_event` writes) and the formatter stay."""
        self._event_setup = (list(filters), self.formatter)  # type: ignore[arg-type]

    def takes_events(self) -> bool:
        setup = self._event_setup
        return (
            setup is not None
            and self.level <= logging.INFO
            and self.filters == setup[0]
            and self.formatter is setup[1]
        )

    def defer_event(
        self,
        rid: str,
        event: dict[str, object],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """The request event, written as its record would be (INFO: deferred on the loop).
        ``loop``: the running loop when the caller knows it (looking it up costs a system
        call in Python 3.11)."""
        created = time.time()
        if loop is None:
            loop = asyncio._get_running_loop()
        self.acquire()
        try:
            if loop is None:
                self._write_pending()
                self._pending.append((created, rid, event))
                self._write_pending()
            else:
                self._defer((created, rid, event), loop)
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        loop = asyncio._get_running_loop()  # None off the loop's thread, without raising
        if loop is None or record.levelno >= logging.WARNING:
            self._write_pending()
            super().emit(record)
            return
        self._defer(record, loop)

    def _defer(
        self,
        record: logging.LogRecord | tuple[float, str, dict[str, object]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.MAX_DEFERRED:
            self._write_pending()
        elif self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._later)

    def _later(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        self._scheduled = None
        if not self._pending:
            return
        records, self._pending = self._pending, []
        lines = []
        for record in records:
            try:
                if isinstance(record, tuple):
                    line = self.formatter.format_event(*record)  # type: ignore[union-attr]
                else:
                    line = self.format(record)
                lines.append(line + self.terminator)
            except Exception:
                self.handleError(_as_record(record))
        try:
            self.stream.write("".join(lines))
            super().flush()
        except Exception:
            self.handleError(_as_record(records[-1]))

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()


def _as_record(
    entry: logging.LogRecord | tuple[float, str, dict[str, object]],
) -> logging.LogRecord:
    """A record for ``handleError`` (which reports the failing record)."""
    if isinstance(entry, logging.LogRecord):
        return entry
    return logging.makeLogRecord({"name": "paygate.request", "msg": _EVENT_MESSAGE})


def quiet_dependencies() -> None:
    """Hold the dependencies' RPC tracing at WARNING, whatever the root level."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current_request.get()
        return True


class ExceptionTextFilter(logging.Filter):
    """Replaces an attached exception by its class name (no message, no traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg = f"{record.getMessage()} ({record.exc_info[0].__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install_logging(
    level: str = "INFO",
    log_format: str = "text",
    secrets: Iterable[str] = (),
    *,
    secret_urls: Iterable[str | None] = (),
) -> logging.Handler:
    """Configure root logging for ``paygate serve`` (stderr; journald or docker collect it):
    the formatter, the exception and URL-credential filters, the quiet dependencies."""
    # A request event per request is on the hot path: skip the record fields the formats never
    # show (the logging HOWTO's "Optimization" list) — thread, process, and the caller's frame.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    handler = DeferredStreamHandler(sys.stderr)
    redact = Redactor(secrets)
    handler.setFormatter(JsonFormatter(redact) if log_format == "json" else TextFormatter(redact))
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(ExceptionTextFilter())
    url_secrets = secret_parts(secret_urls)
    handler.addFilter(SecretTextFilter(url_secrets))
    if scrub(_EVENT_MESSAGE, url_secrets) == _EVENT_MESSAGE:
        # The filters leave the request event's record as format_event assumes: its
        # request id is the one in context, no exception, the message unchanged.
        handler.take_events(handler.filters)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(str(level).upper())
    numeric = numeric if isinstance(numeric, int) else logging.INFO
    root.setLevel(numeric)
    logging.getLogger("paygate").setLevel(numeric)
    logging.getLogger("enclave").setLevel(numeric)
    quiet_dependencies()
    # aiohttp's per-request access line is replaced by the request event.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


def install_safe_logging(
    level: int | str = logging.INFO, *, secret_urls: Iterable[str | None] = ()
) -> None:
    """Plain text logging at ``level`` (commands other than ``serve``)."""
    name = logging.getLevelName(level) if isinstance(level, int) else level
    install_logging(name, "text", secret_urls=secret_urls)
