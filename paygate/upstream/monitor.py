"""The health monitor: probe the model server, drive the breaker, restart a crashed container.

Every ``interval`` seconds (every second at most while the server is down) it asks docker
whether the containers still run (container mode) and probes the health route. A crash trips
the breaker at once and restarts the containers after a backoff that doubles per attempt up
to ``backoff_max`` and resets once the server is ready again; probe failures count toward the
breaker's threshold; the first good probe closes it. The loop runs until it is cancelled (the
gateway's cleanup); each iteration is bounded by the probe timeout and docker's API timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from paygate.errors import PaygateError
from paygate.upstream.breaker import CircuitBreaker
from paygate.upstream.readiness import ProbeResult

State = Literal["starting", "ready", "down", "restarting", "stopped"]
FIRST_BACKOFF = 0.5  # seconds before the first restart attempt
DOWN_PROBE_INTERVAL = 1.0
log = logging.getLogger("paygate.upstream")


@dataclass(slots=True, kw_only=True, eq=False)
class HealthMonitor:
    """The upstream's state machine; :meth:`run` is the background task.

    ``check`` probes the health route; ``crashed`` asks docker whether the containers still
    run and ``recover`` restarts them (container mode only)."""

    check: Callable[[], Awaitable[ProbeResult]]
    breaker: CircuitBreaker
    interval: float
    backoff_max: float
    crashed: Callable[[], Awaitable[bool]] | None = None
    recover: Callable[[], Awaitable[str]] | None = None
    state: State = field(default="starting", init=False)
    since: float = field(default_factory=time.time, init=False)
    restarts: int = field(default=0, init=False)
    last_probe: str = field(default="not probed", init=False)
    _attempt: int = field(default=0, init=False)

    def _set(self, state: State) -> None:
        if state != self.state:
            log.info("model server %s -> %s", self.state, state)
            self.state = state
            self.since = time.time()

    def mark_ready(self) -> None:
        """Startup saw the server ready (the first probe of :meth:`run` follows one interval on)."""
        self.breaker.record_success()
        self.last_probe = "ok"
        self._set("ready")

    async def run(self) -> None:
        """Probe and repair until cancelled (startup has just probed: wait first)."""
        while True:
            ready = self.current_state() == "ready"
            await asyncio.sleep(self.interval if ready else min(self.interval, DOWN_PROBE_INTERVAL))
            await self.step()

    def mark_down(self, detail: str) -> None:
        """Startup found the server not ready: one failure toward the breaker."""
        self.breaker.record_failure(detail)
        self.last_probe = detail
        self._set("down")

    async def step(self) -> None:
        """One round: crash check (container mode), then the health probe."""
        try:
            if self.crashed is not None and await self.crashed():
                self.breaker.trip("container not running")
                await self._restart()
                return
        except PaygateError as exc:
            # docker itself is unreachable or refused: the server's state is unknown
            self.breaker.trip(exc.code)
            self.last_probe = exc.code
            self._set("down")
            return
        result = await self.check()
        self.last_probe = "ok" if result.ok else result.detail
        if result.ok:
            self.breaker.record_success()
            self._attempt = 0
            self._set("ready")
            return
        self.breaker.record_failure(result.detail)
        if self.breaker.is_open:
            self._set("down")

    async def _restart(self) -> None:
        assert self.recover is not None
        delay = min(FIRST_BACKOFF * 2**self._attempt, self.backoff_max)
        self._attempt += 1
        self._set("restarting")
        await asyncio.sleep(delay)
        try:
            action = await self.recover()
        except PaygateError as exc:
            log.error("model server restart failed (attempt %d): %s", self._attempt, exc.code)
            self.last_probe = exc.code
            self._set("down")
            return
        self.restarts += 1
        log.warning("model server container %s after a crash (attempt %d)", action, self._attempt)

    def current_state(self) -> State:
        """The state, counting a breaker that requests opened since the last probe as down."""
        if self.state == "ready" and self.breaker.is_open:
            return "down"
        return self.state

    def snapshot(self) -> dict[str, Any]:
        """State for ``/health/ready`` (no URLs, ids or keys: that endpoint is public)."""
        return {
            "state": self.current_state(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "restarts": self.restarts,
            "last_probe": self.last_probe,
            "breaker": self.breaker.snapshot(),
        }
