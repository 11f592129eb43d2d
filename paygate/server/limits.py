"""Admission limits: concurrent requests (503 + Retry-After) and the bounded body read (413).

The body is never truncated: a declared Content-Length over the limit is refused before a byte
is read, and a chunked body is read only until it passes the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aiohttp import web

from paygate.server.errors import BodyTimeout, BodyTooLarge, Overloaded

_READ_SIZE = 64 * 1024


class ConcurrencyLimiter:
    """A non-queueing cap on in-flight upstream requests: past it, answer 503 at once.

    Queueing would hide saturation and hold sockets; a quick 503 with Retry-After lets the
    caller (or a load balancer) go elsewhere.
    """

    def __init__(self, limit: int, retry_after: int) -> None:
        self._limit = limit
        self._retry_after = retry_after
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def limit(self) -> int:
        return self._limit

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of the block, or raise :class:`Overloaded`."""
        if self._in_flight >= self._limit:
            raise Overloaded(headers={"Retry-After": str(self._retry_after)})
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1


async def read_body(request: web.Request, *, limit: int, timeout: float) -> bytes:
    """The request body, at most ``limit`` bytes, within ``timeout`` seconds."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.read(_READ_SIZE)
                if not chunk:
                    break
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    except TimeoutError:
        raise BodyTimeout from None
    return bytes(body)
