"""The gateway's event loop: uvloop by default where it is installed, else asyncio's own.

Nothing in the gateway depends on which: both run the same aiohttp code. uvloop's transports
and timers are written against libuv in C, which takes about a sixth off the CPU spent per
forwarded request (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

log = logging.getLogger("paygate.server")

EventLoopName = Literal["uvloop", "asyncio"]


def new_event_loop(name: EventLoopName) -> asyncio.AbstractEventLoop:
    """A fresh loop of the kind asked for; asyncio's (with a warning) if uvloop is missing."""
    if name == "uvloop":
        try:
            import uvloop  # optional: not on every platform
        except ImportError:
            log.warning("event_loop=uvloop but uvloop is not installed: using asyncio's loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
