"""Logging that cannot leak: access lines without queries or headers, exceptions without text.

aiohttp's server logger attaches the exception (and its message) when it refuses a malformed
request, and such a message can quote a header line. The filter here keeps only the class.
"""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse


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


def install_safe_logging(level: int = logging.INFO) -> None:
    """Configure root logging once for ``paygate serve`` with the exception filter in place."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "paygate"):
        logging.getLogger(name).addFilter(ExceptionTextFilter())
