"""Logging that cannot leak: access lines without queries or headers, exceptions without text,
no credentials from service URLs, and no dependency's DEBUG trace of RPC traffic.

aiohttp's server logger attaches the exception (and its message) when it refuses a malformed
request, and such a message can quote a header line. The filter here keeps only the class.
web3, urllib3, requests and aiohttp's client log every RPC request at DEBUG with its full URL
(a hosted RPC URL carries its API key) and payload: those loggers are held at WARNING whatever
the gateway's level, and every line that still reaches the handler is scrubbed of the
credential parts of ``chain_rpc_url`` and ``facilitator_url`` (:mod:`paygate.redact`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from paygate.redact import scrub, secret_parts

#: Dependencies whose DEBUG/INFO lines carry RPC URLs, request bodies or answers.
QUIET_LOGGERS = ("web3", "urllib3", "requests", "aiohttp.client", "eth_account", "x402")


class SafeAccessLogger(AbstractAccessLogger):
    """One line per request: method, path without the query, status, seconds."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.3fs", request.method, request.path[:200], response.status, time
        )


class ExceptionTextFilter(logging.Filter):
    """Replaces an attached exception by its class name (no message, no traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg = f"{record.getMessage()} ({record.exc_info[0].__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


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


def quiet_dependencies() -> None:
    """Hold the dependencies' RPC tracing at WARNING, whatever the root level."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def install_safe_logging(
    level: int | str = logging.INFO, *, secret_urls: Iterable[str | None] = ()
) -> None:
    """Configure root logging once for ``paygate serve``: the exception filter, the quiet
    dependencies, and the credential parts of ``secret_urls`` masked in every line."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One access line per request is on the hot path: skip the record fields the format never
    # shows (the logging HOWTO's "Optimization" list) — thread, process, and the caller's frame.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "paygate"):
        logging.getLogger(name).addFilter(ExceptionTextFilter())
    quiet_dependencies()
    secrets = SecretTextFilter(secret_parts(secret_urls))
    for handler in logging.getLogger().handlers:
        handler.addFilter(secrets)
