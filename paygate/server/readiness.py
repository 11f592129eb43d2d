"""What ``GET /health/ready`` answers from: the key and model-server checks, run at most once
per interval whoever asks and however often.

The endpoint is free and unauthenticated; each key check is a real ECDH in the TPM/HSM and an
unmonitored model server's probe carries its API key. So a caller never triggers a check of
its own: the first request after the interval runs one check, every request meanwhile (and
every concurrent one) shares its result. A monitored model server is not probed here at all:
its health monitor already does, on its own schedule, and its state is the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Checked:
    """One round of checks; ``at`` is when it finished (monotonic seconds)."""

    key_ok: bool
    upstream_ok: bool
    at: float


@dataclass(slots=True, kw_only=True, eq=False)
class ReadinessChecks:
    """Single-flight, interval-bounded readiness checks.

    ``check_upstream`` is None when the health monitor's state is the upstream's answer.
    """

    check_key: Callable[[], Awaitable[bool]]
    check_upstream: Callable[[], Awaitable[bool]] | None
    interval: float
    clock: Callable[[], float] = time.monotonic
    rounds: int = field(default=0, init=False)  # checks run so far (for the operator and tests)
    _last: Checked | None = field(default=None, init=False)
    _running: asyncio.Future[Checked] | None = field(default=None, init=False)

    async def current(self) -> Checked:
        """The last round's result while it is younger than the interval, else a fresh one
        (shared with every caller waiting for it)."""
        last = self._last
        if last is not None and self.clock() - last.at < self.interval:
            return last
        if self._running is None:
            self._running = asyncio.ensure_future(self._round())
        # Shielded: a caller that goes away does not cancel the round the others wait for.
        return await asyncio.shield(self._running)

    async def _round(self) -> Checked:
        try:
            self.rounds += 1
            if self.check_upstream is None:
                key_ok, upstream_ok = await self.check_key(), True
            else:
                key_ok, upstream_ok = await asyncio.gather(self.check_key(), self.check_upstream())
            self._last = Checked(key_ok, upstream_ok, self.clock())
            return self._last
        finally:
            self._running = None
