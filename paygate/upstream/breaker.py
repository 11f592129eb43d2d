"""A circuit breaker in front of the model server.

Closed: requests go through. After ``threshold`` consecutive failures (connections refused by
the model server, or failed health probes), or at once when the container is known to be down,
it opens: every request is answered 503 with ``Retry-After`` without trying to connect, so
callers are not held for a connect timeout and a crashed server is not hammered. The health
monitor keeps probing; the first successful probe closes it again. There is no half-open trial
with a caller's request: a paid request is never the one used to find out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    """Consecutive-failure breaker; ``retry_after`` seconds are what a refused caller is told."""

    threshold: int = 3
    retry_after: int = 1
    failures: int = 0
    opened_at: float | None = None
    reason: str = ""
    trips: int = field(default=0)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allows(self) -> bool:
        """True if a request may be sent to the model server now."""
        return self.opened_at is None

    def record_success(self) -> None:
        """A probe or an exchange reached the model server: close."""
        self.failures = 0
        self.opened_at = None
        self.reason = ""

    def record_failure(self, reason: str) -> None:
        """One failure; opens after ``threshold`` in a row. ``reason`` is a fixed short text."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.trip(reason)

    def trip(self, reason: str) -> None:
        """Open now (the container exited, the monitor saw the server go)."""
        if self.opened_at is None:
            self.opened_at = time.monotonic()
            self.trips += 1
        self.reason = reason

    def snapshot(self) -> dict[str, object]:
        """The state for ``/health/ready`` and ``paygate upstream status``."""
        return {
            "state": "open" if self.is_open else "closed",
            "consecutive_failures": self.failures,
            "reason": self.reason or None,
            "trips": self.trips,
        }
