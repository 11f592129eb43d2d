"""Admission limits: slots (no queue: past a cap, answer at once) and the bounded body read.

The body is never truncated: a declared Content-Length over the limit is refused before a byte
is read, and a chunked body is read only until it passes the limit. A body must start arriving
within ``first_byte`` seconds and be complete within ``total``: a connection that trickles its
body is cut by those deadlines instead of holding a slot.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from paygate.server.errors import BodyTimeout, BodyTooLarge, GatewayError, Overloaded

_READ_SIZE = 64 * 1024


class Slots:
    """A non-queueing cap: past ``limit`` holders, ``slot()`` raises at once.

    Queueing would hide saturation and hold sockets; a quick refusal with Retry-After lets the
    caller (or a load balancer) go elsewhere.
    """

    def __init__(self, limit: int, refusal: Callable[[], GatewayError]) -> None:
        self._limit = limit
        self._refusal = refusal
        self._in_use = 0
        # One context manager per cap (its state is the count): taken several times per
        # request, a generator-based one cost more than the counting it does.
        self._slot = _Slot(self)

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def limit(self) -> int:
        return self._limit

    def slot(self) -> _Slot:
        """Hold one slot for the duration of the block, or raise the refusal."""
        return self._slot

    def _take(self) -> None:
        if self._in_use >= self._limit:
            raise self._refusal()
        self._in_use += 1

    def _give(self) -> None:
        self._in_use -= 1


class _Slot:
    """``with slots.slot():`` — a slot held for the block."""

    __slots__ = ("_slots",)

    def __init__(self, slots: Slots) -> None:
        self._slots = slots

    def __enter__(self) -> None:
        self._slots._take()

    def __exit__(self, *exc: object) -> None:
        self._slots._give()


class PerAddressSlots:
    """Slots counted per client address, so one address cannot take another's share.

    Memory is bounded by the connections in flight: an address leaves the table with its last
    slot.
    """

    def __init__(self, limit: int, refusal: Callable[[], GatewayError]) -> None:
        self._limit = limit
        self._refusal = refusal
        self._held: Counter[str] = Counter()

    def slot(self, address: str) -> _AddressSlot:
        return _AddressSlot(self, address)

    def _take(self, address: str) -> None:
        if self._held[address] >= self._limit:
            raise self._refusal()
        self._held[address] += 1

    def _give(self, address: str) -> None:
        self._held[address] -= 1
        if self._held[address] <= 0:
            del self._held[address]


class _AddressSlot:
    """``with per_address.slot(address):`` — one of ``address``'s slots held for the block."""

    __slots__ = ("_address", "_slots")

    def __init__(self, slots: PerAddressSlots, address: str) -> None:
        self._slots = slots
        self._address = address

    def __enter__(self) -> None:
        self._slots._take(self._address)

    def __exit__(self, *exc: object) -> None:
        self._slots._give(self._address)


class ConcurrencyLimiter(Slots):
    """The cap on in-flight upstream requests (503 + Retry-After), taken after admission."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(limit, lambda: Overloaded(retry_after=retry_after))

    @property
    def in_flight(self) -> int:
        return self.in_use


async def read_body(
    request: web.Request, *, limit: int, timeout: float, first_byte: float | None = None
) -> bytes:
    """The request body, at most ``limit`` bytes: its first bytes within ``first_byte``
    seconds, all of it within ``timeout``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    if not request.body_exists:
        return b""
    content = request.content
    if content.is_eof() and content.exception() is None:
        # A small body usually arrives with the headers: all here, nothing to wait for.
        whole = content.read_nowait()
        if len(whole) > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        return whole
    body = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout_at(
            min(deadline, loop.time() + first_byte) if first_byte is not None else deadline
        ) as scope:
            while True:
                chunk = await request.content.read(_READ_SIZE)
                if not chunk:
                    break
                if not body:
                    scope.reschedule(deadline)  # the first bytes came: the total clock rules
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    except TimeoutError:
        raise BodyTimeout from None
    return bytes(body)
